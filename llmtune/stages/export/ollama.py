"""An Ollama Modelfile for an exported GGUF: TEMPLATE, SYSTEM and stop parameters.

Ollama templates are Go templates, so a Jinja chat template cannot be copied over. We find which
known family the model's template renders like (by rendering a probe conversation with it and
with each built-in template) and write that family's Go template, in the form Ollama's own
library uses. An unrecognised template is refused rather than guessed.
"""

from __future__ import annotations

import re
from pathlib import Path

from llmtune.data.templates import BUILT_IN, render
from llmtune.errors import InputError

GO_TEMPLATES = {
    "chatml": (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
        "{{ .Content }}<|im_end|>\n"
        "{{ end }}<|im_start|>assistant\n"
    ),
    "llama-3": (
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
        "{{ .Content }}<|eot_id|>"
        "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    # Mistral has no system role: the system text goes in front of the first user message.
    "mistral": (
        '{{- $system := "" }}{{- range .Messages }}{{- if eq .Role "system" }}{{- $system = .Content }}'
        "{{- end }}{{- end }}{{- $first := true }}"
        '{{- range .Messages }}{{- if eq .Role "user" }}[INST] {{ if and $first $system }}{{ $system }}\n\n'
        "{{ end }}{{ .Content }} [/INST]{{- $first = false }}"
        '{{- else if eq .Role "assistant" }} {{ .Content }}EOS{{- end }}{{- end }}'
    ),
    "alpaca": (
        '{{- range .Messages }}{{- if eq .Role "system" }}{{ .Content }}\n\n'
        '{{ else if eq .Role "user" }}### Instruction:\n{{ .Content }}\n\n'
        '{{ else if eq .Role "assistant" }}### Response:\n{{ .Content }}EOS\n\n'
        "{{ end }}{{- end }}### Response:\n"
    ),
}
# Text that starts a new turn: generation stops there too.
TURN_MARKERS = {"chatml": ["<|im_start|>"], "llama-3": ["<|start_header_id|>"],
                "mistral": ["[INST]"], "alpaca": ["### Instruction:"]}
_PROBE = [
    {"role": "system", "content": "SYSTEM-TEXT"},
    {"role": "user", "content": "USER-ONE"},
    {"role": "assistant", "content": "ASSISTANT-ONE"},
    {"role": "user", "content": "USER-TWO"},
]


def template_family(tokenizer, template: str) -> str | None:
    """The built-in family whose rendering of a multi-turn conversation equals `template`'s."""
    rendered = _render(tokenizer, template, _PROBE)
    for name, candidate in BUILT_IN.items():
        if _render(tokenizer, candidate, _PROBE) == rendered:
            return name
    return None


def default_system_prompt(tokenizer, template: str, family: str) -> str | None:
    """A system message the template adds on its own when a conversation has none (SmolLM2's)."""
    user_only = [{"role": "user", "content": "USER-ONE"}]
    rendered = _render(tokenizer, template, user_only)
    if rendered == _render(tokenizer, BUILT_IN[family], user_only):
        return None
    patterns = {"chatml": r"<\|im_start\|>system\n(.*?)<\|im_end\|>",
                "llama-3": r"<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>"}
    match = re.search(patterns.get(family, r"(?!)"), rendered, re.S)
    return match.group(1) if match else None


def modelfile(gguf_name: str, tokenizer, template: str, eos_texts: list[str],
              system_prompt: str | None) -> str:
    family = template_family(tokenizer, template)
    if family is None:
        raise InputError(
            "export: ollama needs a Go TEMPLATE, and this model's chat template is not one llmtune "
            f"can translate (known: {', '.join(GO_TEMPLATES)})",
            hint="train with data.template set to one of those, or drop ollama from export.formats "
                 "(Ollama can still run the GGUF with a TEMPLATE you write)",
        )
    go_template = GO_TEMPLATES[family].replace("EOS", tokenizer.eos_token or "")
    # the one the model was trained with, else the one its template adds on its own
    system = system_prompt or default_system_prompt(tokenizer, template, family)
    lines = [f"# Written by llmtune: chat template family {family}", f"FROM ./{gguf_name}",
             f'TEMPLATE """{go_template}"""']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    for stop in dict.fromkeys(eos_texts + TURN_MARKERS[family]):
        lines.append(f'PARAMETER stop "{_quote(stop)}"')
    return "\n".join(lines) + "\n"


def write_modelfile(folder: Path, gguf_name: str, tokenizer, template: str, eos_texts: list[str],
                    system_prompt: str | None) -> None:
    (folder / "Modelfile").write_text(modelfile(gguf_name, tokenizer, template, eos_texts, system_prompt))


def _render(tokenizer, template: str, messages: list[dict]) -> str:
    return render(tokenizer, messages, add_generation_prompt=True, template=template)


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
