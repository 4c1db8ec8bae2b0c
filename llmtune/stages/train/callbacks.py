"""Trainer callbacks: progress and metrics.jsonl, graceful stop on SIGTERM/SIGINT, a stop at the
first non-finite loss or gradient, early stopping on eval loss, and marking/rotating checkpoints
once they are fully written."""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from llmtune.console import console
from llmtune.errors import Diverged
from llmtune.objectives import logged_metrics
from llmtune.stages.collate import PadCollator
from llmtune.stages.train import checkpoints, distributed

# What TRL's trainers log -> the names in metrics.jsonl (and the training curves), each
# objective's in its row (objectives.py); besides, GRPO's rewards per function and the share of
# completions that ended (EOS) within max_completion_length, read below.
TRL_METRICS = logged_metrics()
EVAL_METRICS = logged_metrics(evaluation=True)


def trl_metrics(logs: dict) -> dict:
    """The objective's own metrics in a Trainer log entry, under metrics.jsonl's names."""
    entry = {name: round(float(logs[key]), 5) for key, name in TRL_METRICS.items() if key in logs}
    for key, value in logs.items():
        parts = key.split("/")
        if parts[0] == "rewards" and len(parts) == 3:  # rewards/<function>/mean|std (GRPO)
            entry[f"reward_{parts[1]}_{parts[2]}"] = round(float(value), 5)
        elif parts[0] == "reward_errors":
            # completions whose reward raised (each counted as 0): per generation batch, as TRL averages it
            entry[f"reward_errors_{parts[1]}"] = round(float(value), 3)
    if "completions/clipped_ratio" in logs:
        entry["ended_with_eos"] = round(1 - float(logs["completions/clipped_ratio"]), 5)
    return entry



class TrainProgress(TrainerCallback):
    """One terminal line and one metrics.jsonl record per logging step: loss, lr, tokens/s, ETA."""

    def __init__(self, metrics_path: Path, collator: PadCollator):
        self.metrics_path = metrics_path
        self.collator = collator
        self.started = time.perf_counter()
        self.start_step = 0
        self.training = False
        self.tokens = self.trained_tokens = 0
        self.seconds = 0.0  # training time, set when training ends

    def record(self, entry: dict) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()
        self.training = True
        self.start_step = state.global_step  # > 0 when resuming
        self.collator.tokens = self.collator.trained_tokens = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        elapsed = time.perf_counter() - self.started
        # every rank logs at the same steps; each counted its own batches
        self.tokens, self.trained_tokens = distributed.sum_over_ranks(
            [self.collator.tokens, self.collator.trained_tokens])
        if not state.is_world_process_zero:
            return
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
        entry.update(trl_metrics(logs))
        self.record(entry)
        done = step - self.start_step
        eta = elapsed / done * (total - step) if done else 0.0
        minutes, seconds = divmod(int(eta), 60)
        rewards = "".join(f"  {label} {entry[key]:.3f}" for key, label in
                          (("reward_margin", "margin"), ("reward_accuracy", "accuracy"), ("reward_mean", "reward"),
                           ("kl", "kl"), ("completion_length", "length"), ("ended_with_eos", "ended"))
                          if key in entry)
        console.print(
            f"  step {step}/{total}  loss {entry['loss']:.4f}{rewards}  lr {entry['lr']:.2e}  "
            f"{entry['tokens_per_second'] or 0:.0f} tok/s  ETA {minutes}m{seconds:02d}s"
        )

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if state.global_step == 0:
            self.started = time.perf_counter()  # training time starts after the eval before it
        if metrics and "eval_loss" in metrics and state.is_world_process_zero:
            loss = round(metrics["eval_loss"], 5)
            self.record({"step": state.global_step, "eval_loss": loss})
            # perplexity means something for a language-model loss only (not DPO's)
            perplexity = f" (perplexity {math.exp(loss):.2f})" if self.collator.__class__ is PadCollator else ""
            rewards = "".join(f", {name.rsplit('_', 1)[1]} {metrics[key]:.3f}"
                              for key, name in EVAL_METRICS.items() if key in metrics)
            if state.global_step == 0:
                console.print(f"train: eval loss before training: {loss:.4f}{perplexity}{rewards}")
            elif self.training:
                console.print(f"  step {state.global_step}: eval loss {loss:.4f}{rewards}")

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False
        self.seconds = time.perf_counter() - self.started


class RecordEvalBefore(TrainerCallback):
    """Keeps the eval loss before training (evaluated at step 0) in the resume state, so that a
    resumed run reports it too."""

    def __init__(self, partial: Path, resume_state: dict):
        self.partial = partial
        self.resume_state = resume_state

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if state.global_step == 0 and metrics and "eval_loss" in metrics:
            self.resume_state["eval_loss_before"] = round(metrics["eval_loss"], 5)
            if distributed.is_main():
                checkpoints.write_resume_state(self.partial, self.resume_state)


class StopOnSignal(TrainerCallback):
    """SIGTERM, SIGINT or SIGUSR1 (SLURM's warning before the time limit): finish the current
    step, save a checkpoint, stop. With several processes, a signal that reached any rank stops
    every rank after the same step (one all-reduce per step).

    Under Ray the training runs outside the worker's main thread, where Python takes no signal
    handlers: the launcher asks for the stop by writing `request_file` (rank 0 looks for it
    once per step, and the all-reduce tells the others)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self, request_file: Path | None = None):
        self.received: int | None = None
        self.stopped = False
        self.request_file = request_file
        self._previous = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal.signal would raise there; request_file is how to ask
        for number in self.SIGNALS:
            self._previous[number] = signal.signal(number, self._handle)

    def uninstall(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handle(self, number, frame) -> None:
        if self.received is None:
            console.print(f"\ntrain: {signal.Signals(number).name} received; saving at the end of this step")
        self.received = number

    def _requested(self) -> bool:
        if self.received is not None:
            return True
        if self.request_file is not None and distributed.is_main() and self.request_file.exists():
            console.print("\ntrain: the launcher asked to stop; saving at the end of this step")
            self.received = signal.SIGTERM
            return True
        return False

    def on_step_end(self, args, state, control, **kwargs):
        if distributed.any_rank(self._requested()):
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True


class StopOnNonFinite(TrainerCallback):
    """Stops training at the first NaN or infinite loss or gradient norm, before the optimizer
    applies it: the Trainer would otherwise report such a loss as the average of earlier ones
    (0.0 at the start), train on, and hand merge and export a broken adapter.

    The Trainer reports each micro-batch's loss (`saw_loss`) and the gradient norm it computed
    for clipping (`saw_grad_norm`, the same on every rank: after DDP's all-reduce, over FSDP's
    shards, from DeepSpeed's engine); before each optimizer step every rank decides together
    (a NaN on one rank reaches all of them through the gradient all-reduce anyway). Under fp16
    an infinite gradient is the loss scaler's business (it skips that step and lowers the
    scale), so only the loss counts there. Under DeepSpeed the engine has already stepped when
    the norm is known: the stop comes one step late there. Raises Diverged naming the step and
    its rows (file:line)."""

    def __init__(self, collator: PadCollator, precision: str, checkpoints_dir: Path):
        self.collator = collator
        self.scaled = precision == "fp16"
        self.checkpoints_dir = checkpoints_dir
        self.losses: list[torch.Tensor] = []  # this step's micro-batch losses, on the device
        self.grad_norm = None

    def saw_loss(self, loss: torch.Tensor) -> None:
        self.losses.append(loss.detach().float().sum())  # checked once per step: no sync here

    def saw_grad_norm(self, norm) -> None:
        self.grad_norm = norm

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        # one device-to-host sync per optimizer step, not one per micro-batch and per check
        losses = torch.stack(self.losses) if self.losses else torch.zeros(0)
        self.losses = []
        bad = (~torch.isfinite(losses)).any()
        norm = None if self.grad_norm is None else torch.as_tensor(self.grad_norm, dtype=torch.float32)
        if not self.scaled and norm is not None:
            bad = bad.to(norm.device) | ~torch.isfinite(norm)
        if not distributed.any_rank(bad):
            return
        step = state.global_step + 1
        bad_loss = next((value for value in losses.tolist() if not math.isfinite(value)), None)
        what = (f"the loss was {bad_loss}" if bad_loss is not None
                else f"the gradient norm was {float(norm)}")
        rows = self.collator.step_rows
        named = ", ".join(rows[:8]) + (f" (and {len(rows) - 8} more)" if len(rows) > 8 else "")
        good = checkpoints.newest_good(self.checkpoints_dir)
        kept = (f"the last good checkpoint, {good}, is kept" if good is not None
                else "no checkpoint had been saved yet")
        raise Diverged(
            f"training stopped at step {step}: {what}" + (f" on the rows {named}" if rows else "")
            + f"; the adapter was not written and {kept}",
            hint="the usual causes: a learning rate too high (lower train.lr or add warmup_steps), "
            "fp16 overflow (use precision bf16 where the GPU has it), or a bad row (look at the rows "
            "named with llmtune data preview); then run train again with --force",
        )

    def on_step_end(self, args, state, control, **kwargs):
        self.collator.step_rows.clear()
        self.grad_norm = None


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
        distributed.barrier()  # every rank has written its part (its RNG state, its shards)
        folder = self.root / f"checkpoint-{state.global_step}"
        if distributed.is_main() and folder.is_dir():
            checkpoints.mark_good(folder)
            checkpoints.rotate(self.root, self.keep)
        distributed.barrier()  # no rank exits (and has the launcher stop the others) mid-mark


class ReportCheckpointsToRay(TrainerCallback):
    """Under `llmtune launch --engine ray`: each checkpoint, once marked good (MarkCheckpoints
    runs first), is reported to Ray Train (`ray.train.report`), which keeps a copy in its storage
    and hands it back (`ray.train.get_checkpoint`) to the worker group it starts after losing a
    worker. Every rank calls report at every checkpoint (Ray waits for all of them); rank 0 gives
    the folder, with the resume state beside it (resuming needs both)."""

    def __init__(self, partial: Path):
        self.partial = partial

    def on_save(self, args, state, control, **kwargs):
        import shutil

        import ray.train

        folder = self.partial / checkpoints.CHECKPOINTS / f"checkpoint-{state.global_step}"
        checkpoint = None
        if distributed.is_main() and (folder / checkpoints.MARK).is_file():
            # the mark lists the files it vouches for: one more beside them does not unmark it
            shutil.copy2(self.partial / checkpoints.RESUME_STATE, folder / checkpoints.RESUME_STATE)
            checkpoint = ray.train.Checkpoint.from_directory(str(folder))
        loss = next((entry["loss"] for entry in reversed(state.log_history) if "loss" in entry), None)
        ray.train.report({"step": state.global_step, **({"loss": loss} if loss is not None else {})},
                         checkpoint=checkpoint, checkpoint_dir_name=folder.name)
