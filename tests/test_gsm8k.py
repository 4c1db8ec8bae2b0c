"""GSM8K (the slice in tests/data/gsm8k) mapped as prompt/completion, with the SmolLM2 tokenizer."""

from __future__ import annotations

import json

import pytest
import yaml

from helpers import GSM8K_TRAIN as GSM8K
from helpers import llmtune

pytestmark = pytest.mark.slow


def test_gsm8k_prepare_counts_packing_and_preview(tmp_path):
    recipe = {
        "name": "gsm8k",
        "data": {
            "train": [{"path": str(GSM8K), "format": "completion",
                       "fields": {"prompt": "question", "completion": "answer"}}],
            "max_seq_len": 1024,
            "packing": True,
        },
    }
    (tmp_path / "gsm8k.yaml").write_text(yaml.safe_dump(recipe))
    result = llmtune("prepare", "gsm8k.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    stats = json.loads((tmp_path / "runs" / "gsm8k" / "prepared" / "stats.json").read_text())
    rows = sum(1 for line in GSM8K.read_text().splitlines() if line.strip())
    assert stats["rows_read"] == rows == stats["rows_kept"] + stats["rows_skipped"]
    assert stats["train"]["trained_share"] > 0.3
    # padding even when every packed row is padded to max_seq_len: under 5% of tokens
    assert 1 - stats["packing"]["efficiency"] < 0.05

    preview = llmtune("data", "preview", "gsm8k.yaml", "-n", "1", cwd=tmp_path)
    assert preview.returncode == 0, preview.stderr
    assert "prepare: up to date" in preview.stdout
    marked = preview.stdout.split("⟦")[1].split("⟧")[0]
    assert "####" in marked and marked.endswith("<|im_end|>")  # the answer, through its EOS
