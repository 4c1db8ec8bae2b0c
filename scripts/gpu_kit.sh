#!/usr/bin/env bash
# The wheels a lent GPU machine lacks, for scripts/gpu_check.sh to install there without a
# package registry:
#
#   scripts/gpu_kit.sh OUT_DIR        (run here, where PyPI is reachable; then carry OUT_DIR)
#
# The lent machine (see CONTRIBUTING.md, "GPU checks") has Python 3.12, torch 2.11 (CUDA 13),
# transformers 5.17, accelerate 1.15, peft, torchvision, typer, rich, pyarrow, numpy,
# safetensors, tokenizers and huggingface_hub, and nothing else llmtune imports. This fetches the
# rest as Python 3.12 manylinux wheels, at the versions this checkout's .venv runs (what CI
# tests), without dependencies (the list below is complete for that image: a dry run of
# gpu_check.sh --allow-cpu in a Python 3.12 environment holding the image's packages checks it).
# bitsandbytes ships kernels for every CUDA and ROCm version (43 MB); the kit keeps the CPU and
# CUDA 13 ones. The kit must stay within 48 MiB (64 MiB travel with the working tree).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/gpu_kit.sh OUT_DIR}
LIMIT_MIB=48
PY=${LLMTUNE_PYTHON:-.venv/bin/python}
[ -x "$PY" ] || { echo "gpu_kit: $PY not found; run ./scripts/setup.sh first (the kit takes its versions from it)"; exit 1; }

# what llmtune imports that the image lacks, and their own dependencies the image lacks too
PACKAGES="trl bitsandbytes datasets dill multiprocess xxhash pandas tzdata python-dateutil six
pydantic pydantic-core annotated-types typing-inspection gguf jsonschema jsonschema-specifications
referencing rpds-py attrs"

mkdir -p "$OUT"
specs=$("$PY" - $PACKAGES <<'EOF'
import importlib.metadata, sys
for name in sys.argv[1:]:
    try:
        print(f"{name}=={importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
        print(name)
EOF
)
echo "gpu_kit: fetching Python 3.12 wheels into $OUT"
# shellcheck disable=SC2086
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$OUT" \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    $specs 2>&1 | grep -v "^WARNING: Location" || true
for spec in $specs; do
    name=$(echo "${spec%%==*}" | tr '-' '_')
    ls "$OUT" | grep -iq "^${name}-" || { echo "gpu_kit: no wheel for $spec"; exit 1; }
done

# bitsandbytes: keep the CPU and CUDA 13 kernels (the image's torch is a CUDA 13 build); the
# wheel keeps its name, and its RECORD lists what it holds
"$PY" - "$OUT" "$LIMIT_MIB" <<'EOF'
import base64, hashlib, pathlib, re, sys, zipfile

out, limit = pathlib.Path(sys.argv[1]), int(sys.argv[2])
keep = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")
for wheel in out.glob("bitsandbytes-*.whl"):
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as target:
        names = [n for n in source.namelist() if not n.endswith(".so") or keep.search(n)]
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        lines = []
        for name in names:
            if name != record:
                data = source.read(name)
                target.writestr(source.getinfo(name), data)
                digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                lines.append(f"{name},sha256={digest},{len(data)}")
        target.writestr(record, "\n".join(lines + [f"{record},,"]) + "\n")
    slim.replace(wheel)
    print(f"gpu_kit: {wheel.name}: the CPU and CUDA 13 kernels kept")
total = 0
for wheel in sorted(out.glob("*.whl")):
    total += wheel.stat().st_size
    print(f"  {wheel.name:76s} {wheel.stat().st_size / 2**20:6.1f} MiB")
print(f"gpu_kit: {len(list(out.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB in all (limit {limit} MiB)")
sys.exit(f"gpu_kit: over {limit} MiB" if total > limit * 2**20 else 0)
EOF
