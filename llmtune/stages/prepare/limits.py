"""What prepare keeps of each encoded row: data.overlong (truncate, drop, error) and the rows that
are skipped with their reason (nothing to train, refused by the template or for an image, a
max_seq_len that would cut an image)."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import replace

from llmtune.data import special_text
from llmtune.data.chat import IGNORE, Example
from llmtune.data.pairs import Pair
from llmtune.data.rows import Row
from llmtune.errors import InputError
from llmtune.recipe import DataSection
from llmtune.stages.prepare import images

# Rows that would train nothing are skipped, each under its own reason, never kept all masked.
NOTHING_TO_TRAIN = "no trained tokens (no assistant turn rendered)"
CUT_AWAY = "trained tokens all beyond max_seq_len"
PROMPT_TOO_LONG = "prompt longer than max_seq_len"
TEMPLATE_REFUSED = "refused by the chat template"  # a pair's answers would have no room


def limit_examples(rows: list[Row], pieces: list[list[Example]], data: DataSection, skipped: Counter):
    """Apply data.overlong; drop examples left with nothing to train. Returns (row, example,
    first example of its row): a row is kept when one of its examples is (a template that renders
    earlier turns differently gives a row one example per rendering, turns.assistant_spans), and
    otherwise counted as skipped once, for the reason its last example had."""
    kept, overlong = [], []
    for row, examples in zip(rows, pieces):
        if isinstance(examples, images.ImageRefused):  # an image that cannot be used
            if data.bad_rows == "error":
                raise InputError(f"{row.where}: {examples.reason}: {examples.detail}",
                                 hint="fix or remove that row, or set data.bad_rows: skip")
            skipped[examples.reason] += 1
            continue
        if isinstance(examples, special_text.Refused):  # the chat template raised on it
            if data.bad_rows == "error":
                raise InputError(f"{row.where}: {TEMPLATE_REFUSED}: {examples.reason}",
                                 hint="fix or remove that row, use a template that accepts it, "
                                 "or set data.bad_rows: skip")
            skipped[TEMPLATE_REFUSED] += 1
            continue
        taken, reason = [], None
        for example in examples:
            example, reason = _limit_one(example, data)
            if reason == "error":
                overlong.append((row.where, example))
            elif example is not None:
                taken.append(example)
        if taken:
            kept += [(row, example, index == 0) for index, example in enumerate(taken)]
        elif reason != "error":
            skipped[reason] += 1
    _refuse_overlong(overlong, rows, data)
    return kept


def _limit_one(example: Example, data: DataSection) -> tuple:
    """(example as kept, None), (None, why it is skipped), or (its length, "error")."""
    if example.labels.count(IGNORE) == len(example.labels):
        # e.g. a conversation without an assistant turn, or a template that renders none
        return None, NOTHING_TO_TRAIN
    if len(example.input_ids) <= data.max_seq_len:
        return example, None
    if data.overlong == "error":
        return len(example.input_ids), "error"
    if data.overlong == "drop":
        return None, "overlong"
    if any(end > data.max_seq_len for _, end in example.image_spans):
        # never cut an image, nor leave one out: the model would get an image without its tokens
        return None, images.IMAGE_CUT
    cut = any(label != IGNORE for label in example.labels[data.max_seq_len:])
    example = replace(example, input_ids=example.input_ids[: data.max_seq_len],
                      labels=example.labels[: data.max_seq_len], truncated=True, answer_cut=cut,
                      parts=_parts_within(example, data.max_seq_len))
    if example.labels.count(IGNORE) == len(example.labels):  # only a cut can leave none
        return None, CUT_AWAY
    return example, None


def _parts_within(example: Example, limit: int) -> dict | None:
    """Trained tokens by part of a truncated example: the cut tokens taken from the parts met
    last first (exact for one turn; an estimate where a long conversation alternates parts)."""
    if not example.parts:
        return example.parts
    cut = sum(label != IGNORE for label in example.labels[limit:])
    parts = dict(example.parts)
    for name in reversed(list(parts)):
        taken = min(cut, parts[name])
        parts[name] -= taken
        cut -= taken
    return parts


def _refuse_overlong(overlong: list[tuple[str, int]], rows: list[Row], data: DataSection) -> None:
    if overlong:  # stop at the first batch that holds any: a long prepare fails early
        overlong.sort(key=lambda item: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", item[0])])
        listed = "; ".join(f"{where}: overlong: {n} tokens > data.max_seq_len {data.max_seq_len}"
                           for where, n in overlong[:3])
        more = f" (and {len(overlong) - 3} more in these {len(rows)} rows)" if len(overlong) > 3 else ""
        raise InputError(f"{len(overlong)} overlong row(s): {listed}{more}",
                         hint="raise data.max_seq_len, or set data.overlong: truncate or drop")


def limit_pairs(rows: list[Row], pairs: list, data: DataSection, skipped: Counter):
    """data.overlong for preference pairs and kto answers: a sequence is the prompt and one
    answer. Truncating cuts the answers; a prompt that fills max_seq_len leaves nothing to train
    and is skipped (or refused under overlong: error)."""
    kept, overlong = [], []
    for row, pair in zip(rows, pairs):
        if pair is None:
            skipped[NOTHING_TO_TRAIN] += 1
            continue
        if pair.longest > data.max_seq_len:
            if data.overlong == "error":
                overlong.append((row.where, pair.longest))
                continue
            if data.overlong == "drop":
                skipped["overlong"] += 1
                continue
            cut = pair.limited(data.max_seq_len) if isinstance(pair, Pair) else None
            if cut is None:
                skipped[PROMPT_TOO_LONG] += 1
                continue
            pair = cut
        kept.append((row, pair, True))
    _refuse_overlong(overlong, rows, data)
    return kept
