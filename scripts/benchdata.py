"""Where the benchmarks find GSM8K.

The full set is not shipped: pass `--data` pointing at its `train.jsonl`. Without it, the
benchmarks run on the 1,000-row slice the tests ship (tests/data/gsm8k) and say so, so a fresh
clone can run them; figures in docs/benchmarks.md name the data they were measured on.
"""

from __future__ import annotations

import sys
from pathlib import Path

SLICE = Path(__file__).resolve().parent.parent / "tests" / "data" / "gsm8k" / "train.jsonl"
WHERE = ("the whole GSM8K train split (7,473 rows, MIT): https://github.com/openai/grade-school-math "
         "(grade_school_math/data/train.jsonl) or https://huggingface.co/datasets/openai/gsm8k")


def gsm8k_train(path: str | None) -> Path:
    """`--data`, checked; or the shipped slice, with a note on where the whole set is."""
    if path is None:
        print(f"data: the 1,000-row GSM8K slice in {SLICE.relative_to(SLICE.parents[3])}; for {WHERE}, "
              "pass --data PATH", file=sys.stderr)
        return SLICE
    if not Path(path).is_file():
        sys.exit(f"--data {path}: no such file; get {WHERE}")
    return Path(path)
