"""train: LoRA on the prepared data with the transformers Trainer; writes a standard PEFT adapter."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch
from datasets import load_from_disk
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from llmtune import models
from llmtune.console import console
from llmtune.data.chat import IGNORE
from llmtune.errors import InputError
from llmtune.manifest import (
    Outcome,
    finish_stage,
    is_up_to_date,
    read_manifest,
    require_stage,
    start_stage,
    upstream_ref,
)
from llmtune.plot import plot_metrics
from llmtune.recipe import Recipe, section_sha256


def train(recipe: Recipe, run: Path, force: bool = False) -> Outcome:
    prepared_dir, out_dir = run / "prepared", run / "adapter"
    require_stage(prepared_dir, "prepare", f"llmtune prepare {run / 'recipe.yaml'}")
    ref = models.resolve_section(recipe.model)
    inputs = {"prepared": upstream_ref(prepared_dir, out_dir), "base_model": ref.as_manifest()}
    recipe_sha = section_sha256(recipe, "model", "adapter", "train")
    if not force and is_up_to_date(out_dir, "train", recipe_sha, inputs):
        return Outcome(read_manifest(out_dir), up_to_date=True)

    partial = start_stage(out_dir)
    cfg = recipe.train
    set_seed(cfg.seed)
    device = models.pick_device()
    tokenizer = models.load_tokenizer(ref)
    if (prepared_dir / "chat_template.jinja").is_file():  # the template the data was rendered with
        tokenizer.chat_template = (prepared_dir / "chat_template.jinja").read_text(encoding="utf-8")
    base_model = models.load_model(ref)
    # With a cache, transformers does not read packed position ids as sequence boundaries, and
    # packed examples would attend to each other; training never uses the cache anyway.
    base_model.config.use_cache = False
    try:
        model = get_peft_model(base_model, _lora_config(recipe))
    except ValueError as exc:  # peft names the modules it could not find
        raise InputError(f"adapter: {exc}", hint="check adapter.target_modules against the model's "
                         "module names, or use target_modules: all-linear") from None
    # Where a PEFT loader looks for the base: the hub id, or the local folder we trained on.
    model.peft_config["default"].base_model_name_or_path = (
        ref.source if ref.kind == "hub" else str(ref.local_dir)
    )
    trainable, total = model.get_nb_trainable_parameters()
    console.print(
        f"train: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / total:.2f}%), device {device}"
    )

    train_set = load_from_disk(str(prepared_dir / "train"))
    validation = load_from_disk(str(prepared_dir / "validation"))
    validation = validation if len(validation) else None
    collator = PadCollator(tokenizer.pad_token_id or 0)
    progress = TrainProgress(partial / "metrics.jsonl", collator)
    trainer = Trainer(
        model=model,
        args=_training_arguments(recipe, partial / "trainer", device),
        train_dataset=train_set,
        eval_dataset=validation,
        data_collator=collator,
        callbacks=[progress],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)

    eval_before = _evaluate(trainer, "before training", progress)
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started
    eval_after = _evaluate(trainer, "after training", progress)

    shutil.rmtree(partial / "trainer", ignore_errors=True)
    model.save_pretrained(str(partial))
    tokenizer.save_pretrained(str(partial))
    summary = {
        "steps": result.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 3),
        "train_loss": round(result.training_loss, 5),
        "eval_loss_before": eval_before,
        "eval_loss": eval_after,
        "trainable_params": trainable,
        "total_params": total,
        "train_seconds": round(seconds, 1),
        "tokens_per_second": round(progress.tokens / seconds, 1) if seconds else None,
        "trained_tokens_per_second": round(progress.trained_tokens / seconds, 1) if seconds else None,
    }
    manifest = finish_stage(
        partial,
        out_dir,
        stage="train",
        recipe_sha256=recipe_sha,
        inputs=inputs,
        summary=summary,
        device=device,
    )
    plot_metrics(out_dir / "metrics.jsonl", run / "training_curves.png")
    console.print(f"train: training curves -> {run / 'training_curves.png'}")
    return Outcome(manifest, up_to_date=False)


def _lora_config(recipe: Recipe) -> LoraConfig:
    adapter = recipe.adapter
    return LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=adapter.target_modules,
        task_type="CAUSAL_LM",
    )


def _training_arguments(recipe: Recipe, output_dir: Path, device: str) -> TrainingArguments:
    cfg = recipe.train
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=cfg.log_every,
        logging_strategy="steps",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
    )


def _evaluate(trainer: Trainer, when: str, progress: TrainProgress) -> float | None:
    if trainer.eval_dataset is None:
        return None
    loss = round(trainer.evaluate()["eval_loss"], 5)
    console.print(f"train: eval loss {when}: {loss:.4f} (perplexity {math.exp(loss):.2f})")
    progress.record({"step": trainer.state.global_step, "eval_loss": loss, "when": when})
    return loss


class PadCollator:
    """Right-pads a batch to its longest row; labels pad with -100, never masked by pad id
    (SmolLM2's pad token is its EOS, which must be trained).

    Training passes no attention mask: under the causal mask, right padding never reaches a real
    token, and without a mask SDPA takes its causal fast path. Packed rows carry position ids
    that restart at each example, and their pads restart once more, so transformers keeps
    attention inside each example. Counts real and trained tokens for the progress line.
    """

    def __init__(self, pad_id: int, attention_mask: bool = False):
        self.pad_id = pad_id
        self.attention_mask = attention_mask
        self.tokens = 0
        self.trained_tokens = 0

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        packed = "position_ids" in rows[0]
        positions = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            mask[i, :n] = 1
            if packed:
                positions[i, :n] = torch.tensor(row["position_ids"])
                positions[i, n:] = torch.arange(longest - n)
        self.tokens += int(mask.sum())
        self.trained_tokens += int((labels != IGNORE).sum())
        batch = {"input_ids": ids, "labels": labels}
        if packed:
            batch["position_ids"] = positions
        if self.attention_mask:
            batch["attention_mask"] = mask
        return batch


class TrainProgress(TrainerCallback):
    """One terminal line and one metrics.jsonl record per logging step: loss, lr, tokens/s, ETA."""

    def __init__(self, metrics_path: Path, collator: PadCollator):
        self.metrics_path = metrics_path
        self.collator = collator
        self.started = time.perf_counter()
        self.tokens = self.trained_tokens = 0

    def record(self, entry: dict) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()
        self.collator.tokens = self.collator.trained_tokens = 0  # evaluation batches do not count

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        elapsed = time.perf_counter() - self.started
        self.tokens, self.trained_tokens = self.collator.tokens, self.collator.trained_tokens
        step, total = state.global_step, state.max_steps
        entry = {
            "step": step,
            "epoch": round(state.epoch or 0.0, 4),
            "loss": round(logs["loss"], 5),
            "lr": logs.get("learning_rate"),
            "grad_norm": _round(logs.get("grad_norm")),
            "tokens_seen": self.tokens,
            "tokens_per_second": round(self.tokens / elapsed, 1) if elapsed else None,
            "trained_tokens_per_second": round(self.trained_tokens / elapsed, 1) if elapsed else None,
            "elapsed_s": round(elapsed, 2),
        }
        self.record(entry)
        eta = elapsed / step * (total - step) if step else 0.0
        console.print(
            f"  step {step}/{total}  loss {entry['loss']:.4f}  lr {entry['lr']:.2e}  "
            f"{entry['tokens_per_second'] or 0:.0f} tok/s  ETA {_duration(eta)}"
        )


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 5)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"
