"""A model shaped like Llama 3.x Instruct, through every command a user runs on it: no pad token
(the preview, eval, generate and chat once died asking for one), BOS from both the template and
the tokenizer, several end-of-turn ids, weights stored in bf16 (so merge.dtype auto is bf16, and
the merge check must still catch a wrong merge in 16 bits)."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys

import pytest
from safetensors import safe_open

from helpers import llmtune, stage_manifest, write_jsonl, write_recipe
from llmtune.errors import VerificationError
from llmtune.recipe import load_recipe
from llmtune.testing import build_llama3_model


@pytest.fixture(scope="module")
def llama3_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama3")
    base = build_llama3_model(folder / "base")
    recipe = write_recipe(folder, base, rows=40,
                          # the defaults a user gets: bf16 where the CPU has it natively
                          train={"epochs": 2, "lr": 5e-3, "precision": "auto"},
                          preview={"count": 2, "show": 1, "max_new_tokens": 8})
    result = llmtune("run", recipe, cwd=folder)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "held-out exact match" in result.stdout
    return folder, recipe, base


@pytest.mark.slow
def test_run_keeps_one_bos_the_vocabulary_and_every_end_of_turn_id(llama3_run):
    from datasets import load_from_disk

    from llmtune import models

    folder, _, base = llama3_run
    run = folder / "runs" / "tiny"
    tokenizer = models.load_tokenizer(base)
    bos = tokenizer.bos_token_id
    for row in load_from_disk(str(run / "prepared" / "train")):
        assert row["input_ids"][0] == bos and bos not in row["input_ids"][1:]  # once, not twice
    merged = models.load_tokenizer(run / "merged")
    assert len(merged) == len(tokenizer) and merged.pad_token == "<|finetune_right_pad_id|>"
    config = json.loads((run / "merged" / "config.json").read_text())
    assert config["vocab_size"] == json.loads((base / "config.json").read_text())["vocab_size"]
    generation = json.loads((run / "merged" / "generation_config.json").read_text())
    ends = {tokenizer.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")}
    assert ends <= set(generation["eos_token_id"])


def test_merge_auto_writes_the_bases_bf16_and_checks_it_exactly(llama3_run):
    folder, _, base = llama3_run
    run = folder / "runs" / "tiny"
    summary = stage_manifest(run, "merged")["summary"]
    assert summary["dtype"] == "bfloat16" and summary["max_abs_logit_diff"] == 0.0
    assert summary["tensors_equal_to_peft_merge"] == 21
    with safe_open(str(run / "merged" / "model.safetensors"), "pt") as reader:
        assert {reader.get_slice(k).get_dtype() for k in reader.keys()} == {"BF16"}
    written = (run / "merged" / "model.safetensors").stat().st_size
    assert written <= 1.01 * (base / "model.safetensors").stat().st_size  # the size of its base
    assert summary["vs_unmerged"]["top1_agreement"] > 0.9


def test_a_bf16_merge_missing_one_modules_delta_fails_its_check(llama3_run, monkeypatch, tmp_path):
    """A lightly trained adapter's delta moves bf16 logits by about one rounding step: only the
    weight comparison with peft's own merge tells this merge from a correct one."""
    folder, recipe_file, _ = llama3_run
    run = shutil.copytree(folder / "runs" / "tiny", tmp_path / "run")  # the shared run stays as is
    shard_merge = importlib.import_module("llmtune.stages.merge.shards")
    merge_stage = importlib.import_module("llmtune.stages.merge")
    real = shard_merge._merge_shard

    def drop_one_delta(tensors, parts, config, dtype):
        before = {name: tensor.clone() for name, tensor in tensors.items()}
        merged = real(tensors, parts, config, dtype)
        name = "model.layers.1.self_attn.q_proj.weight"
        if name in tensors:
            tensors[name] = before[name]
        return merged

    monkeypatch.setattr(shard_merge, "_merge_shard", drop_one_delta)
    with pytest.raises(VerificationError, match="1 of 21 written tensors differ .*self_attn.q_proj"):
        merge_stage.merge(load_recipe(recipe_file), run, force=True)
    monkeypatch.setattr(shard_merge, "_merge_shard", real)
    assert merge_stage.merge(load_recipe(recipe_file), run, force=True).manifest["summary"]["max_abs_logit_diff"] == 0


@pytest.mark.slow
def test_eval_generate_and_chat_need_no_pad_token_of_their_own(llama3_run, tmp_path):
    folder, recipe, _ = llama3_run
    evaluated = llmtune("eval", recipe, cwd=folder)
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    report = json.loads((folder / "runs" / "tiny" / "eval" / "report.json").read_text())
    models_ = report["sets"]["validation"]["models"]
    assert set(models_) == {"base", "adapter", "merged"}
    assert models_["merged"]["loss"] == pytest.approx(models_["adapter"]["loss"], abs=0.02)  # bf16 merge
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Repeat apple three times."},
                                        {"messages": [{"role": "user", "content": "Repeat river."}]},
                                        {"prompt": "A longer prompt, padded on the left of the shorter ones."}])
    generated = llmtune("generate", folder / "runs" / "tiny", "--input", tmp_path / "in.jsonl",
                        "--output", tmp_path / "out.jsonl", "--max-new-tokens", "6", cwd=folder)
    assert generated.returncode == 0, generated.stdout + generated.stderr
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 3
    chat = subprocess.run([sys.executable, "-m", "llmtune", "chat", "runs/tiny", "--max-new-tokens", "4"],
                          cwd=folder, input="Repeat stone three times.\n/exit\n", capture_output=True,
                          text=True, timeout=300)
    assert chat.returncode == 0, chat.stdout + chat.stderr
    assert chat.stdout.count("model> ") == 1 and chat.stdout.rstrip().endswith("bye")
