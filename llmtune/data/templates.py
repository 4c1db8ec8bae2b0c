"""Chat templates: the tokenizer's own by default, built-in named ones for base models, or a file.

`chatml-tools` and `llama-3.1` also carry tool definitions, tool calls, tool results and
reasoning; a template that cannot carry what a conversation holds is refused (`require`).

Each built-in ends an assistant turn with the token generation must stop at, so that token is
trained: ChatML's `<|im_end|>`, Llama 3's `<|eot_id|>`, and the tokenizer's EOS for Mistral and
Alpaca. Use a named template with a tokenizer that knows its special tokens (a base model whose
tokenizer lacks `<|im_start|>` splits it into ordinary pieces; it still trains, but stops only
where the template's end marker is the EOS).
"""

from __future__ import annotations

import functools
from pathlib import Path

from llmtune.errors import InputError

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Mistral has no system role: a system message is put in front of the first user message.
MISTRAL = (
    "{{ bos_token }}"
    "{% set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else '' %}"
    "{% for message in messages if message['role'] != 'system' %}"
    "{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + (system + '\n\n' if loop.first and system else '') + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)

ALPACA = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)

# ChatML with tools, as Qwen2.5 writes them: definitions in the system turn, each call a JSON
# object in a <tool_call> block of the assistant's turn, results in <tool_response> blocks of a
# user turn. Reasoning opens the assistant's turn in a <think> block, in every turn alike (no
# turn is rendered differently once later turns follow), and no system prompt is injected.
CHATML_TOOLS = (
    "{%- if tools %}{{- '<|im_start|>system\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\n\n' }}{%- endif %}"
    "{{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}"
    "{%- for tool in tools %}{{- '\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call><|im_end|>\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant\n' }}"
    "{%- if message.reasoning_content %}{{- '<think>\n' + message.reasoning_content + '\n</think>\n\n' }}{%- endif %}"
    "{{- message.content }}"
    "{%- for tool_call in message.tool_calls or [] %}"
    "{%- set call = tool_call.function if tool_call.function is defined else tool_call %}"
    "{%- if message.content or not loop.first %}{{- '\n' }}{%- endif %}"
    "{{- '<tool_call>\n{\"name\": \"' + call.name + '\", \"arguments\": ' + (call.arguments | tojson) + '}\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

# Llama 3.1's JSON tool calls: definitions in the system turn (Meta's tools_in_user_message=false
# form, without its injected date), a call as {"name": ..., "parameters": {...}} (one per line
# where a turn makes several), results under the ipython role. Reasoning as in CHATML_TOOLS.
LLAMA31 = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- endif %}"
    "{%- if tools or system %}{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}"
    "{%- if tools %}{{- 'Environment: ipython\n\nYou have access to the following functions. To call a "
    "function, please respond with JSON for a function call. Respond in the format {\"name\": function "
    "name, \"parameters\": dictionary of argument name and its value}. Do not use variables.\n\n' }}"
    "{%- for tool in tools %}{{- (tool | tojson(indent=4)) + '\n\n' }}{%- endfor %}{%- endif %}"
    "{{- system + '<|eot_id|>' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{%- if message.reasoning_content %}{{- '<think>\n' + message.reasoning_content + '\n</think>\n\n' }}{%- endif %}"
    "{{- message.content }}"
    "{%- for tool_call in message.tool_calls or [] %}"
    "{%- set call = tool_call.function if tool_call.function is defined else tool_call %}"
    "{%- if message.content or not loop.first %}{{- '\n' }}{%- endif %}"
    "{{- '{\"name\": \"' + call.name + '\", \"parameters\": ' + (call.arguments | tojson) + '}' }}"
    "{%- endfor %}{{- '<|eot_id|>' }}"
    "{%- else %}{{- '<|start_header_id|>' + ('ipython' if message.role == 'tool' else message.role) "
    "+ '<|end_header_id|>\n\n' + message.content + '<|eot_id|>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)

BUILT_IN = {"chatml": CHATML, "chatml-tools": CHATML_TOOLS, "llama-3": LLAMA3, "llama-3.1": LLAMA31,
            "mistral": MISTRAL, "alpaca": ALPACA}
TOOL_TEMPLATES = ("chatml-tools", "llama-3.1")  # the built-ins that carry tools and reasoning


def resolve_template(choice: str, tokenizer) -> str:
    """The Jinja source for `data.template`: auto (the tokenizer's), a built-in name, or a file."""
    if choice == "auto":
        if not tokenizer.chat_template:
            raise InputError(
                "the tokenizer has no chat template (data.template: auto)",
                hint=f"set data.template to one of {', '.join(BUILT_IN)} or a .jinja file",
            )
        return tokenizer.chat_template
    if choice in BUILT_IN:
        return BUILT_IN[choice]
    path = Path(choice)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise InputError(
        f"data.template: {choice!r} is neither a built-in template nor a file",
        hint=f"use auto, {', '.join(BUILT_IN)}, or a path to a .jinja file",
    )


def turn_end_token(tokenizer, template: str | None = None) -> str | None:
    """The special token that ends an assistant turn in `template` (the tokenizer's own when
    None): what generation must stop at. None when the turn ends in no special token."""
    from llmtune.data.turns import render

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
            hint="set data.template: chatml-tools (tool calls in <tool_call> blocks, as Qwen2.5) or llama-3.1 "
            "(Llama 3.1's JSON tool calls), or a .jinja file that renders them"
            + ("; or data.reasoning: drop to train without the reasoning" if "reasoning" in missing else ""))


@functools.lru_cache(maxsize=64)
def _carries(tokenizer, template: str | None, feature: str) -> bool:
    from llmtune.data.turns import render

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
        return f"the chat template of the tokenizer ({getattr(tokenizer, 'name_or_path', '') or 'its own'})"
    return "the chat template given in data.template"
