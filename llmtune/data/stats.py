"""Dataset statistics shown to the user and written to prepared/stats.json."""

from __future__ import annotations

import math

from llmtune.data.chat import IGNORE, Example


def percentile(values: list[int], q: float) -> int:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def split_stats(examples: list[Example]) -> dict[str, float | int]:
    lengths = [len(e.input_ids) for e in examples]
    tokens = sum(lengths)
    trained = tokens - sum(e.labels.count(IGNORE) for e in examples)
    return {
        "examples": len(examples),
        "tokens": tokens,
        "trained_tokens": trained,
        "trained_share": round(trained / tokens, 4) if tokens else 0.0,
        "length_p50": percentile(lengths, 50) if lengths else 0,
        "length_p95": percentile(lengths, 95) if lengths else 0,
        "length_max": max(lengths, default=0),
        "truncated": sum(1 for e in examples if e.truncated),
        "answers_cut": sum(1 for e in examples if e.answer_cut),  # of those, trained text cut too
    }
