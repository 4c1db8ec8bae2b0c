"""Dataset formats: turn one row into a sample, or say why it cannot be one.

A sample is one of these shapes:
- {"messages": [{"role", "content"}, ...], "tools"?: [...]}  from chat, sharegpt and alpaca rows
  (messages may carry tool calls, tool results and reasoning: data/tools.py);
- {"prompt": str, "completion": str}        from completion rows (no chat template);
- {"text": str}                             from text rows (continued pretraining, all trained);
- {"prompt": [messages], "chosen": str, "rejected": str}     from preference rows;
- {"prompt": [messages], "completion": str, "label": bool}   from kto rows;
- {"prompt": [messages], "answer": str | None, "extra": {...}}  from prompt rows (grpo).
The last three are rendered with the chat template, the answers as the assistant's next turn.

`fields` maps our field names to the row's own column names, e.g. {"prompt": "question"}.
"""

from __future__ import annotations

from llmtune.data import vision
from llmtune.data.tools import (
    THINK_OPEN,
    check_tool_results,
    from_sharegpt_function_call,
    parse_tool_calls,
    parse_tools,
    split_reasoning,
)

ROLES = ("system", "user", "assistant", "tool")
# LLaMA-Factory's function_call turn is the assistant's tool call, observation its result
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "function_call": "assistant", "observation": "tool", "tool": "tool"}


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

    if fmt in ("preference", "kto", "prompt"):
        sample, problem = _prompt_only(row, column) if fmt == "prompt" else _preference(row, fmt, column)
        if sample is not None and system_prompt and sample["prompt"][0]["role"] != "system":
            sample["prompt"] = [{"role": "system", "content": system_prompt}, *sample["prompt"]]
        return sample, problem
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
    images = row.get(column("images"))
    if vision.shows_images(messages, images):
        return _image_sample(messages, images, system_prompt)
    messages = vision.joined_text_parts(messages)  # content parts that hold text only: a text conversation
    messages, problem = normalize_messages(messages)
    if problem:
        return None, problem
    tools, problem = parse_tools(row.get(column("tools")), column("tools")) if row.get(column("tools")) else (None, None)
    if problem:
        return None, problem
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return ({"messages": messages, "tools": tools} if tools else {"messages": messages}), None


def _image_sample(messages, images, system_prompt: str | None):
    """An image chat (data/vision.py: content parts, or `<image>` placeholders and `images`) as a
    sample, its conversation checked as a text one is (roles, order, empty answers)."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return None, "malformed conversation: expected a non-empty list of messages"
    try:
        sample = vision.sample(messages, images)
    except vision.BadImageRow as bad:
        return None, str(bad)
    as_text = [{**m, "content": vision.shown_as_text(m["content"])} for m in sample["messages"]]
    checked, problem = normalize_messages(as_text)
    if problem:
        return None, problem
    if any(m.get("tool_calls") or m["role"] == "tool" or "reasoning_content" in m for m in checked):
        return None, "not supported: tool calls and reasoning in image chats"
    sample["messages"] = [{**m, "content": original["content"]} if m["role"] != "assistant" else m
                          for m, original in zip(checked, sample["messages"])]
    if system_prompt and sample["messages"][0]["role"] != "system":
        sample["messages"] = [{"role": "system", "content": [{"type": "text", "text": system_prompt}]},
                              *sample["messages"]]
    return sample, None


def check_messages(messages) -> str | None:
    """Why a conversation cannot be trained on, or None when it is fine."""
    return normalize_messages(messages)[1]


def normalize_messages(messages) -> tuple[list[dict] | None, str | None]:
    """(messages in one shape, None) or (None, why the conversation cannot be trained on).
    A plain message becomes {role, content}; tool calls, results, reasoning and a `train` flag
    are kept in the shape data/tools.py describes."""
    if not isinstance(messages, list) or not messages:
        return None, "malformed conversation: expected a non-empty list of messages"
    normalized = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            return None, f"malformed conversation: message {index} is not an object with role and content"
        message, problem = _message(message, index)
        if problem:
            return None, problem
        normalized.append(message)
    problem = _check_order(normalized) or (
        check_tool_results(normalized) if any(m["role"] == "tool" for m in normalized) else None)
    return (None, problem) if problem else (normalized, None)


def _message(message: dict, index: int) -> tuple[dict | None, str | None]:
    role, content = message.get("role"), message.get("content")
    if len(message) == 2 and isinstance(content, str) and (  # the common plain message, quickly
            role == "user" or role == "system" and index == 0
            or role == "assistant" and content.strip() and not content.lstrip().startswith(THINK_OPEN)):
        return {"role": role, "content": content}, None
    where = f"message {index}"
    if role not in ROLES:
        return None, f"unknown role: {where} has {role!r} (expected one of {', '.join(ROLES)})"
    calls = message.get("tool_calls") if role == "assistant" else None
    if content is None and calls:
        content = ""
    if not isinstance(content, str):
        return None, f"not a string: {where} 'content'"
    out = {"role": role, "content": content}
    if role == "assistant":
        reasoning, content, problem = split_reasoning(message, where)
        if problem:
            return None, problem
        out["content"] = content
        if calls:
            out["tool_calls"], problem = parse_tool_calls(calls, where)
            if problem:
                return None, problem
        if reasoning is not None:
            out["reasoning_content"] = reasoning
        if not content.strip() and not calls:
            return None, f"empty assistant turn: {where}"
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if message.get(key) is not None:
                out[key] = str(message[key])
    if message.get("train") is not None:
        if role != "assistant" or not isinstance(message["train"], bool):
            return None, (f"malformed train flag: {where} ('train' is true or false, on assistant "
                          "messages only: other turns are never trained)")
        out["train"] = message["train"]
    if role == "system" and index != 0:
        return None, f"roles out of order: {where} is a system message; it may only come first"
    return out, None


# which role may follow which; a tool result only after an assistant turn with tool calls
_FOLLOWS = {"user": ("assistant",), "assistant": ("user", "tool"), "tool": ("tool", "assistant")}


def _check_order(messages: list[dict]) -> str | None:
    turns = [(index, m) for index, m in enumerate(messages) if m["role"] != "system"]
    if not any(m["role"] == "assistant" for _, m in turns):
        return "no assistant turn: nothing to learn from"
    if turns[0][1]["role"] != "user":
        return "roles out of order: user and assistant turns must alternate, starting with user"
    for (_, previous), (index, message) in zip(turns, turns[1:]):
        if message["role"] == "tool" and not (previous.get("tool_calls") or previous["role"] == "tool"):
            return f"tool result without a call: message {index} follows no assistant tool call"
        if message["role"] not in _FOLLOWS[previous["role"]]:
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
        if turn["from"] == "function_call":
            calls, problem = from_sharegpt_function_call(turn["value"], f"{column}[{index}]")
            if problem:
                return None, problem
            messages.append({"role": "assistant", "content": "", "tool_calls": calls})
        else:
            messages.append({"role": role, "content": turn["value"]})
    return messages, None


def _preference(row: dict, fmt: str, column):
    """A preference or kto row as a sample (see the module docstring), or why it is not one."""
    answers = ("chosen", "rejected") if fmt == "preference" else ("completion",)
    for name in answers:
        if row.get(column(name)) is None:
            return None, f"missing field: '{column(name)}'"
    prompt = row.get(column("prompt"))
    if prompt is None and fmt == "preference":
        if not all(isinstance(row[column(name)], list) for name in answers):
            return None, (f"missing field: '{column('prompt')}' (or give '{column('chosen')}' and "
                          f"'{column('rejected')}' as two whole conversations)")
        # two whole conversations sharing a prefix (HH-RLHF, UltraFeedback): split at the first difference
        prompt, problem = _split_conversations(row[column("chosen")], row[column("rejected")], column)
        if problem:
            return None, problem
        values = {"chosen": row[column("chosen")][len(prompt)], "rejected": row[column("rejected")][len(prompt)]}
    elif prompt is None:
        return None, f"missing field: '{column('prompt')}'"
    else:
        values = {name: row[column(name)] for name in answers}
    prompt, problem = _prompt_messages(prompt, column("prompt"))
    if problem:
        return None, problem
    sample = {"prompt": prompt}
    for name, value in values.items():
        text, problem = _answer(value, column(name))
        if problem:
            return None, problem
        sample[name] = text
    if fmt == "preference" and sample["chosen"].strip() == sample["rejected"].strip():
        return None, "chosen equals rejected: nothing to prefer"
    if fmt == "kto":
        label = row.get(column("label"))
        if label is None:
            return None, f"missing field: '{column('label')}'"
        if not isinstance(label, bool):
            return None, f"not a boolean: field '{column('label')}' is {label!r} (true for a good answer, false for a bad one)"
        sample["label"] = label
    return sample, None


def _split_conversations(chosen, rejected, column):
    """The shared prefix of two conversations that differ only in their last (assistant) turn."""
    for name, conversation in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(conversation, list) or not all(isinstance(m, dict) for m in conversation):
            return None, (f"malformed pair: '{column(name)}' must be a list of messages when the row has "
                          f"no '{column('prompt')}'")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        return None, "malformed pair: the two conversations share no prefix (no common prompt)"
    if shared == len(chosen) == len(rejected):
        return None, "chosen equals rejected: nothing to prefer"
    if len(chosen) != shared + 1 or len(rejected) != shared + 1:
        return None, ("malformed pair: the two conversations must differ only in their last turn "
                      f"(they differ from message {shared}, of {len(chosen)} and {len(rejected)})")
    return chosen[:shared], None


def _prompt_messages(prompt, column: str):
    """A prompt (a string, or messages ending with the user's) as messages, or why it is not one."""
    if isinstance(prompt, str):
        if not prompt.strip():
            return None, f"empty field: '{column}'"
        prompt = [{"role": "user", "content": prompt}]
    problem = _check_prompt(prompt, column)
    if problem:
        return None, problem
    return [{"role": m["role"], "content": m["content"]} for m in prompt], None


def _check_prompt(prompt, column: str) -> str | None:
    if not isinstance(prompt, list) or not prompt:
        return f"malformed prompt: '{column}' must be a string or a non-empty list of messages"
    problem = check_messages([*prompt, {"role": "assistant", "content": "answer"}])
    if problem:
        return problem.replace("malformed conversation", "malformed prompt")
    if prompt[-1]["role"] != "user":
        return f"malformed prompt: '{column}' must end with a user message (the answers are the reply)"
    if any(m.get("role") == "tool" or m.get("tool_calls") for m in prompt):
        # they would be rendered without their calls: refused rather than silently cut
        return f"malformed prompt: '{column}' holds tool calls, which preference, kto and prompt data do not carry yet"
    return None


def _answer(value, column: str):
    """An answer: a string, an assistant message, or a list of one assistant message."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        if value.get("role") != "assistant":
            return None, f"malformed answer: '{column}' must be a string or an assistant message"
        value = value.get("content")
    if not isinstance(value, str):
        return None, f"malformed answer: '{column}' must be a string or an assistant message"
    if not value.strip():
        return None, f"empty answer: '{column}'"
    return value, None


def _prompt_only(row: dict, column):
    """A prompt row (grpo): the prompt, its reference answer if any, and every other column
    (passed to reward functions)."""
    prompt = row.get(column("prompt"))
    if prompt is None:
        return None, f"missing field: '{column('prompt')}'"
    prompt, problem = _prompt_messages(prompt, column("prompt"))
    if problem:
        return None, problem
    answer = row.get(column("answer"))
    if answer is not None and (isinstance(answer, bool) or not isinstance(answer, (str, int, float))):
        return None, f"not a string: field '{column('answer')}' must be text or a number"
    extra = {key: value for key, value in row.items() if key not in (column("prompt"), column("answer"))}
    return {"prompt": prompt, "answer": None if answer is None else str(answer), "extra": extra}, None
