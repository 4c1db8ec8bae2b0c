"""Dataset statistics shown to the user and written to prepared/stats.json."""

from __future__ import annotations

import math
from array import array

from llmtune.data.chat import IGNORE, Example


def percentile(values, q: float) -> int:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


class SplitStats:
    """Counts of one split, added to example by example: a streaming prepare never holds the
    examples, only their lengths (4 bytes each) for the percentiles."""

    def __init__(self):
        self.lengths = array("i")
        self.trained = 0
        self.truncated = 0
        self.answers_cut = 0

    def add(self, example: Example, times: int = 1) -> None:
        length = len(example.input_ids)
        self.lengths.extend([length] * times)
        self.trained += times * (length - example.labels.count(IGNORE))
        self.truncated += times * example.truncated
        self.answers_cut += times * example.answer_cut

    def result(self) -> dict[str, float | int]:
        lengths = self.lengths
        tokens = sum(lengths)
        return {
            "examples": len(lengths),
            "tokens": tokens,
            "trained_tokens": self.trained,
            "trained_share": round(self.trained / tokens, 4) if tokens else 0.0,
            "length_p50": percentile(lengths, 50) if lengths else 0,
            "length_p95": percentile(lengths, 95) if lengths else 0,
            "length_max": max(lengths, default=0),
            "truncated": self.truncated,
            "answers_cut": self.answers_cut,  # of those, trained text cut too
        }
