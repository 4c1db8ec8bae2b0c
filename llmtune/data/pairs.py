"""Preference pairs and marked answers (formats preference and kto), and prompts (format prompt,
for grpo), as token ids.

Each answer is rendered as the assistant's next turn after the prompt, with the chat template,
and masked exactly as SFT masks its last assistant turn (chat.py): the answer's ids are the
trained tokens, its end-of-turn token included; the prompt's ids are what comes before them.
TRL's preference trainers take (prompt_ids, chosen_ids, rejected_ids) or (prompt_ids,
completion_ids, label) and compute log-probabilities over the answer ids only.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmtune.data.chat import IGNORE, Example
from llmtune.data.special_text import encode_samples
from llmtune.errors import InputError


@dataclass(frozen=True)
class Pair:
    """prompt_ids + answers[i] is one training sequence; answers are (chosen, rejected) for a
    preference pair, (completion,) for a kto row."""

    prompt_ids: list[int]
    answers: tuple[list[int], ...]
    label: bool | None = None  # kto: a good (True) or bad (False) answer
    truncated: bool = False
    answer_cut: bool = False

    @property
    def longest(self) -> int:
        return len(self.prompt_ids) + max(map(len, self.answers))

    @property
    def tokens(self) -> int:
        """Tokens of every sequence the pair trains on (the prompt once per answer)."""
        return sum(len(self.prompt_ids) + len(answer) for answer in self.answers)

    @property
    def trained(self) -> int:
        return sum(map(len, self.answers))

    def columns(self) -> dict:
        if self.label is None:
            return {"prompt_ids": self.prompt_ids, "chosen_ids": self.answers[0], "rejected_ids": self.answers[1]}
        return {"prompt_ids": self.prompt_ids, "completion_ids": self.answers[0], "label": self.label}

    def limited(self, max_len: int) -> Pair | None:
        """Answers cut to fit max_len after the prompt; None when the prompt leaves no room."""
        room = max_len - len(self.prompt_ids)
        if room <= 0:
            return None
        cut = tuple(answer[:room] for answer in self.answers)
        return Pair(self.prompt_ids, cut, self.label, truncated=True,
                    answer_cut=any(len(a) > room for a in self.answers))


@dataclass(frozen=True)
class PromptRow:
    """A grpo prompt: its ids (rendered with the generation prompt, as chat and generate encode a
    prompt), the rendered text, its reference answer and its other columns (as JSON)."""

    prompt_ids: list[int]
    text: str
    answer: str | None
    extra: str
    truncated: bool = False
    answer_cut: bool = False
    label = None
    trained = 0

    @property
    def longest(self) -> int:
        return len(self.prompt_ids)

    tokens = longest

    def columns(self) -> dict:
        return {"prompt_ids": self.prompt_ids, "prompt": self.text, "answer": self.answer, "extra": self.extra}


def encode_prompts(tokenizer, template: str | None, mode: str, samples: list[dict]) -> list[PromptRow]:
    import json

    from llmtune.data.special_text import encode_prompt
    from llmtune.data.templates import render

    return [PromptRow(encode_prompt(tokenizer, sample["prompt"], template, mode),
                      render(tokenizer, sample["prompt"], True, template), sample["answer"],
                      json.dumps(sample["extra"], ensure_ascii=False, default=str))
            for sample in samples]


def sequence_ids(row: dict) -> list[int]:
    """A prepared row's token ids as one sequence: an SFT example, or a pair's prompt and its
    first answer (the chosen one), for the checks that run the model on prepared data."""
    if "input_ids" in row:
        return row["input_ids"]
    return [*row["prompt_ids"], *row.get("chosen_ids", row.get("completion_ids", []))]


def answer_names(sample: dict) -> tuple[str, ...]:
    return ("chosen", "rejected") if "chosen" in sample else ("completion",)


def encode_pairs(tokenizer, template: str | None, mode: str, samples: list[dict]) -> list[Pair | None]:
    """Each sample's Pair, or None where the template renders no answer to train on."""
    conversations = [{"messages": [*sample["prompt"], {"role": "assistant", "content": sample[name]}]}
                     for sample in samples for name in answer_names(sample)]
    # one assistant turn, the last: always one rendering
    examples = iter(_last(pieces) for pieces in encode_samples(tokenizer, conversations, template, "last_assistant", mode))
    pairs = []
    for sample in samples:
        pairs.append(_pair([next(examples) for _ in answer_names(sample)], sample.get("label")))
    return pairs


def _last(pieces: list[Example]) -> Example:
    if not pieces:  # special_text.Refused
        raise InputError(f"the chat template refused a conversation: {getattr(pieces, 'reason', '?')}",
                         hint="use a template that accepts it (data.template)")
    return pieces[-1]


def _pair(examples: list[Example], label: bool | None) -> Pair | None:
    bounds = [_trained_bounds(example) for example in examples]
    if None in bounds:
        return None
    # The prompt is the tokens every rendering shares before its answer. They are the same but
    # where a tokenizer merges across the boundary; then the differing tokens go with the answer.
    start = min(first for first, _ in bounds)
    for example in examples[1:]:
        start = min(start, _common_prefix(examples[0].input_ids, example.input_ids))
    prompt = examples[0].input_ids[:start]
    answers = tuple(example.input_ids[start:last] for example, (_, last) in zip(examples, bounds))
    return Pair(prompt, answers, label)


def _trained_bounds(example: Example) -> tuple[int, int] | None:
    """[first, last) of the trained tokens: the answer, through its end-of-turn token."""
    labels = example.labels
    trained = [i for i, label in enumerate(labels) if label != IGNORE]
    return (trained[0], trained[-1] + 1) if trained else None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
