"""Tokenising rendered samples (turns.py renders them) into input ids and labels.

Masking works on characters, then maps to tokens: tokens overlapping a trained span keep their id
as label; all others get -100. Pads are never masked by token id, so an EOS equal to the pad
token (as in SmolLM2) is still trained.
"""

from __future__ import annotations

import bisect
import functools
import itertools
from dataclasses import dataclass

from llmtune.data.turns import Span, render_sample

IGNORE = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    answer_cut: bool = False  # truncation cut trained tokens too, not only the prompt
    parts: dict | None = None  # trained tokens by part of the turns (answer, tool_call, reasoning)
    # an image chat (vision-language base, stages/prepare/images.py): the rendered text the
    # processor expanded, its images as (path, content hash), and each image's [start, end) tokens
    text: str | None = None
    images: tuple = ()
    image_spans: tuple = ()


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
            ranges[index] = [_token_range(encoding, start, end, len(text)) for start, end, _ in spans]
    return [labelled(sample_ids, sample_ranges, spans)
            for sample_ids, sample_ranges, (_, spans) in zip(ids, ranges, rendered)]


def labelled(ids: list[int], ranges: list[tuple[int, int]], spans: list[Span]) -> Example:
    """The example whose labels are `ids` inside the token ranges of the trained spans, with its
    trained tokens counted by part (a token two parts share counts for the first)."""
    labels = [IGNORE] * len(ids)
    parts: dict[str, int] = {}
    done = 0
    for (first, last), (_, _, part) in zip(ranges, spans):
        labels[first:last] = ids[first:last]
        counted = max(last, done) - max(first, done)
        parts[part] = parts.get(part, 0) + counted
        done = max(done, last)
    return Example(ids, labels, parts=parts)


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
        for start, end, _ in spans:
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


def encode_sample(tokenizer, sample: dict, template: str | None = None, train_on: str = "assistant",
                  reasoning: str = "train") -> Example:
    """The one example of a sample (a sample that renders into several: encode_pieces)."""
    pieces = encode_pieces(tokenizer, sample, template, train_on, reasoning)
    if len(pieces) != 1:
        raise ValueError(f"the sample renders into {len(pieces)} examples: use encode_pieces")
    return pieces[0]


def encode_pieces(tokenizer, sample: dict, template: str | None = None, train_on: str = "assistant",
                  reasoning: str = "train") -> list[Example]:
    """Every example of a sample: one per rendering (turns.assistant_spans)."""
    return encode(tokenizer, render_sample(sample, tokenizer, template, train_on, reasoning=reasoning))


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
