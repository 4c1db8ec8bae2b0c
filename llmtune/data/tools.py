"""Tool calls and reasoning in conversations: reading them into one shape, and reading them back
out of generated text.

The shape is the one transformers' chat templates read (OpenAI's): a sample's `tools` is a list
of `{"type": "function", "function": {name, description, parameters}}`; an assistant message may
have `tool_calls` (`[{"type": "function", "function": {"name", "arguments": {...}}}]`, arguments
an object: templates write them with `tojson`) and `reasoning_content`; a `tool` message holds a
result, with the `tool_call_id` and/or `name` of its call. A message may carry `train`: true or
false, which overrides data.train_on for that assistant turn.
"""

from __future__ import annotations

import json
import re

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # transformers' aliases


def parse_tools(value, column: str):
    """(tools, None) or (None, why): a list of function definitions, or a JSON string of one
    (LLaMA-Factory's `tools` column). A bare `{name, parameters}` is wrapped as a function."""
    if isinstance(value, str):
        if not value.strip():
            return None, None
        try:
            value = json.loads(value)
        except ValueError:
            return None, f"malformed tools: '{column}' is not JSON"
    if not isinstance(value, list):
        return None, f"malformed tools: '{column}' must be a list of function definitions"
    tools = []
    for index, tool in enumerate(value):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else tool
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            return None, f"malformed tools: {column}[{index}] needs a function name"
        tools.append({"type": "function", "function": function})
    return tools or None, None


def parse_tool_calls(calls, where: str):
    """(tool_calls, None) or (None, why). A call is `{type: function, function: {name,
    arguments}}` or `{name, arguments}`; arguments an object or a JSON string of one."""
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        return None, f"malformed tool call: {where} 'tool_calls' must be a non-empty list"
    parsed = []
    for index, call in enumerate(calls):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            return None, f"malformed tool call: {where} call {index} needs a function name"
        arguments = function.get("arguments", function.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                return None, f"tool call arguments not JSON: {where} call {index} ({function['name']})"
        if not isinstance(arguments, dict):
            return None, f"tool call arguments not JSON: {where} call {index} must have an object of arguments"
        entry = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        parsed.append(entry)
    return parsed, None


def split_reasoning(message: dict, where: str):
    """(reasoning or None, content, None) or (None, None, why): the reasoning of an assistant
    message, from its reasoning field or a `<think>...</think>` block opening its content."""
    content = message.get("content") or ""
    for field in REASONING_FIELDS:
        value = message.get(field)
        if value is not None:
            if not isinstance(value, str):
                return None, None, f"not a string: {where} '{field}'"
            return (value if value.strip() else None), content, None
    stripped = content.lstrip()
    if not stripped.startswith(THINK_OPEN):
        return None, content, None
    close = stripped.find(THINK_CLOSE)
    if close < 0:
        return None, None, f"unclosed think block: {where} opens {THINK_OPEN} without {THINK_CLOSE}"
    reasoning = stripped[len(THINK_OPEN):close].strip("\n")
    return (reasoning if reasoning.strip() else None), stripped[close + len(THINK_CLOSE):].lstrip("\n"), None


def answer_of(text: str) -> tuple[str | None, str]:
    """(reasoning, answer) of a generated text: a leading <think>...</think> block split off
    (also a bare "...</think>" where the generation prompt opened the block itself). The answer
    is what eval compares with the reference."""
    if THINK_CLOSE in text and THINK_OPEN not in text:
        reasoning, _, answer = text.partition(THINK_CLOSE)
        return reasoning.strip("\n") or None, answer.lstrip("\n")
    reasoning, answer, problem = split_reasoning({"content": text}, "the answer")
    return (None, text) if problem else (reasoning, answer)


def check_tool_results(messages: list[dict]) -> str | None:
    """Why the tool messages of a conversation do not fit its calls, or None: each follows an
    assistant message with tool calls (or another result), and names a call it made."""
    calls: list[dict] = []
    for index, message in enumerate(messages):
        role = message["role"]
        if role == "assistant":
            calls = message.get("tool_calls") or []
        elif role == "tool":
            if not calls:
                return f"tool result without a call: message {index} follows no assistant tool call"
            call_id, name = message.get("tool_call_id"), message.get("name")
            ids = {call.get("id") for call in calls} - {None}
            if call_id is not None and call_id not in ids:
                return f"unknown tool_call_id: message {index} answers {call_id!r}, which no call made"
            if call_id is None and name is not None and name not in {c["function"]["name"] for c in calls}:
                return f"unknown tool name: message {index} answers {name!r}, which no call made"
        else:
            calls = []
    return None


def from_sharegpt_function_call(value, where: str):
    """An LLaMA-Factory `function_call` turn's value (a JSON object, or a list of them, with
    name and arguments) as tool calls."""
    try:
        calls = json.loads(value) if isinstance(value, str) else value
    except ValueError:
        return None, f"tool call arguments not JSON: {where} is not a JSON function call"
    return parse_tool_calls(calls, where)


# --- generated text back into tool calls ---------------------------------------------------

_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def calls_in_text(text: str) -> tuple[str, list[dict]]:
    """(content, calls) of a generated answer: `<tool_call>{json}</tool_call>` blocks (ChatML
    tools, Qwen, Hermes) or, for Llama 3.1's format, an answer that is one JSON object with a
    name and parameters. A block that is not valid JSON is kept in the content, not a call."""
    calls, kept = [], []
    position = 0
    for match in _TAGGED.finditer(text):
        call = _as_call(match.group(1))
        if call is None:
            continue
        kept.append(text[position:match.start()])
        calls.append(call)
        position = match.end()
    if calls:
        kept.append(text[position:])
        return "".join(kept).strip(), calls
    stripped = text.strip()
    call = _as_call(stripped.removeprefix("<|python_tag|>")) if stripped.startswith(("{", "<|python_tag|>")) else None
    return ("", [call]) if call else (text, [])


def _as_call(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    return {"name": value["name"], "arguments": arguments} if isinstance(arguments, dict) else None


def same_call(generated: dict, reference: dict) -> bool:
    """A generated call matches the reference: same name, arguments equal as JSON values."""
    function = reference.get("function", reference)
    return generated["name"] == function["name"] and generated["arguments"] == function["arguments"]
