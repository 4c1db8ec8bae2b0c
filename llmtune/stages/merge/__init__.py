"""merge: fold the adapter into the base it was trained on, check it, save a transformers model.

The base comes from the adapter manifest (never the recipe) and must still have the fingerprint
recorded there. `merge.dtype: auto` writes the base's own stored dtype (bf16 for the library's
models): a merged model the size of its base. The merge runs shard by shard (shard_merge.py) on
the local GPU when the model fits in its free memory, else on the CPU (the merge is bound by
memory, not compute: a QLoRA run's float model may be twice its GPU); what it is checked
against, and how, is in merge_check.py.

Memory: one model at a time. First base+adapter in the merge dtype, merged in place by peft
(the reference: its logits and a digest of each tensor are kept); then the shards, written one
at a time; then the written model, loaded back as a user loads it. For QLoRA adapters, the
4-bit base they were trained on is loaded after that, alone too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from llmtune import model_sources, models
from llmtune.console import console
from llmtune.errors import InputError
from llmtune.manifest import (
    Outcome,
    finish_stage,
    is_up_to_date,
    read_manifest,
    require_stage,
    space_warning,
    stage_dir,
    start_stage,
    upstream_ref,
)
from llmtune.model_card import write_model_card
from llmtune.recipe import Recipe, section_sha256
from llmtune.stages.merge import check as merge_check
from llmtune.stages.merge import shards as shard_merge


def merge(recipe: Recipe, run: Path, force: bool = False) -> Outcome:
    adapter_dir, out_dir = stage_dir(run, "train"), stage_dir(run, "merge")
    adapter_manifest = require_stage(adapter_dir, "train", f"llmtune train {run / 'recipe.yaml'}")
    base = adapter_manifest["inputs"]["base_model"]
    ref = model_sources.resolve_section(base)
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
    precision = merge_precision(recipe.merge.dtype, ref)
    size = models.weight_bytes(ref, precision)
    # The adapter's tokenizer carries the chat template the model was trained with.
    tokenizer = models.load_tokenizer(adapter_dir)
    # a vision-language model's processor (image processor, chat template, tokenizer) goes with it
    processor = models.load_processor(adapter_dir) if models.is_vision_language(ref) else None
    job = MergeJob(recipe, ref, adapter_dir, partial, precision, models.fitting_device(size, "merge"),
                   models.head_of(adapter_dir), tokenizer.pad_token_id, size)
    batch = merge_check.check_batch(adapter_dir, adapter_manifest, tokenizer.pad_token_id or 0, job.device,
                                    processor)
    quantization = adapter_manifest["summary"].get("base_quantization") or {}
    qlora = quantization.get("quantize", "none") != "none"

    logits, written = _merge_and_write(job, batch, qlora)
    _save_generation_config(ref, tokenizer, partial)
    (processor or tokenizer).save_pretrained(str(partial))
    with torch.no_grad():  # read back what was written, as a user will load it
        merged = models.load_model(partial, precision, device=job.device).eval()
        logits["written"] = merged(**batch).logits
        del merged
    mask = batch["attention_mask"]
    if job.head == "score":  # one score per sequence: each sequence is one "position" of one value
        logits = {name: value[:, None, :] for name, value in logits.items()}
        mask = torch.ones_like(mask[:, :1])
    summary = {
        "dtype": str(models.DTYPES[precision]).removeprefix("torch."),  # as transformers spells it
        **written,
        **merge_check.check_logits(logits["written"], logits["reference"], logits["unmerged"], mask, precision),
        "checked_tokens": int(batch["attention_mask"].sum()),
        "device": job.device.type,
    }
    if qlora:
        quantized, quantized_base = _quantized_reference(job, quantization, batch)
        if job.head == "score":
            quantized, quantized_base = quantized[:, None, :], quantized_base[:, None, :]
        summary.update(merge_check.qlora_figures(logits["written"], quantized, logits["float_base"],
                                                 quantized_base, mask, quantization["quantize"]))
    base_info = {"source": ref.source, **model_sources.describe_base(ref)}
    write_model_card(partial, recipe, base_info, adapter_manifest["summary"], summary)
    manifest = finish_stage(
        partial, out_dir, stage="merge", recipe_sha256=recipe_sha, inputs=inputs, summary=summary,
        device=job.device.type,
    )
    return Outcome(manifest, up_to_date=False)


@dataclass(frozen=True)
class MergeJob:
    """What one merge works with."""

    recipe: Recipe
    ref: model_sources.ModelRef  # the base, as the adapter manifest names it
    adapter_dir: Path
    partial: Path  # <merged>.partial/, written into
    precision: str  # of the merged weights
    device: torch.device  # the local GPU where the model fits, else the CPU
    head: str  # causal-lm, or score (a reward model)
    pad_token_id: int | None  # where a scored sequence ends
    size: int  # bytes of the merged weights

    def base_with_adapter(self, **quantization):
        """The base in the merge's precision on its device (or quantized, as trained) with the
        adapter on it."""
        if quantization:
            base = models.load_model(self.ref, models.precision("auto"), head=self.head,
                                     pad_token_id=self.pad_token_id, **quantization)
        else:
            base = models.load_model(self.ref, self.precision, device=self.device, head=self.head,
                                     pad_token_id=self.pad_token_id)
        return models.load_adapter(base, self.adapter_dir)


def merge_precision(choice: str, ref: model_sources.ModelRef) -> str:
    """merge.dtype made concrete, as a precision (fp32, bf16, fp16): auto is the dtype the
    base's weights are stored in."""
    if choice != "auto":
        return models.DTYPE_NAMES[choice]
    return models.PRECISION_OF[models.stored_dtype(ref)]


def _merge_and_write(job: MergeJob, batch: dict, qlora: bool) -> tuple[dict, dict]:
    """Logits of base+adapter (unmerged, and the base alone for QLoRA) and of peft's merge in
    memory, then the merged weights written into the partial folder and compared with that merge."""
    dtype = models.DTYPES[job.precision]
    shard_size = job.recipe.merge.max_shard_size
    logits = {}
    unsupported = ("a vision-language checkpoint names its weights otherwise than the model's modules "
                   "(transformers' conversion mapping)" if models.is_vision_language(job.ref)
                   else shard_merge.unsupported(job.ref.local_dir, job.adapter_dir))
    with torch.no_grad():
        model = job.base_with_adapter()
        logits["unmerged"] = model(**batch).logits
        if qlora:
            with model.disable_adapter():
                logits["float_base"] = model(**batch).logits
        reference = _merged_in_memory(model, dtype)
        del model
        logits["reference"] = reference(**batch).logits
        digests = merge_check.tensor_digests(reference)
        if unsupported:
            console.print(f"merge: {unsupported}; writing peft's merge from memory instead")
            reference.save_pretrained(str(job.partial), max_shard_size=shard_size)
        del reference  # freed before any shard is read: one model in memory at a time
    if unsupported:
        written = {"method": "in memory"}
    else:
        warning = space_warning(job.partial, job.size, "the merged model")
        if warning:
            console.print(f"[yellow]warning:[/] {warning}", markup=True)
        try:
            # QLoRA adapters too: the shards are the float base, never the 4-bit weights.
            written = shard_merge.merge_into_shards(job.ref.local_dir, job.adapter_dir, job.partial, dtype,
                                                    shard_size, job.device)
            written = {"method": "shard by shard", **{k: v for k, v in written.items() if k != "bytes"}}
            config = models.load_config(job.ref)
            config.dtype = dtype
            config.save_pretrained(str(job.partial))
        except shard_merge.Unsupported as why:  # found only once a shard was merged: rare
            console.print(f"merge: {why}; writing peft's merge from memory instead")
            for leftover in job.partial.glob("*.safetensors*"):
                leftover.unlink()
            model = job.base_with_adapter()
            _merged_in_memory(model, dtype).save_pretrained(str(job.partial), max_shard_size=shard_size)
            del model
            written = {"method": "in memory"}
    written.update(merge_check.compare_weights(digests, job.partial))
    return logits, written


def _merged_in_memory(model, dtype: torch.dtype):
    """peft's merge_and_unload, with what the adapter replaced in full (modules_to_save, trained
    in fp32) cast to `dtype` as the written merge is. Parameters only: buffers such as
    rotary frequencies stay as transformers keeps them."""
    merged = model.merge_and_unload()
    for param in merged.parameters():
        if param.dtype != dtype:
            param.data = param.data.to(dtype)
    return merged


def _quantized_reference(job: MergeJob, quantization: dict, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the quantized base it was trained on (QLoRA), with and without the adapter, on
    the local device as in training (where the float merge may have run on the CPU), returned
    on the merge's device, beside the merge's own."""
    models.release_memory(models.local_device())
    model = job.base_with_adapter(quantize=quantization["quantize"],
                                  double_quant=quantization.get("double_quant", True),
                                  compute_dtype=quantization.get("compute_dtype", "auto"))
    batch = {key: value.to(model.device) for key, value in batch.items()}
    with torch.no_grad():
        adapted = model(**batch).logits.float().to(job.device)
        with model.disable_adapter():
            alone = model(**batch).logits.float().to(job.device)
    del model
    models.release_memory(models.local_device())
    return adapted, alone


def _save_generation_config(ref: model_sources.ModelRef, tokenizer, target: Path) -> None:
    """The base's generation settings, ending at every end-of-turn token the tokenizer has."""
    generation = models.load_generation_config(ref)
    generation.eos_token_id = models.eos_token_ids(tokenizer, models.load_config(ref))
    generation.pad_token_id = tokenizer.pad_token_id
    generation.save_pretrained(str(target))
