"""Packing: several examples per sequence, each keeping its own position ids.

Position ids restart at 0 for every example; transformers reads those restarts as sequence
boundaries and keeps attention inside each example (its padding-free path, used when no
attention mask is passed). Bins are filled best-fit decreasing, which leaves little room unused.
"""

from __future__ import annotations

import bisect
import random

from llmtune.data.chat import IGNORE, Example


def pack(examples: list[Example], max_len: int, seed: int = 0,
         sources: list[str] | None = None) -> list[dict]:
    """Rows of input_ids, labels and position_ids, each at most `max_len` tokens, seeded order.
    With `sources` (where each example was read), each row also names its examples' sources."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), kept sorted
    for index in order:
        length = len(examples[index].input_ids)
        slot = bisect.bisect_left(free, (length, -1))
        if slot == len(free):
            bins.append([index])
            room, target = max_len - length, len(bins) - 1
        else:
            room, target = free.pop(slot)
            bins[target].append(index)
            room -= length
        bisect.insort(free, (room, target))
    random.Random(seed).shuffle(bins)
    rows = [_concatenate([examples[i] for i in members]) for members in bins]
    if sources is not None:
        for row, members in zip(rows, bins):
            row["where"] = ", ".join(sources[i] for i in members)
    return rows


def _concatenate(members: list[Example]) -> dict[str, list[int]]:
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for example in members:
        row["input_ids"] += example.input_ids
        # A label is predicted from the token before it. An example's first label would be
        # predicted from the previous example's last token; unpacked, the shift drops it anyway.
        row["labels"] += [IGNORE, *example.labels[1:]]
        row["position_ids"] += list(range(len(example.input_ids)))
    return row
