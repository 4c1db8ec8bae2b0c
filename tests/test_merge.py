"""Merging shard by shard gives exactly what peft's merge_and_unload gives, for the LoRA family,
with bounded shards; what it cannot map is refused so the stage can merge in memory."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from llmtune.stages.merge import shards as shard_merge
from llmtune.testing import build_tiny_model


def _adapter(base, folder, **config):
    model = AutoModelForCausalLM.from_pretrained(base)
    # init_lora_weights=False: B is random, so every merged weight really changes.
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **config))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.5)  # a trained full copy differs from the base
    peft_model.save_pretrained(folder)
    return peft_model.merge_and_unload().state_dict()


def _written(folder):
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


@pytest.mark.parametrize("config", [
    {"target_modules": "all-linear"},
    {"target_modules": "all-linear", "use_dora": True},
    {"target_modules": ["q_proj", "v_proj", "embed_tokens"], "use_rslora": True},
    {"target_modules": r".*\.mlp\..*_proj", "modules_to_save": ["lm_head"]},
], ids=["lora", "dora", "rslora+embedding", "regex+modules_to_save"])
def test_shard_merge_equals_merge_and_unload(tmp_path, config):
    base = build_tiny_model(tmp_path / "base", tie_word_embeddings=False)
    expected = _adapter(base, tmp_path / "adapter", **config)
    out = tmp_path / "merged"
    out.mkdir()
    summary = shard_merge.merge_into_shards(base, tmp_path / "adapter", out, torch.float32, "40KB")
    assert summary["shards"] > 3  # the 40 KB bound really splits the model
    index = json.loads((out / shard_merge.INDEX).read_text())
    merged = _written(out)
    assert set(index["weight_map"]) == set(merged) == set(expected)
    for name, tensor in expected.items():
        assert torch.allclose(merged[name], tensor, atol=1e-6), name


def test_a_replaced_tied_weight_is_left_to_the_in_memory_merge(tmp_path):
    base = build_tiny_model(tmp_path / "base")  # ties lm_head to the embeddings
    _adapter(base, tmp_path / "adapter", target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(shard_merge.Unsupported, match="lm_head"):
        shard_merge.merge_into_shards(base, tmp_path / "adapter", tmp_path, torch.float32, "2GB")


def test_sizes_parse_as_the_hub_writes_them():
    assert shard_merge.parse_size("2GB") == 2 * 10**9
    assert shard_merge.parse_size("500MiB") == 500 * 2**20
    shards = shard_merge.plan_shards(["a", "b", "c"], {"a": (10,), "b": (10,), "c": (30,)},
                                     torch.float32, 80)
    assert shards == [["a", "b"], ["c"]]


def test_the_stage_merges_in_memory_what_shards_cannot_hold_and_checks_it_the_same_way(tiny_model, tmp_path):
    """A trained copy of the tied output head (modules_to_save) has no tensor of its own in the
    base checkpoint: the stage writes peft's merge from memory, checked like a shard merge."""
    from helpers import write_recipe
    from llmtune.recipe import load_recipe
    from llmtune.stages.merge import merge
    from llmtune.stages.prepare import prepare
    from llmtune.stages.train import train

    recipe = load_recipe(write_recipe(tmp_path, tiny_model, rows=16, train={"max_steps": 2},
                                      adapter={"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}))
    run = tmp_path / "runs" / "tiny"
    prepare(recipe, run)
    train(recipe, run)
    summary = merge(recipe, run).manifest["summary"]
    assert summary["method"] == "in memory" and summary["dtype"] == "float32"
    assert summary["tensors_equal_to_peft_merge"] >= 20
    assert summary["max_abs_logit_diff"] <= summary["logit_tolerance"]
    assert summary["vs_unmerged"]["max_abs_logit_diff"] <= summary["logit_tolerance"]
