"""eval, generate, chat and plot, through the CLI on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import GSM8K_TEST, llmtune, write_jsonl, write_recipe
from llmtune.metrics import contains, exact_match, extract_answer, regex_match

GSM8K_REGEX = r"#### *(-?[0-9.,]+)"


def test_metrics():
    assert exact_match(" 42 ", "42") and not exact_match("42.", "42")
    assert contains("the answer is 42.", "42")
    assert extract_answer("so 1,200 apples\n#### 1,200", GSM8K_REGEX) == "1200"
    assert extract_answer("no answer here", GSM8K_REGEX) is None
    assert regex_match("... #### 18", "Janet ... #### 18", GSM8K_REGEX)
    assert not regex_match("#### 17", "#### 18", GSM8K_REGEX)
    assert not regex_match("#### 17", "no reference answer", GSM8K_REGEX)


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval-run")
    gsm8k_rows = [json.loads(line) for line in GSM8K_TEST.read_text().splitlines()[:6]]
    write_jsonl(folder / "gsm8k.jsonl", gsm8k_rows)
    recipe = write_recipe(folder, tiny_model, rows=40, train={"epochs": 2}, preview={"count": 0}, eval={
        "sources": [{"path": "gsm8k.jsonl", "format": "completion",
                     "fields": {"prompt": "question", "completion": "answer"}}],
        "answer_regex": GSM8K_REGEX, "max_new_tokens": 12, "max_samples": 6,
    })
    result = llmtune("run", recipe, cwd=folder)
    assert result.returncode == 0, result.stderr
    return folder, recipe


@pytest.mark.slow
def test_eval_compares_base_adapter_and_merged(trained):
    folder, recipe = trained
    result = llmtune("eval", recipe, cwd=folder)
    assert result.returncode == 0, result.stderr
    report = json.loads((folder / "runs" / "tiny" / "eval" / "report.json").read_text())
    validation = report["sets"]["validation"]["models"]
    assert set(validation) == {"base", "adapter", "merged"}
    assert validation["adapter"]["loss"] < validation["base"]["loss"]
    assert validation["merged"]["loss"] == pytest.approx(validation["adapter"]["loss"], abs=1e-4)
    for metric in ("exact_match", "contains", "ended_with_eos", "perplexity"):
        assert metric in validation["base"]
    gsm8k = report["sets"]["0:gsm8k.jsonl"]["models"]
    assert "regex_match" in gsm8k["base"] and "regex_match" in gsm8k["adapter"]
    assert "validation (4 examples)" in result.stdout and "regex_match" in result.stdout
    generations = (folder / "runs" / "tiny" / "eval" / "generations.jsonl").read_text().splitlines()
    gsm8k_rows = report["sets"]["0:gsm8k.jsonl"]["examples"]  # rows whose answer fits max_seq_len
    assert 0 < gsm8k_rows <= 6 and len(generations) == 3 * 4 + 3 * gsm8k_rows
    again = llmtune("eval", recipe, cwd=folder)
    assert "eval: up to date" in again.stdout


def test_training_curves_png(trained):
    folder, _ = trained
    png = folder / "runs" / "tiny" / "training_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    png.unlink()
    result = llmtune("plot", "runs/tiny", cwd=folder)
    assert result.returncode == 0 and png.is_file()


@pytest.mark.slow
def test_generate_writes_one_answer_per_prompt(trained, tmp_path):
    folder, _ = trained
    write_jsonl(tmp_path / "in.jsonl", [
        {"prompt": "Repeat apple three times.", "id": 1},
        {"messages": [{"role": "user", "content": "Repeat river three times."}], "id": 2},
    ])
    result = llmtune("generate", folder / "runs" / "tiny", "--input", tmp_path / "in.jsonl",
                     "--output", tmp_path / "out.jsonl", "--max-new-tokens", "8", cwd=folder)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, 2]
    assert all(isinstance(r["output"], str) and "ended_with_eos" in r for r in rows)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"messages": [{"role": "bot", "content": "x"}]}\n')
    bad = llmtune("generate", folder / "runs" / "tiny", "--input", tmp_path / "bad.jsonl",
                  "--output", tmp_path / "o.jsonl", cwd=folder)
    assert bad.returncode == 2 and "bad.jsonl:2: unknown role" in bad.stderr


@pytest.mark.slow
def test_chat_streams_answers_and_understands_commands(trained):
    folder, _ = trained
    session = "Repeat apple three times.\n/system Be brief.\nAgain?\n/reset\n/exit\n"
    result = subprocess.run([sys.executable, "-m", "llmtune", "chat", "runs/tiny", "--max-new-tokens", "6"],
                            cwd=folder, input=session, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("model> ") == 2
    assert "(system prompt set)" in result.stdout and "(conversation cleared)" in result.stdout
    assert result.stdout.rstrip().endswith("bye")
    # end of input leaves cleanly too
    eof = subprocess.run([sys.executable, "-m", "llmtune", "chat", "runs/tiny"], cwd=folder,
                         input="", capture_output=True, text=True, timeout=300)
    assert eof.returncode == 0 and "bye" in eof.stdout
