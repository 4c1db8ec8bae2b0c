#!/usr/bin/env python3
"""prepare at scale: wall time, tokens/s and peak RSS of `llmtune prepare` as rows grow.

    python scripts/bench_prepare_scale.py [--rows 50000 200000 1000000] [--data GSM8K train.jsonl]
        [--work DIR] [--set data.dedup=false ...] [--packing-fill]

For each count, writes that many GSM8K-shaped chat rows (GSM8K's questions and answers, each copy
with its numbers shifted so that no two rows are duplicates and token counts stay GSM8K's),
then runs `llmtune prepare` on them as a process of its own (peak RSS its own, as
scripts/benchutil.py measures it) with the embedded model's tokenizer. Peak memory that grows
with the row count is what issue "Data at scale" is about; run it before and after a change.

With --packing-fill, instead: how full packed sequences are when prepare packs a bucket of
PACK_BUCKET_TOKENS tokens at a time, for several bucket sizes, against one bucket holding all of
the data (GSM8K's conversations, max_seq_len 2048), in this process.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import gsm8k_train, measure  # noqa: E402


def write_rows(source: Path, count: int, target: Path) -> None:
    """`count` chat rows cycling through GSM8K, the n-th copy's numbers shifted by n."""
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    with open(target, "w", encoding="utf-8") as handle:
        for index in range(count):
            row, copy = rows[index % len(rows)], index // len(rows)

            def shift(text: str) -> str:
                return re.sub(r"\d+", lambda m: str(int(m.group()) + copy), text) if copy else text

            handle.write(json.dumps({"messages": [
                {"role": "user", "content": shift(row["question"])},
                {"role": "assistant", "content": shift(row["answer"])}]}) + "\n")


def packing_fill(source: Path) -> None:
    """Packing's fill and sequences for buckets of several sizes (prepare run in this process)."""
    from llmtune.recipe import load_recipe
    from llmtune.stages.prepare import prepare
    from llmtune.stages.prepare import split as prepared_split

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "chat.jsonl"
        write_rows(source, sum(1 for line in source.read_text().splitlines() if line.strip()), data)
        recipe_file = Path(tmp) / "recipe.yaml"
        recipe_file.write_text(yaml.safe_dump({
            "name": "fill", "model": {"path": "embedded:smollm2-135m-instruct"},
            "data": {"train": [{"path": str(data), "format": "chat"}], "max_seq_len": 2048,
                     "packing": True, "validation": {"fraction": 0.0}}}))
        recipe = load_recipe(recipe_file)
        print("| bucket tokens | buckets | sequences | fill |")
        print("|---|---|---|---|")
        for bucket in (10**9, 1_000_000, 250_000, 50_000):
            prepared_split.PACK_BUCKET_TOKENS = bucket
            prepare(recipe, Path(tmp) / f"run-{bucket}", force=True)
            stats = json.loads((Path(tmp) / f"run-{bucket}" / "prepared" / "stats.json").read_text())
            packing = stats["packing"]
            label = "all (one bucket)" if bucket == 10**9 else f"{bucket:,}"
            print(f"| {label} | {packing['buckets']} | {packing['sequences']:,} | "
                  f"{100 * packing['efficiency']:.2f}% |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[50_000, 200_000])
    parser.add_argument("--data", help="GSM8K train.jsonl (default: the slice in tests/data/gsm8k)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/llmtune-bench-prepare-scale"))
    parser.add_argument("--set", nargs="*", default=[], help="recipe overrides for prepare, e.g. data.dedup=false")
    parser.add_argument("--packing-fill", action="store_true", help="measure packing's fill per bucket size")
    args = parser.parse_args()
    source = gsm8k_train(args.data)
    if args.packing_fill:
        packing_fill(source)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    print("| rows | train tokens | wall time | tokens/s | peak RSS |")
    print("|---|---|---|---|---|")
    for count in args.rows:
        # the rows written depend on the source file: a folder per source and count
        folder = args.work / f"rows-{count}-{hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:8]}"
        folder.mkdir(exist_ok=True)
        data = folder / "chat.jsonl"
        if not data.is_file():
            write_rows(source, count, data)
        recipe = {"name": f"scale-{count}", "output_dir": str(folder / "runs"),
                  "model": {"path": "embedded:smollm2-135m-instruct"},
                  "data": {"train": [{"path": str(data), "format": "chat"}], "max_seq_len": 1024}}
        (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        overrides = [part for item in args.set for part in ("--set", item)]
        done = measure([sys.executable, "-m", "llmtune", "prepare", str(folder / "recipe.yaml"), "--force",
                        *overrides], folder)
        manifest = json.loads((folder / "runs" / f"scale-{count}" / "prepared" / "manifest.json").read_text())
        tokens = manifest["summary"]["train_tokens"]
        print(f"| {count:,} | {tokens:,} | {done.seconds:.1f} s | {tokens / done.seconds:,.0f} | "
              f"{done.peak_rss_gb:.2f} GB |", flush=True)


if __name__ == "__main__":
    main()
