"""Rendering samples to text with trained character spans, and tokenising them into labels.

Masking works on characters, then maps to tokens. For a conversation, each assistant turn's span
is the text the template adds for that message (content plus its end-of-turn token), found by
rendering the conversation up to the turn with and without it. Tokens overlapping a trained
span keep their id as label; all others get -100. Pads are never masked by token id, so an EOS
equal to the pad token (as in SmolLM2) is still trained.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass


from llmtune.errors import InputError

IGNORE = -100
Span = tuple[int, int]


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def render(tokenizer, messages, add_generation_prompt: bool = False, template: str | None = None) -> str:
    """The chat template applied to `messages`, as transformers' apply_chat_template does."""
    compiled = _compiled(template or tokenizer.chat_template)
    if compiled is None:
        return tokenizer.apply_chat_template(
            list(messages), chat_template=template, tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    return compiled.render(
        messages=list(messages), add_generation_prompt=add_generation_prompt,
        **tokenizer.special_tokens_map,
    )


@functools.lru_cache(maxsize=16)
def _compiled(template: str):
    """transformers' own compiled Jinja template, rendered directly: apply_chat_template's
    per-call checks cost as much as the rendering (28 vs 15 us per call, measured on SmolLM2).
    None when that private helper moves, and then apply_chat_template is used."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:
        return None
    return _compile_jinja_template(template)


def assistant_spans(tokenizer, messages, template: str | None = None) -> tuple[str, list[Span]]:
    """The rendered conversation and the character span of each assistant turn in it."""
    full = render(tokenizer, messages, template=template)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:index], add_generation_prompt=True, template=template)
        last = index == len(messages) - 1
        upto = full if last else render(tokenizer, messages[: index + 1], template=template)
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
    """Tokenise rendered samples in one batch; labels are -100 outside the trained spans.

    Calls the Rust tokenizer directly: the transformers wrapper converts every encoding into
    Python dicts first, which cost more than the tokenisation itself (bench_prepare.py).
    """
    if not rendered:
        return []
    encodings = tokenizer.backend_tokenizer.encode_batch(
        [text for text, _ in rendered], add_special_tokens=False
    )
    examples = []
    for encoding, (text, spans) in zip(encodings, rendered):
        ids = encoding.ids
        labels = [IGNORE] * len(ids)
        for start, end in spans:
            first, last = _token_range(encoding, start, end, len(text))
            labels[first:last] = ids[first:last]
        examples.append(Example(ids, labels))
    return examples


def _token_range(encoding, start: int, end: int, text_length: int) -> tuple[int, int]:
    """Indices [first, last) of the tokens overlapping characters [start, end)."""
    # char_to_token is cheap but answers None inside added special tokens (an EOS often ends a
    # span), so the end is found from the character after the span where possible.
    first = encoding.char_to_token(start)
    after = len(encoding.ids) if end >= text_length else encoding.char_to_token(end)
    if first is not None and after is not None:
        return first, after
    # Otherwise search the offsets, which increase along the text: overlapping tokens are a run.
    offsets = encoding.offsets
    first = bisect.bisect_right(offsets, start, key=lambda o: o[1])
    last = bisect.bisect_left(offsets, end, key=lambda o: o[0])
    return first, last


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


def label_runs(input_ids: list[int], labels: list[int], position_ids: list[int] | None = None):
    """Split a row into runs of (token ids, trained, starts a new example) for display.
    A packed row's examples start where its position ids restart at 0."""
    runs: list[tuple[list[int], bool, bool]] = []
    for index, (token, label) in enumerate(zip(input_ids, labels)):
        trained = label != IGNORE
        starts = bool(position_ids) and index > 0 and position_ids[index] == 0
        if runs and runs[-1][1] == trained and not starts:
            runs[-1][0].append(token)
        else:
            runs.append(([token], trained, starts))
    return runs
