#!/usr/bin/env python3
"""Where `prepare`'s time goes: wall time of each step on GSM8K, best run of N.

    python scripts/prepare_phases.py [--format chat|completion] [--repeat 6]

Wraps prepare's steps (tokenizer load, read, dedup, render, encode, overlong limit, save,
stats, manifest) in timers for this process only, runs the whole stage N times, and prints
the steps of the fastest run. "other" is the stage's time outside the timed steps. For
finding the next thing to speed up; scripts/bench_prepare.py gives the ratio the issue asks for.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEPS = ["_read", "dedup", "render_samples", "encode", "_limit", "_save_examples", "split_stats",
         "finish_stage", "_content_hashes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "gsm8k" / "train.jsonl"))
    parser.add_argument("--format", choices=["completion", "chat"], default="chat")
    parser.add_argument("--repeat", type=int, default=6)
    args = parser.parse_args()

    from llmtune import models
    from llmtune.recipe import load_recipe
    import llmtune.stages.prepare  # noqa: F401  (the module; its name is shadowed by the function)

    stage = sys.modules["llmtune.stages.prepare"]
    models.quiet_libraries()
    times: dict[str, float] = {}

    def timed(name, function):
        @functools.wraps(function)
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                times[name] = times.get(name, 0.0) + time.perf_counter() - start
        return wrapper

    for name in STEPS:
        setattr(stage, name, timed(name, getattr(stage, name)))
    models.load_tokenizer = timed("load_tokenizer", models.load_tokenizer)

    rows = [json.loads(line) for line in open(args.data, encoding="utf-8") if line.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        data_file = Path(tmp) / "data.jsonl"
        if args.format == "chat":
            rows = [{"messages": [{"role": "user", "content": r["question"]},
                                  {"role": "assistant", "content": r["answer"]}]} for r in rows]
            source = {"path": str(data_file), "format": "chat"}
        else:
            source = {"path": str(data_file), "format": "completion",
                      "fields": {"prompt": "question", "completion": "answer"}}
        data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (Path(tmp) / "bench.yaml").write_text(json.dumps(
            {"name": "bench", "data": {"train": [source], "max_seq_len": 2048}}))
        recipe = load_recipe(Path(tmp) / "bench.yaml")
        best: tuple[float, dict] | None = None
        for _ in range(args.repeat):
            times.clear()
            start = time.perf_counter()
            stage.prepare(recipe, Path(tmp) / "run", force=True)
            elapsed = time.perf_counter() - start
            if best is None or elapsed < best[0]:
                best = (elapsed, dict(times))

    total, steps = best
    print(f"prepare, {args.format}, {len(rows)} rows: {total:.3f} s (best of {args.repeat})")
    for name, seconds in sorted(steps.items(), key=lambda item: -item[1]):
        print(f"  {name.strip('_'):16s} {seconds:.3f} s  {100 * seconds / total:4.1f}%")
    other = total - sum(steps.values())
    print(f"  {'other':16s} {other:.3f} s  {100 * other / total:4.1f}%")


if __name__ == "__main__":
    main()
