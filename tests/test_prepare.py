"""prepare: formats, sources, templates, bad rows, overlong, dedup, weights, packing, caching."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from datasets import load_from_disk

from helpers import AWKWARD, CONVERSATION, chat_rows, llmtune, write_jsonl, write_recipe
from llmtune.data.chat import IGNORE, Example, encode_sample, trained_segments
from llmtune.data.formats import to_sample
from llmtune.data.packing import pack
from llmtune.data.templates import BUILT_IN
from llmtune.data.turns import render, render_sample
from llmtune.errors import InputError
from llmtune.recipe import load_recipe
from llmtune.stages.prepare import prepare

# What ends an assistant turn in each built-in template (the tiny tokenizer's EOS is <|im_end|>)
TURN_END = {"chatml": "<|im_end|>", "chatml-tools": "<|im_end|>", "llama-3": "<|eot_id|>", "llama-3.1": "<|eot_id|>",
            "mistral": "<|im_end|>", "alpaca": "<|im_end|>"}


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_every_built_in_template_trains_exactly_the_assistant_turns(tokenizer, name):
    example = encode_sample(tokenizer, {"messages": CONVERSATION}, template=BUILT_IN[name])
    decoded = [tokenizer.decode(s).strip() for s in trained_segments(example)]
    assert decoded == [f"Hello! Ünïcode ✓{TURN_END[name]}", f"Sure.{TURN_END[name]}"]
    last_only = encode_sample(tokenizer, {"messages": CONVERSATION}, BUILT_IN[name], "last_assistant")
    assert [tokenizer.decode(s).strip() for s in trained_segments(last_only)] == [f"Sure.{TURN_END[name]}"]


@pytest.mark.parametrize("name", [*sorted(BUILT_IN), "tokenizer's own"])
def test_a_batch_renders_as_each_sample_alone(tokenizer, name, monkeypatch):
    """prepare renders a batch's conversations in one Jinja call (render_samples); the texts and
    spans equal render_sample's, and a text holding the batch separator falls back to single calls."""
    from llmtune.data import turns
    from llmtune.data.turns import SEPARATOR, render_samples

    template = BUILT_IN.get(name)
    samples = [*AWKWARD, {"messages": CONVERSATION}, *[{"messages": [
        {"role": "user", "content": f"question {n}"}, {"role": "assistant", "content": f"answer {n}"}]}
        for n in range(5)]]
    for train_on in ("assistant", "last_assistant", "all"):
        assert render_samples(samples, tokenizer, template, train_on) == [
            render_sample(s, tokenizer, template, train_on) for s in samples]
    single_calls = []
    monkeypatch.setattr(turns, "render", lambda *a, **k: single_calls.append(1) or render(*a, **k))
    render_samples(samples, tokenizer, template)
    assert len(single_calls) == 2  # only the checks of the first and last rendering
    odd = [*samples, {"messages": [{"role": "user", "content": f"a{SEPARATOR}b"},
                                   {"role": "assistant", "content": "c"}]}]
    assert render_samples(odd, tokenizer, template) == [render_sample(s, tokenizer, template) for s in odd]


ROWS = {
    "chat": ({"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]}, {}),
    "sharegpt": ({"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]}, {}),
    "alpaca": ({"instruction": "Q?", "input": "", "output": "A."}, {}),
    "completion": ({"question": "Q?", "answer": "A."}, {"prompt": "question", "completion": "answer"}),
}


@pytest.mark.parametrize("fmt", sorted(ROWS))
def test_every_format_trains_the_answer_and_its_eos(tokenizer, fmt):
    row, fields = ROWS[fmt]
    sample, problem = to_sample(row, fmt, fields, separator="\n")
    assert problem is None
    example = encode_sample(tokenizer, sample)
    assert [tokenizer.decode(s) for s in trained_segments(example)] == ["A.<|im_end|>"]
    prompt = tokenizer.decode([i for i, label in zip(example.input_ids, example.labels) if label == IGNORE])
    assert "Q?" in prompt


def test_text_format_trains_everything_and_all_trains_the_prompt(tokenizer):
    sample, _ = to_sample({"body": "Some prose."}, "text", {"text": "body"})
    example = encode_sample(tokenizer, sample)
    assert IGNORE not in example.labels and tokenizer.decode(example.input_ids) == "Some prose.<|im_end|>"
    everything = encode_sample(tokenizer, {"messages": CONVERSATION}, train_on="all")
    assert IGNORE not in everything.labels


def test_system_prompt_is_added_when_missing(tokenizer):
    sample, _ = to_sample(ROWS["chat"][0], "chat", {}, system_prompt="You are terse.")
    [(text, _)] = render_sample(sample, tokenizer)
    assert text.startswith("<|im_start|>system\nYou are terse.<|im_end|>")


def test_packing_keeps_every_example_and_restarts_positions():
    examples = [Example(list(range(n)), list(range(n))) for n in (5, 3, 7, 2, 6, 1)]
    rows = pack(examples, max_len=8, seed=0)
    assert all(len(r["input_ids"]) <= 8 for r in rows)
    assert sum(len(r["input_ids"]) for r in rows) == 24 and len(rows) == 3  # 24 tokens, 3 full bins
    for row in rows:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert all(row["labels"][i] == IGNORE for i in starts)  # no label across examples


def test_packed_batch_loss_equals_unpacked_per_example(tiny_model, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from llmtune.stages.collate import PadCollator

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    model.config.use_cache = False  # as the train stage sets it: with a cache, packing leaks
    samples = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w * k}]}
               for w, k in (("ab", 3), ("cde", 1), ("f", 9), ("ghij", 2))]
    examples = [encode_sample(tokenizer, s) for s in samples]

    def per_token_losses(batch):
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        shifted = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), shifted, ignore_index=IGNORE, reduction="none")
        return sorted(losses[shifted != IGNORE].tolist())

    collate = PadCollator(tokenizer.pad_token_id)
    unpacked = per_token_losses(collate([{"input_ids": e.input_ids, "labels": e.labels} for e in examples]))
    masked = per_token_losses(PadCollator(tokenizer.pad_token_id, attention_mask=True)(
        [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]))
    packed_rows = pack(examples, max_len=80, seed=0)
    assert len(packed_rows) < len(examples)
    packed = per_token_losses(collate(packed_rows))
    assert len(packed) == len(unpacked)
    assert max(abs(a - b) for a, b in zip(packed, unpacked)) < 1e-4
    assert max(abs(a - b) for a, b in zip(masked, unpacked)) < 1e-5  # no mask = mask, right-padded


def _prepare(folder: Path, model, **sections):
    recipe = load_recipe(write_recipe(folder, model, **sections))
    outcome = prepare(recipe, folder / "runs" / "tiny")
    return outcome, json.loads((folder / "runs" / "tiny" / "prepared" / "stats.json").read_text())


def test_sources_of_every_file_type_mix_with_weights(tiny_model, tmp_path):
    rows = chat_rows(12)
    write_jsonl(tmp_path / "d" / "a.jsonl", rows[:4])
    (tmp_path / "d" / "b.json").write_text(json.dumps(rows[4:8]))
    with open(tmp_path / "d" / "c.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["q", "a"])
        writer.writerows([[r["messages"][0]["content"], r["messages"][1]["content"]] for r in rows[8:12]])
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist([{"instruction": f"Spell {w}", "output": " ".join(w)}
                                         for w in ("cat", "dog", "owl")]), tmp_path / "d" / "e.parquet")
    (tmp_path / "d" / "texts").mkdir()
    (tmp_path / "d" / "texts" / "one.txt").write_text("First document.")
    (tmp_path / "d" / "texts" / "two.md").write_text("Second document.")
    outcome, stats = _prepare(tmp_path, tiny_model, data={
        "train": [
            {"path": "d/a.jsonl"},
            {"path": "d/b.json", "weight": 2},
            {"path": "d/c.csv", "format": "completion", "fields": {"prompt": "q", "completion": "a"}},
            {"path": "d/e.parquet", "format": "alpaca", "weight": 0.5},
            {"path": "d/texts", "format": "text"},
        ],
        "validation": {"fraction": 0.0},
    })
    assert stats["rows_read"] == 4 + 4 + 4 + 3 + 2 == stats["rows_kept"]
    # weights: b.json twice (8); e.parquet half: each of its 3 rows drawn with probability 0.5
    where = load_from_disk(str(tmp_path / "runs" / "tiny" / "prepared" / "train"))["where"]
    halved = sum("e.parquet" in w for w in where)
    assert sum("b.json" in w for w in where) == 8 and 0 <= halved <= 3
    assert outcome.manifest["summary"]["train_examples"] == 4 + 8 + 4 + halved + 2


@pytest.mark.slow
def test_bad_rows_stop_with_file_and_line_or_are_counted(tiny_model, tmp_path):
    lines = [json.dumps(r) for r in chat_rows(10)]
    lines[6] = '{"messages": [broken'
    lines[8] = json.dumps({"messages": [{"role": "robot", "content": "x"}]})
    write_recipe(tmp_path, tiny_model)
    (tmp_path / "data" / "train.jsonl").write_text("\n".join(lines) + "\n")
    result = llmtune("prepare", "recipe.yaml", cwd=tmp_path)
    assert result.returncode == 2 and "train.jsonl:7: malformed JSON" in result.stderr
    result = llmtune("prepare", "recipe.yaml", "--set", "data.bad_rows=skip", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    stats = json.loads((tmp_path / "runs" / "tiny" / "prepared" / "stats.json").read_text())
    assert stats["rows_read"] == 10 == stats["rows_kept"] + stats["rows_skipped"]
    assert stats["skipped_by_reason"] == {"malformed JSON": 1, "unknown role": 1}
    assert "skipped, malformed JSON: 1" in result.stdout


def test_overlong_policies(tiny_model, tmp_path):
    long_prompt = {"messages": [{"role": "user", "content": "x" * 200}, {"role": "assistant", "content": "y"}]}
    long_answer = {"messages": [{"role": "user", "content": "Go"}, {"role": "assistant", "content": "z" * 300}]}
    write_recipe(tmp_path, tiny_model)
    write_jsonl(tmp_path / "data" / "train.jsonl", chat_rows(6) + [long_prompt, long_answer])
    recipe_file = tmp_path / "recipe.yaml"
    run = tmp_path / "runs" / "tiny"
    base = ["data.validation.fraction=0", "data.max_seq_len=128"]

    outcome = prepare(load_recipe(recipe_file, base), run)
    stats = json.loads((run / "prepared" / "stats.json").read_text())
    assert outcome.manifest["summary"]["truncated"] == 1 and stats["rows_kept"] == 7
    assert stats["skipped_by_reason"] == {"trained tokens all beyond max_seq_len": 1}
    assert stats["train"]["length_max"] == 128

    prepare(load_recipe(recipe_file, [*base, "data.overlong=drop"]), run)
    stats = json.loads((run / "prepared" / "stats.json").read_text())
    assert stats["skipped_by_reason"] == {"overlong": 2} and stats["rows_kept"] == 6
    assert stats["rows_read"] == 8 == stats["rows_kept"] + stats["rows_skipped"]

    with pytest.raises(InputError, match=r"train.jsonl:7: overlong: \d+ tokens > data.max_seq_len 128"):
        prepare(load_recipe(recipe_file, [*base, "data.overlong=error"]), run)


def test_dedup_and_max_samples_are_counted_and_reading_stops_at_max_samples(tiny_model, tmp_path):
    rows = chat_rows(8)
    recipe_file = write_recipe(tmp_path, tiny_model, data={"max_samples": 5, "validation": {"fraction": 0.0}})
    write_jsonl(tmp_path / "data" / "train.jsonl", rows[:3] + rows[:2] + rows[3:])
    prepare(load_recipe(recipe_file), tmp_path / "runs" / "tiny")
    stats = json.loads((tmp_path / "runs" / "tiny" / "prepared" / "stats.json").read_text())
    # the 5th training row is line 7 (two duplicates before it): the last 3 lines are never read
    assert stats["rows_read"] == 7 and stats["stopped_at_max_samples"] == 5
    assert stats["skipped_by_reason"] == {"duplicate": 2}
    assert stats["rows_kept"] == 5


def test_duplicates_are_the_same_conversation_whatever_the_key_order(tiny_model, tmp_path):
    rows = chat_rows(6)
    reordered = {"messages": [{"content": m["content"], "role": m["role"], "name": "x"}
                              for m in rows[0]["messages"]], "id": 7}
    changed = {"messages": [dict(m) for m in rows[1]["messages"]]}
    changed["messages"][1]["content"] += "!"  # differs in one character: kept
    recipe_file = write_recipe(tmp_path, tiny_model, data={"validation": {"fraction": 0.0}})
    write_jsonl(tmp_path / "data" / "train.jsonl", rows + [reordered, changed])
    prepare(load_recipe(recipe_file), tmp_path / "runs" / "tiny")
    stats = json.loads((tmp_path / "runs" / "tiny" / "prepared" / "stats.json").read_text())
    assert stats["skipped_by_reason"] == {"duplicate": 1} and stats["rows_kept"] == 7


def test_editing_a_data_file_reprepares(tiny_model, tmp_path):
    recipe_file = write_recipe(tmp_path, tiny_model, rows=10)
    run = tmp_path / "runs" / "tiny"
    assert not prepare(load_recipe(recipe_file), run).up_to_date
    assert prepare(load_recipe(recipe_file), run).up_to_date
    with open(tmp_path / "data" / "train.jsonl", "a") as handle:
        handle.write(json.dumps(chat_rows(11)[10]) + "\n")
    assert not prepare(load_recipe(recipe_file), run).up_to_date
    assert not prepare(load_recipe(recipe_file, ["data.template=chatml"]), run).up_to_date


@pytest.mark.slow
def test_packing_in_prepare_and_training(tiny_model, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model, rows=40, data={"packing": True, "max_seq_len": 256},
                          train={"max_steps": 3}, preview={"count": 1})
    result = llmtune("run", recipe, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    train = load_from_disk(str(tmp_path / "runs" / "tiny" / "prepared" / "train"))
    assert "position_ids" in train.column_names and len(train) < 36
    stats = json.loads((tmp_path / "runs" / "tiny" / "prepared" / "stats.json").read_text())
    assert stats["packing"]["efficiency"] > 0.75  # rows of ~68 tokens: 3 fit in 256
    assert "packed into" in result.stdout


def test_data_preview_marks_trained_text(tiny_model, tmp_path):
    write_recipe(tmp_path, tiny_model, rows=10)
    result = llmtune("data", "preview", "recipe.yaml", "-n", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "train row 0" in result.stdout and "train row 1" in result.stdout
    assert result.stdout.count("⟦") == 2
    assert "three times" in result.stdout  # the prompt is shown, unmarked


def test_validation_sources_and_dedup_across_splits(tiny_model, tmp_path):
    rows = chat_rows(10)
    write_jsonl(tmp_path / "val.jsonl", rows[8:10] + chat_rows(12)[10:12])  # two repeat train rows
    recipe_file = write_recipe(tmp_path, tiny_model, rows=10,
                               data={"validation": {"sources": [{"path": "val.jsonl"}]}})
    outcome = prepare(load_recipe(recipe_file), tmp_path / "runs" / "tiny")
    summary = outcome.manifest["summary"]
    assert summary["train_examples"] == 10 and summary["validation_examples"] == 2
    stats = json.loads((tmp_path / "runs" / "tiny" / "prepared" / "stats.json").read_text())
    assert stats["skipped_by_reason"] == {"duplicate": 2} and stats["rows_read"] == 14


def test_an_empty_data_file_is_named(tiny_model, tmp_path):
    """An empty train file said "no training example is left… check data.train" without naming
    it; an empty file among others is named too, and the rest is prepared."""
    recipe_file = write_recipe(tmp_path, tiny_model, rows=8,
                               data={"train": [{"path": "data/empty.jsonl", "format": "chat"}]})
    (tmp_path / "data" / "empty.jsonl").write_text("")
    with pytest.raises(InputError, match=r"no rows to train on: .*empty\.jsonl is empty"):
        prepare(load_recipe(recipe_file), tmp_path / "run")
    recipe_file = write_recipe(tmp_path, tiny_model, rows=8, data={"train": [
        {"path": "data/empty.jsonl", "format": "chat"}, {"path": "data/train.jsonl", "format": "chat"}]})
    summary = prepare(load_recipe(recipe_file), tmp_path / "run2").manifest["summary"]
    assert summary["train_examples"] + summary["validation_examples"] == 8
