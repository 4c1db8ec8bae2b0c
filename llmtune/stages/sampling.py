"""Batches of similar lengths, in an order fixed by (seed, epoch).

transformers' LengthGroupedSampler shuffles with the global RNG when iteration starts, so a
resumed run sees other batches than an uninterrupted one. This sampler groups with a generator
seeded from the training seed and the epoch, which the Trainer sets on every epoch, resumed or
not. The grouping (`grouped_indices`) is transformers' (shuffled mega-batches of up to 50
batches, each sorted by length, the longest batch first) with two changes: a small dataset is
one mega-batch rather than four (transformers' rule left 23% padding on 64 GSM8K chats, this one
3%), and the batches of a mega-batch come in a random order, not longest to shortest.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler
from transformers import Trainer, TrainerCallback


MEGA_BATCH = 50  # batches sorted together (transformers' largest mega-batch)


def grouped_indices(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[int]:
    """Every index once, in batches of `batch_size` consecutive indices of similar lengths."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    size = MEGA_BATCH * batch_size
    batches = []
    for start in range(0, len(order), size):
        mega = sorted(order[start:start + size], key=lambda i: lengths[i], reverse=True)
        group = [mega[i:i + batch_size] for i in range(0, len(mega), batch_size)]
        batches += [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
    # the longest batch first, so that running out of memory shows at once
    longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
    batches[0], batches[longest] = batches[longest], batches[0]
    return [index for batch in batches for index in batch]


class SeededLengthGroupedSampler(Sampler):
    def __init__(self, lengths: list[int], group_size: int, seed: int):
        self.lengths, self.group_size, self.seed, self.epoch = lengths, group_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(grouped_indices(self.lengths, self.group_size, generator))


class _EpochToSampler(TrainerCallback):
    """Tells the sampler its epoch when each epoch begins. The Trainer does too, except in the
    epoch a run resumes in under several processes: there the sampler sits three wrappers deep
    (skipped batches, accelerate's per-rank shard, the batch sampler) and set_epoch never reaches
    it, so the resumed epoch would replay epoch 0's order (transformers 5.23, accelerate 1.15).
    state.epoch is the (fractional) epoch the loop is at: its whole part is the epoch beginning."""

    def __init__(self, sampler: SeededLengthGroupedSampler):
        self.sampler = sampler

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.sampler.set_epoch(int(state.epoch or 0))


class GroupedTrainer(Trainer):
    """The transformers Trainer with the seeded length-grouped sampler; evaluation batches are
    not counted as trained tokens by the collator; each micro-batch's loss is shown to the
    callbacks that check it (StopOnNonFinite), which the Trainer's own events never see."""

    loraplus_lr_ratio: float | None = None  # adapter.loraplus_lr_ratio

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
        from llmtune.stages.distributed import trainable_state_dict

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
