#!/usr/bin/env python3
"""Memory notes for the library recipes, from `llmtune plan`'s estimate on each model's config.

    python scripts/recipe_memory.py           # print the table
    python scripts/recipe_memory.py --write   # also update each recipe's description line

The estimate is `llmtune plan`'s (llmtune/stages/plan.py: weights, adapter, gradients, AdamW
state, activations, logits, runtime) for a CUDA GPU with bf16 (precision: auto there), at the
recipe's micro-batch (batch_size x max_seq_len tokens, all padded to max_seq_len). The model is
built on the meta device from the config recorded in llmtune/architectures.py: nothing is
downloaded. `tests/test_recipes.py` fails when a description's figure is stale.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

LIBRARY = Path(__file__).resolve().parent.parent / "recipes" / "library"
GPU_SIZES = (8, 12, 16, 24, 40, 48, 80)  # GB of common cards
NOTE = re.compile(r" Memory \(llmtune plan[^\n]*$")


def note_for(recipe) -> str | None:
    from transformers import AutoConfig

    from llmtune.architectures import KNOWN_MODELS
    from llmtune.stages.plan import estimate_memory, sequence_length

    known = KNOWN_MODELS.get(recipe.model.path)
    if known is None:
        return None
    values = dict(known.config)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    total = estimate_memory(config, recipe, "bf16")["memory_bytes"]["total"] / 1e9
    fits = next((size for size in GPU_SIZES if total <= size * 0.9), None)
    article = "an" if fits in (8, 80) else "a"
    where = f"fits {article} {fits} GB GPU" if fits else "more than one 80 GB GPU holds"
    # no ": " in the note: the description is a plain YAML scalar
    # a preference pair is two sequences (plan counts both): say pairs, not sequences
    unit = {"sft": "", "kto": " answers", "grpo": " completions"}.get(recipe.train.objective, " pairs")
    return (f" Memory (llmtune plan, bf16, {recipe.train.batch_size}{unit} x {sequence_length(recipe)} "
            f"tokens) ~{total:.1f} GB peak, {where}.")


def main() -> None:
    from llmtune.models import quiet_libraries
    from llmtune.recipe import load_recipe

    quiet_libraries()
    write = "--write" in sys.argv
    for path in sorted(LIBRARY.glob("*.yaml")):
        recipe = load_recipe(path)
        note = note_for(recipe)
        if note is None:
            continue
        print(f"{path.name:32s}{note}")
        if write:
            text = path.read_text()
            line = next(line for line in text.splitlines() if line.startswith("description: "))
            path.write_text(text.replace(line, NOTE.sub("", line) + note))


if __name__ == "__main__":
    main()
