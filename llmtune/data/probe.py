"""What a chat template does with a conversation, found by rendering probes: which token ends an
assistant turn (what generation and servers must stop at), and whether it shows tool
definitions, tool calls, tool results and reasoning (a template that cannot is refused rather
than training on data with those parts silently dropped)."""

from __future__ import annotations

import functools

from llmtune.data.templates import BUILT_IN, render
from llmtune.errors import InputError


def turn_end_token(tokenizer, template: str | None = None) -> str | None:
    """The special token that ends an assistant turn in `template` (the tokenizer's own when
    None): what generation must stop at. None when the turn ends in no special token."""
    marker = "\U000f0000llmtune\U000f0000"  # private-use characters: in no template's output
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": marker}]
    try:
        text = render(tokenizer, messages, template=template)
    except Exception:  # a template that rejects this conversation tells us nothing
        return None
    after = text.partition(marker)[2].lstrip()
    specials = [token.content for token in tokenizer.added_tokens_decoder.values() if token.special]
    return max((token for token in specials if after.startswith(token)), key=len, default=None)


def end_turns_for_servers(tokenizer, template: str | None = None) -> None:
    """Make the tokenizer's EOS the token that ends an assistant turn in the template it was
    trained with. vLLM, TGI and llama.cpp's servers stop on the tokenizer's EOS (and the ids
    in generation_config.json): a base Llama 3 tokenizer's EOS is `<|end_of_text|>` while its
    chat template ends turns with `<|eot_id|>`, and a model served that way never stops."""
    turn_end = turn_end_token(tokenizer, template)
    if turn_end is not None and turn_end != tokenizer.eos_token:
        tokenizer.eos_token = turn_end


# --- what a template can carry ---------------------------------------------------------------

_MARK = "llmtune-probe-5b1e"  # ASCII, so it survives a tojson that escapes other characters
_CALL = {"type": "function", "function": {"name": "probe_" + "x", "arguments": {"q": _MARK}}}
_PROBES = {  # feature: (messages, tools) whose rendering holds _MARK if the template carries it
    "tool definitions": ([{"role": "user", "content": "Hi"}],
                         [{"type": "function", "function": {"name": "f", "description": _MARK, "parameters": {}}}]),
    "tool calls": ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "", "tool_calls": [_CALL]}],
                   None),
    "tool results": ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "", "tool_calls": [_CALL]},
                      {"role": "tool", "content": _MARK, "name": "probe_x"}], None),
    "reasoning": ([{"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello", "reasoning_content": _MARK}], None),
}


def needs(sample: dict, messages: list[dict]) -> tuple[str, ...]:
    """What a conversation needs its template to render, of the features in _PROBES."""
    if "tools" not in sample and all(len(m) == 2 for m in messages):
        return ()  # plain {role, content} messages, the common conversation
    found = []
    if sample.get("tools"):
        found.append("tool definitions")
    if any(m.get("tool_calls") for m in messages):
        found.append("tool calls")
    if any(m["role"] == "tool" for m in messages):
        found.append("tool results")
    if any(m.get("reasoning_content") for m in messages):
        found.append("reasoning")
    return tuple(found)


def require(tokenizer, template: str | None, features: tuple[str, ...]) -> None:
    """Refuse a template that would silently drop what a conversation holds."""
    missing = [feature for feature in features if not _carries(tokenizer, template, feature)]
    if missing:
        raise InputError(
            f"{describe(tokenizer, template)} does not render {' or '.join(missing)}: training on this "
            "data with it would drop them from what the model sees",
            hint=_hint(missing))


def _hint(missing: list[str]) -> str:
    if missing == ["reasoning"]:
        return ("set data.reasoning: drop to train without the reasoning, or data.template: chatml-tools or "
                "llama-3.1 (both render reasoning_content), or a .jinja file that renders it")
    return ("set data.template: chatml-tools (tool calls in <tool_call> blocks, as Qwen2.5) or llama-3.1 "
            "(Llama 3.1's JSON tool calls), or a .jinja file that renders them"
            + ("; or data.reasoning: drop to train without the reasoning" if "reasoning" in missing else ""))


@functools.lru_cache(maxsize=64)
def _carries(tokenizer, template: str | None, feature: str) -> bool:
    messages, tools = _PROBES[feature]
    try:
        return _MARK in render(tokenizer, messages, feature == "tool definitions", template, tools)
    except Exception:  # a template that raises on the probe (e.g. it refuses a role) does not carry it
        return False


def carried(tokenizer, template: str | None) -> list[str]:
    """The features of _PROBES that `template` (the tokenizer's own when None) renders."""
    return [feature for feature in _PROBES if _carries(tokenizer, template, feature)]


def describe(tokenizer, template: str | None) -> str:
    """A template named for an error message."""
    for name, source in BUILT_IN.items():
        if template == source:
            return f"the built-in template {name!r}"
    if template is None or template == tokenizer.chat_template:
        # the model as the recipe names it (models.load_tokenizer), not the folder it was loaded
        # from (a hub snapshot, or a GGUF converted in llmtune's cache)
        named = getattr(tokenizer, "llmtune_source", None) or getattr(tokenizer, "name_or_path", "")
        return f"the chat template of {named or 'the tokenizer'}"
    return "the chat template given in data.template"
