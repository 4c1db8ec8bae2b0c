"""The Trainer llmtune trains with, and its arguments.

GroupedTrainer: transformers' Trainer (under TRL's, for the objectives beyond SFT: trl.py) with
the seeded length-grouped sampler, LoRA+'s optimizer, the loss and gradient norm shown to the
callbacks that check them, fp16 loss scaling on the CPU, and checkpoints under FSDP that gather
only what was trained. ChunkedLossTrainer: SFT's loss without full logits (loss.py).
`make_trainer` builds the one a recipe's objective trains with; `fit` runs it.
"""

from __future__ import annotations

import math
from pathlib import Path

from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from llmtune.console import console
from llmtune.errors import InputError
from llmtune.stages.train import checkpoints, distributed, trl
from llmtune.stages.train.loss import chunked_loss_supported, summed_token_loss
from llmtune.stages.train.sampler import SeededLengthGroupedSampler, _EpochToSampler


class GroupedTrainer(Trainer):
    """The transformers Trainer with the seeded length-grouped sampler; evaluation batches are
    not counted as trained tokens by the collator; each micro-batch's loss is shown to the
    callbacks that check it (StopOnNonFinite), which the Trainer's own events never see."""

    def __init__(self, *args, loraplus_lr_ratio: float | None = None, **kwargs):
        self.loraplus_lr_ratio = loraplus_lr_ratio  # adapter.loraplus_lr_ratio; the optimizer is made in train()
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        """LoRA+ (adapter.loraplus_lr_ratio): peft's optimizer with the B matrices in a group of
        their own at ratio x the learning rate, of the class train.optimizer names."""
        if self.loraplus_lr_ratio is None or self.optimizer is not None:
            return super().create_optimizer(model)
        from peft.optimizers import create_loraplus_optimizer

        model = model if model is not None else self.model
        optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        kwargs.pop("lr", None)
        self.optimizer = create_loraplus_optimizer(
            model, optimizer_cls, lr=self.args.learning_rate, loraplus_lr_ratio=self.loraplus_lr_ratio,
            loraplus_weight_decay=self.args.weight_decay, **kwargs)
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        for callback in self.callback_handler.callbacks:
            if hasattr(callback, "saw_loss"):
                callback.saw_loss(loss)
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        """The gradient norm the Trainer computed for clipping, shown to the callbacks that check
        it: the same number on every rank, whatever holds the gradients (DDP, FSDP's shards,
        DeepSpeed's partitions, where p.grad is empty), with no second pass over them."""
        norm = super()._get_grad_norm(model, grad_norm)
        for callback in self.callback_handler.callbacks:
            if hasattr(callback, "saw_grad_norm"):
                callback.saw_grad_norm(norm)
        return norm

    def create_accelerator_and_postprocess(self):
        """fp16 with loss scaling on the CPU too (torch's CPU autocast and GradScaler), which
        accelerate leaves out: CI then runs the path pre-Ampere GPUs take."""
        super().create_accelerator_and_postprocess()
        accelerator = self.accelerator
        if self.args.fp16 and accelerator.device.type == "cpu" and accelerator.scaler is None:
            import torch

            accelerator.native_amp = True
            accelerator.scaler = torch.amp.GradScaler("cpu")

    def save_model(self, output_dir=None, _internal_call=False):
        """Under FSDP the Trainer gathers the whole model, frozen base included, onto rank 0 at
        every checkpoint to save an adapter of a few megabytes: gather the trained tensors only."""
        if not self.is_fsdp_enabled:
            return super().save_model(output_dir, _internal_call)
        from llmtune.stages.train.distributed import trainable_state_dict

        state_dict = trainable_state_dict(self)
        if self.args.should_save:
            self._save(output_dir or self.args.output_dir, state_dict=state_dict)

    def evaluate(self, *args, **kwargs):
        collator = self.data_collator
        counting, collator.counting = getattr(collator, "counting", True), False
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            collator.counting = counting

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        # Grouped by the global batch: with N processes, accelerate hands batch i to rank i % N,
        # so N processes see the same examples in each step as one process with N times the batch.
        sampler = SeededLengthGroupedSampler(
            list(dataset[self.args.length_column_name]),
            self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size,
            self.args.data_seed if self.args.data_seed is not None else self.args.seed,
        )
        self.remove_callback(_EpochToSampler)  # from an earlier dataloader
        self.add_callback(_EpochToSampler(sampler))
        return sampler


class ChunkedLossTrainer(GroupedTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        total, trained, outputs = summed_token_loss(model, inputs, checkpointed=True)
        # Normalised over the whole accumulated batch when the Trainer counts it, as the model's
        # own loss is; then the Trainer must not divide by the accumulation steps again.
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        count = num_items_in_batch if num_items_in_batch is not None else max(trained, 1)
        loss = total / count
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # the count is over every rank's batch and DDP averages gradients over ranks: scale
            # back up, as the Trainer's own compute_loss does
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss


def trainer_class(row, model_config, loss_choice: str):
    """The class an objective trains with: TRL's trainer on GroupedTrainer, or for SFT the
    chunked loss where the architecture's head allows it (train.loss)."""
    if row.trl is not None:
        return trl.trainer_class(row, GroupedTrainer)
    chunked = loss_choice == "chunked" or (loss_choice == "auto" and chunked_loss_supported(model_config))
    console.print(f"train: loss {'chunked (no full logits)' if chunked else 'standard'}")
    return ChunkedLossTrainer if chunked else GroupedTrainer


def make_trainer(job, model, tokenizer, train_set, validation, collator, callbacks):
    """The Trainer for a training job (trainer class, arguments, data, callbacks): TRL's config
    takes the arguments SFT uses and the objective's own. Trackers read their settings here."""
    row, recipe = job.row, job.recipe
    arguments = training_arguments(recipe, job.partial / checkpoints.CHECKPOINTS, job.device, job.precision,
                                   validation is not None, "eval_loss_before" not in job.state, job.strategy)
    if row.trl is None:
        arguments, extra = TrainingArguments(**arguments), {"data_collator": collator}
    else:
        arguments = trl.config(row, recipe, arguments)
        extra = {**trl.extra_arguments(row, recipe, collator), "processing_class": tokenizer}
        console.print(f"train: objective {row.name} (TRL's {row.trl[0].rsplit(':', 1)[1]}), "
                      f"reference model: {row.reference(recipe)}")
    distributed.one_gpu_per_process(arguments)
    trainer = trainer_class(row, model.config, recipe.train.loss)(
        model=model, args=arguments, train_dataset=train_set, eval_dataset=validation, callbacks=callbacks,
        loraplus_lr_ratio=recipe.adapter.loraplus_lr_ratio, **extra)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def fit(trainer, checkpoint: Path | None, stop):
    """Train (from `checkpoint` when resuming), with the stop signals handled meanwhile."""
    stop.install()
    try:
        return trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        stop.uninstall()


def evaluate(trainer: Trainer, when: str, row) -> tuple[float | None, dict]:
    """The eval loss, and what the objective's trainer measures besides on the validation set
    (a preference objective's reward margin and accuracy), under the summary's names."""
    if trainer.eval_dataset is None:
        return None, {}
    metrics = trainer.evaluate()
    loss = round(metrics["eval_loss"], 5)
    rewards = [f"{name.rsplit('_', 1)[1]} {metrics[key]:.3f}" for key, name in row.eval_logs.items() if key in metrics]
    if trainer.args.__class__ is not TrainingArguments:  # a preference objective's loss is no perplexity
        console.print(f"train: eval loss {when}: {loss:.4f}" + "".join(f", {r}" for r in rewards))
    else:
        console.print(f"train: eval loss {when}: {loss:.4f} (perplexity {math.exp(loss):.2f})")
    return loss, {name: round(metrics[key], 5) for key, name in row.eval_logs.items() if key in metrics}


# train.optimizer -> transformers' `optim`: each from the library that implements it.
OPTIMIZERS = {"adamw": "adamw_torch_fused", "adamw_8bit": "adamw_bnb_8bit", "paged_adamw_8bit": "paged_adamw_8bit",
              "adafactor": "adafactor", "sgd": "sgd", "lion_8bit": "lion_8bit"}


def check_optimizer(recipe, device: str) -> None:
    """Refuse what the device cannot run, before the model is loaded."""
    if recipe.train.optimizer.startswith("paged_") and device != "cuda":
        raise InputError(f"train.optimizer: {recipe.train.optimizer} pages optimizer state between a CUDA "
                         f"GPU and CPU memory; this device is {device}",
                         hint="use adamw_8bit for the same 8-bit states without paging")


def training_arguments(recipe, output_dir: Path, device: str, precision: str, has_eval: bool,
                        eval_before: bool, strategy: dict) -> dict:
    """transformers' TrainingArguments for the recipe, as keyword arguments (TRL's configs take
    the same, and the objective's own besides)."""
    cfg = recipe.train
    periodic_eval = has_eval and cfg.eval_every is not None
    return dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        learning_rate=cfg.lr,
        optim=OPTIMIZERS[cfg.optimizer],
        neftune_noise_alpha=cfg.neftune_alpha,
        torch_compile=cfg.compile,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        logging_steps=cfg.log_every,
        logging_strategy="steps",
        # A NaN loss is reported as such (StopOnNonFinite stops there), never replaced by the
        # average of earlier ones, which the Trainer does by default.
        logging_nan_inf_filter=False,
        # Checkpoints every save_every steps (and on SIGTERM/SIGINT); MarkCheckpoints rotates
        # them itself, after marking, so rotation can never remove the last good one.
        save_strategy="steps" if cfg.save_every else "no",
        save_steps=cfg.save_every or 500,
        save_total_limit=None,
        eval_strategy="steps" if periodic_eval else "no",
        # The loss before training, evaluated inside train(): a Trainer that evaluates before
        # train() marks the model prepared, and then never wraps it in DDP (transformers 5.23).
        eval_on_start=has_eval and eval_before,
        eval_steps=cfg.eval_every if periodic_eval else None,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        length_column_name="length",
        report_to=list(cfg.report_to) or "none",
        run_name=recipe.name,
        prediction_loss_only=True,
        disable_tqdm=True,
        remove_unused_columns=False,
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        **strategy,  # DDP, FSDP or DeepSpeed settings (distributed.py)
    )
