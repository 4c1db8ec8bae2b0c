#!/usr/bin/env bash
# Set up (if needed) and run the test suite. Extra arguments go to pytest.
# Two workers (pytest-xdist), one file per worker at a time (--dist loadfile keeps a file's
# module fixtures and order), one torch thread each (tests/conftest.py): the suite spends much
# of its time starting CLI subprocesses, which overlap. LLMTUNE_TEST_WORKERS=0 runs it serially.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
workers=${LLMTUNE_TEST_WORKERS:-2}
if [ "$workers" = "0" ]; then
    exec .venv/bin/python -m pytest "$@"
fi
exec .venv/bin/python -m pytest -n "$workers" --dist loadfile "$@"
