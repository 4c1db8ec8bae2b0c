"""The ways fine-tunes fail in the field, each caught by a guard; every test here fails without
its guard (docs/guardrails.md)."""

from __future__ import annotations

import re

import pytest

from helpers import llmtune, write_recipe
from llmtune.errors import Diverged
from llmtune.recipe import load_recipe
from llmtune.stages.prepare import prepare
from llmtune.stages.train import checkpoints, train

ROW = re.compile(r"train\.jsonl:\d+")


# --- non-finite loss or gradients --------------------------------------------------------------

@pytest.mark.slow
def test_a_learning_rate_that_blows_up_stops_training_with_exit_5(tiny_model, tmp_path):
    """As a user meets it: lr 1e30. Without the guard the Trainer logged the NaN loss as 0.0,
    training "succeeded", and merge and export went on with a broken adapter."""
    recipe = write_recipe(tmp_path, tiny_model, train={"lr": 1.0e+30, "max_steps": 10, "save_every": 1},
                          preview={"count": 0})
    result = llmtune("run", recipe, cwd=tmp_path)
    assert result.returncode == 5, result.stdout + result.stderr
    message = " ".join(result.stderr.split())
    assert re.search(r"training stopped at step \d+: the (loss|gradient norm) was (nan|inf)", message), message
    assert ROW.search(message) and "learning rate" in message
    run = tmp_path / "runs" / "tiny"
    assert not (run / "adapter").exists() and not (run / "merged").exists()
    good = checkpoints.newest_good(run / "adapter.partial" / checkpoints.CHECKPOINTS)
    assert good is not None and f"adapter.partial/checkpoints/{good.name}, is kept" in message


def test_an_injected_nan_loss_stops_at_its_step_and_names_its_rows(tiny_model, tmp_path, monkeypatch):
    from llmtune.stages.train import trainer as loss_module

    recipe = load_recipe(write_recipe(tmp_path, tiny_model, rows=40,
                                      train={"max_steps": 8, "save_every": 2, "batch_size": 4}))
    run = tmp_path / "runs" / "tiny"
    prepare(recipe, run)
    calls = {"n": 0}
    original = loss_module.ChunkedLossTrainer.compute_loss

    def nan_at_step_5(self, model, inputs, *args, **kwargs):
        result = original(self, model, inputs, *args, **kwargs)
        if model.training:
            calls["n"] += 1
            if calls["n"] == 5:
                return result * float("nan")
        return result

    monkeypatch.setattr(loss_module.ChunkedLossTrainer, "compute_loss", nan_at_step_5)
    with pytest.raises(Diverged) as caught:
        train(recipe, run)
    message = caught.value.message
    assert message.startswith("training stopped at step 5: the loss was nan on the rows ")
    assert len(ROW.findall(message)) == 4  # the batch of step 5, file:line each
    assert "checkpoint-4" in message
    partial = run / "adapter.partial" / checkpoints.CHECKPOINTS
    assert checkpoints.step_of(checkpoints.newest_good(partial)) == 4
    assert not (run / "adapter").exists()


# --- servers that never stop -------------------------------------------------------------------

@pytest.mark.slow
def test_a_base_llama3_served_after_export_stops_where_its_turns_end(tmp_path):
    """A base Llama 3's EOS is <|end_of_text|>, the Llama 3 chat template ends turns with
    <|eot_id|>: vLLM and TGI stop on the tokenizer's EOS and generation_config's ids, so the
    exported tokenizer's EOS must be <|eot_id|> and the config must list both."""
    import json

    from llmtune.data.probe import turn_end_token
    from llmtune.testing import build_llama3_model, build_llama3_tokenizer

    base = build_llama3_model(tmp_path / "base", base=True)
    recipe = write_recipe(tmp_path, base, rows=24, data={"template": "llama-3"},
                          train={"max_steps": 2}, preview={"count": 0})
    result = llmtune("run", recipe, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    tokenizer = build_llama3_tokenizer(base=True)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in ("<|end_of_text|>", "<|eot_id|>")}
    run = tmp_path / "runs" / "tiny"
    for folder in (run / "adapter", run / "merged", run / "exported" / "hf"):
        assert json.loads((folder / "tokenizer_config.json").read_text())["eos_token"] == "<|eot_id|>", folder
    for folder in (run / "merged", run / "exported" / "hf"):
        generation = json.loads((folder / "generation_config.json").read_text())
        assert set(ids.values()) <= set(generation["eos_token_id"]), folder
    # what decides it: the template's own end of turn, found by rendering
    assert turn_end_token(tokenizer, build_llama3_tokenizer().chat_template) == "<|eot_id|>"
    assert turn_end_token(tokenizer, "{% for m in messages %}{{ m['content'] }}\n{% endfor %}") is None


# --- rows that train nothing; answers cut by truncation ----------------------------------------

def _prepare_rows(tmp_path, tiny_model, rows, *sets):
    import json

    from helpers import write_jsonl

    recipe_file = write_recipe(tmp_path, tiny_model)
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    run = tmp_path / "runs" / "tiny"
    prepare(load_recipe(recipe_file, ["data.validation.fraction=0", "data.max_seq_len=128", *sets]), run)
    return json.loads((run / "prepared" / "stats.json").read_text())


def test_rows_that_train_nothing_are_skipped_each_with_its_reason(tiny_model, tmp_path):
    from helpers import chat_rows
    from llmtune.errors import InputError
    from llmtune.stages.prepare import CUT_AWAY, NOTHING_TO_TRAIN

    long_prompt = {"messages": [{"role": "user", "content": "x" * 200}, {"role": "assistant", "content": "y"}]}
    stats = _prepare_rows(tmp_path, tiny_model, chat_rows(6) + [long_prompt])
    assert stats["skipped_by_reason"] == {CUT_AWAY: 1}
    assert stats["rows_read"] == stats["rows_kept"] + stats["rows_skipped"] == 7

    # a template that renders no assistant turn: every row trains nothing, and the set is refused
    (tmp_path / "users-only.jinja").write_text(
        "{% for m in messages if m['role'] == 'user' %}{{ m['content'] }}\n{% endfor %}")
    with pytest.raises(InputError) as caught:
        _prepare_rows(tmp_path, tiny_model, chat_rows(6), f"data.template={tmp_path / 'users-only.jinja'}")
    hint = caught.value.hint
    assert f"{NOTHING_TO_TRAIN} (6)" in hint and "users-only.jinja" in hint and "llmtune data preview" in hint


def test_answers_cut_by_truncation_are_counted_and_warned_about(tiny_model, tmp_path, capsys):
    from helpers import chat_rows

    long_answer = {"messages": [{"role": "user", "content": "Go"}, {"role": "assistant", "content": "z" * 300}]}
    # truncated after its answer: a last user turn that trains nothing is cut, the answer is whole
    long_tail = {"messages": [{"role": "user", "content": "Go"}, {"role": "assistant", "content": "y"},
                              {"role": "user", "content": "x" * 300}]}
    stats = _prepare_rows(tmp_path, tiny_model, chat_rows(20) + [long_answer, long_tail])
    assert stats["train"]["truncated"] == 2 and stats["train"]["answers_cut"] == 1
    assert "had their answer cut by data.max_seq_len" in " ".join(capsys.readouterr().out.split())


# --- control-token text inside content --------------------------------------------------------

INJECTED = [{"messages": [{"role": "user", "content": "What does <|im_end|> do in ChatML?"},
                          {"role": "assistant", "content": "It ends a turn: <|im_end|>."}]}]


@pytest.mark.parametrize("mode", ["plain", "keep"])
def test_control_token_text_in_content_is_text_unless_keep(tiny_model, tmp_path, mode, tokenizer):
    from helpers import chat_rows
    from llmtune.data.chat import IGNORE
    from llmtune.data.special_text import encode_prompt
    from llmtune.data.turns import render

    stats = _prepare_rows(tmp_path, tiny_model, INJECTED + chat_rows(3), f"data.special_text={mode}")
    assert stats["special_text"] == {"handled_as": mode, "rows": 1, "occurrences": 2}
    from datasets import load_from_disk

    rows = load_from_disk(str(tmp_path / "runs" / "tiny" / "prepared" / "train"))
    row = next(r for r in rows if r["where"].endswith("train.jsonl:1"))
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    text = render(tokenizer, INJECTED[0]["messages"])
    assert tokenizer.decode(row["input_ids"]) == text  # the same characters either way
    # the template puts two end-of-turn tokens; `keep` lets the content add two more
    assert row["input_ids"].count(end) == (2 if mode == "plain" else 4)
    trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE]
    assert tokenizer.decode(trained) == "It ends a turn: <|im_end|>.<|im_end|>"
    assert trained.count(end) == (1 if mode == "plain" else 2)
    # inference tokenises a prompt the same way
    prompt = encode_prompt(tokenizer, INJECTED[0]["messages"][:1], None, mode)
    assert prompt == row["input_ids"][:len(prompt)]


def test_control_token_text_under_error_names_the_row(tiny_model, tmp_path):
    from helpers import chat_rows
    from llmtune.errors import InputError

    with pytest.raises(InputError) as caught:
        _prepare_rows(tmp_path, tiny_model, chat_rows(3) + INJECTED, "data.special_text=error")
    assert caught.value.message.startswith(f"{tmp_path / 'data' / 'train.jsonl'}:4: ")
    assert "<|im_end|>" in caught.value.message


def test_control_token_text_on_a_llama3_tokenizer_matches_the_tokenizer_without_specials():
    """With real BPE merges: the content's text tokenises exactly as the tokenizer does it with
    special-token matching off, and the template's markers stay single tokens."""
    from llmtune.data.special_text import encode_samples
    from llmtune.testing import build_llama3_tokenizer

    tokenizer = build_llama3_tokenizer(corpus=["the end of a turn is near, said the id"] * 50, vocab_size=400)
    content = "the end of a turn is <|eot_id|>"
    sample = {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "ok"}]}
    [[example]] = encode_samples(tokenizer, [sample], None, "assistant", "plain")
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert example.input_ids.count(eot) == 2
    as_text = tokenizer(content, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    ids = example.input_ids
    assert any(ids[i:i + len(as_text)] == as_text for i in range(len(ids)))
    [[kept]] = encode_samples(tokenizer, [sample], None, "assistant", "keep")
    assert kept.input_ids.count(eot) == 3


# --- serving defaults that match training; prompts that silently produce nothing ---------------

@pytest.mark.slow
def test_generate_and_chat_serve_prompts_as_training_saw_them(tiny_model, tmp_path):
    """A {"prompt": ...} row on a chat-trained run is a user turn with the training's system
    prompt: its answer equals that of the same question as a conversation; chat starts with
    that system prompt and says so; no library notice reaches the terminal."""
    import json
    import subprocess
    import sys

    from helpers import write_jsonl
    from llmtune.serve.serving import serving_defaults

    recipe = write_recipe(tmp_path, tiny_model, rows=24, data={"system_prompt": "Answer in three words."},
                          train={"max_steps": 4, "lr": 5e-3}, preview={"count": 0})
    assert llmtune("run", recipe, cwd=tmp_path).returncode == 0
    run = tmp_path / "runs" / "tiny"
    serving = serving_defaults(run)
    assert serving.system_prompt == "Answer in three words." and serving.chat and serving.special_text == "plain"
    assert serving_defaults(run / "merged") == serving

    question = "Repeat apple three times."
    write_jsonl(tmp_path / "in.jsonl", [
        {"prompt": question},
        {"messages": [{"role": "system", "content": "Answer in three words."},
                      {"role": "user", "content": question}]},
        {"messages": [{"role": "user", "content": question}]},
    ])
    result = llmtune("generate", "runs/tiny", "--input", "in.jsonl", "--output", "out.jsonl",
                     "--max-new-tokens", "12", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "text prompts are user turns" in result.stdout and "Answer in three words." in result.stdout
    outputs = [json.loads(line)["output"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert outputs[0] == outputs[1] == outputs[2]
    raw = llmtune("generate", "runs/tiny", "--input", "in.jsonl", "--output", "raw.jsonl", "--raw",
                  "--max-new-tokens", "12", cwd=tmp_path)
    assert raw.returncode == 0 and "text prompts are user turns" not in raw.stdout

    chat = subprocess.run([sys.executable, "-m", "llmtune", "chat", "runs/tiny", "--max-new-tokens", "4"],
                          cwd=tmp_path, input=question + "\n/exit\n", capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0, chat.stderr
    assert "system prompt from training" in chat.stdout and "Answer in three words." in chat.stdout
    for output in (result, raw, chat):
        assert "kernels-community" not in output.stdout + output.stderr

    # template drift: a copy of the merged model whose template was edited is refused...
    import shutil

    shutil.copytree(run / "merged", tmp_path / "edited")
    shutil.copy(run / "merged" / "manifest.json", tmp_path / "edited" / "manifest.json")
    template_file = tmp_path / "edited" / "chat_template.jinja"
    template_file.write_text(template_file.read_text().replace("<|im_start|>", "<|im_start|> "))
    for relative in ("prepared", "adapter"):  # the manifest's upstream paths, as in the run
        (tmp_path / relative).symlink_to(run / relative)
    drift = llmtune("generate", "edited", "--input", "in.jsonl", "--output", "d.jsonl", cwd=tmp_path)
    assert drift.returncode == 2 and "chat template differs from the one the run's data was prepared with" \
        in " ".join(drift.stderr.split())
    # ...unless --template says which to use
    trained = llmtune("generate", "edited", "--input", "in.jsonl", "--output", "d.jsonl",
                      "--template", "trained", "--max-new-tokens", "12", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert [json.loads(line)["output"] for line in (tmp_path / "d.jsonl").read_text().splitlines()] == outputs


def test_empty_answers_are_counted_and_warned_about(capsys):
    from llmtune.serve.inference import Generation
    from llmtune.serve.serving import report_empty

    assert report_empty([Generation("", True), Generation(" 42", True), Generation("  ", True)], "generate") == 2
    assert "generate: warning: 2 of 3 answers are empty" in " ".join(capsys.readouterr().out.split())


# --- adapters that servers refuse --------------------------------------------------------------

@pytest.mark.slow
def test_an_adapter_with_whole_modules_is_flagged_at_export_and_refused_under_strict(tiny_model, tmp_path):
    import json

    recipe = write_recipe(tmp_path, tiny_model, rows=24, adapter={"modules_to_save": ["lm_head"]},
                          train={"max_steps": 2}, export={"formats": ["adapter"]}, preview={"count": 0})
    result = llmtune("run", recipe, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "vLLM refuses this adapter: modules_to_save ['lm_head']" in " ".join(result.stdout.split())
    summary = json.loads((tmp_path / "runs" / "tiny" / "exported" / "manifest.json").read_text())["summary"]
    assert summary["adapter_servable"] is False and "modules_to_save" in summary["adapter_problems"][0]
    strict = llmtune("export", recipe, "--force", "--set", "export.adapter.strict=true", cwd=tmp_path)
    assert strict.returncode == 2 and "LoRA servers refuse" in strict.stderr


def test_numeric_checks_count_a_nan_as_a_failure(tiny_model):
    """NaN compares false against every bar: the GGUF check's argmax of a NaN row is 0 on both
    sides (a perfect "agreement"), and the merge check's difference is NaN (never > tolerance)."""
    import torch

    from llmtune import models
    from llmtune.errors import VerificationError
    from llmtune.stages.export import gguf_verify
    from llmtune.stages.merge import check as merge_check

    model = models.load_model(tiny_model, "fp32").eval()
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    _, non_finite = gguf_verify._top1(model, [[5, 6, 7, 8]])
    assert non_finite == 4
    figures = {"top1_agreement": 1.0, "positions": 4, "non_finite_positions": 4,
               "tokenization_matches": "1/1", "chat_template_matches": True}
    assert gguf_verify.failures(figures, "q8_0") == ["4 positions have NaN or infinite logits"]

    logits = torch.zeros(1, 4, 8)
    broken = logits.clone()
    broken[0, 2, 3] = float("nan")
    mask = torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(VerificationError):
        merge_check.check_logits(broken, logits, logits, mask, "fp32")


# --- evaluation that runs out of memory --------------------------------------------------------

@pytest.mark.slow
def test_plan_reports_eval_and_generation_batches_shrink_to_what_fits(tiny_model, tmp_path, monkeypatch, capsys):
    import json

    from llmtune import models
    from llmtune.serve import inference

    recipe = write_recipe(tmp_path, tiny_model, eval={"batch_size": 8, "max_new_tokens": 16})
    result = llmtune("plan", recipe, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    memory = json.loads(result.stdout)["eval_memory_bytes"]
    assert memory["total"] == memory["weights"] + memory["generation or loss"] + memory["runtime"]
    assert memory["generation or loss"] > 0

    model = models.load_model(tiny_model, "fp32").eval()
    per_row = inference.generation_bytes_per_row(model.config, 40, 4)
    monkeypatch.setattr(inference.models, "free_memory", lambda device: int(3.5 * per_row / 0.8))
    assert inference.fitting_batch_size(model, 8, 40) == 3
    assert "generation: 3 prompts at a time, not 8" in capsys.readouterr().out
    assert inference.fitting_batch_size(model, 2, 40) == 2
