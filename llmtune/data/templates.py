"""Chat templates: the tokenizer's own by default, built-in named ones for base models, or a file.

Each built-in ends an assistant turn with the token generation must stop at, so that token is
trained: ChatML's `<|im_end|>`, Llama 3's `<|eot_id|>`, and the tokenizer's EOS for Mistral and
Alpaca. Use a named template with a tokenizer that knows its special tokens (a base model whose
tokenizer lacks `<|im_start|>` splits it into ordinary pieces; it still trains, but stops only
where the template's end marker is the EOS).
"""

from __future__ import annotations

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

BUILT_IN = {"chatml": CHATML, "llama-3": LLAMA3, "mistral": MISTRAL, "alpaca": ALPACA}


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
    from llmtune.data.chat import render

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
