"""Preference tuning (train.objective dpo, orpo, simpo, kto) on TRL's trainers: the data formats
and their bad rows, the masks of the prepared pairs, training with every guarantee SFT has
(resume after SIGKILL, SIGTERM), eval's preference accuracy, plan, preview."""

from __future__ import annotations

import json
import signal

import pytest
from datasets import load_from_disk

from helpers import (
    adapter_weights,
    llmtune,
    max_difference,
    pairs,
    start_training_until,
    write_preference_recipe,
)
from llmtune.data.chat import encode_sample
from llmtune.data.formats import to_sample
from llmtune.recipe import load_recipe
from llmtune.stages.prepare import prepare
from llmtune.stages.train import train

# --- data ------------------------------------------------------------------------------------


CONVERSATION_PAIR = {
    "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
               {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}],
    "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                 {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Lyon."}],
}


@pytest.mark.parametrize("row", [
    {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."},
    {"prompt": [{"role": "user", "content": "Capital of France?"}],
     "chosen": {"role": "assistant", "content": "Paris."}, "rejected": [{"role": "assistant", "content": "Lyon."}]},
    CONVERSATION_PAIR,
], ids=["strings", "messages", "two-conversations"])
def test_preference_rows_of_every_shape_become_one_sample(row):
    sample, problem = to_sample(row, "preference", {})
    assert problem is None
    assert sample["prompt"][-1] == {"role": "user", "content": "Capital of France?"}
    assert (sample["chosen"], sample["rejected"]) == ("Paris.", "Lyon.")
    if "prompt" not in row:  # split at the first difference: the earlier turns are the prompt
        assert sample["prompt"] == CONVERSATION_PAIR["chosen"][:3]


@pytest.mark.parametrize("row, fields, reason", [
    ({"prompt": "q", "chosen": "a"}, {}, "missing field: 'rejected'"),
    ({"question": "q", "chosen": "a", "rejected": "b"}, {"prompt": "question2"}, "missing field: 'question2'"),
    ({"prompt": "q", "chosen": "a", "rejected": " a "}, {}, "chosen equals rejected"),
    ({"prompt": "q", "chosen": "a", "rejected": ""}, {}, "empty answer: 'rejected'"),
    ({"prompt": {"role": "user"}, "chosen": "a", "rejected": "b"}, {}, "malformed prompt"),
    ({"prompt": "q", "chosen": {"role": "user", "content": "a"}, "rejected": "b"}, {}, "malformed answer"),
    ({"chosen": "a whole answer", "rejected": "b"}, {}, "missing field: 'prompt' (or give 'chosen' and 'rejected'"),
    ({"chosen": ["a"], "rejected": ["b"]}, {}, "malformed pair: 'chosen' must be a list of messages"),
    ({"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "b"}]}, {},
     "malformed pair: the two conversations share no prefix"),
    ({"prompt": [{"role": "assistant", "content": "q"}], "chosen": "a", "rejected": "b"}, {}, "roles out of order"),
], ids=["no-rejected", "renamed-missing", "equal", "empty", "prompt-dict", "answer-role", "string-conversation",
        "list-of-strings",
        "no-prefix", "prompt-order"])
def test_bad_preference_rows_say_why(row, fields, reason):
    sample, problem = to_sample(row, "preference", fields)
    assert sample is None and problem.startswith(reason), problem


def test_kto_rows_need_a_boolean_label():
    good, problem = to_sample({"prompt": "q", "completion": "a", "label": True}, "kto", {})
    assert problem is None and good["label"] is True and good["completion"] == "a"
    assert to_sample({"prompt": "q", "completion": "a", "label": "yes"}, "kto", {})[1].startswith("not a boolean")
    assert to_sample({"prompt": "q", "completion": "a"}, "kto", {})[1] == "missing field: 'label'"


def test_pairs_are_masked_as_sft_masks_the_answer(tiny_model, tmp_path, tokenizer):
    """prompt_ids + chosen_ids is the conversation SFT would train on, and chosen_ids are exactly
    its trained tokens (the answer and its end-of-turn token); bad rows are counted by reason."""
    rows = pairs(10) + [{"prompt": "q", "chosen": "same", "rejected": "same"}, {"prompt": "q", "chosen": "a"},
                        CONVERSATION_PAIR]
    recipe = load_recipe(write_preference_recipe(tmp_path, tiny_model, rows=rows),
                         ["data.bad_rows=skip", "data.validation.fraction=0"])
    prepare(recipe, tmp_path / "run")
    stats = json.loads((tmp_path / "run" / "prepared" / "stats.json").read_text())
    assert stats["kind"] == "preference"
    assert stats["rows_read"] == 13 == stats["rows_kept"] + stats["rows_skipped"]
    assert stats["skipped_by_reason"] == {"chosen equals rejected": 1, "missing field": 1}
    data = load_from_disk(str(tmp_path / "run" / "prepared" / "train"))
    assert len(data) == 11
    for row, source in zip(data, [*rows[:10], CONVERSATION_PAIR]):
        sample = to_sample(source, "preference", {})[0]
        for answer in ("chosen", "rejected"):
            sft = encode_sample(tokenizer, {"messages": [*sample["prompt"],
                                                         {"role": "assistant", "content": sample[answer]}]},
                                train_on="last_assistant")
            trained = [t for t, label in zip(sft.input_ids, sft.labels) if label != -100]
            assert row[f"{answer}_ids"] == trained
            assert row["prompt_ids"] == sft.input_ids[:len(row["prompt_ids"])]
            assert tokenizer.decode(row[f"{answer}_ids"]) == sample[answer] + "<|im_end|>"


@pytest.mark.slow
def test_bad_rows_error_names_the_line_and_wrong_objectives_are_refused(tiny_model, tmp_path):
    rows = pairs(4) + [{"prompt": "q", "chosen": "a"}]
    recipe = write_preference_recipe(tmp_path, tiny_model, rows=rows)
    result = llmtune("prepare", recipe, cwd=tmp_path)
    assert result.returncode != 0
    assert "train.jsonl:5: missing field: 'rejected'" in result.stderr

    chat_data = llmtune("recipe", "validate", recipe, "--set", "data.train.0.format=chat", cwd=tmp_path)
    assert chat_data.returncode == 2
    assert "train.objective dpo trains on format preference, but data.train has a source of format chat" \
        in chat_data.stderr
    kto = llmtune("recipe", "validate", recipe, "--set", "train.objective=kto", "--set", "train.batch_size=1",
                  cwd=tmp_path)
    assert kto.returncode == 2 and "objective kto needs batch_size 2 or more" in kto.stderr


@pytest.mark.slow
def test_overlong_pairs_are_cut_dropped_or_refused(tiny_model, tmp_path):
    long_prompt = {"prompt": "word " * 200, "chosen": "a", "rejected": "b"}
    long_answer = {"prompt": "q", "chosen": "long " * 200, "rejected": "b"}
    rows = pairs(6) + [long_prompt, long_answer]
    recipe_file = write_preference_recipe(tmp_path, tiny_model, rows=rows)
    truncated = load_recipe(recipe_file, ["data.validation.fraction=0"])
    prepare(truncated, tmp_path / "cut")
    stats = json.loads((tmp_path / "cut" / "prepared" / "stats.json").read_text())
    assert stats["skipped_by_reason"] == {"prompt longer than max_seq_len": 1}
    assert stats["train"]["truncated"] == 1 and stats["train"]["answers_cut"] == 1
    assert stats["train"]["length_max"] == 128
    dropped = load_recipe(recipe_file, ["data.validation.fraction=0", "data.overlong=drop"])
    prepare(dropped, tmp_path / "drop")
    stats = json.loads((tmp_path / "drop" / "prepared" / "stats.json").read_text())
    assert stats["skipped_by_reason"] == {"overlong": 2} and stats["rows_kept"] == 6
    refused = llmtune("prepare", recipe_file, "--set", "data.overlong=error", cwd=tmp_path)
    assert refused.returncode != 0 and "train.jsonl:7: overlong" in refused.stderr


# --- training --------------------------------------------------------------------------------


@pytest.mark.parametrize("objective, sets", [
    ("dpo", []),
    ("dpo", ["adapter.method=dora", "train.dpo_loss=ipo"]),
    ("dpo", ["model.quantize=nf4", "model.compute_dtype=float32"]),
    ("orpo", []),
    ("simpo", []),
    ("kto", []),
], ids=["dpo-lora", "dpo-dora-ipo", "dpo-qlora", "orpo", "simpo", "kto"])
def test_every_objective_trains_and_logs_its_rewards(tiny_model, tmp_path, objective, sets):
    recipe = load_recipe(write_preference_recipe(tmp_path, tiny_model, objective), ["train.max_steps=4", *sets])
    run = tmp_path / "runs" / "tiny"
    prepare(recipe, run)
    summary = train(recipe, run).manifest["summary"]
    assert summary["steps"] == 4
    entries = [json.loads(line) for line in (run / "adapter" / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in entries if "loss" in e]
    assert len(steps) == 4
    # KTO logs no accuracy, a KL estimate, and a margin when a batch holds good and bad answers
    expected = {"kl"} if objective == "kto" else {"reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy"}
    assert all(expected <= e.keys() for e in steps)
    assert any("reward_margin" in e for e in steps)
    assert all(e["tokens_seen"] > 0 for e in steps)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "training_curves.png").is_file()


@pytest.mark.slow
def test_dpo_raises_the_preference_accuracy_in_eval(tiny_model, tmp_path):
    """eval scores base, adapter and merged on held-out pairs: the adapter prefers the chosen
    answers more than the base did, and merged agrees with the adapter."""
    recipe = write_preference_recipe(tmp_path, tiny_model, rows=pairs(80),
                                     train={"epochs": 3, "lr": 1e-2, "beta": 0.5},
                                     export={"formats": ["hf"]})
    result = llmtune("run", recipe, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "margin" in result.stdout and "accuracy" in result.stdout
    evaluated = llmtune("eval", recipe, cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "preference_accuracy" in evaluated.stdout
    report = json.loads((tmp_path / "runs" / "tiny" / "eval" / "report.json").read_text())
    models = report["sets"]["validation"]["models"]
    assert models["adapter"]["margin"] > models["base"]["margin"]
    assert models["adapter"]["preference_accuracy"] >= models["base"]["preference_accuracy"]
    assert models["adapter"]["preference_accuracy"] > 0.5
    assert abs(models["merged"]["margin"] - models["adapter"]["margin"]) < 1e-2

    shown = llmtune("data", "preview", recipe, "-n", "1", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "── chosen:" in shown.stdout and "── rejected:" in shown.stdout
    assert "⟦" in shown.stdout and "<|im_end|>⟧" in shown.stdout
    from llmtune.stages.plan import plan

    planned = plan(load_recipe(recipe), tmp_path / "runs" / "tiny")
    assert planned["objective"] == "dpo" and planned["sequences_per_example"].startswith("2 trained + 2 forward only")


RESUMABLE = {"max_steps": 40, "batch_size": 2, "save_every": 10, "keep_checkpoints": 2, "lr": 1e-3}


@pytest.fixture(scope="module")
def dpo_uninterrupted(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dpo-uninterrupted")
    recipe = write_preference_recipe(folder, tiny_model, train=RESUMABLE)
    prepare(load_recipe(recipe), folder / "runs" / "tiny")  # in-process: the CLI is tested elsewhere
    train(load_recipe(recipe), folder / "runs" / "tiny")
    return adapter_weights(folder / "runs" / "tiny")


@pytest.mark.slow
def test_dpo_killed_then_stopped_resumes_to_the_uninterruptedadapter_weights(dpo_uninterrupted, tiny_model, tmp_path):
    """SIGKILL after checkpoint 10, resume; SIGTERM after checkpoint 20 (exit 75, saved where it
    stopped), resume again: the adapter of the uninterrupted run, every step logged once."""
    recipe = write_preference_recipe(tmp_path, tiny_model, train=RESUMABLE)
    prepare(load_recipe(recipe), tmp_path / "runs" / "tiny")  # in-process: the CLI is tested elsewhere
    killed = start_training_until(tmp_path, recipe, 10)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=120)
    stopped = start_training_until(tmp_path, recipe, 20, "--resume", "auto")
    stopped.send_signal(signal.SIGTERM)
    out, err = stopped.communicate(timeout=120)
    assert "resuming from" in out
    assert stopped.returncode == 75, err
    assert "interrupted at step" in err
    resumed = llmtune("train", recipe, "--resume", "auto", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    assert max_difference(adapter_weights(tmp_path / "runs" / "tiny"), dpo_uninterrupted) <= 1e-5
    steps = [json.loads(line)["step"] for line in
             (tmp_path / "runs" / "tiny" / "adapter" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 41))  # every step logged once, none twice after the resumes


@pytest.mark.slow
def test_dpo_on_two_processes_equals_one_with_the_same_global_batch(tiny_model, tmp_path):
    """DDP under torchrun (`llmtune launch`, gloo on CPU): 2 processes x 1 pair = 1 x 2 pairs."""
    adapters = []
    for folder, command in ((tmp_path / "one", ["train", "--set", "train.batch_size=2"]),
                            (tmp_path / "two", ["launch", "--nproc", "2"])):
        folder.mkdir()
        recipe = write_preference_recipe(folder, tiny_model, train={"max_steps": 12, "batch_size": 1, "lr": 1e-3})
        prepare(load_recipe(recipe), folder / "runs" / "tiny")  # in-process: the CLI is tested elsewhere
        result = llmtune(command[0], recipe, *command[1:], cwd=folder)
        assert result.returncode == 0, result.stderr
        adapters.append(adapter_weights(folder / "runs" / "tiny"))
    assert "2 processes (ddp)" in result.stdout
    assert max_difference(*adapters) <= 1e-5
