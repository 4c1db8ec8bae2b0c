"""Prepared rows as a person reads them (`llmtune data preview`): each row a title and its text
in pieces, each piece trained or not, decoded with the tokenizer the data was prepared with.
The command prints them; a script can read them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from datasets import load_from_disk

from llmtune.data.chat import IGNORE, label_runs


@dataclass
class Piece:
    text: str
    trained: bool
    new_example: bool = False  # a packed row's next example starts here
    label: str | None = None  # a heading before it: "chosen", "rejected", "completion"


@dataclass
class ShownRow:
    title: str
    pieces: list[Piece]
    notes: list[str] = field(default_factory=list)  # what rewards compare with, other columns


def shown_rows(prepared: Path, split: str, count: int, tokenizer) -> list[ShownRow]:
    """The first `count` rows of a prepared split: an SFT example (packed examples apart), a
    preference pair or KTO answer (the prompt, then each answer, trained), or a GRPO prompt
    (its reference answer and other columns as notes)."""
    rows = load_from_disk(str(prepared / split))
    return [_shown(rows[index], f"{split} row {index}", tokenizer) for index in range(min(count, len(rows)))]


def _shown(row: dict, name: str, tokenizer) -> ShownRow:
    decode = tokenizer.decode
    if "answer" in row:  # a prompt: what the model is asked, and what rewards compare with
        notes = [f"reference answer: {row['answer']!r}"]
        if row["extra"] not in ("{}", None):
            notes.append(f"other columns (for python rewards): {row['extra']}")
        return ShownRow(f"{name}: prompt {len(row['prompt_ids'])} tokens ({row['where']})",
                        [Piece(decode(row["prompt_ids"]), False)], notes)
    if "prompt_ids" in row:  # a preference pair or a kto answer: the prompt, then each answer trained
        answers = [(label, row[f"{label}_ids"]) for label in ("chosen", "rejected", "completion")
                   if f"{label}_ids" in row]
        verdict = "" if "label" not in row else f", {'good' if row['label'] else 'bad'} answer"
        title = (f"{name}: prompt {len(row['prompt_ids'])} tokens, "
                 + ", ".join(f"{label} {len(ids)} trained" for label, ids in answers) + verdict)
        return ShownRow(title, [Piece(decode(row["prompt_ids"]), False),
                                *(Piece(decode(ids), True, label=label) for label, ids in answers)])
    trained = len(row["labels"]) - row["labels"].count(IGNORE)
    pieces = [Piece(_decoded(tokenizer, tokens), is_trained, new_example)
              for tokens, is_trained, new_example in label_runs(row["input_ids"], row["labels"], row.get("position_ids"))]
    images = f", {len(row['images'])} image(s)" if row.get("images") else ""
    return ShownRow(f"{name}: {len(row['input_ids'])} tokens, {trained} trained{images}", pieces)


def _decoded(tokenizer, tokens: list[int]) -> str:
    """Tokens as text, a run of one added token repeated (an image's 576 `<image>`) as
    `<image> x576`."""
    added = tokenizer.added_tokens_decoder
    out, start = [], 0
    for index in range(1, len(tokens) + 1):
        if index == len(tokens) or tokens[index] != tokens[start]:
            run = index - start
            if run >= 8 and tokens[start] in added:
                out.append(f"{tokenizer.decode(tokens[start:start + 1])} x{run}")
            else:
                out.append(tokens[start:index])
            start = index
    merged: list = []  # consecutive token runs decoded together (byte-level tokens join up)
    for part in out:
        if isinstance(part, list) and merged and isinstance(merged[-1], list):
            merged[-1] += part
        else:
            merged.append(part)
    return "".join(tokenizer.decode(part) if isinstance(part, list) else part for part in merged)
