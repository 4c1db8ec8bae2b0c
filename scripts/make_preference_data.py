#!/usr/bin/env python3
"""Write recipes/data/preference-quickstart.jsonl, the preference quickstart's pairs, and
recipes/data/kto-quickstart.jsonl, the same answers marked good or bad (format kto).

The quickstart's extraction task (a sentence about a person -> one line of JSON with name, age,
city and job, in that order), as preference pairs in the usual DPO shape: the chosen answer is
the reference JSON, the rejected answer is what the embedded base model (SmolLM2-135M-Instruct)
itself answers, greedily: prose, other keys, a fact wrong. The base prefers its own answers, so
its preference accuracy on these pairs starts low; DPO teaches it to prefer the reference.
Needs llmtune and the embedded model installed (generating 400 answers takes a few minutes on
2 CPU cores). Deterministic: seeded prompts, greedy fp32 answers.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from make_quickstart_data import make_row

ANSWER_TOKENS = 64


def base_answers(prompts: list[list[dict]]) -> list[str]:
    from llmtune import model_sources, models
    from llmtune.serve.inference import generate

    models.quiet_libraries()
    ref = model_sources.resolve("embedded:smollm2-135m-instruct")
    model, tokenizer = models.load_model(ref, "fp32").eval(), models.load_tokenizer(ref)
    return [g.text for g in generate(model, tokenizer, prompts, ANSWER_TOKENS, batch_size=32)]


def as_kto(pair: dict) -> list[dict]:
    """A pair as two kto rows: the chosen answer good, the rejected one bad."""
    return [{"prompt": pair["prompt"], "completion": pair[name], "label": name == "chosen"}
            for name in ("chosen", "rejected")]


def main(count: int = 400, seed: int = 11) -> None:
    rng = random.Random(seed)
    folder = Path(__file__).resolve().parent.parent / "recipes" / "data"
    rows = [make_row(rng)["messages"] for _ in range(count)]
    answers = base_answers([[system, user] for system, user, _ in rows])
    pairs = [{"prompt": [system, user], "chosen": reference["content"], "rejected": answer}
             for (system, user, reference), answer in zip(rows, answers)
             if answer.strip() and answer.strip() != reference["content"]]
    (folder / "preference-quickstart.jsonl").write_text(
        "".join(json.dumps(pair) + "\n" for pair in pairs), encoding="utf-8")
    (folder / "kto-quickstart.jsonl").write_text(
        "".join(json.dumps(row) + "\n" for pair in pairs for row in as_kto(pair)), encoding="utf-8")
    print(f"wrote {len(pairs)} preference pairs ({count - len(pairs)} prompts the base already answered "
          f"as the reference, or not at all, left out) to {folder / 'preference-quickstart.jsonl'}, "
          f"and {2 * len(pairs)} marked answers to {folder / 'kto-quickstart.jsonl'}")


if __name__ == "__main__":
    main()
