"""prepare streams: the same prepared sets whatever the batch size, packing a bucket at a time,
a validation row always drawn, hub datasets streamed, progress lines, worker processes."""

from __future__ import annotations

import importlib
import json
from types import SimpleNamespace

import pytest
from datasets import Dataset, load_from_disk

from helpers import chat_rows, llmtune, write_jsonl, write_recipe
from llmtune.data.chat import IGNORE
from llmtune.errors import InputError
from llmtune.recipe import load_recipe
from llmtune.stages.prepare import prepare
from llmtune.stages.prepare import split as prepared_split

prepare_module = importlib.import_module("llmtune.stages.prepare")  # the name is also the function's


def _mixed_data(folder):
    """Two weighted sources with duplicates, a bad row and answers of every length."""
    rows = chat_rows(60)
    for n, row in enumerate(rows):
        row["messages"][1]["content"] += " and more" * (n % 9)
    lines = [json.dumps(r) for r in rows[:40] + rows[:5]] + ['{"messages": [broken']
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "data" / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    write_jsonl(folder / "data" / "more.jsonl", rows[40:] + rows[10:12])
    return {"train": [{"path": "data/mixed.jsonl"}, {"path": "data/more.jsonl", "weight": 1.5}],
            "validation": {"fraction": 0.2}, "bad_rows": "skip", "max_seq_len": 256}


def _prepared(run):
    sets = {name: load_from_disk(str(run / "prepared" / name)).to_dict() for name in ("train", "validation")}
    stats = json.loads((run / "prepared" / "stats.json").read_text())
    summary = json.loads((run / "prepared" / "manifest.json").read_text())["summary"]
    return sets, stats, summary


@pytest.mark.parametrize("packing", [False, True])
def test_streamed_in_tiny_batches_equals_one_batch(tiny_model, tmp_path, monkeypatch, packing):
    recipe_file = write_recipe(tmp_path, tiny_model, data={**_mixed_data(tmp_path), "packing": packing})
    recipe = load_recipe(recipe_file)
    results = []
    for batch in (3, 100_000):
        monkeypatch.setattr(prepare_module, "BATCH", batch)
        monkeypatch.setattr(prepared_split, "FLUSH_ROWS", batch)
        run = tmp_path / f"batch-{batch}"
        prepare(recipe, run)
        results.append(_prepared(run))
    (sets, stats, summary), (one_sets, one_stats, one_summary) = results
    assert sets == one_sets and stats == one_stats and summary == one_summary
    assert stats["rows_read"] == 46 + 22 == stats["rows_kept"] + stats["rows_skipped"]
    assert stats["skipped_by_reason"] == {"duplicate": 7, "malformed JSON": 1}
    assert 0 < len(sets["validation"]["input_ids"]) < 60
    if packing:
        assert "position_ids" in sets["train"] and stats["packing"]["buckets"] == 1
        assert stats["packing"]["sequences"] == len(sets["train"]["input_ids"]) < stats["train"]["examples"]


def test_packing_bucket_by_bucket_keeps_every_token_and_nearly_the_fill(tiny_model, tmp_path, monkeypatch):
    recipe = load_recipe(write_recipe(tmp_path, tiny_model, rows=120,
                                      data={"packing": True, "max_seq_len": 512, "validation": {"fraction": 0.0}}))
    prepare(recipe, tmp_path / "whole")
    monkeypatch.setattr(prepared_split, "PACK_BUCKET_TOKENS", 1500)  # about 22 examples a bucket
    prepare(recipe, tmp_path / "buckets")
    (whole, whole_stats, _), (buckets, stats, _) = _prepared(tmp_path / "whole"), _prepared(tmp_path / "buckets")
    assert whole_stats["packing"]["buckets"] == 1 and stats["packing"]["buckets"] == 6

    def trained(rows):
        return sorted(t for ids, labels in zip(rows["input_ids"], rows["labels"])
                      for t, label in zip(ids, labels) if label != IGNORE)

    assert trained(buckets["train"]) == trained(whole["train"])
    assert all(len(ids) <= 512 for ids in buckets["train"]["input_ids"])
    # each bucket's last bin is part-filled: at most one more sequence per bucket
    assert stats["packing"]["sequences"] <= whole_stats["packing"]["sequences"] + 6


def test_a_validation_fraction_always_gets_a_row_when_two_are_kept(tiny_model, tmp_path):
    recipe_file = write_recipe(tmp_path, tiny_model, rows=3, data={"validation": {"fraction": 0.001}})
    _, stats, summary = prepare_and_read(recipe_file, tmp_path / "three")
    assert (summary["train_examples"], summary["validation_examples"]) == (2, 1)
    recipe_file = write_recipe(tmp_path, tiny_model, rows=1, data={"validation": {"fraction": 0.5}})
    _, _, summary = prepare_and_read(recipe_file, tmp_path / "one")
    assert (summary["train_examples"], summary["validation_examples"]) == (1, 0)
    recipe_file = write_recipe(tmp_path, tiny_model, rows=1, data={"validation": {"fraction": 0.99}})
    with pytest.raises(InputError, match="all 1 rows kept were drawn for validation"):
        prepare(load_recipe(recipe_file), tmp_path / "greedy")


def prepare_and_read(recipe_file, run):
    prepare(load_recipe(recipe_file), run)
    return _prepared(run)


def test_the_split_writer_writes_what_save_to_disk_writes(tmp_path):
    rows = [{"input_ids": [1, 2, 3], "labels": [IGNORE, 2, 3], "where": "a.jsonl:1"},
            {"input_ids": [4], "labels": [4], "where": "a.jsonl:2"}]
    writer = prepared_split.SplitWriter(tmp_path / "ours", ("input_ids", "labels", "where"))
    for row in rows:
        writer.add(row)
    assert writer.close() == 2
    reference = Dataset.from_list(rows, features=writer.features)
    reference.save_to_disk(str(tmp_path / "theirs"))
    ours, theirs = load_from_disk(str(tmp_path / "ours")), load_from_disk(str(tmp_path / "theirs"))
    assert ours.features == theirs.features and ours.to_list() == theirs.to_list() == rows
    for name in ("state.json", "dataset_info.json"):
        mine, library = (json.loads((tmp_path / side / name).read_text()) for side in ("ours", "theirs"))
        mine.pop("_fingerprint", None), library.pop("_fingerprint", None)
        assert mine == library
    empty = prepared_split.SplitWriter(tmp_path / "empty", ("input_ids", "labels", "where", "sample"))
    assert empty.close() == 0 and len(load_from_disk(str(tmp_path / "empty"))) == 0


def test_hub_datasets_are_streamed_and_read_from_the_cache_offline(monkeypatch):
    import datasets

    from llmtune.data.sources import read_source

    calls = []
    rows = [{"messages": f"row {n}"} for n in range(3)]

    def online(name, subset, split, streaming=False):
        calls.append(streaming)
        return iter(rows)

    monkeypatch.setattr(datasets, "load_dataset", online)
    source = SimpleNamespace(hub="acme/chats", subset=None, split="train")
    records = list(read_source(source))
    assert calls == [True] and [r.data for r in records] == rows
    assert [r.where for r in records] == ["acme/chats:row 1", "acme/chats:row 2", "acme/chats:row 3"]

    def offline(name, subset, split, streaming=False):
        calls.append(streaming)
        if streaming:
            raise ConnectionError("offline")
        return rows

    calls.clear()
    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert [r.data for r in read_source(source)] == rows and calls == [True, False]


def test_a_long_prepare_prints_progress_with_an_eta(tiny_model, tmp_path, monkeypatch, capsys):
    recipe = load_recipe(write_recipe(tmp_path, tiny_model, rows=30))
    monkeypatch.setattr(prepare_module, "BATCH", 10)
    monkeypatch.setattr(prepare_module, "PROGRESS_SECONDS", 0.0)
    prepare(recipe, tmp_path / "run")
    lines = [line for line in capsys.readouterr().out.splitlines() if "rows/s" in line]
    assert len(lines) == 3 and "prepare: 30 rows read" in lines[-1]
    assert "tokens/s" in lines[-1] and "100% of" in lines[-1] and "ETA 0m00s" in lines[-1]


@pytest.mark.slow
def test_worker_processes_prepare_what_one_process_prepares(tiny_model, tmp_path):
    recipe_file = write_recipe(tmp_path, tiny_model, data=_mixed_data(tmp_path))
    prepare(load_recipe(recipe_file), tmp_path / "one")
    # through the CLI, as a user runs it: spawned workers must not run the command again
    result = llmtune("prepare", recipe_file, "--set", "data.num_proc=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("prepare: done") == 1
    assert _prepared(tmp_path / "one")[:2] == _prepared(tmp_path / "runs" / "tiny")[:2]
