"""prepare: data sources -> tokenised, label-masked train/validation sets (`datasets` folders).

Order: read and convert rows (bad rows stop or are skipped) -> exact dedup -> validation split
-> max_samples -> render and tokenise -> overlong rows truncated, dropped or refused -> mixing
weights -> packing. Every row read is either kept or counted as skipped with its reason.
"""

from __future__ import annotations

import functools
import gc
import json
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa
from datasets import Dataset
from datasets.table import InMemoryTable

from llmtune import model_sources, models
from llmtune.console import console
from llmtune.data import special_text
from llmtune.data.chat import IGNORE, Example
from llmtune.data.formats import to_sample
from llmtune.data.packing import pack
from llmtune.data.sources import local_files, read_source
from llmtune.data.split import dedup, split_rows, weighted
from llmtune.data.stats import split_stats
from llmtune.data.templates import resolve_template
from llmtune.errors import InputError
from llmtune.manifest import Outcome, finish_stage, is_up_to_date, read_manifest, stage_dir, start_stage
from llmtune.recipe import DataSection, Recipe, section_sha256

BATCH = 8192  # rows per tokenizer call: larger batches keep every core busy
# Rows that would train nothing are skipped, each under its own reason, never kept all masked.
NOTHING_TO_TRAIN = "no trained tokens (no assistant turn rendered)"
CUT_AWAY = "trained tokens all beyond max_seq_len"
ANSWERS_CUT_WARNING = 0.01  # share of kept rows with a truncated answer that prepare warns about


def _cyclic_gc_paused(function):
    """Prepare builds millions of small objects (token id and label lists, rows) and no reference
    cycles: CPython's cyclic collector would only traverse them again and again, 10-20% of the
    stage on GSM8K (scripts/bench_prepare.py). Reference counting still frees all of it."""

    @functools.wraps(function)
    def paused(*args, **kwargs):
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return function(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()

    return paused


@_cyclic_gc_paused
def prepare(recipe: Recipe, run: Path, force: bool = False) -> Outcome:
    out_dir = stage_dir(run, "prepare")
    ref, inputs, recipe_sha = _identity(recipe)
    data = recipe.data
    if not force and is_up_to_date(out_dir, "prepare", recipe_sha, inputs):
        return Outcome(read_manifest(out_dir), up_to_date=True)

    partial = start_stage(out_dir)
    tokenizer = models.load_tokenizer(ref)
    conversational = any(s.format in ("chat", "sharegpt", "alpaca")
                         for s in [*data.train, *(data.validation.sources or [])])
    template = resolve_template(data.template, tokenizer) if conversational else None
    if template:  # the template trained with travels on to the adapter and merged model
        (partial / "chat_template.jinja").write_text(template, encoding="utf-8")
    skipped: Counter = Counter()
    controls = special_text.control_tokens(tokenizer)
    seen = Counter()  # rows and occurrences of control-token text in content

    train_rows = [r for i, s in enumerate(data.train) for r in _read(s, i, data, skipped, controls, seen)]
    val_rows = [r for s in data.validation.sources or [] for r in _read(s, -1, data, skipped, controls, seen)]
    rows_read = len(train_rows) + len(val_rows) + sum(skipped.values())
    sources = len(data.train) + len(data.validation.sources or [])
    console.print(f"prepare: {rows_read} rows read from {sources} source(s)")
    if data.dedup:
        everything, duplicates = dedup(train_rows + val_rows, key=lambda r: _sample_key(r[2]))
        skipped["duplicate"] += duplicates
        val_ids = {id(r) for r in val_rows}
        train_rows = [r for r in everything if id(r) not in val_ids]
        val_rows = [r for r in everything if id(r) in val_ids]
    if data.validation.sources is None:
        train_rows, val_rows = split_rows(train_rows, data.validation.effective_fraction, data.seed)
    else:
        train_rows, _ = split_rows(train_rows, 0.0, data.seed)
    if data.max_samples is not None and len(train_rows) > data.max_samples:
        skipped["beyond max_samples"] += len(train_rows) - data.max_samples
        train_rows = train_rows[: data.max_samples]

    encoder = functools.partial(_encode_batch, tokenizer, template, data.train_on, data.special_text)
    train = _limit(train_rows, _tokenize(encoder, train_rows, data.num_proc), data, skipped)
    validation = _limit(val_rows, _tokenize(encoder, val_rows, data.num_proc), data, skipped)
    if not train:
        raise InputError("no training example is left after preparation", hint=_skip_hint(skipped, data))
    rows_kept = len(train) + len(validation)
    train = [row for i, s in enumerate(data.train) for row in
             weighted([t for t in train if t[0][1] == i], s.weight, data.seed + i)]
    train = split_rows(train, 0.0, data.seed)[0]

    examples = [example for _, example in train]
    packed = pack(examples, data.max_seq_len, data.seed, [row[0] for row, _ in train]) if data.packing else None
    _save_examples(train, packed, partial / "train", with_samples=False)
    _save_examples(validation, None, partial / "validation", with_samples=True)

    stats = {
        "rows_read": rows_read,
        "rows_kept": rows_kept,
        "rows_skipped": sum(skipped.values()),
        "skipped_by_reason": {reason: n for reason, n in skipped.most_common() if n},
        "max_seq_len": data.max_seq_len,
        "overlong": data.overlong,
        "special_text": {"handled_as": data.special_text, "rows": seen["rows"],
                         "occurrences": seen["occurrences"]},
        "train": split_stats(examples),
        "validation": split_stats([e for _, e in validation]),
    }
    if packed is not None:
        tokens = sum(len(row["input_ids"]) for row in packed)
        stats["packing"] = {"sequences": len(packed),
                            "efficiency": round(tokens / (len(packed) * data.max_seq_len), 4)}
    (partial / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print_stats(stats)
    summary = {
        "rows_read": rows_read,
        "rows_kept": rows_kept,
        "rows_skipped": stats["rows_skipped"],
        "train_examples": len(train),
        "validation_examples": len(validation),
        "train_tokens": stats["train"]["tokens"],
        "trained_share": stats["train"]["trained_share"],
        "truncated": stats["train"]["truncated"] + stats["validation"]["truncated"],
        "answers_cut": stats["train"]["answers_cut"] + stats["validation"]["answers_cut"],
        # chat, generate, eval and the preview tokenise prompts the same way
        "special_text": data.special_text,
    }
    if packed is not None:
        summary["packing_efficiency"] = stats["packing"]["efficiency"]
    common = _common_system_prompt([row for row, _ in train])
    if common:  # an exported chat model (Ollama's SYSTEM) should start where training did
        summary["chat"] = {"common_system_prompt": common}
    manifest = finish_stage(
        partial, out_dir, stage="prepare", recipe_sha256=recipe_sha, inputs=inputs, summary=summary
    )
    return Outcome(manifest, up_to_date=False)


def print_stats(stats: dict) -> None:
    train, val = stats["train"], stats["validation"]
    console.print(
        f"prepare: read {stats['rows_read']} = kept {stats['rows_kept']} + skipped {stats['rows_skipped']}"
        + "".join(f"\n  skipped, {reason}: {n}" for reason, n in stats["skipped_by_reason"].items())
    )
    console.print(
        f"  train {train['examples']} examples, {train['tokens']:,} tokens, "
        f"{100 * train['trained_share']:.1f}% trained; length p50/p95/max "
        f"{train['length_p50']}/{train['length_p95']}/{train['length_max']}; "
        f"truncated {train['truncated'] + val['truncated']}; validation {val['examples']} examples"
    )
    cut = train["answers_cut"] + val["answers_cut"]
    if cut and cut / max(stats["rows_kept"], 1) > ANSWERS_CUT_WARNING:
        console.print(
            f"[yellow]prepare: warning: {cut} of {stats['rows_kept']} kept rows "
            f"({100 * cut / stats['rows_kept']:.1f}%) had their answer cut by data.max_seq_len "
            f"{stats['max_seq_len']}: the model learns to stop mid-answer. Raise data.max_seq_len, "
            "or set data.overlong: drop[/yellow]")
    if "packing" in stats:
        packing = stats["packing"]
        console.print(f"  packed into {packing['sequences']} sequences, "
                      f"{100 * packing['efficiency']:.1f}% of max_seq_len filled")


# --- steps -----------------------------------------------------------------------------------

Row = tuple  # (where it was read, index of its data.train source or -1, sample)


def _sample_key(sample: dict) -> tuple:
    """What makes two samples duplicates: every field, and each message's role and content
    (a tuple hashes 2x faster than the sorted JSON text it stands for)."""
    return tuple((key, tuple((m["role"], m["content"]) for m in value) if key == "messages" else value)
                 for key, value in sorted(sample.items()))


def _common_system_prompt(rows: list[Row]) -> str | None:
    """The system message every training conversation starts with, when they all share one."""
    prompts = set()
    for _, _, sample in rows:
        messages = sample.get("messages") or [{}]
        prompts.add(messages[0].get("content") if messages[0].get("role") == "system" else None)
    return prompts.pop() if len(prompts) == 1 else None


def _read(source, index: int, data: DataSection, skipped: Counter, controls: tuple[str, ...],
          seen: Counter) -> list[Row]:
    rows = []
    for record in read_source(source):
        sample, reason = (None, record.error) if record.error else to_sample(
            record.data, source.format, source.fields, data.system_prompt, source.separator)
        if reason is None:
            rows.append((record.where, index, sample))
            continue
        if data.bad_rows == "error":
            raise InputError(f"{record.where}: {reason}",
                             hint="fix or remove that row, or set data.bad_rows: skip")
        skipped[reason.split(":")[0]] += 1
    holding = special_text.found_in_samples([sample for _, _, sample in rows], controls)
    for row_index, hits in sorted(holding.items()):
        if data.special_text == "error":
            raise InputError(
                f"{rows[row_index][0]}: the content holds the text of a control token, {hits[0]}",
                hint="data.special_text: plain tokenises such text as ordinary text (the default), "
                "keep lets it become the control token; or fix that row")
        seen["rows"] += 1
        seen["occurrences"] += len(hits)
    return rows


def _tokenize(encoder, rows: list[Row], workers: int) -> list[Example]:
    """Render and tokenise in batches; in worker processes when the data is large."""
    if workers <= 1:
        examples = []
        for start in range(0, len(rows), BATCH):
            examples += encoder([sample for _, _, sample in rows[start:start + BATCH]])
        return examples
    # Worker processes exchange Arrow tables: samples travel as JSON strings.
    columns = Dataset.from_dict({"sample": [json.dumps(sample) for _, _, sample in rows]}).map(
        functools.partial(_encode_json_batch, encoder), batched=True, batch_size=BATCH,
        num_proc=workers, remove_columns=["sample"],
    ).to_dict()
    return [Example(ids, labels) for ids, labels in zip(columns["input_ids"], columns["labels"])]


def _encode_batch(tokenizer, template, train_on, mode: str, samples: list[dict]) -> list[Example]:
    return special_text.encode_samples(tokenizer, samples, template, train_on, mode)


def _encode_json_batch(encoder, batch: dict) -> dict[str, list]:
    examples = encoder([json.loads(s) for s in batch["sample"]])
    return {"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]}


def _limit(rows: list[Row], examples: list[Example], data: DataSection, skipped: Counter):
    """Apply data.overlong; drop examples left with nothing to train. Returns (row, example)."""
    kept, overlong = [], []
    for row, example in zip(rows, examples):
        if example.labels.count(IGNORE) == len(example.labels):
            # e.g. a conversation without an assistant turn, or a template that renders none
            skipped[NOTHING_TO_TRAIN] += 1
            continue
        if len(example.input_ids) > data.max_seq_len:
            if data.overlong == "error":
                overlong.append((row[0], len(example.input_ids)))
                continue
            if data.overlong == "drop":
                skipped["overlong"] += 1
                continue
            cut = any(label != IGNORE for label in example.labels[data.max_seq_len:])
            example = Example(example.input_ids[: data.max_seq_len],
                              example.labels[: data.max_seq_len], truncated=True, answer_cut=cut)
        if example.labels.count(IGNORE) == len(example.labels):
            skipped[CUT_AWAY] += 1
            continue
        kept.append((row, example))
    if overlong:
        overlong.sort(key=lambda item: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", item[0])])
        listed = "; ".join(f"{where}: overlong: {n} tokens > data.max_seq_len {data.max_seq_len}"
                           for where, n in overlong[:3])
        more = f" (and {len(overlong) - 3} more)" if len(overlong) > 3 else ""
        raise InputError(f"{len(overlong)} overlong row(s): {listed}{more}",
                         hint="raise data.max_seq_len, or set data.overlong: truncate or drop")
    return kept


def _save_examples(pairs, packed: list[dict] | None, path: Path, with_samples: bool) -> None:
    """Write a split as a `datasets` folder. With `with_samples`, each row also keeps its sample
    as JSON, so later stages can show and score it (the validation split)."""
    if packed is not None:
        columns = {key: [row[key] for row in packed] for key in ("input_ids", "labels", "position_ids", "where")}
    else:
        columns = {"input_ids": [e.input_ids for _, e in pairs], "labels": [e.labels for _, e in pairs],
                   "where": [row[0] for row, _ in pairs]}  # training names a bad batch's rows
        if with_samples:
            columns["sample"] = [json.dumps(row[2], ensure_ascii=False) for row, _ in pairs]
    # Arrow arrays with a declared type: 3x faster than letting `datasets` infer it from lists.
    ids = pa.list_(pa.int32())
    table = pa.table({k: pa.array(v, type=pa.string() if k in ("sample", "where") else ids)
                      for k, v in columns.items()})
    # An empty split (validation fraction 0) needs one explicit shard: datasets writes none and
    # then cannot load the folder back.
    Dataset(InMemoryTable(table)).save_to_disk(str(path), num_shards=1 if not table.num_rows else None)


def up_to_date(recipe: Recipe, run: Path) -> dict | None:
    """The manifest of `<run>/prepared` when it is up to date for this recipe, else None."""
    _, inputs, recipe_sha = _identity(recipe)
    out_dir = stage_dir(run, "prepare")
    return read_manifest(out_dir) if is_up_to_date(out_dir, "prepare", recipe_sha, inputs) else None


def _identity(recipe: Recipe):
    """(model, inputs, recipe hash) that decide whether prepared data is up to date. Only the
    tokenizer matters here: a hub model's weights are not fetched, a local model's not hashed."""
    ref = model_sources.resolve_section(recipe.model, weights=False)
    inputs = {"tokenizer": model_sources.tokenizer_fingerprint(ref), "data_files": _content_hashes(recipe.data)}
    return ref, inputs, section_sha256(recipe, "data")


def _content_hashes(data: DataSection) -> dict[str, str]:
    """What the prepared data depends on besides the recipe: every source file's content
    (a folder's files one by one), hub dataset ids, and a template file's content."""
    hashes = {}
    for source in [*data.train, *(data.validation.sources or [])]:
        if source.hub:
            hashes[f"hub:{source.hub}/{source.subset or ''}/{source.split}"] = "not hashed"
            continue
        for file in local_files(source):
            hashes[str(file)] = model_sources.file_sha256(file)
    if Path(data.template).is_file():
        hashes[data.template] = model_sources.file_sha256(Path(data.template))
    return hashes


def _skip_hint(skipped: Counter, data: DataSection) -> str:
    if not skipped:
        return "check data.train"
    reasons = ", ".join(f"{reason} ({n})" for reason, n in skipped.most_common())
    hint = f"every row was skipped: {reasons}"
    if skipped[NOTHING_TO_TRAIN] or skipped[CUT_AWAY]:
        template = "the tokenizer's own" if data.template == "auto" else repr(data.template)
        hint += (f". With data.template {template} and data.train_on {data.train_on}, look at what is "
                 "trained with: llmtune data preview RECIPE (trained tokens are highlighted)")
    return hint
