"""Dataset statistics shown to the user and written to prepared/stats.json."""

from __future__ import annotations

import math
from array import array
from collections import Counter

from llmtune.data.chat import IGNORE, Example
from llmtune.data.pairs import Pair, PromptRow


def percentile(values, q: float) -> int:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


class SplitStats:
    """Counts of one split, added to example by example: a streaming prepare never holds the
    examples, only their lengths (4 bytes each) for the percentiles."""

    def __init__(self):
        self.lengths = array("i")
        self.tokens = 0
        self.trained = 0
        self.labels = Counter()  # kto: good (True) and bad (False) answers
        self.prompts = self.without_answer = 0  # grpo prompts, and those without a reference answer
        self.truncated = 0
        self.answers_cut = 0
        self.parts = Counter()  # trained tokens by part: answer, tool_call, reasoning
        self.conversations = Counter()  # with tools, tool calls, tool results, reasoning turns
        self.images = self.image_tokens = self.with_images = 0  # image chats (vision-language bases)

    def add(self, example: Example | Pair | PromptRow, times: int = 1) -> None:
        """An SFT example, a preference pair / kto answer (its length is its longest sequence, its
        tokens those of every sequence it trains on), or a grpo prompt."""
        if isinstance(example, Example):
            length = tokens = len(example.input_ids)
            trained = length - example.labels.count(IGNORE)
            if example.parts:
                self.parts.update({part: times * n for part, n in example.parts.items()})
            if example.images:
                self.with_images += times
                self.images += times * len(example.images)
                self.image_tokens += times * sum(end - start for start, end in example.image_spans)
        else:  # a Pair or a PromptRow (data/pairs.py)
            length, tokens, trained = example.longest, example.tokens, example.trained
            if example.label is not None:
                self.labels[example.label] += times
            if isinstance(example, PromptRow):
                self.without_answer += times * (example.answer is None)
                self.prompts += times
        self.lengths.extend([length] * times)
        self.tokens += times * tokens
        self.trained += times * trained
        self.truncated += times * example.truncated
        self.answers_cut += times * example.answer_cut

    def add_sample(self, sample: dict, times: int = 1) -> None:
        """Count what a kept conversation holds: tool definitions, calls, results, reasoning."""
        messages = sample.get("messages")
        if not messages:
            return
        calls = sum(len(m.get("tool_calls") or ()) for m in messages)
        counts = {"with_tools": bool(sample.get("tools")), "with_tool_calls": bool(calls), "tool_calls": calls,
                  "tool_results": sum(m["role"] == "tool" for m in messages),
                  "reasoning_turns": sum(bool(m.get("reasoning_content")) for m in messages)}
        self.conversations.update({key: times * int(n) for key, n in counts.items() if n})

    def result(self) -> dict[str, float | int]:
        lengths, tokens = self.lengths, self.tokens
        result = {
            "examples": len(lengths),
            "tokens": tokens,
            "trained_tokens": self.trained,
            "trained_share": round(self.trained / tokens, 4) if tokens else 0.0,
            "length_p50": percentile(lengths, 50) if lengths else 0,
            "length_p95": percentile(lengths, 95) if lengths else 0,
            "length_max": max(lengths, default=0),
            "truncated": self.truncated,
            "answers_cut": self.answers_cut,  # of those, trained text cut too
        }
        if self.images:
            result["images"] = {"rows_with_images": self.with_images, "images": self.images,
                                "image_tokens": self.image_tokens,
                                "image_token_share": round(self.image_tokens / max(tokens, 1), 4)}
        if self.labels:
            result["desirable"], result["undesirable"] = self.labels[True], self.labels[False]
        if self.prompts:
            result["without_answer"] = self.without_answer
        if self.conversations:
            result["conversations"] = {key: self.conversations[key] for key in
                                       ("with_tools", "with_tool_calls", "tool_calls", "tool_results", "reasoning_turns")}
        if self.parts.keys() - {"answer"}:
            result["trained_by_part"] = {part: {"tokens": self.parts[part],
                                                "share": round(self.parts[part] / max(self.trained, 1), 4)}
                                         for part in ("answer", "tool_call", "reasoning")}
        return result
