"""Batching prepared rows for training and evaluation."""

from __future__ import annotations

import torch

from llmtune.data.chat import IGNORE


class PadCollator:
    """Right-pads a batch to its longest row; labels pad with -100, never masked by pad id
    (SmolLM2's pad token is its EOS, which must be trained).

    Training passes no attention mask: under the causal mask, right padding never reaches a real
    token, and without a mask SDPA takes its causal fast path. Packed rows carry position ids
    that restart at each example, and their pads restart once more, so transformers keeps
    attention inside each example. Counts real and trained tokens for the progress line, and
    keeps where the training rows since `step_rows` was last cleared were read (file:line), so
    that a step that goes wrong can name them.
    """

    def __init__(self, pad_id: int, attention_mask: bool = False):
        self.pad_id = pad_id
        self.attention_mask = attention_mask
        self.tokens = 0
        self.trained_tokens = 0
        self.counting = True  # off while the Trainer evaluates
        self.step_rows: list[str] = []

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        packed = "position_ids" in rows[0]
        positions = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            mask[i, :n] = 1
            if packed:
                positions[i, :n] = torch.tensor(row["position_ids"])
                positions[i, n:] = torch.arange(longest - n)
        if self.counting:
            self.step_rows += [row["where"] for row in rows if "where" in row]
            self.tokens += int(mask.sum())
            self.trained_tokens += int((labels != IGNORE).sum())
        batch = {"input_ids": ids, "labels": labels}
        if packed:
            batch["position_ids"] = positions
        if self.attention_mask:
            batch["attention_mask"] = mask
        return batch
