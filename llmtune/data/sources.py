"""Reading data sources into records, each with where it came from (`file:line` or `file:row N`).

A record that cannot be parsed is still yielded, with an error, so `data.bad_rows: skip` can
count it and `error` can stop on it: nothing is dropped without a word.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llmtune.errors import InputError

TEXT_SUFFIXES = (".txt", ".md", ".text")
TABLE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class Record:
    where: str  # file:line, file:row N or hub-id:row N
    data: dict | None  # the parsed row; None when it could not be parsed
    error: str | None = None


def read_source(source) -> Iterator[Record]:
    """Every record of one recipe data source (a `recipe.DataSource`)."""
    if source.hub:
        yield from _read_hub(source.hub, source.subset, source.split)
        return
    path = Path(source.path)
    files = local_files(source)
    if path.is_dir():
        wanted = TEXT_SUFFIXES if source.format == "text" else TABLE_SUFFIXES
        files = [f for f in files if f.suffix.lower() in wanted]
        if not files:
            raise InputError(f"{path}: no {'/'.join(wanted)} files in this folder")
    for file in files:
        yield from read_file(file, source.format)


def local_files(source) -> list[Path]:
    """The file a local source names, or every file of its folder, in a stable order."""
    path = Path(source.path)
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def read_file(path: Path, fmt: str) -> Iterator[Record]:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        if fmt != "text":
            raise InputError(f"{path}: plain text files need format: text (this source says {fmt})")
        yield Record(str(path), {"text": path.read_text(encoding="utf-8")})
    elif suffix in (".jsonl", ".ndjson"):
        yield from _read_jsonl(path)
    elif suffix == ".json":
        yield from _read_json(path)
    elif suffix == ".csv":
        yield from _read_csv(path)
    elif suffix == ".parquet":
        yield from _read_parquet(path)
    else:
        raise InputError(
            f"{path}: unsupported file type {suffix or '(none)'}",
            hint="use .jsonl, .json, .csv, .parquet, or .txt/.md with format: text",
        )


def _read_jsonl(path: Path) -> Iterator[Record]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                yield Record(where, _as_row(json.loads(line)))
            except (json.JSONDecodeError, ValueError) as exc:
                detail = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
                reason = f"malformed JSON: {detail}"
                yield Record(where, None, reason)


def _read_json(path: Path) -> Iterator[Record]:
    text = path.read_text(encoding="utf-8")
    if not text.lstrip().startswith("["):  # a .json file holding JSON lines
        yield from _read_jsonl(path)
        return
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{exc.lineno}: malformed JSON: {exc.msg}") from None
    for index, row in enumerate(rows, start=1):
        where = f"{path}:item {index}"
        if isinstance(row, dict):
            yield Record(where, row)
        else:
            yield Record(where, None, "malformed JSON: not a JSON object")


def _read_csv(path: Path) -> Iterator[Record]:
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            yield Record(f"{path}:{reader.line_num}", dict(row))


def _read_parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    for index, row in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield Record(f"{path}:row {index}", row)


def _read_hub(dataset_id: str, subset: str | None, split: str) -> Iterator[Record]:
    import datasets

    try:
        rows = datasets.load_dataset(dataset_id, subset, split=split)
    except Exception as exc:  # offline, not found, auth: the hub raises many types
        raise InputError(
            f"data: could not load hub dataset {dataset_id!r} (split {split!r}): {type(exc).__name__}: {exc}",
            hint="check the id; offline, it must already be in the datasets cache (HF_DATASETS_OFFLINE=1)",
        ) from None
    for index, row in enumerate(rows, start=1):
        yield Record(f"{dataset_id}:row {index}", dict(row))


def _as_row(value) -> dict:
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value
