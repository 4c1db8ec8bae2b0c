"""Chat rows: validation, rendering, label masks, truncation, splits and stats (tiny tokenizer)."""

from __future__ import annotations

import json

import pytest

from helpers import AWKWARD, CONVERSATION, encode_both_ways
from llmtune.data.chat import IGNORE, Example, encode_sample, trained_segments
from llmtune.data.formats import to_sample
from llmtune.data.split import copies, digest, sample_json, unit
from llmtune.data.stats import SplitStats, percentile


def test_trained_spans_are_exactly_the_assistant_turns_with_their_eos(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the SmolLM2 trap is present
    example = encode_sample(tokenizer, {"messages": CONVERSATION})
    decoded = [tokenizer.decode(s) for s in trained_segments(example)]
    assert decoded == ["Hello! Ünïcode ✓<|im_end|>", "Sure.<|im_end|>"]
    # every trained label equals its input id; every EOS that ends an assistant turn is trained
    assert all(label in (IGNORE, i) for i, label in zip(example.input_ids, example.labels))
    eos_positions = [n for n, i in enumerate(example.input_ids) if i == tokenizer.eos_token_id]
    trained_eos = [n for n in eos_positions if example.labels[n] != IGNORE]
    assert len(eos_positions) == 5 and len(trained_eos) == 2


def test_prompt_tokens_are_masked(tokenizer):
    example = encode_sample(tokenizer, {"messages": CONVERSATION})
    masked = tokenizer.decode([i for i, label in zip(example.input_ids, example.labels) if label == IGNORE])
    assert "Be brief." in masked and "Hi there" in masked and "Again?" in masked
    assert "Hello!" not in masked and "Sure." not in masked


@pytest.mark.parametrize("row, kind, detail", [
    ({"text": "x"}, "missing field", "'messages'"),
    ({"messages": []}, "malformed conversation", "non-empty list"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "unknown role", "'bot'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]},
     "empty assistant turn", "message 1"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn", ""),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "roles out of order", "alternate"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                   {"role": "assistant", "content": "y"}]}, "roles out of order", "alternate"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "y"}]}, "roles out of order", "system message"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]},
     "not a string", "message 0"),
])
def test_bad_rows_are_named_by_kind(row, kind, detail):
    sample, reason = to_sample(row, "chat", {})
    assert sample is None
    assert reason.split(":")[0] == kind and detail in reason


def test_row_draws_are_seeded_uniform_and_weights_repeat_rows_on_average():
    digests = [digest(sample_json({"text": f"row {n}"})) for n in range(20_000)]
    assert len(set(digests)) == len(digests) and all(len(d) == 16 for d in digests)
    draws = [unit(d, 3, b"validation") for d in digests]
    assert draws == [unit(d, 3, b"validation") for d in digests]  # the same in every run
    assert draws != [unit(d, 4, b"validation") for d in digests]  # another seed, another split
    assert draws != [unit(d, 3, b"weight") for d in digests]  # split and weights drawn apart
    assert all(0 <= x < 1 for x in draws)
    held_out = sum(x < 0.1 for x in draws)
    assert 1800 < held_out < 2200  # 10% +- 7 standard deviations of a binomial(20000, 0.1)
    for weight, mean in ((2, 2.0), (0.5, 0.5), (1.25, 1.25)):
        taken = sum(copies(weight, x) for x in draws) / len(draws)
        assert abs(taken - mean) < 0.02
    assert {copies(2, x) for x in draws} == {2}


def test_stats(tokenizer):
    full = encode_sample(tokenizer, {"messages": CONVERSATION})
    examples = [full, Example(full.input_ids[:40], full.labels[:40], truncated=True)]
    counted = SplitStats()
    for example in examples:
        counted.add(example)
    stats = counted.result()
    assert stats["examples"] == 2 and stats["truncated"] == 1 and stats["length_max"] > 40
    assert 0 < stats["trained_share"] < 1
    assert json.dumps(stats)
    assert percentile([5, 1, 3], 50) == 3 and percentile([1, 2, 3, 4], 95) == 4


def test_byte_level_masks_equal_the_tokenizers_offsets(tokenizer, monkeypatch):
    from llmtune.data.chat import _token_byte_lengths

    assert _token_byte_lengths(tokenizer.backend_tokenizer) is not None  # the fast path runs
    fast, with_offsets = encode_both_ways(tokenizer, AWKWARD, monkeypatch)
    assert fast == with_offsets
    assert [tokenizer.decode(s) for s in trained_segments(fast[1])] == ["naïve café — 東京 🚀<|im_end|>"]


def test_a_sample_whose_tokens_do_not_add_up_falls_back_to_offsets(monkeypatch):
    from tokenizers import AddedToken

    from llmtune.data import chat, turns
    from llmtune.testing import build_tiny_tokenizer

    # An added token that swallows the spaces before it: its tokens cover fewer bytes than the text.
    tokenizer = build_tiny_tokenizer()
    tokenizer.backend_tokenizer.add_tokens([AddedToken("<sep>", lstrip=True)])
    samples = [{"prompt": "left   <sep> right", "completion": " done"}, {"prompt": "plain", "completion": " ok"}]
    rendered = [piece for s in samples for piece in turns.render_sample(s, tokenizer)]
    ids = [e.ids for e in tokenizer.backend_tokenizer.encode_batch_fast([t for t, _ in rendered], add_special_tokens=False)]
    ranges = chat._byte_level_ranges(chat._token_byte_lengths(tokenizer.backend_tokenizer), ids, rendered)
    assert ranges[0] is None and ranges[1] is not None
    fast, with_offsets = encode_both_ways(tokenizer, samples, monkeypatch)
    assert fast == with_offsets
    assert tokenizer.decode(trained_segments(fast[0])[0]) == " done<|im_end|>"


def test_tokenizers_with_a_normalizer_use_offsets(tokenizer):
    from tokenizers import normalizers

    from llmtune.data.chat import _token_byte_lengths
    from llmtune.testing import build_tiny_tokenizer

    normalized = build_tiny_tokenizer()
    normalized.backend_tokenizer.normalizer = normalizers.NFKC()
    assert _token_byte_lengths(normalized.backend_tokenizer) is None
    example = encode_sample(normalized, {"prompt": "ﬁx: ", "completion": "ﬁne"})
    assert normalized.decode(trained_segments(example)[0]) == "fine<|im_end|>"
