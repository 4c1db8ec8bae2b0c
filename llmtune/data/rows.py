"""The rows prepare trains on, read one at a time: read, convert, dedup, split, weigh.

Every decision about a row is taken from the row alone (data/split.py), in the order the rows are
read, so nothing here holds the dataset: only the digests of the rows seen (for dedup, 16 bytes
each) and the counts. Every row read is taken or counted as skipped with its reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from llmtune.data import special_text
from llmtune.data.formats import to_sample
from llmtune.data.sources import read_source
from llmtune.data.split import copies, digest, sample_json, unit
from llmtune.errors import InputError
from llmtune.recipe import DataSection


class Row(NamedTuple):
    where: str  # file:line
    source: int  # index of its data.train source, -1 for a validation source
    sample: dict
    text: str  # the sample as JSON
    held_out: bool  # for validation
    draw: float  # its validation draw, in [0, 1): held out when below the fraction
    copies: int  # times a train row is used (its source's mixing weight)


def resolved_images(images: list[dict], where: str) -> list[dict]:
    """An image sample's relative image paths made absolute, from the folder of the file that
    lists them (`where` is its file:line)."""
    folder = Path(where.rsplit(":", 1)[0]).resolve().parent
    return [{"path": str(folder / ref["path"])} if "path" in ref and not Path(ref["path"]).is_absolute() else ref
            for ref in images]


class RowStream:
    """The rows of the recipe's data sources, train sources first, with the counts of what was
    read and why rows were skipped."""

    def __init__(self, data: DataSection, controls: tuple[str, ...]):
        self.data, self.controls = data, controls
        self.read = 0
        self.bytes_read = 0.0
        self.skipped: Counter = Counter()
        self.train_rows = 0
        self.stopped_at_max_samples = False
        self.special = Counter()  # rows taken, and occurrences, holding control-token text
        self.digests: set[bytes] = set()
        self.empty_sources: list[str] = []  # sources that gave no row at all (an empty file)

    def batches(self, size: int) -> Iterator[list[Row]]:
        batch = []
        for row in self.rows():
            batch.append(row)
            if len(batch) == size:
                yield self._checked(batch)
                batch = []
        if batch:
            yield self._checked(batch)

    def rows(self) -> Iterator[Row]:
        data = self.data
        fraction = data.validation.effective_fraction if data.validation.sources is None else 0.0
        for index, source in enumerate(data.train):
            for row in self._source_rows(source, index, fraction):
                if not row.held_out:
                    self.train_rows += 1
                yield row
                if self.train_rows == data.max_samples:
                    self.stopped_at_max_samples = True
                    break
            if self.stopped_at_max_samples:
                break
        for source in data.validation.sources or []:
            yield from self._source_rows(source, -1, 0.0)

    def _source_rows(self, source, index: int, fraction: float) -> Iterator[Row]:
        read_before = self.read
        yield from self._records(source, index, fraction)
        if self.read == read_before:
            self.empty_sources.append(str(source.path or source.hub))

    def _records(self, source, index: int, fraction: float) -> Iterator[Row]:
        data = self.data
        for record in read_source(source):
            self.read += 1
            self.bytes_read += record.size
            sample, reason = (None, record.error) if record.error else to_sample(
                record.data, source.format, source.fields, data.system_prompt, source.separator)
            if reason is not None:
                if data.bad_rows == "error":
                    raise InputError(f"{record.where}: {reason}",
                                     hint="fix or remove that row, or set data.bad_rows: skip")
                self.skipped[reason.split(":")[0]] += 1
                continue
            if data.special_text == "error":  # row by row: the first such row read is the one named
                self._refuse_control_text(record.where, sample)
            text = sample_json(sample)
            row_digest = digest(text)
            if data.dedup:
                if row_digest in self.digests:
                    self.skipped["duplicate"] += 1
                    continue
                self.digests.add(row_digest)
            if "images" in sample and not source.hub:
                # relative to the data file that lists them; after the digest, so that where the
                # data lives changes neither the split nor what counts as a duplicate
                sample["images"] = resolved_images(sample["images"], record.where)
                text = sample_json(sample)
            draw = unit(row_digest, data.seed, b"validation") if fraction > 0 else 1.0
            held_out = index < 0 or draw < fraction
            times = 1 if held_out else copies(source.weight, unit(row_digest, data.seed + index, b"weight"))
            yield Row(record.where, index, sample, text, held_out, draw, times)

    def _refuse_control_text(self, where: str, sample: dict) -> None:
        hits = special_text.found(special_text.contents(sample), self.controls)
        if hits:
            raise InputError(
                f"{where}: the content holds the text of a control token, {hits[0]}",
                hint="data.special_text: plain tokenises such text as ordinary text (the default), "
                "keep lets it become the control token; or fix that row")

    def _checked(self, batch: list[Row]) -> list[Row]:
        """Count the rows holding control-token text (one search over the whole batch)."""
        for hits in special_text.found_in_samples([row.sample for row in batch], self.controls).values():
            self.special["rows"] += 1
            self.special["occurrences"] += len(hits)
        return batch
