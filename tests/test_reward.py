"""train.objective reward: a reward model (TRL's RewardTrainer) on preference pairs, as a row of
the objectives table and one trainer entry. It trains a score head with the adapter, merges into
a model that scores sequences, is evaluated by how it ranks held-out pairs, and is refused where
only a language model makes sense (GGUF, chat, generate)."""

from __future__ import annotations

import json

import pytest

from helpers import llmtune, pairs, write_preference_recipe
from llmtune.errors import RecipeError
from llmtune.recipe import load_recipe
from llmtune.stages.merge import merge
from llmtune.stages.prepare import prepare
from llmtune.stages.train import train


@pytest.fixture(scope="module")
def reward_run(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("reward")
    # what a reward model can learn from the tiny model's random features: an answer that does
    # what was asked scores above a refusal
    rows = [{**pair, "rejected": "No."} for pair in pairs(40)]
    recipe_file = write_preference_recipe(folder, tiny_model, objective="reward", rows=rows,
                                          train={"max_steps": 12, "lr": 1e-2})
    recipe = load_recipe(recipe_file)
    run = folder / "runs" / "tiny"
    prepare(recipe, run)
    summary = train(recipe, run).manifest["summary"]
    merge(recipe, run)
    return folder, recipe_file, run, summary


@pytest.mark.slow
def test_a_reward_model_learns_to_rank_the_chosen_answer_first(reward_run):
    folder, recipe_file, run, summary = reward_run
    assert summary["objective"] == "reward"
    assert summary["eval_loss"] < summary["eval_loss_before"]  # -log sigmoid(chosen - rejected)
    assert summary["eval_reward_accuracy"] >= 0.75
    metrics = [json.loads(line) for line in (run / "adapter" / "metrics.jsonl").read_text().splitlines()]
    assert any("reward_accuracy" in entry and "reward_margin" in entry for entry in metrics)
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "SEQ_CLS" and "score" in adapter_config["modules_to_save"]

    evaluated = llmtune("eval", recipe_file, cwd=folder)
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    models_ = json.loads((run / "eval" / "report.json").read_text())["sets"]["validation"]["models"]
    assert set(models_) == {"base", "adapter", "merged"}
    assert models_["adapter"]["preference_accuracy"] >= 0.75 and models_["adapter"]["margin"] > 0
    assert models_["merged"]["preference_accuracy"] == models_["adapter"]["preference_accuracy"]


def test_the_merged_reward_model_scores_as_base_and_adapter_do(reward_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    _, _, run, _ = reward_run
    merged_summary = json.loads((run / "merged" / "manifest.json").read_text())["summary"]
    assert merged_summary["max_abs_logit_diff"] <= merged_summary["logit_tolerance"]
    merged = AutoModelForSequenceClassification.from_pretrained(run / "merged").eval()
    base_path = json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=1)
    base.config.pad_token_id = merged.config.pad_token_id
    tuned = PeftModel.from_pretrained(base, run / "adapter").eval()
    ids = torch.tensor([[1, 45, 97, 120, 33, 7, 250, 3]])
    with torch.no_grad():
        assert merged(input_ids=ids).logits.shape == (1, 1)
        assert float((merged(input_ids=ids).logits - tuned(input_ids=ids).logits).abs().max()) < 1e-4


@pytest.mark.slow
def test_a_reward_model_is_refused_where_a_language_model_is_needed(reward_run, tiny_model, tmp_path):
    folder, recipe_file, run, _ = reward_run
    with pytest.raises(RecipeError, match="gguf hold a language model, and train.objective reward trains a reward"):
        load_recipe(recipe_file, ["export.formats=[hf, gguf]"])
    chat = llmtune("chat", run, cwd=folder)
    assert chat.returncode == 2 and "a reward model (a score head) scores answers and writes none" in chat.stderr
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "Repeat apple three times."}\n')
    generated = llmtune("generate", run, "--input", tmp_path / "prompts.jsonl", "--output", tmp_path / "out.jsonl",
                        cwd=folder)
    assert generated.returncode == 2 and "Traceback" not in generated.stderr


def test_plan_prices_a_reward_model(reward_run):
    from llmtune.stages.plan import plan

    folder, recipe_file, run, _ = reward_run
    planned = plan(load_recipe(recipe_file), run)
    assert planned["objective"] == "reward" and planned["sequences_per_example"] == "2 trained"
    assert planned["memory_bytes"]["logits"] == 0  # one score per sequence, no vocabulary
