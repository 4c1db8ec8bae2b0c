#!/usr/bin/env python3
"""Benchmark `prepare` against the raw batched tokenizer on the same text, in one process.

    python scripts/bench_prepare.py [--data PATH/TO/gsm8k/train.jsonl] [--format completion|chat]

Without --data it runs on the 1,000-row GSM8K slice in tests/data/gsm8k (see scripts/benchutil.py).

Both sides tokenise the same rendered text with the embedded SmolLM2 tokenizer. The baseline is
one batched call of the fast tokenizer (no offsets, no labels); prepare is the whole stage
(read, convert, dedup, split, render, tokenise with offsets, mask, save). Prints tokens/s of
each and their ratio (target >= 0.6), and the ratio against the raw call with Python's cyclic
garbage collector paused as prepare pauses it. With --phases, also where the fastest prepare
run's time went, step by step (tokenizer load, read, dedup, render, encode, save, ...).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEPS = ["_limit", "finish_stage", "_content_hashes"]
# reading, converting, dedup and split happen row by row in RowStream._source_rows (a generator,
# timed per row); writing in the split writers
ROW_STEPS = {"llmtune.data.rows": [("RowStream", "_source_rows")],
             "llmtune.stages.prepare.split": [("SplitWriter", "add"), ("SplitWriter", "close"),
                                               ("TrainWriter", "_pack_bucket")]}
# rendering and tokenising happen in llmtune.data.special_text.encode_samples
ENCODE_STEPS = ["render_samples", "encode", "found"]


def time_steps(times: dict[str, float]) -> None:
    """Wrap prepare's steps (and the tokenizer load) in timers adding up into `times`."""
    from llmtune import models

    stage = sys.modules["llmtune.stages.prepare"]  # the module: its name is shadowed by the function

    def timed(name, function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                times[name] = times.get(name, 0.0) + time.perf_counter() - start
        return wrapper

    def timed_generator(name, function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            items = function(*args, **kwargs)
            while True:
                start = time.perf_counter()
                try:
                    item = next(items)
                except StopIteration:
                    return
                finally:
                    times[name] = times.get(name, 0.0) + time.perf_counter() - start
                yield item
        return wrapper

    for name in STEPS:
        setattr(stage, name, timed(name.strip("_"), getattr(stage, name)))
    for module, methods in ROW_STEPS.items():
        for owner, name in methods:
            cls = getattr(sys.modules[module], owner)
            wrap = timed_generator if name == "_source_rows" else timed
            setattr(cls, name, wrap(f"{owner}.{name.strip('_')}", getattr(cls, name)))
    from llmtune.data import special_text

    for name in ENCODE_STEPS:
        setattr(special_text, name, timed(name, getattr(special_text, name)))
    models.load_tokenizer = timed("load_tokenizer", models.load_tokenizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="GSM8K train.jsonl (default: the slice in tests/data/gsm8k)")
    parser.add_argument("--format", choices=["completion", "chat"], default="completion")
    parser.add_argument("--repeat", type=int, default=5, help="best of N runs for each side, interleaved")
    parser.add_argument("--copies", type=int, default=1, help="use the data N times over (more tokens)")
    parser.add_argument("--num-proc", type=int, default=1, help="data.num_proc for prepare")
    parser.add_argument("--phases", action="store_true", help="also time prepare's steps")
    args = parser.parse_args()

    from benchutil import gsm8k_train
    from llmtune import model_sources, models
    from llmtune.data.formats import to_sample
    from llmtune.data.turns import render_sample
    from llmtune.recipe import load_recipe
    from llmtune.stages.prepare import prepare

    args.data = str(gsm8k_train(args.data))
    models.quiet_libraries()
    ref = model_sources.resolve("embedded:smollm2-135m-instruct")
    tokenizer = models.load_tokenizer(ref)
    rows = [json.loads(line) for line in open(args.data, encoding="utf-8") if line.strip()] * args.copies

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
        recipe_file = Path(tmp) / "bench.yaml"
        recipe_file.write_text(json.dumps({
            "name": "bench",
            "data": {"train": [source], "max_seq_len": 2048, "num_proc": args.num_proc},
        }))
        recipe = load_recipe(recipe_file)
        fields = source.get("fields", {})
        times: dict[str, float] = {}
        if args.phases:
            time_steps(times)
        texts = [render_sample(to_sample(r, args.format, fields, separator="\n")[0], tokenizer)[0][0] for r in rows]

        # The sides take turns, so a slow spell of this shared machine hits both alike; best of N.
        raw_best = paused_best = prep_best = float("inf")
        for _ in range(args.repeat):
            start = time.perf_counter()
            encoded = tokenizer(texts, add_special_tokens=False)
            raw_best = min(raw_best, time.perf_counter() - start)
            # prepare pauses Python's cyclic garbage collector; the same call with it paused too
            gc.disable()
            start = time.perf_counter()
            tokenizer(texts, add_special_tokens=False)
            paused_best = min(paused_best, time.perf_counter() - start)
            gc.enable()
            times.clear()
            start = time.perf_counter()
            prepare(recipe, Path(tmp) / "run", force=True)
            elapsed = time.perf_counter() - start
            if elapsed < prep_best:
                prep_best, steps = elapsed, dict(times)
        tokens = sum(len(ids) for ids in encoded["input_ids"])

    raw_rate, prep_rate, paused_rate = tokens / raw_best, tokens / prep_best, tokens / paused_best
    print(f"data: {args.data} ({len(rows)} rows, {tokens:,} tokens, format {args.format}, "
          f"{os.cpu_count()} cores)")
    print(f"raw batched tokenizer: {raw_rate:,.0f} tokens/s ({raw_best:.2f} s)")
    print(f"llmtune prepare:       {prep_rate:,.0f} tokens/s ({prep_best:.2f} s)")
    print(f"ratio prepare/raw:     {prep_rate / raw_rate:.2f}")
    print(f"raw, cyclic GC paused: {paused_rate:,.0f} tokens/s ({paused_best:.2f} s); "
          f"ratio prepare/that: {prep_rate / paused_rate:.2f}")
    if args.phases:
        print(f"where the fastest prepare's {prep_best:.3f} s went:")
        for name, seconds in sorted(steps.items(), key=lambda item: -item[1]):
            print(f"  {name:16s} {seconds:.3f} s  {100 * seconds / prep_best:4.1f}%")
        other = prep_best - sum(steps.values())
        print(f"  {'other':16s} {other:.3f} s  {100 * other / prep_best:4.1f}%")


if __name__ == "__main__":
    main()
