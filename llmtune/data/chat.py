"""Chat rows: reading, checking, rendering with the chat template, and label masking.

Masking works on characters, then maps to tokens: each assistant turn's span is the text the
template adds for that message (content plus its end-of-turn token), found by rendering the
conversation up to the turn with and without it. Tokens overlapping a span are trained; every
other label is -100. Pads are never masked by token id, so an EOS equal to the pad token (as in
SmolLM2) is still trained.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llmtune.errors import InputError

IGNORE = -100
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def read_chat_jsonl(path: str | Path) -> Iterator[tuple[int, list[dict[str, str]]]]:
    """Yield (line number, messages) for each non-blank line; bad rows stop with file:line."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise _bad_row(path, number, f"not valid JSON ({exc.msg})") from None
            problem = check_messages(row)
            if problem:
                raise _bad_row(path, number, problem)
            yield number, row["messages"]


def check_messages(row: object) -> str | None:
    """Why a chat row cannot be trained on, or None when it is fine."""
    if not isinstance(row, dict) or "messages" not in row:
        return "missing field 'messages'"
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages[{index}] is not an object with role and content"
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return f"messages[{index}]: unknown role {role!r} (expected one of {', '.join(ROLES)})"
        if not isinstance(content, str):
            return f"messages[{index}]: 'content' must be a string"
        if role == "system" and index != 0:
            return f"messages[{index}]: a system message may only come first"
        if role == "assistant" and not content.strip():
            return f"messages[{index}]: empty assistant turn"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn to learn from"
    if messages[0]["role"] == "assistant" or messages[-1]["role"] != "assistant":
        return "roles out of order: a conversation must start with a prompt and end with the assistant"
    return None


def render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def assistant_spans(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn in it."""
    full = render(tokenizer, messages)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:index], add_generation_prompt=True)
        upto = render(tokenizer, messages[: index + 1])
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise InputError(
                "the chat template renders a conversation differently from its prefixes, "
                "so assistant turns cannot be located",
                hint="use a template whose output for the first N turns is a prefix of the whole",
            )
        # Train through the end-of-turn token, not the whitespace some templates put after it.
        end = len(upto.rstrip())
        spans.append((len(prompt), end))
    return full, spans


def tokenize_chat(tokenizer, messages: list[dict[str, str]], max_seq_len: int) -> Example:
    """Token ids and labels for one conversation; labels are -100 outside assistant spans."""
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    labels = [
        token if any(start < span_end and end > span_start for span_start, span_end in spans)
        else IGNORE
        for token, (start, end) in zip(ids, offsets)
    ]
    truncated = len(ids) > max_seq_len
    return Example(ids[:max_seq_len], labels[:max_seq_len], truncated)


def trained_segments(example: Example) -> list[list[int]]:
    """Runs of consecutive trained token ids: one per assistant turn (for checks and reports)."""
    segments: list[list[int]] = []
    previous_trained = False
    for token, label in zip(example.input_ids, example.labels):
        trained = label != IGNORE
        if trained and not previous_trained:
            segments.append([])
        if trained:
            segments[-1].append(token)
        previous_trained = trained
    return segments


def _bad_row(path: str | Path, line: int, reason: str) -> InputError:
    return InputError(f"{path}:{line}: {reason}", hint="fix or remove that row, then run again")
