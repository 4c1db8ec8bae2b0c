"""Control-token text inside content (`data.special_text`).

A tokenizer turns the text of any special token it knows into that token, wherever it appears:
a user message that mentions `<|eot_id|>` (a chat log about chat templates, a prompt-injection
sample) would end a turn in the middle of the conversation. Content must reach the model as the
characters it is, and only the template's own markers as control tokens:

- `plain` (default): such text in content is tokenised as ordinary text;
- `error`: a row holding such text is refused, with its file:line;
- `keep`: the tokenizer's behaviour (the text becomes the control token).

How `plain` works: before rendering, each occurrence in a sample's content is replaced by as
many private-use characters as it has (so every character offset stays where it was); the
control tokens left in the rendered text are the template's. The text between them is
tokenised with the tokenizer's special-token matching off (`encode_special_tokens`), exactly
as the tokenizer itself tokenises the text between the added tokens it splits out, and the
template's markers become their ids. Only samples that hold such text take this path.
"""

from __future__ import annotations

import bisect
import functools
import re

from llmtune.data.chat import Example, encode, labelled
from llmtune.data.turns import Span, render_samples

PLACEHOLDER = 0xF0000  # Supplementary Private Use Area-A: placeholder k stands for token k


@functools.lru_cache(maxsize=8)
def _finder(tokens: tuple[str, ...]):
    """One regex finding any of the tokens, the longest first where one is a prefix of another."""
    return re.compile("|".join(re.escape(token) for token in sorted(tokens, key=len, reverse=True)))


def control_tokens(tokenizer) -> tuple[str, ...]:
    """The texts the tokenizer turns into special tokens (added tokens marked special)."""
    return tuple(sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content}))


def contents(sample: dict) -> list[str]:
    """The user's own text in a sample: message contents, prompt and completion, or text (and a
    preference or kto sample's prompt messages and answers)."""
    if "messages" in sample:  # an image chat's content is parts: its text parts count
        return [text for m in sample["messages"] for key in ("content", "reasoning_content")
                for text in ([m.get(key)] if not isinstance(m.get(key), list) else
                             [p.get("text") for p in m[key] if isinstance(p, dict) and p.get("type") == "text"])
                if isinstance(text, str)]
    if isinstance(sample.get("prompt"), list):
        return [*contents({"messages": sample["prompt"]}),
                *(sample[key] for key in ("chosen", "rejected", "completion") if key in sample)]
    return [value for key, value in sample.items() if key in ("prompt", "completion", "text")]


def found(texts: list[str], tokens: tuple[str, ...]) -> list[str]:
    """Every control-token text in `texts`, in order."""
    if not tokens:
        return []
    finder = _finder(tokens)
    return [hit for text in texts for hit in finder.findall(text)]


def found_in_samples(samples: list[dict], tokens: tuple[str, ...]) -> dict[int, list[str]]:
    """{index of a sample: its control-token texts} for the samples that hold any. One regex
    search of the whole batch's text answers for the common batch that holds none (GSM8K's
    7,473 conversations: 13 ms, against 70 ms sample by sample)."""
    if not tokens:
        return {}
    texts = [contents(sample) for sample in samples]
    if not _finder(tokens).search("\x00".join(text for sample_texts in texts for text in sample_texts)):
        return {}
    hits = {index: found(sample_texts, tokens) for index, sample_texts in enumerate(texts)}
    return {index: found_here for index, found_here in hits.items() if found_here}


def hide(sample: dict, tokens: tuple[str, ...]) -> dict:
    """The sample with each control-token text in its content replaced by placeholders of the
    same length."""
    finder = _finder(tokens)
    index = {token: k for k, token in enumerate(tokens)}

    def masked(text: str) -> str:
        return finder.sub(lambda m: chr(PLACEHOLDER + index[m.group()]) * len(m.group()), text)

    if "messages" in sample:
        return {**sample, "messages": [
            {**m, **{key: masked(m[key]) for key in ("content", "reasoning_content") if isinstance(m.get(key), str)}}
            for m in sample["messages"]]}
    return {key: masked(value) if key in ("prompt", "completion", "text") else value
            for key, value in sample.items()}


def restore(text: str, tokens: tuple[str, ...]) -> str:
    """The placeholders of `hide` back as the text they stand for."""
    return re.sub("[\U000f0000-\U000fffff]+", lambda m: _unmask(m.group(), tokens), text)


def _unmask(run: str, tokens: tuple[str, ...]) -> str:
    # Content that holds characters of this plane itself (private use: next to no real text
    # does) is left as it is where they stand for no token.
    out, position = [], 0
    while position < len(run):
        k = ord(run[position]) - PLACEHOLDER
        token = tokens[k] if k < len(tokens) else run[position]
        out.append(token)
        position += len(token)
    return "".join(out)


def encode_as_text(tokenizer, hidden_text: str, spans: list[Span], tokens: tuple[str, ...]) -> Example:
    """Token ids and labels for a rendered sample whose content was hidden: the template's
    control tokens as their ids, everything else (content's control-token text included)
    tokenised as ordinary text; labels inside the trained `spans` (character offsets)."""
    finder = _finder(tokens)
    backend = tokenizer.backend_tokenizer
    ids: list[int] = []
    starts: list[int] = []
    ends: list[int] = []

    def add_text(start: int, end: int) -> None:
        if start == end:
            return
        encoding = backend.encode(restore(hidden_text[start:end], tokens), add_special_tokens=False)
        ids.extend(encoding.ids)
        starts.extend(start + s for s, _ in encoding.offsets)
        ends.extend(start + e for _, e in encoding.offsets)

    previous = backend.encode_special_tokens
    backend.encode_special_tokens = True
    try:
        position = 0
        for match in finder.finditer(hidden_text):
            add_text(position, match.start())
            ids.append(backend.token_to_id(match.group()))
            starts.append(match.start())
            ends.append(match.end())
            position = match.end()
        add_text(position, len(hidden_text))
    finally:
        backend.encode_special_tokens = previous
    ranges = [(bisect.bisect_right(ends, start), bisect.bisect_left(starts, end))  # as chat.encode finds them
              for start, end, _ in spans]
    return labelled(ids, ranges, spans)


def encode_prompt(tokenizer, prompt, template: str | None, mode: str, tools: list | None = None) -> list[int]:
    """Token ids of a prompt (a conversation, rendered with the generation prompt added and the
    `tools` it may call, or a raw text) under `mode`, as prepare tokenised the training data."""
    from llmtune.data.templates import render
    from llmtune.errors import InputError

    sample = {"messages": list(prompt)} if not isinstance(prompt, str) else {"prompt": prompt}
    controls = control_tokens(tokenizer) if mode != "keep" else ()
    hits = found(contents(sample), controls)
    if hits and mode == "error":
        raise InputError(f"the prompt holds the text of a control token, {hits[0]}",
                         hint="the model was trained with data.special_text: error; remove that text")
    if hits:
        sample = hide(sample, controls)
    text = sample["prompt"] if "prompt" in sample else render(tokenizer, sample["messages"], True, template, tools)
    if not hits:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return encode_as_text(tokenizer, text, [], controls).input_ids


def encode_samples(tokenizer, samples: list[dict], template: str | None, train_on: str,
                   mode: str, reasoning: str = "train") -> list[list[Example]]:
    """Each sample rendered and tokenised (chat.encode) into its examples: one, or one per
    rendering for a template that renders earlier turns differently (turns.assistant_spans).
    Under `plain`, samples whose content holds control-token text are tokenised with that text
    as ordinary text (`error` refused such rows when they were read)."""
    controls = control_tokens(tokenizer) if mode == "plain" else ()
    holding = found_in_samples(samples, controls)
    samples = [hide(s, controls) if index in holding else s for index, s in enumerate(samples)]
    rendered = rendered_or_refused(samples, tokenizer, template, train_on, reasoning)
    flat = [piece for index, pieces in enumerate(rendered) if index not in holding for piece in pieces]
    examples = iter(encode(tokenizer, flat))
    return [pieces if isinstance(pieces, Refused)
            else [encode_as_text(tokenizer, text, spans, controls) for text, spans in pieces] if index in holding
            else [next(examples) for _ in pieces]
            for index, pieces in enumerate(rendered)]


class Refused(list):
    """No examples: the chat template raised on this conversation (Llama 3.1's refuses two tool
    calls in one turn, say); `reason` is its message. prepare skips or stops on it, by row."""

    def __init__(self, reason: str):
        super().__init__()
        self.reason = reason


def rendered_or_refused(samples, tokenizer, template, train_on, reasoning) -> list:
    """render_samples, or, when the template raises, each sample alone: those it raises on are
    Refused."""
    from jinja2 import TemplateError

    try:
        return render_samples(samples, tokenizer, template, train_on, reasoning)
    except TemplateError:
        pass
    rendered = []
    for sample in samples:
        try:
            rendered += render_samples([sample], tokenizer, template, train_on, reasoning)
        except TemplateError as exc:
            rendered.append(Refused(str(exc)))
    return rendered
