"""What the merge stage checks, and the figures it records.

The reference is peft's own merge_and_unload of the same base and adapter, in the merge dtype,
on the same device. The shard merge does that same arithmetic (shard_merge.py), so the written
weights must equal the reference's bit for bit, whatever the dtype: a module whose delta went
missing or was scaled wrongly differs wherever rounding kept its effect. Logits could not tell
these apart in 16 bits: a bf16 logit has ~3 significant digits, so a missed module of a lightly
trained adapter moves them by less than one step (measured on the Llama-3-shaped test model).

Then what was written is loaded as a user loads it, and its logits are compared with the
reference's (the same weights: any difference is the folder itself, its config or tensor names)
and with the unmerged base+adapter: what storing the merge in the merge dtype costs (top-1
agreement, KL), bounded tightly in float32, recorded in 16 bits.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from datasets import load_from_disk
from safetensors import safe_open

from llmtune.console import console
from llmtune.data.pairs import sequence_ids
from llmtune.errors import InputError, VerificationError
from llmtune.manifest import upstream_dir
from llmtune.stages.collate import PadCollator

# Largest |logit| difference between the written folder and the reference, which hold the same
# weights: 0 when the folder loads as it should (tiny and SmolLM2 models, CPU); room for a
# kernel that orders its sums differently. In float32 the same bound holds against the
# unmerged base+adapter: an fp32 merge only reorders additions (SmolLM2-135M after the
# quickstart: 2.3e-4 on logits of magnitude ~20; a lost alpha/r scale or module shows 1e-1+).
LOGIT_TOLERANCE = {"fp32": 5e-3, "bf16": 1e-2, "fp16": 1e-2}
CHECK_EXAMPLES = 4
CHECK_TOKENS = 128


def check_rows(adapter_dir: Path, adapter_manifest: dict, count: int, tokens: int) -> list[list[int]]:
    """Token ids of `count` prepared examples (validation first), each cut to `tokens`."""
    prepared = upstream_dir(adapter_dir, adapter_manifest, "prepared")
    rows = []
    for split in ("validation", "train"):
        path = prepared / split
        if path.is_dir():
            data = load_from_disk(str(path))
            rows += [sequence_ids(r)[:tokens] for r in data.select(range(min(count, len(data))))]
        if len(rows) >= count:
            break
    if not rows:
        raise InputError(
            f"the checks run on prepared examples, and none were found under {prepared}",
            hint="run the prepare stage again",
        )
    return rows[:count]


def check_batch(adapter_dir: Path, adapter_manifest: dict, pad_id: int, device,
                processor=None) -> dict[str, torch.Tensor]:
    """A few prepared examples as a padded batch on `device` (image chats: with their images,
    expanded by `processor`, and whole: a cut would fall inside an image)."""
    if processor is not None:
        return {key: value.to(device) for key, value in image_check_batch(adapter_dir, adapter_manifest,
                                                                         processor).items()}
    rows = check_rows(adapter_dir, adapter_manifest, CHECK_EXAMPLES, CHECK_TOKENS)
    collate = PadCollator(pad_id, attention_mask=True)
    batch = collate([{"input_ids": ids, "labels": ids} for ids in rows])
    del batch["labels"]
    return {key: value.to(device) for key, value in batch.items()}


def image_check_batch(adapter_dir: Path, adapter_manifest: dict, processor) -> dict[str, torch.Tensor]:
    """CHECK_EXAMPLES prepared image chats (validation first, rows with images first) as the
    training collator batches them, without labels."""
    from llmtune.stages.collate import ImageCollator

    prepared = upstream_dir(adapter_dir, adapter_manifest, "prepared")
    rows = []
    for split in ("validation", "train"):
        if (prepared / split).is_dir():
            data = load_from_disk(str(prepared / split))
            rows += list(data.select(range(min(len(data), 4 * CHECK_EXAMPLES))))
    rows = sorted(rows, key=lambda r: not r["images"])[:CHECK_EXAMPLES]  # stable: validation first
    if not rows:
        raise InputError(f"the checks run on prepared examples, and none were found under {prepared}",
                         hint="run the prepare stage again")
    collate = ImageCollator(processor, prepared)
    collate.counting = False
    batch = collate(rows)
    del batch["labels"]
    return batch


def tensor_digests(model) -> dict[str, str]:
    """sha256 of every tensor of `model`'s state dict, by name: what compare_weights checks the
    written files against once the model itself is gone (so the merge never holds it beside a
    shard being written)."""
    from transformers.core_model_loading import revert_weight_conversion

    # by the names save_pretrained writes: transformers 5 writes some models (vision-language
    # ones: language_model.model.* for model.language_model.*) under their checkpoints' names
    return {name: _digest(tensor) for name, tensor in revert_weight_conversion(model, model.state_dict()).items()}


def compare_weights(digests: dict[str, str], folder: Path) -> dict:
    """Every tensor written to `folder` against the reference's digest, exactly; raises naming
    the first tensors that differ. One tensor is read at a time."""
    differing, compared = [], 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as reader:
            for name in reader.keys():
                compared += 1
                if digests.get(name) != _digest(reader.get_tensor(name)):
                    differing.append(name)
    if differing:
        raise VerificationError(
            f"merge: {len(differing)} of {compared} written tensors differ from peft's merge of the same "
            f"adapter in the same dtype, first {', '.join(differing[:3])}",
            hint="the merge is wrong; please report it with the adapter manifest",
        )
    return {"tensors_equal_to_peft_merge": compared}


def _digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().to("cpu").contiguous()
    return hashlib.sha256(data.reshape(-1).view(torch.uint8).numpy()).hexdigest()


def check_logits(logits, reference, unmerged, mask, precision: str) -> dict:
    """Figures for the written model's logits; raises when they fail their bounds (NaN fails)."""
    check = compare(logits, reference, mask)
    cost = {**compare(logits, unmerged, mask), "kl_mean": kl_mean(unmerged, logits, mask)}
    tolerance = LOGIT_TOLERANCE[precision]
    console.print(f"merge ({precision}): written weights equal peft's merge; logits as loaded differ "
                  f"by {check['max_abs_logit_diff']:.2e} (tolerance {tolerance:.0e}); against the unmerged "
                  f"base+adapter: max {cost['max_abs_logit_diff']:.2e}, top-1 agreement "
                  f"{cost['top1_agreement']:.1%}, KL {cost['kl_mean']:.2e}")
    bounded = [("peft's merge loaded in memory", check)]
    if precision == "fp32":  # no rounding to hide behind: the unmerged model too
        bounded.append(("the unmerged base+adapter", cost))
    for what, figures in bounded:
        difference = figures["max_abs_logit_diff"]
        if not difference <= tolerance:  # NaN fails too
            raise VerificationError(
                f"merged logits differ from {what} by {difference:.2e} (tolerance {tolerance:.0e} "
                f"for {precision})",
                hint="the merge is wrong (or the adapter holds non-finite weights); please report "
                "it with the adapter manifest",
            )
    return {**check, "logit_tolerance": tolerance, "vs_unmerged": cost}


def qlora_figures(logits, quantized, float_base, quantized_base, mask, kind: str) -> dict:
    """The float merge cannot equal the 4-bit model + adapter: the base's quantization error
    remains. Recorded beside it, that error shows whether the merge added any of its own."""
    figures = {"vs_quantized": compare(logits, quantized, mask),
               "quantization_gap": compare(float_base, quantized_base, mask)}
    merged, gap = figures["vs_quantized"], figures["quantization_gap"]
    console.print(f"merge: vs the {kind} base + adapter it was trained on: top-1 agreement "
                  f"{merged['top1_agreement']:.1%}, mean |logit difference| {merged['mean_abs_logit_diff']:.3f} "
                  f"(float vs {kind} base alone: {gap['top1_agreement']:.1%}, {gap['mean_abs_logit_diff']:.3f})")
    return figures


def compare(logits: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> dict:
    """Largest and mean |logit difference| and top-1 agreement over the real positions."""
    largest, total, agree, count = 0.0, 0.0, 0, 0
    for ours, theirs in _position_chunks(logits, reference, mask):
        diff = (ours - theirs).abs()
        largest = float(torch.maximum(torch.tensor(largest), diff.max()))  # NaN propagates
        total += float(diff.mean(-1).sum())
        agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        count += len(ours)
    return {
        "max_abs_logit_diff": largest,
        "mean_abs_logit_diff": round(total / count, 6),
        "top1_agreement": round(agree / count, 4),
    }


def kl_mean(reference: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean KL(reference || logits) over the real positions, in nats."""
    total, count = 0.0, 0
    for theirs, ours in _position_chunks(reference, logits, mask):
        log_p, log_q = torch.log_softmax(theirs, -1), torch.log_softmax(ours, -1)
        total += float((log_p.exp() * (log_p - log_q)).sum())
        count += len(theirs)
    return total / count


def _position_chunks(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, rows: int = 64):
    """The real positions of two logit tensors, as fp32 pairs of `rows` positions at a time:
    a 128k vocabulary makes a whole batch's fp32 copy hundreds of MB."""
    real = mask.bool()
    a, b = a[real], b[real]
    for start in range(0, len(a), rows):
        yield a[start:start + rows].float(), b[start:start + rows].float()
