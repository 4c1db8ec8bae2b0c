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


from llmtune.data import templates
from llmtune.errors import InputError

IGNORE = -100
Span = tuple[int, int, str]  # characters [start, end) of a trained part: answer, tool_call or reasoning


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    answer_cut: bool = False  # truncation cut trained tokens too, not only the prompt
    parts: dict | None = None  # trained tokens by part of the turns (answer, tool_call, reasoning)


def render(tokenizer, messages, add_generation_prompt: bool = False, template: str | None = None,
           tools: list | None = None) -> str:
    """The chat template applied to `messages` (and `tools`), as transformers' apply_chat_template
    does."""
    messages = template_messages(messages)
    extra = {"tools": tools} if tools else {}
    compiled = _compiled(template or tokenizer.chat_template)
    if compiled is None:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False,
            add_generation_prompt=add_generation_prompt, **extra,
        )
    return compiled.render(
        messages=messages, add_generation_prompt=add_generation_prompt,
        **extra, **tokenizer.special_tokens_map,
    )


def template_messages(messages) -> list[dict]:
    """The messages as templates read them: reasoning under each name templates use
    (`reasoning_content`, Qwen's and DeepSeek's; `thinking`, gpt-oss'), as transformers'
    apply_chat_template aliases them, and no llmtune `train` flag."""
    out = []
    for message in messages:
        if "reasoning_content" in message or "train" in message:
            message = {key: value for key, value in message.items() if key != "train"}
            if "reasoning_content" in message:
                message["thinking"] = message["reasoning_content"]
        out.append(message)
    return out


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


def assistant_spans(tokenizer, messages, template: str | None = None, rendered: dict | None = None,
                    tools: list | None = None, trained=None) -> list[tuple[str, list[tuple[int, int, int]]]]:
    """The conversation rendered, with the character span (start, end, message index) of each
    trained assistant turn: one (text, spans), or several where the template renders an earlier
    turn differently once later turns follow (Qwen3 drops the reasoning of turns before the last
    user message). Each turn is trained on the text its own rendering gives it, the text the
    model reads and writes when it produces that turn: a turn is trained in the first rendering,
    from the whole conversation back, that holds it unchanged. `trained(index)` says which
    assistant turns train (all by default). `rendered`: the renderings `_renders_needed` lists,
    done already (`render_samples`)."""

    def at(count: int, add_generation_prompt: bool) -> str:
        if rendered is not None:
            return rendered[count, add_generation_prompt]
        return render(tokenizer, messages[:count], add_generation_prompt, template, tools)

    pending = [index for index, message in enumerate(messages)
               if message["role"] == "assistant" and (trained is None or trained(index))]
    text, own = at(len(messages), False), False
    pieces = []
    while pending:
        spans, left = [], []
        for index in pending:
            prompt = at(index, True)
            upto = at(index + 1, False)
            if upto.startswith(prompt) and text.startswith(upto):
                # Train through the end-of-turn token, not the whitespace some templates put after it.
                spans.append((len(prompt), len(upto.rstrip()), index))
            elif own and index == pending[-1]:
                raise InputError(
                    "the chat template renders an assistant turn differently from its generation "
                    "prompt, so the turn cannot be located",
                    hint="use a template whose conversation up to a turn starts with the generation "
                    "prompt for that turn (data.template: chatml, chatml-tools, llama-3, llama-3.1, "
                    "mistral, alpaca or a .jinja file)",
                )
            else:
                left.append(index)
        if spans:
            pieces.append((text, spans))
        pending = left
        if pending:
            text, own = at(pending[-1] + 1, False), True
    return pieces[::-1]


def _renders_needed(messages) -> list[tuple[int, bool]]:
    """(first N messages, add_generation_prompt) of every rendering assistant_spans makes."""
    needed = [(len(messages), False)]
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            needed.append((index, True))
            if index != len(messages) - 1:
                needed.append((index + 1, False))
    return needed


def render_sample(sample: dict, tokenizer, template: str | None = None, train_on: str = "assistant",
                  rendered: dict | None = None, reasoning: str = "train") -> list[tuple[str, list[Span]]]:
    """Text and trained spans for one sample (see formats.py for the sample shapes): one
    (text, spans), or one per rendering for a template that renders earlier turns differently
    (assistant_spans). `reasoning`: train, mask (in context, not trained) or drop."""
    eos = tokenizer.eos_token or ""
    if "messages" in sample:
        messages = sample_messages(sample, reasoning)
        features = templates.needs(sample, messages)
        if features:
            templates.require(tokenizer, template, features)
        if train_on == "all":
            text = render(tokenizer, messages, False, template, sample.get("tools")) if rendered is None \
                else rendered[len(messages), False]
            return [(text, [(0, len(text), ANSWER)])]
        last = max(index for index, m in enumerate(messages) if m["role"] == "assistant")

        def trained(index: int) -> bool:
            flag = messages[index].get("train")
            return flag if flag is not None else (train_on == "assistant" or index == last)

        pieces = assistant_spans(tokenizer, messages, template, rendered, sample.get("tools"), trained)
        return [(text, [part for start, end, index in spans
                        for part in turn_parts(text, start, end, messages[index], reasoning)])
                for text, spans in pieces] or [(render(tokenizer, messages, False, template, sample.get("tools")), [])]
    if "prompt" in sample:
        text = sample["prompt"] + sample["completion"] + eos
        spans = [(len(sample["prompt"]), len(text), ANSWER)]
    else:
        text = sample["text"] + eos
        spans = [(0, len(text), ANSWER)]
    if train_on == "all":
        spans = [(0, len(text), ANSWER)]
    return [(text, spans)]


def sample_messages(sample: dict, reasoning: str) -> list[dict]:
    """The sample's messages as they are rendered: under reasoning: drop, without reasoning."""
    if reasoning != "drop":
        return sample["messages"]
    return [{k: v for k, v in m.items() if k != "reasoning_content"} for m in sample["messages"]]


ANSWER, TOOL_CALL, REASONING = "answer", "tool_call", "reasoning"  # the parts of a trained turn


def turn_parts(text: str, start: int, end: int, message: dict, reasoning: str) -> list[Span]:
    """An assistant turn's span split into its parts: reasoning (up to the end of the reasoning
    text; left out under reasoning: mask), answer text, tool calls (the rest of a turn that calls
    tools: the calls and their markup, and its end-of-turn token)."""
    thought = (message.get("reasoning_content") or "").strip()
    reasoning_end = start
    parts: list[Span] = []
    if thought:
        found = text.find(thought, start, end)
        if found < 0:
            raise InputError("the chat template rewrites the reasoning of an assistant turn, so it "
                             "cannot be located for data.reasoning", hint="set data.reasoning: train or "
                             "drop, or use a template that writes the reasoning as given")
        reasoning_end = found + len(thought)
        parts.append((start, found, ANSWER) if reasoning == "mask" else (start, reasoning_end, REASONING))
    content = message["content"].strip()
    if message.get("tool_calls"):
        found = text.find(content, reasoning_end, end) if content else -1
        content_end = found + len(content) if found >= 0 else reasoning_end
        parts += [(reasoning_end, content_end, ANSWER), (content_end, end, TOOL_CALL)]
    else:
        parts.append((reasoning_end, end, ANSWER))
    return [part for part in parts if part[1] > part[0]]


def render_samples(samples: list[dict], tokenizer, template: str | None = None, train_on: str = "assistant",
                   reasoning: str = "train") -> list[list[tuple[str, list[Span]]]]:
    """render_sample for a batch, with every chat template rendering of the batch done in one
    Jinja call (`_render_batch`)."""
    conversations = [sample_messages(s, reasoning) if "messages" in s else None for s in samples]
    needed = [_renders_needed(messages) if messages else None for messages in conversations]
    requests = [(messages[:count], add_generation_prompt, sample.get("tools"))
                for sample, messages, keys in zip(samples, conversations, needed) if keys
                for count, add_generation_prompt in keys]
    texts = iter(_render_batch(tokenizer, requests, template))
    results = []
    for sample, keys in zip(samples, needed):
        rendered = {key: next(texts) for key in keys} if keys else None
        results.append(render_sample(sample, tokenizer, template, train_on, rendered, reasoning))
    return results


SEPARATOR = "\x1e"  # ASCII record separator: ends each rendering of a batch


def _render_batch(tokenizer, requests: list[tuple[list, bool, list | None]], template: str | None) -> list[str]:
    """render() for each (messages, add_generation_prompt, tools), in one call of the template
    wrapped in a macro: 0.056 s instead of 0.088 s for 7,473 GSM8K conversations, most of a
    Jinja call being its context setup. Rendered one by one instead when the wrapper does not
    compile, the call raises (the single call then names the conversation), a text holds the
    separator, or the first or last rendering differs from a single call's."""
    wrapped = _compiled_batch(template or tokenizer.chat_template)

    def one_by_one() -> list[str]:
        return [render(tokenizer, messages, flag, template, tools) for messages, flag, tools in requests]

    if wrapped is None or len(requests) < 2:
        return one_by_one()
    try:
        parts = wrapped.render(llmtune_requests=[(template_messages(m), flag, tools) for m, flag, tools in requests],
                               **tokenizer.special_tokens_map).split(SEPARATOR)
    except Exception:
        return one_by_one()
    if (len(parts) != len(requests) + 1 or parts[-1]
            or parts[0] != render(tokenizer, *requests[0][:2], template, requests[0][2])
            or parts[-2] != render(tokenizer, *requests[-1][:2], template, requests[-1][2])):
        return one_by_one()
    return parts[:-1]


@functools.lru_cache(maxsize=16)
def _compiled_batch(template: str):
    """The template as a macro, called for each request in a loop; None if it does not compile.
    A request without tools passes none, as a single call leaves `tools` out."""
    if _compiled(template) is None:
        return None
    from transformers.utils.chat_template_utils import _compile_jinja_template

    body = template[:-1] if template.endswith("\n") else template  # Jinja drops a template's last newline
    try:
        return _compile_jinja_template(
            "{% macro llmtune_render(messages, add_generation_prompt, tools) %}" + body + "{% endmacro %}"
            "{% for request in llmtune_requests %}{{ llmtune_render(request[0], request[1], request[2]) }}"
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
    """Every example of a sample: one per rendering (assistant_spans)."""
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
