"""Running a trained model: loading it from a run directory, greedy batched generation, and
token loss. Shared by preview, eval, generate and chat."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmtune import models
from llmtune.data.chat import IGNORE, render
from llmtune.errors import InputError
from llmtune.manifest import read_manifest
from llmtune.stages.collate import PadCollator


@dataclass(frozen=True)
class Generation:
    text: str
    ended_with_eos: bool  # stopped by an end-of-turn token, not by max_new_tokens


def generate(model, tokenizer, prompts, max_new_tokens: int, template: str | None = None,
             batch_size: int = 16) -> list[Generation]:
    """Greedy answers, in left-padded batches, stopping at any EOS id. A prompt is a
    conversation, rendered with the chat template, or a plain completion prompt, used as is."""
    eos_ids = models.eos_token_ids(tokenizer, model.config)
    texts = [p if isinstance(p, str) else render(tokenizer, p, True, template) for p in prompts]
    tokenizer.padding_side = "left"
    results = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], add_special_tokens=False,
                          padding=True, return_tensors="pt").to(model.device)
        with torch.no_grad():
            output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                    eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id)
        for row in output[:, batch["input_ids"].shape[1]:].tolist():
            ended = any(token in eos_ids for token in row)
            if ended:
                row = row[: next(i for i, token in enumerate(row) if token in eos_ids)]
            text = tokenizer.decode(row, skip_special_tokens=True).strip()
            results.append(Generation(text, ended))
    return results


def adapter_on_base(adapter_dir: Path, base: models.ModelRef):
    """The float base model with the PEFT adapter in `adapter_dir` on it, in eval mode."""
    return PeftModel.from_pretrained(models.load_model(base), str(adapter_dir)).eval()


def mean_token_loss(model, rows: list[dict], pad_id: int, batch_size: int = 8) -> float | None:
    """Mean cross-entropy over the trained tokens of prepared rows (input_ids, labels)."""
    collate = PadCollator(pad_id, attention_mask=True)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = {k: v.to(model.device) for k, v in collate(rows[start:start + batch_size]).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="sum")
            total += float(losses)
            count += int((labels != IGNORE).sum())
    return total / count if count else None


def perplexity(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 50.0))


def prompt_and_answer(sample: dict) -> tuple[list[dict] | str, str] | None:
    """The prompt up to the first assistant turn and that turn's text; None for text samples."""
    if "prompt" in sample:
        return sample["prompt"], sample["completion"]
    if "messages" not in sample:
        return None
    messages = sample["messages"]
    index = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:index], messages[index]["content"]


def load_tuned(target: Path, adapter: Path | None = None):
    """(model, tokenizer) from a run directory (its merged model, else base + adapter), a
    transformers folder, or a folder plus a PEFT adapter."""
    if adapter is None and read_manifest(target / "merged") is not None:
        target = target / "merged"
    elif adapter is None and read_manifest(target / "adapter") is not None:
        adapter = target / "adapter"
        manifest = read_manifest(adapter)
        model = adapter_on_base(adapter, models.resolve_section(manifest["inputs"]["base_model"]))
        return model, AutoTokenizer.from_pretrained(adapter)
    if not (target / "config.json").is_file():
        raise InputError(
            f"{target}: not a run directory with a finished merge or train stage, nor a model folder",
            hint="give a run directory (runs/NAME) or a transformers model folder",
        )
    models.check_weight_files(target, allow_pickle=False)
    model = AutoModelForCausalLM.from_pretrained(target, use_safetensors=True).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    return model, AutoTokenizer.from_pretrained(adapter or target)
