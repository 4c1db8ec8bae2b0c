#!/usr/bin/env python3
"""Peak memory of merging an adapter shard by shard (llmtune) vs peft's merge_and_unload.

    python scripts/bench_merge.py RUN_DIR [--max-shard-size 100MB]

RUN_DIR is a finished run (e.g. runs/quickstart after ./scripts/quickstart.sh). Each variant runs
in its own subprocess, so its peak RSS is its own, and writes the merged weights to a temporary
folder: "imports" only imports the libraries (the floor every variant pays), "shard" is
llmtune's shard-by-shard merge, "peft" loads the whole base, merges with merge_and_unload and
saves with save_pretrained at the same shard size. Prints seconds, peak RSS, and the sizes the
shard merge should be near: the largest output shard plus the adapter.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one(variant: str, run: Path, max_shard_size: str) -> dict:
    import torch

    from llmtune import model_sources, models
    from llmtune.manifest import read_manifest
    from llmtune.stages.merge import shards as shard_merge

    adapter = run / "adapter"
    ref = model_sources.resolve_section(read_manifest(adapter)["inputs"]["base_model"])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        if variant == "shard":
            shard_merge.merge_into_shards(ref.local_dir, adapter, Path(out), torch.float32, max_shard_size)
        elif variant == "peft":
            merged = models.load_adapter(models.load_model(ref, "fp32"), adapter).merge_and_unload()
            merged.save_pretrained(out, max_shard_size=max_shard_size)
        largest = max((p.stat().st_size for p in Path(out).glob("*.safetensors")), default=0)
    return {"seconds": round(time.perf_counter() - start, 2), "largest_shard_mb": round(largest / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--max-shard-size", default="100MB")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = one(args.child, args.run, args.max_shard_size) if args.child != "imports" else {}
        result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        print(json.dumps(result))
        return
    results = {}
    for variant in ("imports", "shard", "peft"):
        command = [sys.executable, __file__, str(args.run), "--max-shard-size", args.max_shard_size,
                   "--child", variant]
        if variant == "imports":
            command = [sys.executable, "-c", "import resource, json, torch, peft, transformers, "
                       "llmtune.stages.merge.shards; print(json.dumps({'peak_rss_mb': round("
                       "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))"]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(output.strip().splitlines()[-1])
    adapter_mb = (args.run / "adapter" / "adapter_model.safetensors").stat().st_size / 2**20
    print(f"adapter {adapter_mb:.1f} MB, max shard size {args.max_shard_size}")
    for variant, result in results.items():
        print(f"{variant:8s} " + "  ".join(f"{k}={v}" for k, v in result.items()))
    floor = results["imports"]["peak_rss_mb"]
    shard, peft = results["shard"]["peak_rss_mb"] - floor, results["peft"]["peak_rss_mb"] - floor
    print(f"above the imports floor: shard {shard:.0f} MB, peft {peft:.0f} MB, ratio {shard / peft:.2f}")


if __name__ == "__main__":
    main()
