#!/usr/bin/env python3
"""Write recipes/data/grpo-quickstart.jsonl: small arithmetic prompts with their answers, for the
GRPO quickstart (format: prompt). The system prompt asks for the equation and its result on one
line ("7 + 5 = 12"); the rewards check that format and the number. Deterministic (seeded)."""

from __future__ import annotations

import json
import random
from pathlib import Path

SYSTEM = "Reply with the equation and its result on one line, like: 7 + 5 = 12. Nothing else."


def make_row(a: int, op: str, b: int) -> dict:
    value = a + b if op == "+" else a - b
    return {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"What is {a} {op} {b}?"}],
            "answer": str(value)}


def main(count: int = 400, seed: int = 5) -> None:
    problems = [(a, op, b) for a in range(2, 31) for op in "+-" for b in range(2, 31)]
    chosen = random.Random(seed).sample(problems, count)  # no problem twice
    path = Path(__file__).resolve().parent.parent / "recipes" / "data" / "grpo-quickstart.jsonl"
    path.write_text("".join(json.dumps(make_row(*problem)) + "\n" for problem in chosen), encoding="utf-8")
    print(f"wrote {count} prompts to {path}")


if __name__ == "__main__":
    main()
