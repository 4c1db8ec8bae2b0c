"""Training: the LoRA family and QLoRA learn; resume after SIGKILL or SIGTERM gives the same
adapter as an uninterrupted run; corrupt checkpoints are never resumed from."""

from __future__ import annotations

import json
import re
import signal

import pytest

from helpers import adapter_weights, llmtune, max_difference, start_training_until, write_recipe
from llmtune.recipe import load_recipe
from llmtune.stages.prepare import prepare
from llmtune.stages.train import checkpoints, train


@pytest.mark.parametrize("sets", [
    [],
    ["adapter.method=dora"],
    ["adapter.rslora=true", "adapter.init=gaussian"],
    ["model.quantize=nf4", "model.compute_dtype=float32"],
    ["adapter.modules_to_save=[lm_head]", "adapter.target_modules=.*(q|v)_proj"],
    ["train.precision=bf16", "train.gradient_checkpointing=true"],
], ids=["lora", "dora", "rslora", "qlora-nf4", "regex+modules_to_save", "bf16+checkpointing"])
def test_adapter_variants_lower_the_loss(tiny_model, tmp_path, sets):
    recipe_file = write_recipe(tmp_path, tiny_model, rows=40, train={"max_steps": 12, "lr": 5e-3})
    recipe = load_recipe(recipe_file, sets)
    run = tmp_path / "runs" / "tiny"
    prepare(recipe, run)
    summary = train(recipe, run).manifest["summary"]
    assert summary["eval_loss"] < summary["eval_loss_before"]


def test_qlora_gradients_are_the_same_after_an_evaluation(tiny_model, tmp_path):
    """Training evaluates first (the loss before training). bitsandbytes repacks 4-bit weights
    for inference on CPUs with AVX512-BF16, into a form with no backward; llmtune keeps them
    trainable, so an evaluation changes no gradient. (Without AVX512-BF16 nothing is repacked
    and this holds either way.)"""
    import importlib

    import torch

    build = importlib.import_module("llmtune.stages.train.build")
    from llmtune import model_sources

    recipe = load_recipe(write_recipe(tmp_path, tiny_model, adapter={"init": "gaussian"}),
                         ["model.quantize=nf4", "model.compute_dtype=bfloat16"])
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))

    def gradients(evaluate_first: bool):
        torch.manual_seed(0)
        model = build.adapter_model(recipe, model_sources.resolve(str(tiny_model)), "bf16")
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as the Trainer runs every forward
            if evaluate_first:
                model.eval()
                with torch.no_grad():
                    model(input_ids=ids)
                model.train()
            model(input_ids=ids, labels=ids).loss.backward()
        return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}

    plain, after_eval = gradients(False), gradients(True)
    assert all(torch.equal(plain[name], after_eval[name]) for name in plain)


RESUMABLE = {"max_steps": 160, "batch_size": 1, "save_every": 20, "keep_checkpoints": 2, "lr": 1e-3}


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    recipe = write_recipe(folder, tiny_model, rows=40, adapter={"dropout": 0.1}, train=RESUMABLE,
                          preview={"count": 0})
    # in-process: the CLI is what the interrupted runs use, and they must end with this adapter
    prepare(load_recipe(recipe), folder / "runs" / "tiny")
    summary = train(load_recipe(recipe), folder / "runs" / "tiny").manifest["summary"]
    return {"weights": adapter_weights(folder / "runs" / "tiny"), "train_loss": summary["train_loss"]}


def _fresh(tiny_model, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model, rows=40, adapter={"dropout": 0.1}, train=RESUMABLE,
                          preview={"count": 0})
    prepare(load_recipe(recipe), tmp_path / "runs" / "tiny")
    return recipe


def _killed_after(tiny_model, tmp_path, step: int):
    """A fresh run SIGKILLed once checkpoint-`step` is marked: (recipe, checkpoints folder)."""
    recipe = _fresh(tiny_model, tmp_path)
    process = start_training_until(tmp_path, recipe, step)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    return recipe, tmp_path / "runs" / "tiny" / "adapter.partial" / "checkpoints"


@pytest.mark.slow
def test_sigkill_then_the_same_command_resumes_and_equals_uninterrupted(uninterrupted, tiny_model, tmp_path):
    """A re-run after a crash resumes by default (it used to start over and delete the
    checkpoint without a word), and reports the whole run's training loss, not the resumed part's.
    While it trains, a second command on its run folder is refused (two used to interleave)."""
    recipe = _fresh(tiny_model, tmp_path)
    process = start_training_until(tmp_path, recipe, 40)
    process.send_signal(signal.SIGSTOP)  # frozen, lock held: it cannot finish while the check runs
    busy = llmtune("run", recipe, cwd=tmp_path)
    assert busy.returncode == 6 and f"is in use by another llmtune command (pid {process.pid}: llmtune train" in busy.stderr
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    root = tmp_path / "runs" / "tiny" / "adapter.partial" / "checkpoints"
    assert checkpoints.newest_good(root) is not None
    resumed = llmtune("train", recipe, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    step = re.search(r"resuming from \S+ \(step (\d+)\)", resumed.stdout)
    assert step and int(step.group(1)) >= 40
    assert max_difference(adapter_weights(tmp_path / "runs" / "tiny"), uninterrupted["weights"]) <= 1e-5
    summary = json.loads((tmp_path / "runs" / "tiny" / "adapter" / "manifest.json").read_text())["summary"]
    assert summary["train_loss"] == pytest.approx(uninterrupted["train_loss"], rel=1e-3)


@pytest.mark.slow
def test_corrupt_checkpoint_is_skipped_and_rotation_keeps_a_good_one(uninterrupted, tiny_model, tmp_path):
    recipe, root = _killed_after(tiny_model, tmp_path, 60)
    good = [c for c in checkpoints.checkpoints(root) if checkpoints.is_good(c)]
    # keep_checkpoints: 2, plus one when the kill lands between marking the newest and rotating
    assert 1 <= len(good) <= 3
    newest = good[0]
    with open(newest / "optimizer.pt", "r+b") as handle:  # flip bytes in the newest
        handle.seek(100)
        handle.write(b"\x00corrupt\x00")
    (root / "checkpoint-999").mkdir()  # a checkpoint cut short: no mark
    assert checkpoints.newest_good(root) in (good[1:] or [None])
    resumed = llmtune("train", recipe, "--resume", "auto", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert max_difference(adapter_weights(tmp_path / "runs" / "tiny"), uninterrupted["weights"]) <= 1e-5
    final = checkpoints.checkpoints(tmp_path / "runs" / "tiny" / "adapter" / checkpoints.CHECKPOINTS)
    assert len(final) == 2 and all(checkpoints.is_good(c) for c in final)  # no corrupt leftovers


@pytest.mark.slow
def test_sigterm_saves_exits_75_and_resumes(uninterrupted, tiny_model, tmp_path):
    recipe = _fresh(tiny_model, tmp_path)
    process = start_training_until(tmp_path, recipe, 20)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 75, err
    assert "interrupted at step" in err and "--resume auto" in err
    root = tmp_path / "runs" / "tiny" / "adapter.partial" / "checkpoints"
    newest = checkpoints.newest_good(root)
    assert newest is not None and checkpoints.step_of(newest) > 20  # saved where it stopped

    changed = llmtune("train", recipe, "--resume", "auto", "--set", "train.lr=5e-4", cwd=tmp_path)
    assert changed.returncode == 2 and "cannot resume: train section changed" in changed.stderr
    resumed = llmtune("train", recipe, "--resume", "auto", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert max_difference(adapter_weights(tmp_path / "runs" / "tiny"), uninterrupted["weights"]) <= 1e-5

    # a --force retraining stopped by Ctrl-C resumes on the next plain command, where it used to
    # be called up to date (the adapter of the run before was)
    again = start_training_until(tmp_path, recipe, 20, "--force")
    again.send_signal(signal.SIGINT)
    again.communicate(timeout=120)
    assert again.returncode == 75
    resumed = llmtune("train", recipe, cwd=tmp_path)
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout and "up to date" not in resumed.stdout
    assert max_difference(adapter_weights(tmp_path / "runs" / "tiny"), uninterrupted["weights"]) <= 1e-5


def test_chunked_loss_equals_the_model_loss(tiny_model, tokenizer, monkeypatch):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from helpers import chat_rows, chunked_and_standard_loss
    from llmtune.data.chat import encode_sample
    from llmtune.stages.collate import PadCollator
    from llmtune.stages.train import loss as loss_module

    monkeypatch.setattr(loss_module, "MAX_CHUNK", 7)  # several chunks, the last one partial
    assert loss_module.chunk_rows(128256) == 7 and loss_module.chunk_rows(32) == 7
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian"))
    examples = [encode_sample(tokenizer, row) for row in chat_rows(3)]
    batch = PadCollator(tokenizer.pad_token_id)([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])

    chunked, standard, gradient_difference = chunked_and_standard_loss(model, batch)
    assert chunked == pytest.approx(standard, abs=1e-5) and gradient_difference < 1e-5
    assert loss_module.chunked_loss_supported(model.config)  # the tiny model is a llama

    # evaluation (eval, the merge check's peers) computes the same loss without full logits
    from llmtune.serve.inference import mean_token_loss

    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    chunked_mean = mean_token_loss(model, rows, tokenizer.pad_token_id, batch_size=2)
    monkeypatch.setattr(loss_module, "chunked_loss_supported", lambda config: False)
    assert chunked_mean == pytest.approx(mean_token_loss(model, rows, tokenizer.pad_token_id, batch_size=2), abs=1e-5)


@pytest.mark.slow
def test_plan_counts_parameters_and_steps_before_training(tiny_model, tmp_path):
    import json as json_module

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    recipe = write_recipe(tmp_path, tiny_model, rows=40, train={"batch_size": 4, "grad_accum": 2, "epochs": 3})
    result = llmtune("plan", recipe, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    plan = json_module.loads(result.stdout)
    real = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                          LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert (plan["trainable_parameters"], plan["parameters"]) == real.get_nb_trainable_parameters()
    assert plan["train_examples"] == 36 and plan["steps"] == 3 * 5  # ceil(36 / 8) per epoch
    # the rest in-process: the CLI's output is what is tested above
    from llmtune.recipe import load_recipe
    from llmtune.stages.plan import plan as make_plan
    from llmtune.stages.prepare import prepare

    loaded, run = load_recipe(recipe), tmp_path / "runs" / "tiny"
    two = make_plan(loaded, run, processes=2)
    assert two["global_batch"] == 16 and two["steps"] == 3 * 3  # ceil(36 / 16) per epoch
    memory = plan["memory_bytes"]
    assert memory["optimizer"] == 2 * memory["adapter"] and memory["total"] == sum(
        v for k, v in memory.items() if k != "total")
    assert not (tmp_path / "runs").exists()  # plan writes nothing: no run directory at all
    assert "counting tokens by preparing the data in a temporary folder" in result.stderr
    prepare(loaded, run)
    again = make_plan(loaded, run)
    assert again["tokens_counted_from"] == "prepared data (up to date)"
    assert again["tokens_per_epoch"] == plan["tokens_per_epoch"]
    nf4_plan = make_plan(load_recipe(recipe, ["model.quantize=nf4"]), run)
    assert nf4_plan["memory_bytes"]["weights"] < memory["weights"] / 2


@pytest.mark.slow
def test_no_validation_split_trains_without_eval(tiny_model, tmp_path):
    recipe_file = write_recipe(tmp_path, tiny_model, rows=16, data={"validation": {"fraction": 0.0}},
                               train={"max_steps": 2}, preview={"count": 0})
    result = llmtune("run", recipe_file, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "runs" / "tiny" / "adapter" / "manifest.json").read_text())["summary"]
    assert summary["steps"] == 2 and summary["eval_loss"] is None


def test_length_grouped_batches_are_seeded_by_epoch_and_pad_less():
    import random

    from llmtune.stages.train.sampler import SeededLengthGroupedSampler

    rng = random.Random(0)
    lengths = [rng.randrange(20, 400) for _ in range(2000)]
    sampler = SeededLengthGroupedSampler(lengths, group_size=8, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(2000)) and list(sampler) == first  # a resumed run sees the same
    sampler.set_epoch(1)
    assert list(sampler) != first

    def padding(order):
        batches = [order[i:i + 8] for i in range(0, len(order), 8)]
        cells = sum(8 * max(lengths[j] for j in batch) for batch in batches)
        return 1 - sum(lengths) / cells

    shuffled = list(range(2000))
    rng.shuffle(shuffled)
    assert padding(first) < 0.05 < 0.3 < padding(shuffled)
    batches = [first[i:i + 8] for i in range(0, 2000, 8)]
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # the longest batch first
    maxima = [max(lengths[i] for i in batch) for batch in batches[1:50]]
    assert maxima != sorted(maxima, reverse=True)  # then in no length order
    small = SeededLengthGroupedSampler(lengths[:64], group_size=8, seed=3)  # 8 batches: one group
    assert padding(list(small)) < 0.05


@pytest.mark.slow
def test_an_8bit_optimizer_checkpoints_and_resumes_exactly(tiny_model, tmp_path):
    """bitsandbytes' 8-bit AdamW runs on this CPU; its quantized states go into the checkpoint
    and a resumed run ends with the same adapter as an uninterrupted one. (r 64: bitsandbytes
    keeps tensors under 4,096 elements in 32 bits; the tiny model's 64 x 64 matrices reach it.)"""
    settings = {**RESUMABLE, "optimizer": "adamw_8bit"}
    adapter = {"dropout": 0.1, "r": 64, "alpha": 64}
    whole = tmp_path / "whole"
    recipe = write_recipe(whole, tiny_model, rows=40, adapter=adapter, train=settings, preview={"count": 0})
    prepare(load_recipe(recipe), whole / "runs" / "tiny")  # in-process: the resumed run is the CLI's
    train(load_recipe(recipe), whole / "runs" / "tiny")
    killed = tmp_path / "killed"
    recipe = write_recipe(killed, tiny_model, rows=40, adapter=adapter, train=settings, preview={"count": 0})
    prepare(load_recipe(recipe), killed / "runs" / "tiny")
    process = start_training_until(killed, recipe, 40)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    optimizer_state = killed / "runs" / "tiny" / "adapter.partial" / "checkpoints" / "checkpoint-40" / "optimizer.pt"
    import torch

    states = torch.load(optimizer_state, weights_only=False)["state"]
    # bitsandbytes nests its quantized moments under one key per parameter
    moments = [value for state in states.values() for part in state.values() if isinstance(part, dict)
               for value in part.values() if isinstance(value, torch.Tensor)]
    assert any(value.dtype == torch.uint8 for value in moments)  # 8-bit moments, not fp32
    resumed = llmtune("train", recipe, "--resume", "auto", cwd=killed)
    assert resumed.returncode == 0, resumed.stderr
    assert max_difference(adapter_weights(killed / "runs" / "tiny"), adapter_weights(whole / "runs" / "tiny")) <= 1e-5


@pytest.mark.parametrize("sets", [
    ["train.optimizer=adafactor", "train.lr=1e-2"],
    ["train.optimizer=sgd", "train.lr=5e-1"],
    ["train.optimizer=lion_8bit", "train.lr=1e-3"],
    ["adapter.loraplus_lr_ratio=16", "train.neftune_alpha=5"],
    ["adapter.layers_to_transform=[1]", "adapter.rank_pattern={q_proj: 8}", "adapter.alpha_pattern={q_proj: 4}"],
], ids=["adafactor", "sgd", "lion_8bit", "loraplus+neftune", "layers+patterns"])
def test_training_options_train(tiny_model, tmp_path, sets):
    recipe = load_recipe(write_recipe(tmp_path, tiny_model, rows=40, train={"max_steps": 12, "lr": 5e-3}), sets)
    run = tmp_path / "runs" / "tiny"
    prepare(recipe, run)
    summary = train(recipe, run).manifest["summary"]
    assert summary["eval_loss"] < summary["eval_loss_before"]
    config = __import__("json").loads((run / "adapter" / "adapter_config.json").read_text())
    if "adapter.layers_to_transform=[1]" in sets:
        weights = adapter_weights(run)
        assert all(".layers.1." in name for name in weights)
        assert weights["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape[0] == 8
        assert config["rank_pattern"] == {"q_proj": 8} and config["alpha_pattern"] == {"q_proj": 4}
        from llmtune.stages.merge import merge

        summary = merge(recipe, run).manifest["summary"]  # checked against peft's own merge
        assert summary["tensors_equal_to_peft_merge"] > 0 and summary["merged_modules"] == 7


def test_paged_optimizer_is_refused_off_cuda(tiny_model, tmp_path):
    from llmtune.errors import InputError

    recipe = load_recipe(write_recipe(tmp_path, tiny_model), ["train.optimizer=paged_adamw_8bit"])
    prepare(recipe, tmp_path / "runs" / "tiny")
    with pytest.raises(InputError, match="paged_adamw_8bit pages optimizer state"):
        train(recipe, tmp_path / "runs" / "tiny")


def test_loraplus_gives_the_b_matrices_their_own_learning_rate(tiny_model, tmp_path, monkeypatch):
    from llmtune.stages.train.trainer import GroupedTrainer

    seen = {}
    original = GroupedTrainer.create_optimizer

    def spy(self, model=None):
        optimizer = original(self, model)
        seen["groups"] = [(group["lr"], len(group["params"])) for group in optimizer.param_groups]
        return optimizer

    monkeypatch.setattr(GroupedTrainer, "create_optimizer", spy)
    recipe = load_recipe(write_recipe(tmp_path, tiny_model, train={"max_steps": 1, "lr": 1e-3}),
                         ["adapter.loraplus_lr_ratio=16"])
    prepare(recipe, tmp_path / "runs" / "tiny")
    train(recipe, tmp_path / "runs" / "tiny")
    rates = {lr for lr, count in seen["groups"] if count}
    assert rates == {1e-3, 16e-3}


@pytest.mark.slow
def test_plan_shows_each_optimizers_state(tiny_model, tmp_path):
    import json

    from llmtune.stages.memory import optimizer_state_bytes

    states = optimizer_state_bytes([(16, 2048), (2048, 16), (64,)])
    assert states["adamw"] == 8 * (2 * 16 * 2048 + 64)
    # 8-bit: a quarter of AdamW for large tensors (plus a scale per 256), 32 bits below 4,096 elements
    assert states["adamw_8bit"] == 2 * (2 * (32768 + 4 * 128)) + 2 * 4 * 64
    assert states["lion_8bit"] == (2 * (32768 + 4 * 128)) + 4 * 64
    assert states["adafactor"] == 2 * 4 * (16 + 2048) + 4 * 64 and states["sgd"] == 0
    recipe = write_recipe(tmp_path, tiny_model, train={"optimizer": "adamw_8bit"})
    plan = json.loads(llmtune("plan", recipe, "--json", cwd=tmp_path).stdout)
    assert plan["optimizer"] == "adamw_8bit"
    assert plan["memory_bytes"]["optimizer"] == plan["optimizer_state_bytes_by_choice"]["adamw_8bit"]


def test_two_micro_batches_of_one_train_what_one_batch_of_two_trains(tiny_model, tmp_path):
    """Gradient accumulation is the batch (design.md §5): batch_size 2 x grad_accum 1 and
    1 x 2 see the same examples per step, normalise the loss over the same trained tokens, and
    end with the same adapter (fp32: only the order of additions differs)."""
    adapters = []
    for batch_size, grad_accum in ((2, 1), (1, 2)):
        folder = tmp_path / f"{batch_size}x{grad_accum}"
        recipe = load_recipe(write_recipe(folder, tiny_model, rows=24, preview={"count": 0}, train={
            "max_steps": 5, "batch_size": batch_size, "grad_accum": grad_accum, "lr": 5e-3}))
        prepare(recipe, folder / "runs" / "tiny")
        train(recipe, folder / "runs" / "tiny")
        adapters.append(adapter_weights(folder / "runs" / "tiny"))
    assert max_difference(*adapters) <= 1e-5
    assert max(float(tensor.abs().max()) for tensor in adapters[0].values()) > 1e-3  # it trained
