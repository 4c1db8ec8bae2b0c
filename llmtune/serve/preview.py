"""preview: base vs tuned answers to held-out prompts, scored by exact match (after `run`); on
prompt data (grpo), also by the recipe's rewards.

Reads the adapter and the prepared validation set; the result is cached in `<run>/preview.json`
against the adapter manifest, so a `run` with nothing to do prints it again in no time.
"""

from __future__ import annotations

import json
from pathlib import Path

from datasets import load_from_disk

from llmtune import model_sources, models
from llmtune.console import console
from llmtune.data.tools import answer_of
from llmtune.manifest import manifest_sha256, require_stage, stage_dir, upstream_dir
from llmtune.recipe import Recipe
from llmtune.serve.inference import (
    adapter_on_base,
    generate,
    open_images,
    prompt_and_answer,
    shown_text,
    trained_precision,
)
from llmtune.serve.serving import as_prompt, report_empty, serving_defaults

PREVIEW_FILE = "preview.json"


def preview(recipe: Recipe, run: Path) -> dict | None:
    cfg = recipe.preview
    if cfg.count == 0:
        return None
    adapter_dir = stage_dir(run, "train")
    adapter_manifest = require_stage(adapter_dir, "train", f"llmtune train {run / 'recipe.yaml'}")
    if models.head_of(adapter_dir) == "score":
        console.print("preview: a reward model writes no answers; llmtune eval scores it on the held-out pairs")
        return None
    key = {"adapter_manifest_sha256": manifest_sha256(adapter_dir), "preview": cfg.model_dump()}
    cached = _read_json(run / PREVIEW_FILE)
    if cached is not None and cached.get("key") == key:
        return cached

    prepared = upstream_dir(adapter_dir, adapter_manifest, "prepared")
    held_out = load_from_disk(str(prepared / "validation"))
    prompt_rows = "extra" in held_out.column_names  # grpo: prompts, their reference answers, the rewards
    if prompt_rows:
        held_out = held_out.select(range(min(cfg.count, len(held_out))))
        pairs = [(json.loads(s)["prompt"], answer) for s, answer in zip(held_out["sample"], held_out["answer"])]
    else:
        read = [json.loads(s) for s in held_out["sample"] if s]  # "": a row's later example
        kept = [(pair, sample) for sample in read if (pair := prompt_and_answer(sample)) is not None][: cfg.count]
        pairs, samples = [pair for pair, _ in kept], [sample for _, sample in kept]
    if not pairs:
        console.print("preview: no held-out prompts (empty validation set, or text data)")
        return None
    prompts, references = zip(*pairs)

    ref = model_sources.resolve_section(adapter_manifest["inputs"]["base_model"])
    tokenizer = models.load_tokenizer(adapter_dir)  # with the template trained with
    model = adapter_on_base(adapter_dir, ref, trained_precision(adapter_dir))
    serving = serving_defaults(adapter_dir)
    served = [as_prompt(prompt, serving) for prompt in prompts]
    # image chats: the images each prompt shows, expanded by the model's processor
    processor = models.load_processor(adapter_dir) if models.is_vision_language(ref) else None
    images = {"processor": processor, "images": [open_images(s, p) for s, p in zip(samples, prompts)]} \
        if processor is not None else {}
    console.print(f"preview: generating answers to {len(prompts)} held-out prompts, base and tuned")
    tuned_answers = generate(model, tokenizer, served, cfg.max_new_tokens, special_text=serving.special_text,
                             **images)
    report_empty(tuned_answers, "preview (tuned)")
    tuned = [g.text for g in tuned_answers]
    with model.disable_adapter():
        untuned = [g.text for g in generate(model, tokenizer, served, cfg.max_new_tokens,
                                            special_text=serving.special_text, **images)]

    examples = [
        {
            "prompt": shown_text(prompt),
            "reference": reference,
            "base": b,
            "tuned": t,
            "base_exact": reference is not None and answer_of(b)[1].strip() == str(reference).strip(),
            "tuned_exact": reference is not None and answer_of(t)[1].strip() == str(reference).strip(),
        }
        for prompt, reference, b, t in zip(prompts, references, untuned, tuned)
    ]
    result = {
        "key": key,
        "examples": examples,
        "base_exact_match": sum(e["base_exact"] for e in examples),
        "tuned_exact_match": sum(e["tuned_exact"] for e in examples),
        "count": len(examples),
    }
    if prompt_rows and recipe.rewards:
        result["rewards"] = _rewards(recipe, held_out, tokenizer, examples)
    tmp = run / (PREVIEW_FILE + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.rename(run / PREVIEW_FILE)
    return result


def _rewards(recipe: Recipe, held_out, tokenizer, examples: list[dict]) -> dict:
    """Prompt data (grpo): the recipe's rewards on the base's and the tuned model's answers, each
    example's and the means {"base": {reward: mean}, "tuned": {...}}, as eval computes them."""
    from llmtune.rewards import build

    rows = [{"prompt": row["prompt"], "answer": row["answer"], "extra": row["extra"], "where": row.get("where", "?")}
            for row in held_out]
    means, functions = {}, build(recipe.rewards)
    for label in ("base", "tuned"):
        texts = [example[label] for example in examples]
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
        scores = {function.name: function.score(texts, ids, rows) for function in functions}
        for i, example in enumerate(examples):
            example[f"{label}_rewards"] = {name: values[i] for name, values in scores.items()}
        means[label] = {name: round(sum(values) / len(values), 4) for name, values in scores.items()}
    return means


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
