"""GRPO (train.objective grpo) on TRL's GRPOTrainer: the prompt format, the reward functions and
their bad outputs, training with its metrics, resume after SIGKILL, and eval's rewards."""

from __future__ import annotations

import json
import re
import signal

import pytest
import yaml

from helpers import adapter_weights, llmtune, max_difference, start_training_until, write_jsonl
from llmtune import rewards
from llmtune.errors import InputError
from llmtune.recipe import Reward, load_recipe
from llmtune.serve.preview import preview
from llmtune.stages.prepare import prepare
from llmtune.stages.train import train


def prompts(count: int, answers: bool = True) -> list[dict]:
    rows = []
    for i in range(count):
        a, b = i % 7 + 1, i % 5 + 2
        row = {"prompt": f"What is {a} + {b}? (#{i})", "id": i}
        if answers:
            row["answer"] = a + b
        rows.append(row)
    return rows


def write_grpo_recipe(folder, base, rows=None, rewards_=None, **train):
    write_jsonl(folder / "data" / "train.jsonl", rows if rows is not None else prompts(24))
    recipe = {
        "name": "tiny",
        "model": {"path": str(base)},
        "data": {"train": [{"path": "data/train.jsonl", "format": "prompt"}], "validation": {"fraction": 0.1},
                 "max_seq_len": 128},
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"objective": "grpo", "batch_size": 4, "max_steps": 3, "lr": 1e-3, "seed": 0, "precision": "fp32",
                  "gradient_checkpointing": False,
                  "grpo": {"num_generations": 2, "max_completion_length": 6, "beta": 0.04}, **train},
        "rewards": rewards_ or [{"type": "match", "answer_regex": "(-?[0-9]+)"},
                                {"type": "length", "max_tokens": 3, "weight": 0.5}],
        "preview": {"count": 0},
        "eval": {"max_samples": 4, "max_new_tokens": 6},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


# --- rewards, without a model ----------------------------------------------------------------


def test_match_extracts_the_last_answer_and_compares_numbers_as_numbers():
    gsm8k = re.compile(r"#### *(-?[0-9.,]+)")
    row = {"answer": "Natalia sold 48/2 = 24 clips in May.\n#### 1,072"}
    assert rewards.match("so 1000 + 72\n#### 1072", row, gsm8k) == 1.0
    assert rewards.match("#### 5 first, then #### 1,072.0", row, gsm8k) == 1.0  # the last match counts
    assert rewards.match("#### 1073", row, gsm8k) == 0.0
    assert rewards.match("no answer here", row, gsm8k) == 0.0
    word = re.compile(r"Answer: *(.+)")
    assert rewards.match("Answer:  PARIS ", {"answer": "paris"}, word) == 1.0  # whitespace and case
    assert rewards.normalise("1,000.50") == "1000.5" and rewards.normalise("+7.") == "7"


def test_format_json_and_length_rewards(tmp_path):
    assert rewards.fits_format("  <think>x\ny</think> <answer>3</answer>\n",
                               re.compile(r"<think>.*</think>\s*<answer>.*</answer>", re.DOTALL)) == 1.0
    assert rewards.fits_format("<answer>3</answer>", re.compile(r"<think>.*</think>", re.DOTALL)) == 0.0
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "required": ["name"]}))
    [json_reward] = rewards.build([Reward(type="json", schema=str(schema))])
    assert json_reward.score(['{"name": "a"}', '{"age": 3}', "not json"], [[]] * 3, [{}] * 3) == [1.0, 0.0, 0.0]
    assert rewards.length_penalty([1] * 10, 10) == 0.0
    assert rewards.length_penalty([1] * 15, 10) == -0.5
    assert rewards.length_penalty([1] * 40, 10) == -1.0


def test_a_python_reward_that_raises_counts_as_zero_or_stops(tmp_path):
    code = tmp_path / "my_rewards.py"
    code.write_text("def strict(completion, answer, **row):\n"
                    "    if completion == 'boom':\n        raise ValueError('cannot score ' + completion)\n"
                    "    return float(completion == answer) + row['bonus']\n"
                    "def wrong(completion, **row):\n    return 'high'\n")
    spec = Reward(type="python", path=str(code), function="strict")
    rows = [{"answer": "4", "extra": json.dumps({"bonus": 0.5}), "where": f"train.jsonl:{i}"} for i in (1, 2)]
    [lenient] = rewards.build([spec])
    assert lenient.score(["4", "boom"], [[], []], rows) == [1.5, 0.0]
    assert lenient.errors == 1 and "reward python raised on the completion for train.jsonl:2: ValueError: " \
        "cannot score boom" in lenient.messages[0]
    [strict] = rewards.build([spec], stop_on_error=True)
    with pytest.raises(InputError, match="train.jsonl:2: ValueError"):
        strict.score(["4", "boom"], [[], []], rows)
    [wrong] = rewards.build([Reward(type="python", path=str(code), function="wrong")])
    with pytest.raises(InputError, match="returned 'high' for train.jsonl:1: a reward must be a finite number"):
        wrong.score(["x"], [[]], rows[:1])
    with pytest.raises(InputError, match="no function named 'missing'"):
        rewards.build([Reward(type="python", path=str(code), function="missing")])


def test_a_reward_written_for_trl_takes_the_batch_and_reports_as_the_per_completion_form(tmp_path):
    """TRL, Axolotl, Unsloth and open-r1 write `reward(completions, **kwargs) -> list[float]`,
    with the prompts and the dataset's columns as lists: told apart by the first parameter."""
    code = tmp_path / "trl_rewards.py"
    code.write_text("def exact(completions, prompts, answer, bonus, **kwargs):\n"
                    "    return [float(c == a) + b for c, a, b in zip(completions, answer, bonus)]\n"
                    "def boom(completions, **kwargs):\n    raise ValueError('no scorer')\n"
                    "def short(completions, **kwargs):\n    return [1.0]\n")
    rows = [{"prompt": f"p{i}", "answer": "4", "extra": json.dumps({"bonus": 0.5}), "where": f"train.jsonl:{i}"}
            for i in (1, 2)]
    [exact] = rewards.build([Reward(type="python", path=str(code), function="exact")])
    assert exact.score(["4", "5"], [[], []], rows) == [1.5, 0.5]
    [lenient] = rewards.build([Reward(type="python", path=str(code), function="boom")])
    assert lenient.score(["4", "5"], [[], []], rows) == [0.0, 0.0] and lenient.errors == 2
    assert "reward python raised on a batch of 2 completions (for train.jsonl:1, train.jsonl:2): " \
        "ValueError: no scorer" in lenient.messages[0]
    [strict] = rewards.build([Reward(type="python", path=str(code), function="boom")], stop_on_error=True)
    with pytest.raises(InputError, match="ValueError: no scorer"):
        strict.score(["4"], [[]], rows[:1])
    [short] = rewards.build([Reward(type="python", path=str(code), function="short")])
    with pytest.raises(InputError, match="reward python returned 1 values for a batch of 2 completions"):
        short.score(["4", "5"], [[], []], rows)


def test_reward_recipes_are_checked_before_anything_loads(tiny_model, tmp_path):
    recipe = write_grpo_recipe(tmp_path, tiny_model)
    cases = {
        "rewards.0.answer_regex=null": "a match reward needs answer_regex",
        "rewards.0.regex=x": "regex not used by a match reward",
        "rewards.0.answer_regex=(": "answer_regex is not a valid regular expression",
        "train.batch_size=3": "must be a multiple of grpo.num_generations (2)",
        "train.objective=sft": "rewards are for train.objective grpo",
    }
    for setting, message in cases.items():
        result = llmtune("recipe", "validate", recipe, "--set", setting, cwd=tmp_path)
        assert result.returncode == 2 and message in result.stderr, (setting, result.stderr)
    no_rewards = llmtune("recipe", "validate", recipe, "--set", "rewards=[]", cwd=tmp_path)
    assert no_rewards.returncode == 2 and "train.objective grpo needs rewards" in no_rewards.stderr


# --- the pipeline on the tiny model ----------------------------------------------------------


def test_prompts_are_prepared_with_the_generation_prompt_and_counted(tiny_model, tmp_path, tokenizer):
    rows = [*prompts(6), {"question": "no prompt"}, {"prompt": "", "answer": 1}, {"prompt": "q", "answer": [1]}]
    recipe = load_recipe(write_grpo_recipe(tmp_path, tiny_model, rows=rows),
                         ["data.bad_rows=skip", "data.validation.fraction=0"])
    prepare(recipe, tmp_path / "run")
    stats = json.loads((tmp_path / "run" / "prepared" / "stats.json").read_text())
    assert stats["kind"] == "prompt" and stats["rows_read"] == 9 == stats["rows_kept"] + stats["rows_skipped"]
    assert stats["skipped_by_reason"] == {"missing field": 1, "empty field": 1, "not a string": 1}
    from datasets import load_from_disk

    first = load_from_disk(str(tmp_path / "run" / "prepared" / "train"))[0]
    assert tokenizer.decode(first["prompt_ids"]) == first["prompt"]
    assert first["prompt"].endswith("<|im_start|>assistant\n") and first["answer"] == "3"
    assert json.loads(first["extra"]) == {"id": 0}


def test_grpo_trains_and_logs_rewards_kl_length_and_eos(tiny_model, tmp_path, capsys):
    flaky = tmp_path / "flaky.py"  # raises on every other call: reported, counted, scored 0
    flaky.write_text("calls = []\ndef score(completion, **row):\n    calls.append(1)\n"
                     "    if len(calls) % 2:\n        raise RuntimeError('flaky')\n    return 1.0\n")
    batch = tmp_path / "trl_rewards.py"  # TRL's form: a batch in, a list out (used to be refused)
    batch.write_text("def has_digit(completions, prompts, answer, id, completion_ids, **kwargs):\n"
                     "    assert len(prompts) == len(answer) == len(id) == len(completion_ids) == len(completions)\n"
                     "    return [float(any(ch.isdigit() for ch in c)) for c in completions]\n")
    path = write_grpo_recipe(tmp_path, tiny_model, rewards_=[
        {"type": "match", "answer_regex": "(-?[0-9]+)"}, {"type": "length", "max_tokens": 3, "weight": 0.5},
        {"type": "python", "path": str(flaky), "function": "score", "name": "flaky"},
        {"type": "python", "path": str(batch), "function": "has_digit"}])
    recipe = load_recipe(path)
    run = tmp_path / "runs" / "tiny"
    prepare(recipe, run)
    summary = train(recipe, run).manifest["summary"]
    out = capsys.readouterr().out
    assert "reward flaky raised on the completion for " in out and "train.jsonl:" in out and "RuntimeError: flaky" in out
    assert f"reward: running the code of {batch}" in out  # the file whose code runs is named first
    assert summary["steps"] == 3 and summary["objective"] == "grpo"
    steps = [json.loads(line) for line in (run / "adapter" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 3
    for entry in steps:
        assert {"reward_mean", "reward_std", "reward_match_mean", "reward_match_std", "reward_length_mean",
                "kl", "completion_length", "ended_with_eos"} <= entry.keys()
        assert entry["tokens_seen"] > 0
        assert entry["reward_errors_flaky"] > 0 and entry["reward_flaky_mean"] == 0.5  # half raised
        assert 0 <= entry["reward_python_mean"] <= 1
    assert (run / "training_curves.png").is_file()

    # the preview of a prompt-only run: prompt, reference answer, and the rewards of base and tuned
    # (it used to crash with KeyError: 'completion')
    shown = preview(load_recipe(path, ["preview.count=2"]), run)
    assert shown["count"] >= 1 and shown["examples"][0]["reference"] is not None
    assert set(shown["rewards"]["base"]) == set(shown["rewards"]["tuned"]) == {"match", "length", "flaky", "python"}
    assert set(shown["examples"][0]["tuned_rewards"]) == {"match", "length", "flaky", "python"}


@pytest.mark.slow
def test_a_match_reward_on_prompts_without_answers_is_refused_before_training(tiny_model, tmp_path):
    recipe = write_grpo_recipe(tmp_path, tiny_model, rows=prompts(10, answers=False))
    prepare(load_recipe(recipe), tmp_path / "runs" / "tiny")  # in-process: the CLI is tested elsewhere
    result = llmtune("train", recipe, cwd=tmp_path)
    assert result.returncode == 2
    assert "prompts in" in result.stderr and "have no answer, and the reward(s) match compare" in result.stderr
    assert not (tmp_path / "runs" / "tiny" / "adapter.partial").exists()


@pytest.mark.slow
def test_eval_scores_each_reward_per_model(tiny_model, tmp_path):
    recipe = write_grpo_recipe(tmp_path, tiny_model, max_steps=2)
    prepare(load_recipe(recipe), tmp_path / "runs" / "tiny")  # in-process: the CLI is tested elsewhere
    train(load_recipe(recipe), tmp_path / "runs" / "tiny")
    result = llmtune("eval", recipe, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "rewards.match" in result.stdout and "full_reward" in result.stdout
    report = json.loads((tmp_path / "runs" / "tiny" / "eval" / "report.json").read_text())
    for model in ("base", "adapter"):
        metrics = report["sets"]["validation"]["models"][model]
        assert set(metrics["rewards"]) == {"match", "length"}
        assert 0 <= metrics["full_reward"] <= 1 and metrics["generated"] >= 1


RESUMABLE = {"max_steps": 8, "save_every": 4, "keep_checkpoints": 2}


@pytest.mark.slow
def test_grpo_resumed_after_sigkill_ends_with_the_uninterrupted_adapter(tiny_model, tmp_path):
    """Sampling is seeded and the checkpoint carries the RNG states: a resumed CPU run in fp32
    draws the same completions and ends with the same adapter (docs/objectives.md, "GRPO")."""
    adapters = []
    for name, kill in (("whole", False), ("killed", True)):
        folder = tmp_path / name
        folder.mkdir()
        recipe = write_grpo_recipe(folder, tiny_model, **RESUMABLE)
        prepare(load_recipe(recipe), folder / "runs" / "tiny")  # in-process: the CLI is tested elsewhere
        if kill:
            process = start_training_until(folder, recipe, 4, timeout=240)
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
            result = llmtune("train", recipe, "--resume", "auto", cwd=folder)
            assert "resuming from" in result.stdout
            assert result.returncode == 0, result.stderr
        else:  # in this process: one process start less
            train(load_recipe(recipe), folder / "runs" / "tiny")
        adapters.append(adapter_weights(folder / "runs" / "tiny"))
    assert max_difference(*adapters) <= 1e-5


def test_vllm_generation_is_refused_with_a_reason_where_it_cannot_run(tiny_model, tmp_path):
    from llmtune.objectives import objective
    from llmtune.stages.train import trl

    recipe = load_recipe(write_grpo_recipe(tmp_path, tiny_model), ["train.grpo.generation=vllm"])
    with pytest.raises(InputError, match="train.grpo.generation: vllm needs a CUDA GPU and the vllm package"):
        trl.config(objective("grpo"), recipe, {"output_dir": str(tmp_path / "out"), "use_cpu": True})
