"""Chat rows: validation, rendering, label masks, truncation, splits and stats (tiny tokenizer)."""

from __future__ import annotations

import json

import pytest

from conftest import write_jsonl
from llmtune.data.chat import IGNORE, check_messages, read_chat_jsonl, tokenize_chat, trained_segments
from llmtune.data.split import split_rows
from llmtune.data.stats import percentile, split_stats
from llmtune.errors import InputError
from llmtune.testing import build_tiny_tokenizer

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! Ünïcode ✓"},
    {"role": "user", "content": "Again?"},
    {"role": "assistant", "content": "Sure."},
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def test_trained_spans_are_exactly_the_assistant_turns_with_their_eos(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the SmolLM2 trap is present
    example = tokenize_chat(tokenizer, CONVERSATION, max_seq_len=1024)
    decoded = [tokenizer.decode(s) for s in trained_segments(example)]
    assert decoded == ["Hello! Ünïcode ✓<|im_end|>", "Sure.<|im_end|>"]
    # every trained label equals its input id; every EOS that ends an assistant turn is trained
    assert all(l in (IGNORE, i) for i, l in zip(example.input_ids, example.labels))
    eos_positions = [n for n, i in enumerate(example.input_ids) if i == tokenizer.eos_token_id]
    trained_eos = [n for n in eos_positions if example.labels[n] != IGNORE]
    assert len(eos_positions) == 5 and len(trained_eos) == 2


def test_prompt_tokens_are_masked(tokenizer):
    example = tokenize_chat(tokenizer, CONVERSATION, max_seq_len=1024)
    masked = tokenizer.decode([i for i, l in zip(example.input_ids, example.labels) if l == IGNORE])
    assert "Be brief." in masked and "Hi there" in masked and "Again?" in masked
    assert "Hello!" not in masked and "Sure." not in masked


def test_truncation_is_flagged(tokenizer):
    example = tokenize_chat(tokenizer, CONVERSATION, max_seq_len=40)
    assert example.truncated and len(example.input_ids) == 40 == len(example.labels)
    assert not tokenize_chat(tokenizer, CONVERSATION, max_seq_len=1024).truncated


@pytest.mark.parametrize("row, reason", [
    ({"text": "x"}, "missing field 'messages'"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]},
     "empty assistant turn"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "roles out of order"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "y"}]}, "system message may only come first"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]},
     "'content' must be a string"),
])
def test_bad_rows_are_named(row, reason):
    assert reason in check_messages(row)


def test_reader_reports_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CONVERSATION}])
    with open(path, "a") as handle:
        handle.write("\n{not json}\n")
    rows = read_chat_jsonl(path)
    assert next(rows)[0] == 1
    with pytest.raises(InputError, match=r"d.jsonl:3: not valid JSON"):
        next(rows)


def test_split_is_seeded_and_holds_out_the_fraction():
    rows = list(range(100))
    train, validation = split_rows(rows, 0.1, seed=3)
    assert len(validation) == 10 and sorted(train + validation) == rows
    assert split_rows(rows, 0.1, seed=3) == (train, validation)
    assert split_rows(rows, 0.1, seed=4) != (train, validation)
    assert split_rows([1, 2, 3], 0.01, seed=0)[1] != []  # at least one held out when asked
    assert split_rows([1], 0.5, seed=0) == ([1], [])


def test_stats(tokenizer):
    examples = [tokenize_chat(tokenizer, CONVERSATION, 1024), tokenize_chat(tokenizer, CONVERSATION, 40)]
    stats = split_stats(examples)
    assert stats["examples"] == 2 and stats["truncated"] == 1 and stats["length_max"] > 40
    assert 0 < stats["trained_share"] < 1
    assert json.dumps(stats)
    assert percentile([5, 1, 3], 50) == 3 and percentile([1, 2, 3, 4], 95) == 4
