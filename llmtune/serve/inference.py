"""Running a trained model: loading it from a run directory, greedy batched generation, and
token loss. Shared by preview, eval, generate and chat."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from llmtune import model_sources, models
from llmtune.console import console
from llmtune.data.chat import IGNORE
from llmtune.data.special_text import encode_prompt
from llmtune.errors import InputError
from llmtune.manifest import read_manifest, stage_dir
from llmtune.stages.collate import PadCollator
from llmtune.stages.memory import generation_bytes_per_row


@dataclass(frozen=True)
class Generation:
    text: str
    ended_with_eos: bool  # stopped by an end-of-turn token, not by max_new_tokens


def generate(model, tokenizer, prompts, max_new_tokens: int, template: str | None = None,
             batch_size: int = 16, special_text: str = "plain", tools: list | None = None,
             images: list[list] | None = None, processor=None) -> list[Generation]:
    """Greedy answers, in left-padded batches, stopping at any EOS id. A prompt is a
    conversation, rendered with the chat template (and `tools[i]`, the tool definitions it may
    call), or a plain completion prompt, used as is; control-token text in it is handled as
    `special_text` says (as prepare did). Image chats: `images[i]` are the PIL images of prompt
    i (its `{"type": "image"}` parts, in order), expanded by a vision-language model's `processor`."""
    if processor is not None:
        return _generate_with_images(model, processor, prompts, images or [[] for _ in prompts], max_new_tokens,
                                     template, batch_size)
    eos_ids = models.eos_token_ids(tokenizer, model.config)
    tools = tools or [None] * len(prompts)
    encoded = [encode_prompt(tokenizer, p, template, special_text, t) for p, t in zip(prompts, tools)]
    if encoded:
        batch_size = fitting_batch_size(model, batch_size, max(map(len, encoded)) + max_new_tokens)
    results = []
    for start in range(0, len(encoded), batch_size):
        batch = left_padded(encoded[start:start + batch_size], tokenizer.pad_token_id or 0, model.device)
        with torch.no_grad():
            output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                    eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id)
        results += [_decoded(tokenizer, row, eos_ids) for row in output[:, batch["input_ids"].shape[1]:].tolist()]
    return results


def _generate_with_images(model, processor, prompts, images: list[list], max_new_tokens: int,
                          template: str | None, batch_size: int) -> list[Generation]:
    from llmtune.data.templates import render

    tokenizer = processor.tokenizer
    eos_ids = models.eos_token_ids(tokenizer, model.config)
    texts = [render(tokenizer, prompt, True, template) for prompt in prompts]
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    results = []
    try:
        for start in range(0, len(texts), batch_size):
            chunk = images[start:start + batch_size]
            batch = processor(text=texts[start:start + batch_size], images=chunk if any(chunk) else None,
                              padding=True, return_tensors="pt", add_special_tokens=False).to(model.device)
            with torch.no_grad():
                output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                        eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id)
            results += [_decoded(tokenizer, row, eos_ids) for row in output[:, batch["input_ids"].shape[1]:].tolist()]
    finally:
        tokenizer.padding_side = padding_side
    return results


def _decoded(tokenizer, row: list[int], eos_ids) -> Generation:
    ended = any(token in eos_ids for token in row)
    if ended:
        row = row[: next(i for i, token in enumerate(row) if token in eos_ids)]
    return Generation(tokenizer.decode(row, skip_special_tokens=True).strip(), ended)


def fitting_batch_size(model, requested: int, tokens: int) -> int:
    """The largest generation batch up to `requested` whose estimate (plan's, below) fits in
    80% of the memory free now, with the model loaded; says so when it is smaller."""
    dtype_bytes = torch.finfo(model.dtype).bits // 8 if model.dtype.is_floating_point else 2
    per_row = generation_bytes_per_row(model.config, tokens, dtype_bytes, model.device.type == "cpu")
    free = models.free_memory(model.device)
    fits = max(1, int(0.8 * free // per_row))
    if fits < requested:
        console.print(f"generation: {fits} prompts at a time, not {requested}: each needs about "
                      f"{per_row / 1e9:.2f} GB ({tokens} tokens), {free / 1e9:.1f} GB are free")
        return fits
    return requested


def left_padded(rows: list[list[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask of prompts padded on the left, for generation."""
    longest = max(len(row) for row in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, longest - len(row):] = torch.tensor(row)
            mask[i, longest - len(row):] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def adapter_on_base(adapter_dir: Path, base: model_sources.ModelRef, precision: str):
    """The base model with the PEFT adapter in `adapter_dir` on it, on the local device, frozen
    weights in `precision`'s dtype, in eval mode. A QLoRA adapter runs on the base quantized as
    it was trained (its manifest says how): what it learnt to correct is that base's error, and
    the float base of a model trained in 4 bits may not fit the GPU it was trained on. A reward
    model's adapter runs on the base with its score head."""
    quantization = ((read_manifest(adapter_dir) or {}).get("summary") or {}).get("base_quantization") or {}
    quantize = quantization.get("quantize", "none")
    head = models.head_of(adapter_dir)
    pad_token_id = models.load_tokenizer(adapter_dir).pad_token_id if head == "score" else None
    base_model = models.load_model(base, precision, quantize=quantize,
                                   double_quant=quantization.get("double_quant", True),
                                   compute_dtype=quantization.get("compute_dtype", "auto"),
                                   head=head, pad_token_id=pad_token_id)
    return models.load_adapter(base_model, adapter_dir)


def trained_precision(adapter_dir: Path) -> str:
    """The precision the adapter was trained in (its manifest), else what auto picks here: a
    trained model is run in the dtype it was trained in."""
    recorded = ((read_manifest(adapter_dir) or {}).get("summary") or {}).get("precision")
    return recorded if recorded in models.DTYPES and _usable(recorded) else models.precision("auto")


def _usable(precision: str) -> bool:
    return precision != "fp16" or models.pick_device() == "cuda"


def mean_token_loss(model, rows: list[dict], pad_id: int, batch_size: int = 8, collate=None) -> float | None:
    """Mean cross-entropy over the trained tokens of prepared rows (input_ids, labels). For the
    output heads loss.py knows, from the final hidden states in chunks as training computes it
    (a 128k vocabulary makes a batch's full logits gigabytes); otherwise from the logits.
    `collate`: what batches the rows (image chats: an ImageCollator, with their images)."""
    from llmtune.stages.train.loss import chunked_loss_supported, summed_token_loss

    chunked = chunked_loss_supported(model.config)
    collate = collate or PadCollator(pad_id, attention_mask=True)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = {k: v.to(model.device) for k, v in collate(rows[start:start + batch_size]).items()}
            if chunked:
                summed, trained, _ = summed_token_loss(model, batch)
                total, count = total + float(summed), count + trained
                continue
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            labels = batch["labels"][:, 1:]
            # in fp32 a few hundred positions at a time, never a copy of the whole batch's logits
            for positions, targets in zip(logits[:, :-1].split(256, dim=1), labels.split(256, dim=1)):
                total += float(torch.nn.functional.cross_entropy(
                    positions.float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="sum"))
            count += int((labels != IGNORE).sum())
    return total / count if count else None


def answer_logps(model, sequences: list[tuple[list[int], list[int]]], pad_id: int) -> list[float]:
    """The summed log-probability of each answer given its prompt, (prompt_ids, answer_ids) as
    prepare wrote them: answer tokens only, as DPO scores them. One sequence at a time, through
    mean_token_loss (chunked where it can be): eval scores a few dozen pairs."""
    logps = []
    for prompt, answer in sequences:
        row = {"input_ids": [*prompt, *answer], "labels": [IGNORE] * len(prompt) + list(answer)}
        loss = mean_token_loss(model, [row], pad_id, batch_size=1)
        logps.append(-loss * len(answer))
    return logps


def sequence_scores(model, sequences: list[list[int]], pad_id: int, batch_size: int = 8) -> list[float]:
    """A reward model's score of each sequence (right-padded: the model reads the score at each
    sequence's last real token, found by its pad id)."""
    scores = []
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            rows = sequences[start:start + batch_size]
            longest = max(map(len, rows))
            ids = torch.tensor([row + [pad_id] * (longest - len(row)) for row in rows], device=model.device)
            mask = torch.tensor([[1] * len(row) + [0] * (longest - len(row)) for row in rows], device=model.device)
            scores += model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist()
    return scores


def perplexity(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 50.0))


def open_images(sample: dict, prompt) -> list:
    """The PIL images a held-out image chat's prompt shows (its images before the first answer)."""
    from llmtune.data import vision

    shown = sum(1 for message in prompt if isinstance(message.get("content"), list)
                for part in message["content"] if part.get("type") == "image")
    return [vision.open_image(vision.stored_source(reference).read(Path("/")))
            for reference in sample.get("images", [])[:shown]]


def shown_text(prompt) -> str:
    """A prompt's last turn as text, for reports: an image chat's images as <image>."""
    from llmtune.data.vision import shown_as_text

    return prompt if isinstance(prompt, str) else shown_as_text(prompt[-1]["content"])


def prompt_and_answer(sample: dict) -> tuple[list[dict] | str, str] | None:
    """The prompt up to the first assistant turn and that turn's text; None for text samples.
    For a preference pair, the chosen answer; for a kto row, a good answer (None for a bad one)."""
    if "chosen" in sample:
        return sample["prompt"], sample["chosen"]
    if "label" in sample:
        return (sample["prompt"], sample["completion"]) if sample["label"] else None
    if "prompt" in sample:
        return sample["prompt"], sample["completion"]
    if "messages" not in sample:
        return None
    messages = sample["messages"]
    index = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:index], messages[index]["content"]


def load_tuned(target: Path, adapter: Path | None = None):
    """(model, tokenizer) on the local device from a run directory (its merged model, else base
    + adapter), a transformers folder, or a folder plus a PEFT adapter: a model that writes (a
    reward model scores and is refused). A run is loaded in the precision it was trained in; a
    folder in what precision auto picks here."""
    for folder in (adapter, stage_dir(target, "train"), target):
        if folder is not None and models.head_of(folder) == "score":
            raise InputError(f"{folder}: a reward model (a score head) scores answers and writes none",
                             hint="llmtune eval scores it on the held-out pairs")
    if adapter is None and read_manifest(stage_dir(target, "merge")) is not None:
        precision = trained_precision(stage_dir(target, "train"))
        target = stage_dir(target, "merge")
    elif adapter is None and read_manifest(stage_dir(target, "train")) is not None:
        adapter = stage_dir(target, "train")
        manifest = read_manifest(adapter)
        base = model_sources.resolve_section(manifest["inputs"]["base_model"])
        model = adapter_on_base(adapter, base, trained_precision(adapter))
        return model, models.load_tokenizer(adapter)
    else:
        precision = trained_precision(adapter) if adapter is not None else models.precision("auto")
    if not (target / "config.json").is_file():
        raise InputError(
            f"{target}: not a run directory with a finished merge or train stage, nor a model folder",
            hint="give a run directory (runs/NAME) or a transformers model folder",
        )
    model_sources.check_weight_files(target, allow_pickle=False)
    model = models.load_model(target, precision).eval()
    if adapter is not None:
        model = models.load_adapter(model, adapter)
    return model, models.load_tokenizer(adapter or target)


def tuned_processor(target: Path, adapter: Path | None = None):
    """The processor of a vision-language model, from where load_tuned takes the tokenizer (the
    adapter, the run's merged model or adapter, or the folder); None for a language model."""
    folder = adapter
    if folder is None:
        folder = next((stage_dir(target, stage) for stage in ("merge", "train")
                       if read_manifest(stage_dir(target, stage)) is not None), target)
    if not any((folder / name).is_file() for name in ("processor_config.json", "preprocessor_config.json")):
        return None
    return models.load_processor(folder)

