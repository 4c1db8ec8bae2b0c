"""Reading data sources into records, each with where it came from (`file:line` or `file:row N`).

A record that cannot be parsed is still yielded, with an error, so `data.bad_rows: skip` can
count it and `error` can stop on it: nothing is dropped without a word. Files are read row by
row (JSON lines, CSV) or batch by batch (Parquet), so memory does not grow with the file; a
`.json` array is parsed whole (JSON lines suit large data). Each record carries about how many
bytes of its file it took, for prepare's progress and ETA.
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
    size: float = 0.0  # about how many bytes of its file this record took (for progress)


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


def source_bytes(sources) -> int | None:
    """The bytes the sources' files hold, for an ETA; None when a hub source has no known size."""
    if any(source.hub for source in sources):
        return None
    return sum(file.stat().st_size for source in sources for file in local_files(source))


def local_files(source) -> list[Path]:
    """The file a local source names, or every file of its folder, in a stable order."""
    path = Path(source.path)
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def read_file(path: Path, fmt: str) -> Iterator[Record]:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        if fmt != "text":
            raise InputError(f"{path}: plain text files need format: text (this source says {fmt})")
        yield Record(str(path), {"text": path.read_text(encoding="utf-8")}, size=path.stat().st_size)
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
    with open(path, "rb") as handle:  # bytes: json reads UTF-8 itself, and a line's size is exact
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                yield Record(where, _as_row(json.loads(line)), size=len(line))
            except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
                detail = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
                yield Record(where, None, f"malformed JSON: {detail}", size=len(line))


def _read_json(path: Path) -> Iterator[Record]:
    text = path.read_text(encoding="utf-8")
    if not text.lstrip().startswith("["):  # a .json file holding JSON lines
        yield from _read_jsonl(path)
        return
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{exc.lineno}: malformed JSON: {exc.msg}") from None
    share = path.stat().st_size / max(len(rows), 1)
    for index, row in enumerate(rows, start=1):
        where = f"{path}:item {index}"
        if isinstance(row, dict):
            yield Record(where, row, size=share)
        else:
            yield Record(where, None, "malformed JSON: not a JSON object", size=share)


def _read_csv(path: Path) -> Iterator[Record]:
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        for row in reader:  # a text file's position cannot be asked while it is iterated: characters
            size = sum(len(value) + 1 for value in row.values() if isinstance(value, str))
            yield Record(f"{path}:{reader.line_num}", dict(row), size=size)


def _read_parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    share = path.stat().st_size / max(parquet.metadata.num_rows, 1)
    index = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            index += 1
            yield Record(f"{path}:row {index}", row, size=share)


def _read_hub(dataset_id: str, subset: str | None, split: str) -> Iterator[Record]:
    """A hub dataset's rows, streamed where the dataset and the network allow it (rows come as
    they download; nothing is held whole), else from `datasets`' cache (offline)."""
    import datasets

    try:
        rows = iter(datasets.load_dataset(dataset_id, subset, split=split, streaming=True))
        first = next(rows, None)
        streamed = True
    except Exception:  # offline, no streaming for this dataset: the regular load, its cache
        streamed = False
    if not streamed:
        try:
            rows = iter(datasets.load_dataset(dataset_id, subset, split=split))
        except Exception as exc:  # offline, not found, auth: the hub raises many types
            raise InputError(
                f"data: could not load hub dataset {dataset_id!r} (split {split!r}): {type(exc).__name__}: {exc}",
                hint="check the id; offline, it must already be in the datasets cache (HF_DATASETS_OFFLINE=1)",
            ) from None
        first = next(rows, None)
    if first is None:
        return
    yield Record(f"{dataset_id}:row 1", dict(first))
    for index, row in enumerate(rows, start=2):
        yield Record(f"{dataset_id}:row {index}", dict(row))


def _as_row(value) -> dict:
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value
