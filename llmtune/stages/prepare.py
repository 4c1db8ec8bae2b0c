"""prepare: chat JSONL -> tokenised, label-masked train/validation sets (`datasets` folders)."""

from __future__ import annotations

import json
from pathlib import Path

from datasets import Dataset

from llmtune import models
from llmtune.console import console
from llmtune.data.chat import IGNORE, Example, read_chat_jsonl, tokenize_chat
from llmtune.data.split import split_rows
from llmtune.data.stats import split_stats
from llmtune.errors import InputError
from llmtune.manifest import Outcome, finish_stage, is_up_to_date, read_manifest, sha256_file, start_stage
from llmtune.recipe import Recipe, section_sha256


def prepare(recipe: Recipe, run: Path, force: bool = False) -> Outcome:
    out_dir = run / "prepared"
    ref = models.resolve(recipe.model.path, recipe.model.revision)
    data = recipe.data
    sources = [*data.train, *(data.validation.sources or [])]
    inputs = {
        "base_model": ref.as_manifest(),
        "tokenizer": models.tokenizer_fingerprint(ref),
        "data_files": {s.path: sha256_file(s.path) for s in sources},
    }
    recipe_sha = section_sha256(recipe, "data")
    if not force and is_up_to_date(out_dir, "prepare", recipe_sha, inputs):
        return Outcome(read_manifest(out_dir), up_to_date=True)

    partial = start_stage(out_dir)
    tokenizer = models.load_tokenizer(ref)
    if not tokenizer.chat_template:
        raise InputError(
            f"the tokenizer of {ref.source} has no chat template",
            hint="use an instruct/chat model, or one whose tokenizer_config.json has chat_template",
        )

    train_rows = [m for s in data.train for _, m in read_chat_jsonl(s.path)]
    if data.validation.sources is not None:
        train_rows, _ = split_rows(train_rows, 0.0, data.seed)
        val_rows = [m for s in data.validation.sources for _, m in read_chat_jsonl(s.path)]
    else:
        train_rows, val_rows = split_rows(train_rows, data.validation.effective_fraction, data.seed)
    rows_read = len(train_rows) + len(val_rows)
    console.print(f"prepare: {rows_read} conversations read from {len(sources)} file(s)")

    train, train_messages, dropped_train = _tokenize_all(tokenizer, train_rows, data.max_seq_len)
    validation, val_messages, dropped_val = _tokenize_all(tokenizer, val_rows, data.max_seq_len)
    if not train:
        raise InputError("no training example is left after tokenisation", hint="check data.train")
    _save(train, train_messages, partial / "train")
    _save(validation, val_messages, partial / "validation")

    stats = {
        "rows_read": rows_read,
        "rows_kept": len(train) + len(validation),
        "rows_dropped_no_trained_tokens": dropped_train + dropped_val,
        "max_seq_len": data.max_seq_len,
        "train": split_stats(train),
        "validation": split_stats(validation),
    }
    (partial / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    summary = {
        "rows_read": rows_read,
        "train_examples": len(train),
        "validation_examples": len(validation),
        "train_tokens": stats["train"]["tokens"],
        "trained_share": stats["train"]["trained_share"],
        "truncated": stats["train"]["truncated"] + stats["validation"]["truncated"],
        "dropped": stats["rows_dropped_no_trained_tokens"],
    }
    manifest = finish_stage(
        partial, out_dir, stage="prepare", recipe_sha256=recipe_sha, inputs=inputs, summary=summary
    )
    return Outcome(manifest, up_to_date=False)


def _tokenize_all(tokenizer, rows, max_seq_len: int) -> tuple[list[Example], list, int]:
    """Tokenise every row; rows whose trained tokens all fall past max_seq_len are dropped."""
    kept, kept_messages, dropped = [], [], 0
    for messages in rows:
        example = tokenize_chat(tokenizer, messages, max_seq_len)
        if any(label != IGNORE for label in example.labels):
            kept.append(example)
            kept_messages.append(messages)
        else:
            dropped += 1
    return kept, kept_messages, dropped


def _save(examples: list[Example], messages: list, path: Path) -> None:
    # The conversation travels with its tokens (as JSON) so later stages can show and score it.
    columns = {
        "input_ids": [e.input_ids for e in examples],
        "labels": [e.labels for e in examples],
        "messages": [json.dumps(m, ensure_ascii=False) for m in messages],
    }
    Dataset.from_dict(columns).save_to_disk(str(path))
