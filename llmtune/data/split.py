"""Seeded shuffling and the validation split."""

from __future__ import annotations

import random
from typing import TypeVar

T = TypeVar("T")


def split_rows(rows: list[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Shuffle with `seed`, then hold out `fraction` of the rows (at least one when asked for)."""
    shuffled = list(rows)
    random.Random(seed).shuffle(shuffled)
    if fraction <= 0 or len(shuffled) < 2:
        return shuffled, []
    held_out = min(len(shuffled) - 1, max(1, round(fraction * len(shuffled))))
    return shuffled[held_out:], shuffled[:held_out]


def dedup(samples: list[T], key) -> tuple[list[T], int]:
    """Samples with exact duplicates (by `key(sample)`) removed, first kept; and how many went."""
    seen: set = set()
    unique = []
    for sample in samples:
        identity = key(sample)
        if identity not in seen:
            seen.add(identity)
            unique.append(sample)
    return unique, len(samples) - len(unique)


def weighted(rows: list[T], weight: float, seed: int) -> list[T]:
    """A source's rows repeated or sampled to `weight` times their number (for mixing sources)."""
    whole, fraction = int(weight), weight - int(weight)
    extra = random.Random(seed).sample(rows, round(fraction * len(rows)))
    return rows * whole + extra
