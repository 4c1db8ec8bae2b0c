"""Dataset formats: turn one row into a sample, or say why it cannot be one.

A sample is one of three shapes:
- {"messages": [{"role", "content"}, ...]}  from chat, sharegpt and alpaca rows;
- {"prompt": str, "completion": str}        from completion rows (no chat template);
- {"text": str}                             from text rows (continued pretraining, all trained).

`fields` maps our field names to the row's own column names, e.g. {"prompt": "question"}.
"""

from __future__ import annotations

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


def to_sample(row: dict, fmt: str, fields: dict[str, str], system_prompt: str | None = None,
              separator: str = ""):
    """(sample, None) for a good row, (None, reason) for a bad one. A reason reads
    "<kind>: <detail>", and reports count rows by kind. `separator` goes between a completion
    row's prompt and completion."""
    def column(name: str) -> str:
        return fields.get(name, name)

    def text_field(name: str, required: bool = True) -> tuple[str | None, str | None]:
        value = row.get(column(name))
        if value is None:
            return None, (f"missing field: '{column(name)}'" if required else None)
        if not isinstance(value, str):
            return None, f"not a string: field '{column(name)}'"
        if required and not value.strip():
            return None, f"empty field: '{column(name)}'"
        return value, None

    if fmt == "text":
        text, problem = text_field("text")
        return (None, problem) if problem else ({"text": text}, None)
    if fmt == "completion":
        prompt, problem = text_field("prompt")
        completion, problem2 = text_field("completion")
        if problem or problem2:
            return None, problem or problem2
        return {"prompt": prompt + separator, "completion": completion}, None
    if fmt == "alpaca":
        instruction, problem = text_field("instruction")
        extra, problem2 = text_field("input", required=False)
        output, problem3 = text_field("output")
        if problem or problem2 or problem3:
            return None, problem or problem2 or problem3
        user = instruction + (f"\n\n{extra}" if extra and extra.strip() else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    elif fmt == "sharegpt":
        messages, problem = _from_sharegpt(row.get(column("conversations")), column("conversations"))
        if problem:
            return None, problem
    else:
        messages = row.get(column("messages"))
        if messages is None:
            return None, f"missing field: '{column('messages')}'"
    problem = check_messages(messages)
    if problem:
        return None, problem
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}, None


def check_messages(messages) -> str | None:
    """Why a conversation cannot be trained on, or None when it is fine."""
    if not isinstance(messages, list) or not messages:
        return "malformed conversation: expected a non-empty list of messages"
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"malformed conversation: message {index} is not an object with role and content"
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return f"unknown role: message {index} has {role!r} (expected one of {', '.join(ROLES)})"
        if not isinstance(content, str):
            return f"not a string: message {index} 'content'"
        if role == "system" and index != 0:
            return f"roles out of order: message {index} is a system message; it may only come first"
        if role == "assistant" and not content.strip():
            return f"empty assistant turn: message {index}"
    turns = [m["role"] for m in messages if m["role"] != "system"]
    if "assistant" not in turns:
        return "no assistant turn: nothing to learn from"
    if turns[0] != "user" or any(a == b for a, b in zip(turns, turns[1:])):
        return "roles out of order: user and assistant turns must alternate, starting with user"
    return None


def _from_sharegpt(conversation, column: str):
    if not isinstance(conversation, list):
        return None, (f"missing field: '{column}'" if conversation is None
                      else f"malformed conversation: '{column}' must be a list")
    messages = []
    for index, turn in enumerate(conversation):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            return None, f"malformed conversation: {column}[{index}] needs 'from' and 'value'"
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            known = ", ".join(SHAREGPT_ROLES)
            return None, f"unknown role: {column}[{index}] has {turn['from']!r} (expected one of {known})"
        messages.append({"role": role, "content": turn["value"]})
    return messages, None
