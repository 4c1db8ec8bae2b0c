"""Rendering samples to text with trained character spans, and tokenising them into labels.

Masking works on characters, then maps to tokens. For a conversation, each assistant turn's span
is the text the template adds for that message (content plus its end-of-turn token), found by
rendering the conversation up to the turn with and without it. Tokens overlapping a trained
span keep their id as label; all others get -100. Pads are never masked by token id, so an EOS
equal to the pad token (as in SmolLM2) is still trained.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmtune.errors import InputError

IGNORE = -100
Span = tuple[int, int]


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def render(tokenizer, messages, add_generation_prompt: bool = False, template: str | None = None) -> str:
    return tokenizer.apply_chat_template(
        list(messages), chat_template=template, tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


def assistant_spans(tokenizer, messages, template: str | None = None) -> tuple[str, list[Span]]:
    """The rendered conversation and the character span of each assistant turn in it."""
    full = render(tokenizer, messages, template=template)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:index], add_generation_prompt=True, template=template)
        upto = render(tokenizer, messages[: index + 1], template=template)
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise InputError(
                "the chat template renders a conversation differently from its prefixes, "
                "so assistant turns cannot be located",
                hint="use a template whose output for the first N turns is a prefix of the whole "
                "(data.template: chatml, llama-3, mistral, alpaca or a .jinja file)",
            )
        # Train through the end-of-turn token, not the whitespace some templates put after it.
        spans.append((len(prompt), len(upto.rstrip())))
    return full, spans


def render_sample(sample: dict, tokenizer, template: str | None = None,
                  train_on: str = "assistant") -> tuple[str, list[Span]]:
    """Text and trained spans for one sample (see formats.py for the three sample shapes)."""
    eos = tokenizer.eos_token or ""
    if "messages" in sample:
        text, spans = assistant_spans(tokenizer, sample["messages"], template)
        if train_on == "last_assistant":
            spans = spans[-1:]
    elif "prompt" in sample:
        text = sample["prompt"] + sample["completion"] + eos
        spans = [(len(sample["prompt"]), len(text))]
    else:
        text = sample["text"] + eos
        spans = [(0, len(text))]
    if train_on == "all":
        spans = [(0, len(text))]
    return text, spans


def encode(tokenizer, rendered: list[tuple[str, list[Span]]]) -> list[Example]:
    """Tokenise rendered samples in one batch; labels are -100 outside the trained spans."""
    if not rendered:
        return []
    texts = [text for text, _ in rendered]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    examples = []
    for ids, offsets, (_, spans) in zip(encoded["input_ids"], encoded["offset_mapping"], rendered):
        bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        trained = np.zeros(len(ids), dtype=bool)
        for start, end in spans:
            trained |= (bounds[:, 0] < end) & (bounds[:, 1] > start)
        labels = np.where(trained, np.asarray(ids, dtype=np.int64), IGNORE)
        examples.append(Example(list(ids), labels.tolist()))
    return examples


def encode_sample(tokenizer, sample: dict, template: str | None = None,
                  train_on: str = "assistant") -> Example:
    return encode(tokenizer, [render_sample(sample, tokenizer, template, train_on)])[0]


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
