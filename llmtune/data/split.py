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
