#!/usr/bin/env bash
# Set up (if needed) and run the quickstart recipe end to end. Extra arguments go to `llmtune run`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/llmtune run recipes/quickstart.yaml "$@"
