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

# The file a template travels in: beside the prepared data (the template it was rendered with),
# and in every tokenizer folder transformers writes (adapter, merged model)
TEMPLATE_FILE = "chat_template.jinja"
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


# --- rendering --------------------------------------------------------------------------------


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
    messages = messages if isinstance(messages, list) else list(messages)
    if not any("reasoning_content" in message or "train" in message for message in messages):
        return messages  # nothing to change: no copy
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
