"""merge: fold the adapter into the base it was trained on, check logits, save a transformers model.

The base comes from the adapter manifest (never the recipe) and must still have the fingerprint
recorded there. Merged logits are compared with base+adapter logits on a few prepared examples.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from datasets import load_from_disk
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from llmtune import models
from llmtune.console import console
from llmtune.errors import InputError, VerificationError
from llmtune.model_card import write_model_card
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
from llmtune.stages import shard_merge
from llmtune.stages.inference import adapter_on_base

# An fp32 merge only reorders floating-point additions: after the quickstart, SmolLM2-135M
# (30 layers) shows 2.3e-4 on logits of magnitude ~20. A wrong merge (a lost alpha/r scale, a
# missed module) shows 1e-1 and more, so this bound separates rounding from mistakes. Saving
# in 16 bits rounds every weight; the bounds for those are set from measurements (see tests).
LOGIT_TOLERANCE = {"float32": 5e-3, "bfloat16": 1.0, "float16": 0.25}
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
    batch = _check_batch(adapter_dir, adapter_manifest, tokenizer.pad_token_id or 0)
    mask = batch["attention_mask"]
    # One model in memory at a time: the reference logits first, then the merge, then the check.
    quantization = adapter_manifest["summary"].get("base_quantization") or {}
    qlora = quantization.get("quantize", "none") != "none"
    with torch.no_grad():
        model = adapter_on_base(adapter_dir, ref)
        reference = model(**batch).logits
        if qlora:
            with model.disable_adapter():
                float_base = model(**batch).logits
        del model
    if qlora:
        quantized, quantized_base = _quantized_reference(adapter_dir, ref, quantization, batch)

    method, written = _write_merged(recipe, ref, adapter_dir, partial)
    _save_generation_config(ref, tokenizer, partial)
    tokenizer.save_pretrained(str(partial))

    # The check reads back what was written, as a user will load it.
    merged = AutoModelForCausalLM.from_pretrained(str(partial), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = merged(**batch).logits
    del merged
    check = _compare(logits, reference, mask)
    tolerance = LOGIT_TOLERANCE[recipe.merge.dtype]
    console.print(f"merge ({method}, {recipe.merge.dtype}): max |merged - (base+adapter)| logit "
                  f"difference {check['max_abs_logit_diff']:.2e} (tolerance {tolerance:.0e}), "
                  f"top-1 agreement {check['top1_agreement']:.1%}")
    if check["max_abs_logit_diff"] > tolerance:
        raise VerificationError(
            f"merged logits differ from base+adapter by {check['max_abs_logit_diff']:.2e} "
            f"(tolerance {tolerance:.0e} for {recipe.merge.dtype})",
            hint="the merge is wrong; please report it with the adapter manifest",
        )
    summary = {
        "dtype": recipe.merge.dtype,
        "method": method,
        **check,
        "logit_tolerance": tolerance,
        "checked_tokens": int(mask.sum()),
        **written,
    }
    if qlora:
        summary.update(_qlora_figures(logits, quantized, float_base, quantized_base, mask,
                                      quantization["quantize"]))
    base_info = {"source": ref.source, **models.describe_base(ref)}
    write_model_card(partial, recipe, base_info, adapter_manifest["summary"], summary)
    manifest = finish_stage(
        partial, out_dir, stage="merge", recipe_sha256=recipe_sha, inputs=inputs, summary=summary
    )
    return Outcome(manifest, up_to_date=False)


def _write_merged(recipe: Recipe, ref: models.ModelRef, adapter_dir: Path, partial: Path) -> tuple[str, dict]:
    """The merged weights and config in `partial`: shard by shard, else in memory."""
    dtype = DTYPES[recipe.merge.dtype]
    warning = space_warning(partial, _weight_bytes(ref.local_dir, dtype), "the merged model")
    if warning:
        console.print(f"[yellow]warning:[/] {warning}", markup=True)
    try:
        # QLoRA adapters too: the shards are the float base, never the 4-bit weights.
        written = shard_merge.merge_into_shards(ref.local_dir, adapter_dir, partial, dtype,
                                                recipe.merge.max_shard_size)
    except shard_merge.Unsupported as why:
        console.print(f"merge: {why}; merging in memory instead")
        _merge_in_memory(adapter_dir, ref, dtype, partial, recipe.merge.max_shard_size)
        return "in memory", {}
    config = AutoConfig.from_pretrained(ref.local_dir, trust_remote_code=ref.trust_remote_code)
    config.dtype = dtype
    config.save_pretrained(str(partial))
    return "shard by shard", {key: value for key, value in written.items() if key != "bytes"}


def _qlora_figures(logits, quantized, float_base, quantized_base, mask, kind: str) -> dict:
    """The float merge cannot equal the 4-bit model + adapter: the base's quantization error
    remains. Recorded beside it, that error shows whether the merge added any of its own."""
    figures = {"vs_quantized": _compare(logits, quantized, mask),
               "quantization_gap": _compare(float_base, quantized_base, mask)}
    merged, gap = figures["vs_quantized"], figures["quantization_gap"]
    console.print(f"merge: vs the {kind} base + adapter it was trained on: top-1 agreement "
                  f"{merged['top1_agreement']:.1%}, mean |logit difference| {merged['mean_abs_logit_diff']:.3f} "
                  f"(float vs {kind} base alone: {gap['top1_agreement']:.1%}, {gap['mean_abs_logit_diff']:.3f})")
    return figures


def _quantized_reference(adapter_dir: Path, ref: models.ModelRef, quantization: dict,
                         batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the quantized base it was trained on (QLoRA), with and without the adapter."""
    from peft import PeftModel

    base = models.load_model(ref, quantize=quantization["quantize"],
                             double_quant=quantization.get("double_quant", True),
                             compute_dtype=quantization.get("compute_dtype", "auto"))
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        adapted = model(**batch).logits.float()
        with model.disable_adapter():
            alone = model(**batch).logits.float()
    return adapted, alone


def _merge_in_memory(adapter_dir: Path, ref: models.ModelRef, dtype: torch.dtype, target: Path,
                     max_shard_size: str) -> None:
    """peft's merge_and_unload on the whole float model: for adapters the shard merge cannot map."""
    merged = adapter_on_base(adapter_dir, ref).merge_and_unload().to(dtype)
    merged.save_pretrained(str(target), max_shard_size=max_shard_size)


def _save_generation_config(ref: models.ModelRef, tokenizer, target: Path) -> None:
    """The base's generation settings, ending at every end-of-turn token the tokenizer has."""
    try:
        generation = GenerationConfig.from_pretrained(ref.local_dir)
    except OSError:
        generation = GenerationConfig()
    config = AutoConfig.from_pretrained(ref.local_dir, trust_remote_code=ref.trust_remote_code)
    generation.eos_token_id = models.eos_token_ids(tokenizer, config)
    generation.pad_token_id = tokenizer.pad_token_id
    generation.save_pretrained(str(target))


def _weight_bytes(folder: Path, dtype: torch.dtype) -> int:
    """Size of the merged weights: the base's parameter count at the merge dtype."""
    try:
        shapes = shard_merge.tensor_shapes(shard_merge.base_tensors(folder))
    except shard_merge.Unsupported:
        return 0
    return sum(math.prod(shape) for shape in shapes.values()) * dtype.itemsize


def check_rows(adapter_dir: Path, adapter_manifest: dict, count: int, tokens: int) -> list[list[int]]:
    """Token ids of `count` prepared examples (validation first), each cut to `tokens`."""
    prepared = upstream_dir(adapter_dir, adapter_manifest, "prepared")
    rows = []
    for split in ("validation", "train"):
        path = prepared / split
        if path.is_dir():
            data = load_from_disk(str(path))
            rows += [r["input_ids"][:tokens] for r in data.select(range(min(count, len(data))))]
        if len(rows) >= count:
            break
    if not rows:
        raise InputError(
            f"the checks run on prepared examples, and none were found under {prepared}",
            hint="run the prepare stage again",
        )
    return rows[:count]


def _check_batch(adapter_dir: Path, adapter_manifest: dict, pad_id: int) -> dict[str, torch.Tensor]:
    """A few prepared examples as a padded batch."""
    rows = check_rows(adapter_dir, adapter_manifest, CHECK_EXAMPLES, CHECK_TOKENS)
    collate = PadCollator(pad_id, attention_mask=True)
    batch = collate([{"input_ids": ids, "labels": ids} for ids in rows])
    del batch["labels"]
    return batch


def _compare(logits: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> dict:
    real = mask.bool()
    logits, reference = logits[real].float(), reference[real].float()
    diff = (logits - reference).abs()
    return {
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": round(float(diff.mean()), 6),
        "top1_agreement": round(float((logits.argmax(-1) == reference.argmax(-1)).float().mean()), 4),
    }
