"""Batching prepared rows for training and evaluation."""

from __future__ import annotations

from pathlib import Path

import torch

from llmtune.data.chat import IGNORE
from llmtune.errors import InputError


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


class ImageCollator:
    """Batches image chats (vision-language bases). The processor expands each row's stored text
    with its images again, which gives the pixels and whatever else the family's model takes
    (image sizes, token types, ...); that expansion must equal the ids prepare stored and
    labelled, row by row, or the batch is refused naming the row (an image changed since
    prepare, another processor): what trains is what prepare decided, never a silent shift.
    Rows without images mix with image rows in one batch. Counts tokens as PadCollator does."""

    def __init__(self, processor, prepared: Path):
        self.processor, self.prepared = processor, prepared
        processor.tokenizer.padding_side = "right"  # the stored ids are the start of each row
        self.pad_id = processor.tokenizer.pad_token_id or 0
        self.tokens = 0
        self.trained_tokens = 0
        self.counting = True
        self.step_rows: list[str] = []

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        images = [[self._image(row, index) for index in range(len(row["images"]))] for row in rows]
        flat = [image for row_images in images for image in row_images]
        batch = dict(self.processor(text=[row["text"] for row in rows], images=images if flat else None,
                                    padding=True, return_tensors="pt", add_special_tokens=False))
        longest = max(len(row["input_ids"]) for row in rows)
        width = batch["input_ids"].shape[1]
        for name, value in batch.items():  # per-token inputs end with the stored rows
            if torch.is_tensor(value) and value.dim() >= 2 and value.shape[:2] == (len(rows), width):
                batch[name] = value[:, :longest].clone()
        ids = batch["input_ids"]
        labels = torch.full((len(rows), longest), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            stored = torch.tensor(row["input_ids"], dtype=ids.dtype)
            if width < n or not torch.equal(ids[i, :n], stored):
                differ = next((k for k in range(min(n, width)) if ids[i, k] != stored[k]), min(n, width))
                raise InputError(
                    f"{row.get('where', 'a prepared row')}: its images expand into other tokens than prepare "
                    f"stored (first difference at token {differ} of {n})",
                    hint="the processor or an image changed since prepare; prepare again with --force")
            labels[i, :n] = torch.tensor(row["labels"])
            mask[i, :n] = 1
            ids[i, n:] = self.pad_id  # a truncated row: what follows its stored ids is padding
        batch["attention_mask"] = mask
        batch["labels"] = labels
        if self.counting:
            self.step_rows += [row["where"] for row in rows if "where" in row]
            self.tokens += int(mask.sum())
            self.trained_tokens += int((labels != IGNORE).sum())
        return batch

    def _image(self, row: dict, index: int):
        from llmtune.data.vision import BadImageRow, content_hash, open_image

        where = row.get("where", "a prepared row")
        path = Path(row["images"][index])
        path = path if path.is_absolute() else self.prepared / path
        try:
            data = path.read_bytes()
            if content_hash(data) != row["image_hashes"][index]:
                raise InputError(f"{where}: image {path} changed since prepare", hint="prepare again with --force")
            return open_image(data)
        except OSError as exc:
            raise InputError(f"{where}: image {path}: {exc.strerror}",
                             hint="restore it, or prepare again with --force") from None
        except BadImageRow as bad:
            raise InputError(f"{where}: image {path}: {bad}", hint="prepare again with --force") from None
