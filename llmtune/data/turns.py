"""Samples rendered to text with the character spans that are trained (chat.py tokenises them).

For a conversation, each assistant turn's span is the text the template adds for that message
(its content, tool calls and reasoning, through its end-of-turn token), found by rendering the
conversation up to the turn with the generation prompt and with the turn itself. A template that
renders an earlier turn differently once later turns follow gives a conversation one rendering
per such turn (assistant_spans).
"""

from __future__ import annotations

import functools

from llmtune.data import probe
from llmtune.data.templates import _compiled, render, template_messages  # noqa: F401 (render: turns' public name too)
from llmtune.errors import InputError

Span = tuple[int, int, str]  # characters [start, end) of a trained part: answer, tool_call or reasoning


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
        features = probe.needs(sample, messages)
        if features:
            probe.require(tokenizer, template, features)
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
    if "reasoning_content" not in message and "tool_calls" not in message:
        return [(start, end, ANSWER)]  # a plain answer, the common turn
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
