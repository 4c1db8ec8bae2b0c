"""Generation metrics: pure functions over a generated text and its reference."""

from __future__ import annotations

import re


def exact_match(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()


def contains(prediction: str, reference: str) -> bool:
    return reference.strip() in prediction


def extract_answer(text: str, pattern: str) -> str | None:
    """The pattern's first group (or whole match) in `text`, without thousands separators;
    the last match wins, since answers usually come at the end."""
    matches = list(re.finditer(pattern, text))
    if not matches:
        return None
    last = matches[-1]
    answer = last.group(1) if last.groups() else last.group(0)
    return answer.strip().replace(",", "").rstrip(".")


def regex_match(prediction: str, reference: str, pattern: str) -> bool:
    expected = extract_answer(reference, pattern)
    return expected is not None and extract_answer(prediction, pattern) == expected
