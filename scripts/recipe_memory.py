#!/usr/bin/env python3
"""Memory notes for the library recipes, from `llmtune plan`'s estimate of every stage.

    python scripts/recipe_memory.py           # print the table
    python scripts/recipe_memory.py --write   # also update each recipe's description line

The estimate is `llmtune plan --device cuda --gpu-memory N`'s (llmtune/stages/plan.py and
memory.py) for a CUDA GPU with bf16 (precision: auto there), at the recipe's micro-batch
(batch_size x max_seq_len tokens, all padded to max_seq_len), for every stage: train, merge,
eval and the GGUF check. A recipe fits the smallest common card whose 90% holds its largest
stage, where merge, the merged model's eval and the GGUF check run on the CPU when their model
does not fit that card (llmtune does so itself; the note says which). The model is built on the
meta device from the config recorded in llmtune/architectures.py: nothing is downloaded.
`tests/test_recipes.py` fails when a description's figure is stale.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

LIBRARY = Path(__file__).resolve().parent.parent / "recipes" / "library"
GPU_SIZES = (8, 12, 16, 24, 40, 48, 80)  # GB of common cards
NOTE = re.compile(r" Memory \(llmtune plan[^\n]*$")


def stage_peaks(recipe, gpu_sizes=GPU_SIZES) -> dict:
    """plan's per-stage peaks (GB) and the stages on the CPU, for a GPU of each size (GB)."""
    from llmtune.stages import memory, plan

    config = plan.model_config(recipe)
    counts = plan._model_counts(config, recipe)
    train = memory.train_memory(config, recipe, "bf16", counts, "cuda")
    by_size = {}
    for size in gpu_sizes:
        stages = memory.stage_peaks(config, recipe, "bf16", counts, train, "cuda", size * 10**9)
        by_size[size] = {"peaks": {stage: value / 1e9 for stage, value in stages["peaks"].items()},
                         "on_cpu": stages["on_cpu"]}
    return by_size


def note_for(recipe) -> str | None:
    from llmtune.architectures import KNOWN_MODELS
    from llmtune.stages.memory import sequence_length

    if recipe.model.path not in KNOWN_MODELS:
        return None
    by_size = stage_peaks(recipe)
    fits = next((size for size, stages in by_size.items() if max(stages["peaks"].values()) <= size * 0.9), None)
    stages = by_size[fits or GPU_SIZES[-1]]
    train = stages["peaks"]["train"]
    largest = max(stages["peaks"], key=stages["peaks"].get)
    article = "an" if fits in (8, 80) else "a"
    where = f"fits {article} {fits} GB GPU" if fits else "more than one 80 GB GPU holds"
    if fits and stages["on_cpu"]:
        where += f" ({', '.join(stages['on_cpu'])} on the CPU there)"
    peak = "" if largest == "train" else f", {largest} {stages['peaks'][largest]:.1f} GB"
    # no ": " in the note: the description is a plain YAML scalar
    # a preference pair is two sequences (plan counts both): say pairs, not sequences
    unit = {"sft": "", "kto": " answers", "grpo": " completions"}.get(recipe.train.objective, " pairs")
    return (f" Memory (llmtune plan, bf16, {recipe.train.batch_size}{unit} x {sequence_length(recipe)} "
            f"tokens) ~{train:.1f} GB peak in training{peak}, {where}.")


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
