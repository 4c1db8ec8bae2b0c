"""Trainer callbacks: progress and metrics.jsonl, graceful stop on SIGTERM/SIGINT, early
stopping on eval loss, and marking/rotating checkpoints once they are fully written."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from transformers import TrainerCallback

from llmtune.console import console
from llmtune.stages import checkpoints
from llmtune.stages.collate import PadCollator


class TrainProgress(TrainerCallback):
    """One terminal line and one metrics.jsonl record per logging step: loss, lr, tokens/s, ETA."""

    def __init__(self, metrics_path: Path, collator: PadCollator):
        self.metrics_path = metrics_path
        self.collator = collator
        self.started = time.perf_counter()
        self.start_step = 0
        self.training = False
        self.tokens = self.trained_tokens = 0

    def record(self, entry: dict) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()
        self.training = True
        self.start_step = state.global_step  # > 0 when resuming
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
            "grad_norm": None if logs.get("grad_norm") is None else round(float(logs["grad_norm"]), 5),
            "tokens_seen": self.tokens,
            "tokens_per_second": round(self.tokens / elapsed, 1) if elapsed else None,
            "trained_tokens_per_second": round(self.trained_tokens / elapsed, 1) if elapsed else None,
            "elapsed_s": round(elapsed, 2),
        }
        self.record(entry)
        done = step - self.start_step
        eta = elapsed / done * (total - step) if done else 0.0
        minutes, seconds = divmod(int(eta), 60)
        console.print(
            f"  step {step}/{total}  loss {entry['loss']:.4f}  lr {entry['lr']:.2e}  "
            f"{entry['tokens_per_second'] or 0:.0f} tok/s  ETA {minutes}m{seconds:02d}s"
        )

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_loss" in metrics:
            loss = round(metrics["eval_loss"], 5)
            self.record({"step": state.global_step, "eval_loss": loss})
            if self.training:
                console.print(f"  step {state.global_step}: eval loss {loss:.4f}")

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False


class StopOnSignal(TrainerCallback):
    """SIGTERM or SIGINT: finish the current step, save a checkpoint, stop."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def install(self) -> None:
        for number in (signal.SIGTERM, signal.SIGINT):
            self._previous[number] = signal.signal(number, self._handle)

    def uninstall(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number, frame) -> None:
        if self.received is None:
            console.print(f"\ntrain: {signal.Signals(number).name} received; saving at the end of this step")
        self.received = number

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True


class EarlyStop(TrainerCallback):
    """Stop when the eval loss has not improved for `patience` evaluations in a row."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best: float | None = None
        self.stale = 0

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        loss = (metrics or {}).get("eval_loss")
        if loss is None or state.global_step == 0:
            return
        if self.best is None or loss < self.best:
            self.best, self.stale = loss, 0
            return
        self.stale += 1
        if self.stale >= self.patience:
            console.print(f"train: early stop, eval loss has not improved for {self.stale} evaluations")
            control.should_training_stop = True


class MarkCheckpoints(TrainerCallback):
    """After the Trainer has written a checkpoint: mark it good, then rotate."""

    def __init__(self, root: Path, keep: int):
        self.root = root
        self.keep = keep

    def on_save(self, args, state, control, **kwargs):
        folder = self.root / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            checkpoints.mark_good(folder)
            checkpoints.rotate(self.root, self.keep)
