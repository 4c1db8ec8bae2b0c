"""Batches of similar lengths, in an order fixed by (seed, epoch).

transformers' LengthGroupedSampler shuffles with the global RNG when iteration starts, so a
resumed run sees other batches than an uninterrupted one. This sampler uses transformers' own
grouping (get_length_grouped_indices: shuffled mega-batches, each sorted by length) with a
generator seeded from the training seed and the epoch, which the Trainer sets on every epoch,
resumed or not.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import get_length_grouped_indices


class SeededLengthGroupedSampler(Sampler):
    def __init__(self, lengths: list[int], group_size: int, seed: int):
        self.lengths, self.group_size, self.seed, self.epoch = lengths, group_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.group_size, generator=generator))


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
    not counted as trained tokens by the collator."""

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
