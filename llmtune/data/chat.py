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
import itertools
from dataclasses import dataclass


from llmtune.errors import InputError

IGNORE = -100
Span = tuple[int, int]


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    answer_cut: bool = False  # truncation cut trained tokens too, not only the prompt


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


def assistant_spans(tokenizer, messages, template: str | None = None,
                    rendered: dict | None = None) -> tuple[str, list[Span]]:
    """The rendered conversation and the character span of each assistant turn in it.
    `rendered`: the renderings `_renders_needed` lists, done already (`render_samples`)."""

    def at(count: int, add_generation_prompt: bool) -> str:
        if rendered is not None:
            return rendered[count, add_generation_prompt]
        return render(tokenizer, messages[:count], add_generation_prompt, template)

    full = at(len(messages), False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = at(index, True)
        last = index == len(messages) - 1
        upto = full if last else at(index + 1, False)
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


def _renders_needed(messages) -> list[tuple[int, bool]]:
    """(first N messages, add_generation_prompt) of every rendering assistant_spans makes."""
    needed = [(len(messages), False)]
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            needed.append((index, True))
            if index != len(messages) - 1:
                needed.append((index + 1, False))
    return needed


def render_sample(sample: dict, tokenizer, template: str | None = None,
                  train_on: str = "assistant", rendered: dict | None = None) -> tuple[str, list[Span]]:
    """Text and trained spans for one sample (see formats.py for the three sample shapes)."""
    eos = tokenizer.eos_token or ""
    if "messages" in sample:
        text, spans = assistant_spans(tokenizer, sample["messages"], template, rendered)
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


def render_samples(samples: list[dict], tokenizer, template: str | None = None,
                   train_on: str = "assistant") -> list[tuple[str, list[Span]]]:
    """render_sample for a batch, with every chat template rendering of the batch done in one
    Jinja call (`_render_batch`)."""
    needed = [_renders_needed(sample["messages"]) if "messages" in sample else None for sample in samples]
    requests = [(sample["messages"][:count], add_generation_prompt)
                for sample, keys in zip(samples, needed) if keys
                for count, add_generation_prompt in keys]
    texts = iter(_render_batch(tokenizer, requests, template))
    results = []
    for sample, keys in zip(samples, needed):
        rendered = {key: next(texts) for key in keys} if keys else None
        results.append(render_sample(sample, tokenizer, template, train_on, rendered))
    return results


SEPARATOR = "\x1e"  # ASCII record separator: ends each rendering of a batch


def _render_batch(tokenizer, requests: list[tuple[list, bool]], template: str | None) -> list[str]:
    """render() for each (messages, add_generation_prompt), in one call of the template wrapped in
    a macro: 0.056 s instead of 0.088 s for 7,473 GSM8K conversations, most of a Jinja call being
    its context setup. Rendered one by one instead when the wrapper does not compile, the call
    raises (the single call then names the conversation), a text holds the separator, or the
    first or last rendering differs from a single call's."""
    wrapped = _compiled_batch(template or tokenizer.chat_template)

    def one_by_one() -> list[str]:
        return [render(tokenizer, messages, flag, template) for messages, flag in requests]

    if wrapped is None or len(requests) < 2:
        return one_by_one()
    try:
        parts = wrapped.render(llmtune_requests=requests, **tokenizer.special_tokens_map).split(SEPARATOR)
    except Exception:
        return one_by_one()
    if (len(parts) != len(requests) + 1 or parts[-1]
            or parts[0] != render(tokenizer, *requests[0], template=template)
            or parts[-2] != render(tokenizer, *requests[-1], template=template)):
        return one_by_one()
    return parts[:-1]


@functools.lru_cache(maxsize=16)
def _compiled_batch(template: str):
    """The template as a macro, called for each request in a loop; None if it does not compile."""
    if _compiled(template) is None:
        return None
    from transformers.utils.chat_template_utils import _compile_jinja_template

    body = template[:-1] if template.endswith("\n") else template  # Jinja drops a template's last newline
    try:
        return _compile_jinja_template(
            "{% macro llmtune_render(messages, add_generation_prompt) %}" + body + "{% endmacro %}"
            "{% for request in llmtune_requests %}{{ llmtune_render(request[0], request[1]) }}"
            + SEPARATOR + "{% endfor %}")
    except Exception:
        return None


def encode(tokenizer, rendered: list[tuple[str, list[Span]]]) -> list[Example]:
    """Tokenise rendered samples in one batch; labels are -100 outside the trained spans.

    Calls the Rust tokenizer directly: the transformers wrapper converts every encoding into
    Python dicts first, which cost more than the tokenisation itself (bench_prepare.py). For
    byte-level BPE tokenizers the token boundaries come from token byte lengths and the
    tokenizer skips its offset tracking (`_byte_level_ranges`); other tokenizers, and any sample
    whose tokens do not add up to its text, use the tokenizer's own offsets.
    """
    if not rendered:
        return []
    backend = tokenizer.backend_tokenizer
    # Special-token text becomes the token (special_text.py handles content that holds such
    # text). transformers sets this flag on each call and leaves it as the call wanted it.
    backend.encode_special_tokens = False
    texts = [text for text, _ in rendered]
    byte_lengths = _token_byte_lengths(backend)
    ranges: list = [None] * len(rendered)
    if byte_lengths is not None:
        ids = [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]
        ranges = _byte_level_ranges(byte_lengths, ids, rendered)
    redo = [index for index, found in enumerate(ranges) if found is None]
    if redo:
        encodings = backend.encode_batch([texts[i] for i in redo], add_special_tokens=False)
        if byte_lengths is None:
            ids = [None] * len(rendered)
        for index, encoding in zip(redo, encodings):
            text, spans = rendered[index]
            ids[index] = encoding.ids
            ranges[index] = [_token_range(encoding, start, end, len(text)) for start, end in spans]
    examples = []
    for sample_ids, sample_ranges in zip(ids, ranges):
        labels = [IGNORE] * len(sample_ids)
        for first, last in sample_ranges:
            labels[first:last] = sample_ids[first:last]
        examples.append(Example(sample_ids, labels))
    return examples


def _token_byte_lengths(backend):
    """UTF-8 length of each token id's text, or None unless the tokenizer is byte-level BPE with
    no normalizer (GPT-2 style: SmolLM2, Llama 3, Qwen). There every byte of the input becomes
    one character of the byte-level alphabet, tokens partition those characters, and a token's
    length is the length of its string in the vocabulary; added tokens match their content."""
    from tokenizers import decoders

    if backend.normalizer is not None or not isinstance(backend.decoder, decoders.ByteLevel):
        return None
    return _length_table(backend, backend.get_vocab_size(with_added_tokens=True))


@functools.lru_cache(maxsize=4)
def _length_table(backend, vocab_size: int):  # the size in the key: tokens added later count
    import numpy as np

    lengths = np.zeros(vocab_size, dtype=np.int64)
    vocab = backend.get_vocab(with_added_tokens=False)
    lengths[np.fromiter(vocab.values(), dtype=np.int64, count=len(vocab))] = np.fromiter(
        map(len, vocab), dtype=np.int64, count=len(vocab))
    for index, added in backend.get_added_tokens_decoder().items():
        lengths[index] = len(added.content.encode("utf-8"))
    return lengths


def _byte_level_ranges(byte_lengths, ids: list[list[int]], rendered) -> list:
    """For each sample, its spans' token ranges [first, last) as `_token_range` finds them from
    offsets: first is the token holding the span's first character, last the token holding the
    character after the span (or the end). None for a sample whose token lengths do not add up
    to its text's bytes (an added token that strips spaces, a pre-tokenizer that adds a prefix
    space): that sample is tokenised again with offsets. One vectorised search for the batch."""
    import numpy as np

    counts = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(counts.sum()))
    ends = np.cumsum(byte_lengths[flat])  # byte offset after each token, over the whole batch
    first_token = np.concatenate(([0], np.cumsum(counts)))
    at_first = np.concatenate(([0], ends))[first_token]  # bytes before each sample (and the end)
    bases, covered = at_first[:-1].tolist(), np.diff(at_first).tolist()
    owners, starts, stops, ranges = [], [], [], []
    for index, (text, spans) in enumerate(rendered):
        ascii_only = text.isascii()  # then characters are bytes
        size = len(text) if ascii_only else len(text.encode("utf-8"))
        if covered[index] != size:
            ranges.append(None)
            continue
        ranges.append([])
        base = bases[index]
        for start, end in spans:
            if not ascii_only:
                start, end = len(text[:start].encode("utf-8")), len(text[:end].encode("utf-8"))
            owners.append(index)
            starts.append(base + start)
            stops.append(base + min(end, size))
    owners = np.asarray(owners, dtype=np.int64)
    firsts = np.searchsorted(ends, np.asarray(starts, dtype=np.int64), side="right") - first_token[owners]
    lasts = np.searchsorted(ends, np.asarray(stops, dtype=np.int64), side="right") - first_token[owners]
    lasts = np.minimum(lasts, counts[owners])
    for owner, first, last in zip(owners.tolist(), firsts.tolist(), lasts.tolist()):
        ranges[owner].append((first, last))
    return ranges


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
