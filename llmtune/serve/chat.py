"""`llmtune chat` as an object: a conversation with a trained model, served as the run was
trained, its history kept as structured turns (reasoning, tool calls and their results apart),
so that a script can hold the same conversation the command line does."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import TextStreamer

from llmtune.console import console
from llmtune.data.special_text import encode_prompt
from llmtune.data.tools import answer_of, calls_in_text
from llmtune.errors import InputError
from llmtune.models import eos_token_ids
from llmtune.serve.generate import read_tools, require_tools
from llmtune.serve.inference import load_tuned, tuned_processor
from llmtune.serve.serving import serving_defaults, use_template


class Chat:
    """A conversation with the model of `target` (a run directory or a model folder, with
    `adapter`). `system`: the system prompt (default: the one every training conversation had);
    `tools`: a JSON file of functions the model may call."""

    def __init__(self, target: Path, adapter: Path | None = None, system: str | None = None,
                 max_new_tokens: int = 256, template: str | None = None, tools: Path | None = None):
        self.serving = serving_defaults(target, adapter)
        self.model, self.tokenizer = load_tuned(target, adapter)
        use_template(self.tokenizer, self.serving, template, target)
        if not self.tokenizer.chat_template:
            raise InputError(f"{target}: the tokenizer has no chat template to chat with")
        self.tools = read_tools(tools)
        if self.tools:
            require_tools(self.tokenizer)
        self.system_from_training = system is None and bool(self.serving.system_prompt)
        self.system = self.serving.system_prompt if system is None else system
        self.max_new_tokens = max_new_tokens
        self.history: list[dict] = []
        # a vision-language model: images shown with /image, in the order the turns show them
        self.processor = tuned_processor(target, adapter)
        self.images: list = []  # of the history
        self.pending: list = []  # for the next user turn

    def reset(self) -> None:
        self.history, self.images, self.pending = [], [], []

    def show_image(self, path: Path) -> None:
        """An image the next user turn shows (a vision-language model only)."""
        from llmtune.data import vision

        if self.processor is None:
            raise InputError("this model is a language model: it takes no images")
        try:
            self.pending.append(vision.open_image(Path(path).expanduser().read_bytes()))
        except OSError as exc:
            raise InputError(f"/image {path}: {exc.strerror}") from None
        except vision.BadImageRow as bad:
            raise InputError(f"/image {path}: {bad}") from None

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    def awaits_tool_result(self) -> bool:
        return bool(self.history) and (bool(self.history[-1].get("tool_calls")) or self.history[-1]["role"] == "tool")

    def say(self, text: str, stream: bool = True) -> dict:
        """The user's turn (with the images shown since the last one), and the model's answer
        to it (streamed to stdout with `stream`)."""
        if not self.pending:
            return self._answer({"role": "user", "content": text}, stream)
        turn = {"role": "user", "content": [*({"type": "image"} for _ in self.pending), {"type": "text", "text": text}]}
        shown, self.pending = self.pending, []
        self.images += shown
        try:
            return self._answer(turn, stream)
        except BaseException:
            del self.images[len(self.images) - len(shown):]
            raise

    def tool_result(self, text: str, stream: bool = True) -> dict:
        """The result of the model's last tool call, and what it makes of it."""
        return self._answer({"role": "tool", "content": text, "name": self._last_call()}, stream)

    def _answer(self, turn: dict, stream: bool) -> dict:
        """The model's turn after `turn`: {"role": "assistant", "content", reasoning_content?,
        tool_calls?}, added to the history. Control-token text in content refused by
        data.special_text: error leaves the history as it was."""
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history + [turn]
        if self.images:  # the processor expands every image shown so far into its tokens
            from llmtune.data.templates import render

            inputs = self.processor(text=[render(self.tokenizer, messages, True)], images=self.images,
                                    return_tensors="pt", add_special_tokens=False).to(self.model.device)
        else:
            ids = encode_prompt(self.tokenizer, messages, None, self.serving.special_text, self.tools)
            inputs = {"input_ids": torch.tensor([ids], device=self.model.device)}
        self.history.append(turn)
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
        try:
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                         eos_token_id=eos_token_ids(self.tokenizer, self.model.config),
                                         pad_token_id=self.tokenizer.pad_token_id, streamer=streamer)
        except KeyboardInterrupt:  # Ctrl-C stops this answer: the conversation is as it was before the turn
            self.history.pop()
            raise
        answer = self.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        # the turn as the template renders it back: reasoning, answer and tool calls apart
        reasoning, content = answer_of(answer.strip())
        content, calls = calls_in_text(content) if self.tools else (content, [])
        reply = {"role": "assistant", "content": content,
                 **({"reasoning_content": reasoning} if reasoning else {}),
                 **({"tool_calls": [{"type": "function", "function": call} for call in calls]} if calls else {})}
        self.history.append(reply)
        return reply

    def _last_call(self) -> str | None:
        for message in reversed(self.history):
            if message.get("tool_calls"):
                return message["tool_calls"][-1]["function"]["name"]
        return None


def describe_calls(reply: dict) -> list[str]:
    """The tool calls of a reply, one line each: `tool call: name {arguments}`."""
    return [f"tool call: {call['function']['name']} {json.dumps(call['function']['arguments'], ensure_ascii=False)}"
            for call in reply.get("tool_calls", [])]


def say_start(chat: Chat) -> None:
    if chat.tools:
        console.print(f"chat: the model may call {', '.join(t['function']['name'] for t in chat.tools)}; "
                      "answer a call with /tool RESULT")
    if chat.system_from_training:
        console.print(f"chat: system prompt from training (every training conversation had it; "
                      f"/system to change it): {chat.system}", markup=False)
    if chat.processor is not None:
        console.print("chat: /image PATH shows an image with your next message")
    console.print("chat: /reset clears the conversation, /system TEXT sets the system prompt, /exit leaves")
