"""train: an adapter (LoRA and its family, on a float or quantized base) trained on the prepared
data with the recipe's objective; writes a standard PEFT adapter and its manifest.

Read top to bottom: what training depends on, and whether the adapter is up to date; the checks
that need no model; the folder to train into (or the checkpoint to resume from); the tokenizer,
model, data and collator (build.py); the trainer (trainer.py; TRL's for the objectives beyond
SFT, trl.py); training; the adapter and its manifest. Under torchrun or accelerate launch every
rank runs this and rank 0 writes (distributed.py). What differs by objective is its row in
llmtune/objectives.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import set_seed

from llmtune import model_sources, models
from llmtune.console import console
from llmtune.errors import InputError, Interrupted
from llmtune.manifest import (
    Outcome,
    finish_stage,
    is_up_to_date,
    partial_dir,
    read_manifest,
    require_stage,
    stage_dir,
    start_stage,
    upstream_ref,
)
from llmtune.objectives import Objective, objective
from llmtune.plot import plot_metrics
from llmtune.recipe import Recipe, section_sha256
from llmtune.stages.train import build, checkpoints, distributed, trackers
from llmtune.stages.train.build import lora_config
from llmtune.stages.train.callbacks import (
    EarlyStop,
    MarkCheckpoints,
    RecordEvalBefore,
    ReportCheckpointsToRay,
    StopOnNonFinite,
    StopOnSignal,
    TrainProgress,
)
from llmtune.stages.train.trainer import check_optimizer, evaluate, fit, make_trainer

__all__ = ["train", "lora_config"]


@dataclass
class TrainingJob:
    """One training run's settings and state, as the trainer is built from them."""

    recipe: Recipe
    row: Objective  # the objective's row
    run: Path
    prepared: Path
    partial: Path  # <adapter>.partial/, trained into
    device: str
    precision: str
    strategy: dict  # the Trainer's arguments for the distributed section
    state: dict  # the resume state: what the run depends on, the eval loss before training
    checkpoint: Path | None  # to resume from
    command: str


# what a lost worker costs (restarts), not what is trained: changing it leaves the adapter up to date
NOT_TRAINING = {"distributed": {"max_failures"}}


def train(recipe: Recipe, run: Path, force: bool = False, resume: bool = False,
          stop_request: Path | None = None) -> Outcome:
    """Train the adapter; under torchrun/accelerate launch every rank runs this, rank 0 writes.
    Under Ray (llmtune/ray_launch.py) each worker runs it with `stop_request`: the file whose
    appearance stops training at a checkpoint, as a signal does elsewhere; each checkpoint is
    reported to Ray as it is written."""
    prepared_dir, out_dir = stage_dir(run, "prepare"), stage_dir(run, "train")
    command = f"llmtune train {run / 'recipe.yaml'}"
    require_stage(prepared_dir, "prepare", f"llmtune prepare {run / 'recipe.yaml'}")
    device = models.pick_device()
    distributed.start(device, recipe.distributed)
    with distributed.main_first():  # converted and fingerprinted once, not once per rank
        ref = model_sources.resolve_section(recipe.model)
        ref.fingerprint
    inputs = {"prepared": upstream_ref(prepared_dir, out_dir), "base_model": ref.as_manifest()}
    recipe_sha = section_sha256(recipe, "model", "adapter", "train", "distributed", exclude=NOT_TRAINING)
    depends_on = {
        "model section": section_sha256(recipe, "model"),
        "adapter section": section_sha256(recipe, "adapter"),
        "train section": section_sha256(recipe, "train"),
        "distributed section": section_sha256(recipe, "distributed", exclude=NOT_TRAINING),
        "prepared data": inputs["prepared"]["manifest_sha256"],
        "base model weights": ref.fingerprint,
    }
    # an interrupted training of this same run is resumed, even where an older adapter is up to date
    resumable = not force and _resumable(out_dir, depends_on)
    if not force and not resumable and is_up_to_date(out_dir, "train", recipe_sha, inputs):
        return Outcome(read_manifest(out_dir), up_to_date=True)

    row = objective(recipe.train.objective)
    strategy = _check_before_loading(recipe, row, device, prepared_dir, command)
    partial, state, checkpoint = distributed.share_from_main(
        lambda: _open_partial(out_dir, resume, force, depends_on, command))
    job = TrainingJob(recipe, row, run, prepared_dir, partial, device, models.precision(recipe.train.precision, device),
                      strategy, state, checkpoint, command)

    set_seed(recipe.train.seed)
    processor = build.processor(ref, prepared_dir)  # image chats: the base's processor
    tokenizer = processor.tokenizer if processor is not None else build.tokenizer(ref, prepared_dir)
    if job.precision == "fp16" and device != "cuda":
        console.print("train: fp16 with loss scaling on the CPU (what pre-Ampere GPUs run); "
                      "bf16 or fp32 are the CPU's own choices")
    distributed.prepare_sharded_loading(strategy)
    model = build.adapter_model(recipe, ref, job.precision, tokenizer.pad_token_id)
    trainable, total = model.get_nb_trainable_parameters()
    _say_what_trains(job, trainable, total)
    train_set, validation = build.datasets(prepared_dir, row, recipe.train.seed, recipe.train.group_by_length)
    collator = build.collator(row, tokenizer, processor, prepared_dir)
    progress = TrainProgress(partial / "metrics.jsonl", collator)
    stop = StopOnSignal(stop_request)
    callbacks = [progress, stop, MarkCheckpoints(partial / checkpoints.CHECKPOINTS, recipe.train.keep_checkpoints),
                 RecordEvalBefore(partial, state),
                 StopOnNonFinite(collator, job.precision, partial / checkpoints.CHECKPOINTS)]
    if stop_request is not None:  # a Ray worker
        callbacks.append(ReportCheckpointsToRay(partial))
    if recipe.train.early_stopping_patience:
        callbacks.append(EarlyStop(recipe.train.early_stopping_patience))
    with trackers.tracker_environment(recipe.train.report_to, run, recipe.name):
        trainer = make_trainer(job, model, tokenizer, train_set, validation, collator, callbacks)
        result = fit(trainer, checkpoint, stop)
    if stop.stopped:
        _interrupted(job, trainer)
    if recipe.distributed.strategy == "fsdp" and distributed.world_size() > 1:
        console.print(f"train: FSDP2 sharded {distributed.sharded_parameters(trainer.model_wrapped)} "
                      f"parameter tensors across {distributed.world_size()} processes")
    eval_after, eval_rewards = evaluate(trainer, "after training", row)
    rose = _eval_loss_rose(state.get("eval_loss_before"), eval_after)
    # FSDP and ZeRO-3 shard the weights: every rank takes part in gathering the trained ones
    state_dict = distributed.trainable_state_dict(trainer)
    if not distributed.is_main():
        distributed.barrier()  # until rank 0 has written the adapter and its manifest
        return Outcome(read_manifest(out_dir), up_to_date=False)

    model.save_pretrained(str(partial), state_dict=state_dict)
    (processor or tokenizer).save_pretrained(str(partial))  # a processor saves its tokenizer too
    (partial / checkpoints.RESUME_STATE).unlink()
    summary = {
        "steps": result.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 3),
        "train_loss": round(_whole_run_loss(result, checkpoint, partial / "metrics.jsonl"), 5),
        "eval_loss_before": state.get("eval_loss_before"),
        "eval_loss": eval_after,
        "eval_loss_rose": rose,  # `llmtune run` stops before merge and export then
        **eval_rewards,  # preference objectives: eval_reward_margin, eval_reward_accuracy
        "objective": row.name,
        "trainable_params": trainable,
        "total_params": total,
        # the compute dtype (and of the frozen weights): inference on this adapter uses it too
        "precision": job.precision,
        # merge compares the float merge with the quantized base + adapter that was trained
        "base_quantization": {"quantize": recipe.model.quantize,
                              "double_quant": recipe.model.double_quant,
                              "compute_dtype": recipe.model.compute_dtype},
        "train_seconds": round(progress.seconds, 1),
        "resumed_from_step": checkpoints.step_of(checkpoint) if checkpoint else None,
        "tokens_per_second": round(progress.tokens / progress.seconds, 1) if progress.seconds else None,
        "trained_tokens_per_second": (round(progress.trained_tokens / progress.seconds, 1)
                                      if progress.seconds else None),
    }
    manifest = finish_stage(partial, out_dir, stage="train", recipe_sha256=recipe_sha,
                            inputs=inputs, summary=summary, device=device)
    try:
        plot_metrics(out_dir / "metrics.jsonl", run / "training_curves.png")
        console.print(f"train: training curves -> {run / 'training_curves.png'}")
    except InputError as missing:  # the adapter is written: a missing plotting library costs the PNG only
        console.print(f"train: no training curves: {missing.message} ({missing.hint})")
    distributed.barrier()
    return Outcome(manifest, up_to_date=False)


def _eval_loss_rose(before: float | None, after: float | None) -> bool:
    """Whether training made the held-out loss worse (a learning rate too high, data unlike the
    validation set); said in one line with both figures."""
    rose = before is not None and after is not None and after > before
    if rose:
        console.print(f"[yellow]train: the eval loss rose from {before:.4f} before training to {after:.4f}: "
                      "this adapter is worse than the base on the held-out data[/yellow]")
    return rose


def _check_before_loading(recipe: Recipe, row: Objective, device: str, prepared_dir: Path, command: str) -> dict:
    """What can be refused before the model loads; returns the distributed strategy's arguments."""
    trackers.check_installed(recipe.train.report_to)
    check_optimizer(recipe, device)
    if recipe.train.compile and device == "cpu":
        console.print("[yellow]train: warning: train.compile on a CPU was 4.5x slower in "
                      "scripts/bench_train.py (it compiles again for each new batch length)[/yellow]")
    strategy = distributed.strategy_arguments(recipe.distributed, device, recipe.model.quantize,
                                              recipe.train.optimizer)
    notice = distributed.single_process_notice(recipe.distributed)
    if notice:
        console.print(f"train: {notice}")
    _check_prepared_kind(prepared_dir, row, command)  # before anything is written
    if row.rewards:
        _check_answers(recipe, prepared_dir)
    return strategy


def _say_what_trains(job: TrainingJob, trainable: int, total: int) -> None:
    recipe = job.recipe
    console.print(
        f"train: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / total:.2f}%), device {job.device}, precision {job.precision}"
        + (", gradient checkpointing" if recipe.train.gradient_checkpointing else "")
        + (f", base quantized {recipe.model.quantize}" if recipe.model.quantize != "none" else "")
        + (f", {distributed.world_size()} processes ({recipe.distributed.strategy})"
           if distributed.world_size() > 1 else "")
    )


def _interrupted(job: TrainingJob, trainer) -> None:
    """Stopped by a signal at a checkpoint: say where, and how to go on (exit 75)."""
    if distributed.is_main():  # `llmtune launch` reads this to tell "interrupted" from a crash
        checkpoints.write_resume_state(job.partial, {**job.state, "interrupted_at_step": trainer.state.global_step})
    distributed.barrier()
    raise Interrupted(
        f"training interrupted at step {trainer.state.global_step}; a checkpoint was saved "
        f"in {job.partial / checkpoints.CHECKPOINTS}",
        hint=f"resume with: {job.command} (training resumes by default; --resume auto insists on it, "
        "--force starts over)",
    )


def _resumable(out_dir: Path, depends_on: dict) -> bool:
    """Whether `<adapter>.partial/` holds a good checkpoint of a training of this same run."""
    partial = partial_dir(out_dir)
    state = checkpoints.read_resume_state(partial)
    return (state is not None and state.get("depends_on") == depends_on
            and checkpoints.newest_good(partial / checkpoints.CHECKPOINTS) is not None)


def _open_partial(out_dir: Path, resume: bool, force: bool, depends_on: dict, command: str):
    """`<adapter>.partial/` to train into: (folder, resume state, checkpoint to resume from).
    A good checkpoint of this same run is resumed by default, and never dropped without a word:
    --force starts over saying so; a checkpoint of another recipe or data is refused under
    --resume auto and otherwise left saying why."""
    partial = partial_dir(out_dir)
    state = checkpoints.read_resume_state(partial)
    checkpoint = checkpoints.newest_good(partial / checkpoints.CHECKPOINTS) if state is not None else None
    if checkpoint is not None:
        found = f"the checkpoint at step {checkpoints.step_of(checkpoint)} ({checkpoint})"
        changed = [name for name in depends_on if state["depends_on"].get(name) != depends_on[name]]
        if force:
            console.print(f"train: --force: starting over; {found} is discarded")
            checkpoint = None
        elif changed:
            if resume:
                checkpoints.check_same_run(state["depends_on"], depends_on, command)
            console.print(f"train: starting over: {found} was trained with another {', '.join(changed)}")
            checkpoint = None
    elif resume:
        console.print("train: no good checkpoint to resume from; starting from the beginning")
    if checkpoint is None:
        partial = start_stage(out_dir)
        state = {"depends_on": depends_on}
    else:
        console.print(f"train: resuming from {checkpoint} (step {checkpoints.step_of(checkpoint)}); "
                      "--force starts over")
        checkpoints.discard_after(partial / checkpoints.CHECKPOINTS, checkpoints.step_of(checkpoint))
        _drop_metrics_after(partial / "metrics.jsonl", checkpoints.step_of(checkpoint))
        state.pop("interrupted_at_step", None)
    checkpoints.write_resume_state(partial, state)
    return partial, state, checkpoint


def _whole_run_loss(result, checkpoint: Path | None, metrics: Path) -> float:
    """The mean training loss over every step of the run. After a resume, the Trainer's covers
    the resumed steps only: the steps before come from metrics.jsonl (each logged loss is the
    mean since the one before)."""
    if checkpoint is None or not result.global_step:
        return result.training_loss
    resumed = checkpoints.step_of(checkpoint)
    logged = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.is_file() else []
    before = sorted((entry["step"], entry["loss"]) for entry in logged if "loss" in entry and entry["step"] <= resumed)
    if not before:
        return result.training_loss
    summed, previous = 0.0, 0
    for step, loss in before:
        summed += loss * (step - previous)
        previous = step
    summed *= resumed / previous  # steps after the last logged one, before the checkpoint
    return (summed + result.training_loss * (result.global_step - resumed)) / result.global_step


def _drop_metrics_after(path: Path, step: int) -> None:
    """Resuming repeats the steps after the checkpoint: forget what they logged."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in kept))


def _check_prepared_kind(prepared_dir: Path, row, command: str) -> None:
    """Refuse a prepared set of another kind than the objective trains on."""
    kind = read_manifest(prepared_dir)["summary"].get("kind", "sft")
    if kind != row.kind:
        raise InputError(f"{prepared_dir} holds {kind} data, but train.objective {row.name} trains on {row.kind} data",
                         hint=f"prepare it again for this recipe: {command.replace('train', 'prepare', 1)} --force")


def _check_answers(recipe: Recipe, prepared_dir: Path) -> None:
    """Refuse, before the model loads, rewards that compare with an answer on prompts without one."""
    from llmtune.rewards import needs_answer

    missing = read_manifest(prepared_dir)["summary"].get("without_answer", 0)
    comparing = needs_answer(recipe.rewards)
    if missing and comparing:
        raise InputError(f"{missing} prompts in {prepared_dir} have no answer, and the reward(s) "
                         f"{', '.join(comparing)} compare the completion with the row's answer",
                         hint="give every row an answer (data fields: {answer: COLUMN}), or drop the match reward")
