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
from llmtune.manifest import read_manifest, stage_dir, upstream_dir
from llmtune.stages.collate import PadCollator


@dataclass(frozen=True)
class Generation:
    text: str
    ended_with_eos: bool  # stopped by an end-of-turn token, not by max_new_tokens


def generate(model, tokenizer, prompts, max_new_tokens: int, template: str | None = None,
             batch_size: int = 16, special_text: str = "plain") -> list[Generation]:
    """Greedy answers, in left-padded batches, stopping at any EOS id. A prompt is a
    conversation, rendered with the chat template, or a plain completion prompt, used as is;
    control-token text in it is handled as `special_text` says (as prepare did)."""
    eos_ids = models.eos_token_ids(tokenizer, model.config)
    encoded = [encode_prompt(tokenizer, p, template, special_text) for p in prompts]
    if encoded:
        batch_size = fitting_batch_size(model, batch_size, max(map(len, encoded)) + max_new_tokens)
    results = []
    for start in range(0, len(encoded), batch_size):
        batch = left_padded(encoded[start:start + batch_size], tokenizer.pad_token_id or 0, model.device)
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


def generation_bytes_per_row(config, tokens: int, dtype_bytes: int) -> int:
    """Memory one sequence of `tokens` (prompt and answer) takes while it is generated: its KV
    cache, the prompt's largest transient in the prefill (the MLP's intermediate tensors, and
    the attention scores where the kernel materialises them, as CPU SDPA does), and one step's
    fp32 logits over the vocabulary with their processed copy (generate keeps the last
    position's logits only)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    inter = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
    kv_cache = 2 * config.num_hidden_layers * kv_heads * head_dim * tokens * dtype_bytes
    prefill = max(3 * tokens * inter * dtype_bytes, heads * tokens * tokens * dtype_bytes)
    return int(kv_cache + prefill + 2 * config.vocab_size * 4)


def available_bytes(device: torch.device) -> int:
    """Memory free for more work on the device: the GPU's free memory, or the system's."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not limit


def fitting_batch_size(model, requested: int, tokens: int) -> int:
    """The largest generation batch up to `requested` whose estimate (plan's, below) fits in
    80% of the memory free now, with the model loaded; says so when it is smaller."""
    dtype_bytes = torch.finfo(model.dtype).bits // 8 if model.dtype.is_floating_point else 2
    per_row = generation_bytes_per_row(model.config, tokens, dtype_bytes)
    free = available_bytes(model.device)
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


@dataclass(frozen=True)
class Serving:
    """How a run's data was prepared, so that prompts reach the model as training's did."""

    special_text: str = "plain"
    system_prompt: str | None = None  # the system message every training conversation had
    chat: bool = True  # prompts are user turns rendered with the chat template
    template: str | None = None  # the chat template the data was rendered with


def serving_defaults(target: Path, adapter: Path | None = None) -> Serving:
    """The Serving of the run that `target` (a run directory or one of its stage folders) or
    `adapter` came from; the defaults for a model folder of unknown origin."""
    prepared = _prepared_manifest(adapter) if adapter is not None else None
    prepared = prepared or _prepared_manifest(target) or _prepared_manifest(stage_dir(target, "train"))
    if prepared is None:
        return Serving()
    summary, folder = prepared
    template = folder / "chat_template.jinja"
    return Serving(special_text=summary.get("special_text", "keep"),  # before the setting: keep
                   system_prompt=(summary.get("chat") or {}).get("common_system_prompt"),
                   chat=template.is_file(),
                   template=template.read_text(encoding="utf-8") if template.is_file() else None)


def use_template(tokenizer, serving: Serving, choice: str | None, target: Path) -> None:
    """Give the tokenizer the chat template to serve with: `choice` when given (trained: the
    one the data was prepared with; auto: the model folder's own; a built-in name or a file),
    else the trained one, and a folder whose own template differs from it is refused: a model
    prompted in another format than it was trained in answers worse, silently."""
    from llmtune.data.templates import resolve_template

    if choice is None:
        if serving.template is not None and tokenizer.chat_template != serving.template:
            raise InputError(
                f"{target}: its chat template differs from the one the run's data was prepared with",
                hint="pass --template trained to serve with the training one, or --template auto "
                "for the folder's own")
        return
    if choice == "trained":
        if serving.template is None:
            raise InputError(f"{target}: no run to take the trained template from",
                             hint="give a run directory, or --template auto, a built-in name or a file")
        tokenizer.chat_template = serving.template
    else:
        tokenizer.chat_template = resolve_template(choice, tokenizer)


def as_prompt(prompt, serving: Serving, raw: bool = False):
    """A prompt as the run's training conversations looked: on a run trained on chat data a
    text prompt is a user turn (unless `raw`), and a conversation without a system message
    starts with the system prompt every training conversation had."""
    if isinstance(prompt, str):
        if raw or not serving.chat:
            return prompt
        prompt = [{"role": "user", "content": prompt}]
    if serving.system_prompt and not (prompt and prompt[0].get("role") == "system"):
        prompt = [{"role": "system", "content": serving.system_prompt}, *prompt]
    return prompt


def report_empty(results: list[Generation], where: str) -> int:
    """Count the empty answers and warn about them: a prompt that produces nothing is a prompt
    the model was not trained to answer (raw text to a chat model, another template)."""
    empty = sum(1 for result in results if not result.text.strip())
    if empty:
        console.print(f"[yellow]{where}: warning: {empty} of {len(results)} answers are empty; "
                      "is the prompt shaped like the training data (template, system prompt)?[/yellow]")
    return empty


def _prepared_manifest(folder: Path, depth: int = 0) -> tuple[dict, Path] | None:
    """(summary, folder) of the prepare stage upstream of a stage folder, following manifests."""
    manifest = read_manifest(folder) if depth < 4 else None
    if manifest is None:
        return None
    if manifest.get("stage") == "prepare":
        return manifest.get("summary") or {}, folder
    for name, ref in (manifest.get("inputs") or {}).items():
        if isinstance(ref, dict) and "path" in ref:
            found = _prepared_manifest(upstream_dir(folder, manifest, name), depth + 1)
            if found is not None:
                return found
    return None


def adapter_on_base(adapter_dir: Path, base: model_sources.ModelRef, precision: str):
    """The base model with the PEFT adapter in `adapter_dir` on it, on the local device, frozen
    weights in `precision`'s dtype, in eval mode."""
    return models.load_adapter(models.load_model(base, precision), adapter_dir)


def trained_precision(adapter_dir: Path) -> str:
    """The precision the adapter was trained in (its manifest), else what auto picks here: a
    trained model is run in the dtype it was trained in."""
    recorded = ((read_manifest(adapter_dir) or {}).get("summary") or {}).get("precision")
    return recorded if recorded in models.DTYPES and _usable(recorded) else models.precision("auto")


def _usable(precision: str) -> bool:
    return precision != "fp16" or models.pick_device() == "cuda"


def mean_token_loss(model, rows: list[dict], pad_id: int, batch_size: int = 8) -> float | None:
    """Mean cross-entropy over the trained tokens of prepared rows (input_ids, labels). For
    plain output heads, from hidden states in chunks as training computes it (a 128k vocabulary
    makes a batch's full logits gigabytes); otherwise from the logits."""
    from llmtune.stages.loss import chunked_loss_supported, summed_token_loss

    chunked = chunked_loss_supported(model.config)
    collate = PadCollator(pad_id, attention_mask=True)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = {k: v.to(model.device) for k, v in collate(rows[start:start + batch_size]).items()}
            if chunked:
                summed, trained, _ = summed_token_loss(model, batch)
                total, count = total + float(summed), count + trained
                continue
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
    """(model, tokenizer) on the local device from a run directory (its merged model, else base
    + adapter), a transformers folder, or a folder plus a PEFT adapter. A run is loaded in the
    precision it was trained in; a folder in what precision auto picks here."""
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
