"""Writing the prepared splits as their rows come, so prepare's memory does not grow with the data.

The result is a `datasets` folder as `Dataset.save_to_disk` writes it (one Arrow shard written by
`datasets`' own ArrowWriter, then state.json and dataset_info.json), which `load_from_disk` reads
memory-mapped. Building a whole Dataset first and saving it would hold every row in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
from datasets import Features, List, Value
from datasets.arrow_writer import ArrowWriter
from datasets.fingerprint import generate_random_fingerprint
from datasets.info import DatasetInfo
from datasets.utils.py_utils import asdict  # save_to_disk's, which leaves out what is unset

from llmtune.data.chat import Example
from llmtune.data.packing import pack
from llmtune.data.pairs import Pair, PromptRow
from llmtune.data.rows import Row
from llmtune.data.stats import SplitStats
from llmtune.recipe import DataSection

SHARD = "data-00000-of-00001.arrow"
FLUSH_ROWS = 2048  # rows gathered before they go to the Arrow file
# Packing packs the train examples a bucket at a time: their Python lists cost about 60 bytes a
# token, so a bucket of 4M tokens holds ~250 MB. Best-fit decreasing fills the bins of a bucket
# of thousands of examples as well as of all of them (docs/benchmarks.md, "Data at scale").
PACK_BUCKET_TOKENS = 4_000_000
TYPES = {"input_ids": List(Value("int32")), "labels": List(Value("int32")),
         "position_ids": List(Value("int32")), "where": Value("string"), "sample": Value("string"),
         "prompt_ids": List(Value("int32")), "chosen_ids": List(Value("int32")),
         "rejected_ids": List(Value("int32")), "completion_ids": List(Value("int32")), "label": Value("bool"),
         "prompt": Value("string"), "answer": Value("string"), "extra": Value("string"),
         "text": Value("string"), "images": List(Value("string")), "image_hashes": List(Value("string"))}
# The columns of a split by the kind of data prepared (pairs.py for the last two).
COLUMNS = {"sft": ("input_ids", "labels"), "preference": ("prompt_ids", "chosen_ids", "rejected_ids"),
           "kto": ("prompt_ids", "completion_ids", "label"), "prompt": ("prompt_ids", "prompt", "answer", "extra")}
# an image chat's row besides (vision-language bases): the rendered text and its images by
# reference, which the collator expands again and checks against the stored ids
IMAGE_COLUMNS = ("text", "images", "image_hashes")


def image_columns(example: Example) -> dict:
    return {"text": example.text, "images": [path for path, _ in example.images],
            "image_hashes": [digest for _, digest in example.images]}


class SplitWriter:
    """Rows of the named columns, appended to one `datasets` folder."""

    def __init__(self, path: Path, columns: tuple[str, ...]):
        path.mkdir(parents=True)
        self.path, self.columns = path, columns
        self.features = Features({name: TYPES[name] for name in columns})
        self.writer = ArrowWriter(features=self.features, path=str(path / SHARD))
        self.pending: dict[str, list] = {name: [] for name in columns}
        self.rows = 0

    def add(self, row: dict) -> None:
        for name in self.columns:
            self.pending[name].append(row[name])
        self.rows += 1
        if len(self.pending["where"]) >= FLUSH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self.pending["where"]:
            # Arrow arrays of a declared type: 3x faster than letting `datasets` infer it from lists.
            schema = self.features.arrow_schema
            self.writer.write_table(pa.table({name: pa.array(values, type=schema.field(name).type)
                                              for name, values in self.pending.items()}))
            self.pending = {name: [] for name in self.columns}

    def close(self) -> int:
        """Finish the folder; the number of rows written."""
        self._flush()
        self.writer.finalize()  # an empty split still gets its shard: load_from_disk needs one
        state = {"_data_files": [{"filename": SHARD}], "_fingerprint": generate_random_fingerprint(),
                 "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
                 "_output_all_columns": False, "_split": None}
        (self.path / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        info = asdict(DatasetInfo(features=self.features))
        (self.path / "dataset_info.json").write_text(json.dumps({k: info[k] for k in sorted(info)}, indent=2))
        return self.rows


class PairWriter:
    """The train split of preference, kto or prompt data: rows as they come (never packed)."""

    def __init__(self, path: Path, kind: str):
        self.out = SplitWriter(path, (*COLUMNS[kind], "where"))

    def add(self, where: str, pair: Pair | PromptRow) -> None:
        self.out.add({**pair.columns(), "where": where})

    def close(self) -> None:
        self.out.close()


class TrainWriter:
    """The train split: examples as they come, or packed a bucket of PACK_BUCKET_TOKENS at a time."""

    def __init__(self, path: Path, packing: bool, max_len: int, seed: int, images: bool = False):
        columns = ("input_ids", "labels", "position_ids", "where") if packing else ("input_ids", "labels", "where")
        self.images = images
        self.out = SplitWriter(path, columns + IMAGE_COLUMNS if images else columns)
        self.packing, self.max_len, self.seed = packing, max_len, seed
        self.bucket: list[Example] = []
        self.bucket_where: list[str] = []
        self.bucket_tokens = 0
        self.buckets = 0
        self.packed_tokens = 0

    def add(self, where: str, example: Example) -> None:
        if not self.packing:
            self.out.add({"input_ids": example.input_ids, "labels": example.labels, "where": where,
                          **(image_columns(example) if self.images else {})})
            return
        self.bucket.append(example)
        self.bucket_where.append(where)
        self.bucket_tokens += len(example.input_ids)
        if self.bucket_tokens >= PACK_BUCKET_TOKENS:
            self._pack_bucket()

    def _pack_bucket(self) -> None:
        if self.bucket:
            for row in pack(self.bucket, self.max_len, self.seed + self.buckets, self.bucket_where):
                self.out.add(row)
            self.packed_tokens += self.bucket_tokens
            self.buckets += 1
        self.bucket, self.bucket_where, self.bucket_tokens = [], [], 0

    def close(self) -> dict | None:
        """Finish the split; for packing, its sequences and the share of their room filled."""
        self._pack_bucket()
        rows = self.out.close()
        if not self.packing:
            return None
        return {"sequences": rows, "efficiency": round(self.packed_tokens / max(rows * self.max_len, 1), 4),
                "buckets": self.buckets}


class Outputs:
    """Where kept examples go: validation, or train (as many times as its copies), with the
    counts of each. While no row has been held out for validation, the train row with the lowest
    validation draw is held back, so that a validation fraction always gets a row when two are
    kept (a few hundred rows at fraction 0.001 might otherwise draw none)."""

    def __init__(self, partial: Path, data: DataSection, kind: str = "sft", images: bool = False):
        self.train = (TrainWriter(partial / "train", data.packing, data.max_seq_len, data.seed, images)
                      if kind == "sft" else PairWriter(partial / "train", kind))
        # validation rows keep their sample as JSON, so later stages can show and score them
        self.images = images
        self.validation = SplitWriter(partial / "validation", (*COLUMNS[kind], "where", "sample",
                                                                *(IMAGE_COLUMNS if images else ())))
        self.train_stats, self.validation_stats = SplitStats(), SplitStats()
        self.holding = data.validation.sources is None and data.validation.effective_fraction > 0
        self.held: list[tuple] = []  # the held row's examples, as (row, example, first)
        self.kept = 0
        self.tokens = 0
        self.system_prompts: set = set()  # of the train conversations, while there is one at most

    def add(self, row: Row, example: Example | Pair | PromptRow, first: bool = True) -> None:
        """A kept example of `row`; `first` is false for a row's further examples (one per
        rendering, turns.assistant_spans), which count as examples but not as rows."""
        self.kept += first
        self.tokens += len(example.input_ids) if isinstance(example, Example) else example.tokens
        if row.held_out:
            self._to_validation(row, example, first)
            if self.holding:
                self._release()
        elif not self.holding:
            self._to_train(row, example, first)
        elif self.held and row is self.held[0][0]:  # another example of the held row
            self.held.append((row, example, first))
        elif not self.held or row.draw < self.held[0][0].draw:
            self._release()
            self.held = [(row, example, first)]
        else:
            self._to_train(row, example, first)

    def _release(self) -> None:
        for held in self.held:
            self._to_train(*held)
        self.held = []
        self.holding = self.holding and not self.validation.rows

    def close(self) -> dict | None:
        """Finish both splits; packing's figures, if the train split is packed."""
        to_validation = bool(self.train_stats.lengths)  # another train row is there: hold this one out
        for held in self.held:
            (self._to_validation if to_validation else self._to_train)(*held)
        self.validation.close()
        return self.train.close()

    def _to_validation(self, row: Row, example: Example | Pair | PromptRow, first: bool = True) -> None:
        columns = (example.columns() if isinstance(example, (Pair, PromptRow))
                   else {"input_ids": example.input_ids, "labels": example.labels,
                         **(image_columns(example) if self.images else {})})
        # a row's sample once, with its first example: eval and preview generate once per row
        self.validation.add({**columns, "where": row.where, "sample": row.text if first else ""})
        self.validation_stats.add(example)
        if first:
            self.validation_stats.add_sample(row.sample)

    def _to_train(self, row: Row, example: Example, first: bool = True) -> None:
        for _ in range(row.copies):
            self.train.add(row.where, example)
        self.train_stats.add(example, row.copies)
        if first:
            self.train_stats.add_sample(row.sample, row.copies)
        if row.copies and len(self.system_prompts) < 2:
            prompt = row.sample.get("prompt")  # preference and kto prompts are messages too
            messages = row.sample.get("messages") or (prompt if isinstance(prompt, list) else [{}])
            self.system_prompts.add(messages[0].get("content") if messages[0].get("role") == "system" else None)
