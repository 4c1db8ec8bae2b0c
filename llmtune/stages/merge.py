"""merge: fold the adapter into the base it was trained on, check logits, save a transformers model.

The base comes from the adapter manifest (never the recipe) and must still have the fingerprint
recorded there. Merged logits are compared with base+adapter logits on a few prepared examples.
"""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import load_from_disk
from transformers import AutoTokenizer

from llmtune import models
from llmtune.console import console
from llmtune.errors import InputError, VerificationError
from llmtune.manifest import (
    Outcome,
    finish_stage,
    is_up_to_date,
    read_manifest,
    require_stage,
    space_warning,
    start_stage,
    upstream_dir,
    upstream_ref,
)
from llmtune.recipe import Recipe, section_sha256
from llmtune.stages.collate import PadCollator
from llmtune.stages.inference import adapter_on_base

# An fp32 merge only reorders floating-point additions: after the quickstart, SmolLM2-135M
# (30 layers) shows 2.3e-4 on logits of magnitude ~20. A wrong merge (a lost alpha/r scale, a
# missed module) shows 1e-1 and more, so this bound separates rounding from mistakes.
LOGIT_TOLERANCE = 5e-3
CHECK_EXAMPLES = 4
CHECK_TOKENS = 128
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def merge(recipe: Recipe, run: Path, force: bool = False) -> Outcome:
    adapter_dir, out_dir = run / "adapter", run / "merged"
    adapter_manifest = require_stage(adapter_dir, "train", f"llmtune train {run / 'recipe.yaml'}")
    base = adapter_manifest["inputs"]["base_model"]
    ref = models.resolve_section(base)
    if ref.fingerprint != base["fingerprint"]:
        raise InputError(
            f"the base model {base['source']} is not the one the adapter was trained on "
            f"(fingerprint {ref.fingerprint[:19]}…, adapter manifest says {base['fingerprint'][:19]}…)",
            hint=f"restore that base, or re-train: llmtune train {run / 'recipe.yaml'} --force",
        )
    inputs = {"adapter": upstream_ref(adapter_dir, out_dir), "base_model": base}
    recipe_sha = section_sha256(recipe, "merge")
    if not force and is_up_to_date(out_dir, "merge", recipe_sha, inputs):
        return Outcome(read_manifest(out_dir), up_to_date=True)

    partial = start_stage(out_dir)
    # The adapter's tokenizer carries the chat template the model was trained with.
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    model = adapter_on_base(adapter_dir, ref)
    batch = _check_batch(adapter_dir, adapter_manifest, tokenizer.pad_token_id or 0)
    with torch.no_grad():
        reference = model(**batch).logits
        merged = model.merge_and_unload()
        max_diff = _max_diff(merged(**batch).logits, reference, batch["attention_mask"])
    console.print(f"merge: max |merged - (base+adapter)| logit difference {max_diff:.2e}")
    if max_diff > LOGIT_TOLERANCE:
        raise VerificationError(
            f"merged logits differ from base+adapter by {max_diff:.2e} (tolerance {LOGIT_TOLERANCE:.0e})",
            hint="the merge is wrong; please report it with the adapter manifest",
        )

    dtype = DTYPES[recipe.merge.dtype]
    cast_diff = None
    if dtype != torch.float32:
        merged = merged.to(dtype)
        with torch.no_grad():
            logits = merged(**batch).logits.float()
        cast_diff = _max_diff(logits, reference, batch["attention_mask"])
        console.print(f"merge: cast to {recipe.merge.dtype}: max logit difference {cast_diff:.2e}")
    needed = sum(p.numel() * p.element_size() for p in merged.parameters())
    warning = space_warning(partial, needed, "the merged model")
    if warning:
        console.print(f"[yellow]warning:[/] {warning}", markup=True)
    merged.generation_config.eos_token_id = models.eos_token_ids(tokenizer, merged.config)
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    merged.save_pretrained(str(partial), max_shard_size=recipe.merge.max_shard_size)
    tokenizer.save_pretrained(str(partial))

    summary = {
        "dtype": recipe.merge.dtype,
        "max_abs_logit_diff": max_diff,
        "logit_tolerance": LOGIT_TOLERANCE,
        "checked_tokens": int(batch["attention_mask"].sum()),
        "cast_max_abs_logit_diff": cast_diff,
    }
    manifest = finish_stage(
        partial, out_dir, stage="merge", recipe_sha256=recipe_sha, inputs=inputs, summary=summary
    )
    return Outcome(manifest, up_to_date=False)


def _check_batch(adapter_dir: Path, adapter_manifest: dict, pad_id: int) -> dict[str, torch.Tensor]:
    """A few prepared examples (validation first), cut to CHECK_TOKENS, as a padded batch."""
    prepared = upstream_dir(adapter_dir, adapter_manifest, "prepared")
    rows = []
    for split in ("validation", "train"):
        path = prepared / split
        if path.is_dir():
            data = load_from_disk(str(path))
            rows += [r["input_ids"][:CHECK_TOKENS] for r in data]
        if len(rows) >= CHECK_EXAMPLES:
            break
    if not rows:
        raise InputError(
            f"merge checks logits on prepared examples, and none were found under {prepared}",
            hint="run the prepare stage again",
        )
    collate = PadCollator(pad_id, attention_mask=True)
    batch = collate([{"input_ids": ids, "labels": ids} for ids in rows[:CHECK_EXAMPLES]])
    del batch["labels"]
    return batch


def _max_diff(logits: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> float:
    real = mask.bool()
    return float((logits[real].float() - reference[real].float()).abs().max())
