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
from transformers import Trainer
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


class GroupedTrainer(Trainer):
    """The transformers Trainer with the seeded length-grouped sampler."""

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        return SeededLengthGroupedSampler(
            list(dataset[self.args.length_column_name]),
            self.args.train_batch_size * self.args.gradient_accumulation_steps,
            self.args.data_seed if self.args.data_seed is not None else self.args.seed,
        )
