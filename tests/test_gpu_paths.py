"""The GPU paths, reached on the CPU wherever their behaviour can be: a host with several GPUs
(faked device count), fp16 with loss scaling (torch's CPU GradScaler, the pre-Ampere path),
strategies in one process, the process group's settings, torchrun's flags on older torch, and
the memory each stage needs. What only a GPU can show is scripts/gpu_check.sh's (issue #28)."""

from __future__ import annotations

import functools
import importlib

import pytest

from helpers import write_recipe
from llmtune.recipe import DistributedSection, load_recipe
from llmtune.stages.prepare import prepare

train_module = importlib.import_module("llmtune.stages.train")
build = importlib.import_module("llmtune.stages.train.build")


def _prepared(tiny_model, tmp_path, sets=(), **sections):
    recipe = load_recipe(write_recipe(tmp_path, tiny_model, rows=40, **sections), list(sets))
    run = tmp_path / "runs" / "tiny"
    prepare(recipe, run)
    return recipe, run


def test_one_process_on_a_host_with_two_gpus_trains_with_its_own_batch(tiny_model, tmp_path, monkeypatch):
    """transformers counts every visible GPU of a process not launched distributed and wraps the
    model in nn.DataParallel (no autocast, batch x GPUs onto cuda:0). Faked here: the Trainer's
    device set-up reports two GPUs, as on such a host. One process must train on one device:
    36 examples in batches of 4 are 9 steps, not 5 of 8."""
    from torch import nn
    from transformers import Trainer, TrainingArguments

    setup = TrainingArguments.__dict__["_setup_devices"]

    def two_gpus(self):
        device = setup.func(self)
        self._n_gpu = 2  # what _setup_devices sets on a host with two visible GPUs
        return device

    patched = functools.cached_property(two_gpus)
    patched.__set_name__(TrainingArguments, "_setup_devices")
    monkeypatch.setattr(TrainingArguments, "_setup_devices", patched)
    wrapped = []
    original_wrap = Trainer._wrap_model
    monkeypatch.setattr(Trainer, "_wrap_model", lambda self, model, *a, **k: wrapped.append(
        type(r := original_wrap(self, model, *a, **k))) or r)

    recipe, run = _prepared(tiny_model, tmp_path, train={"epochs": 1, "batch_size": 4})
    summary = train_module.train(recipe, run).manifest["summary"]
    assert summary["steps"] == 9
    assert nn.DataParallel not in wrapped


@pytest.mark.parametrize("sets", [
    ["adapter.modules_to_save=[lm_head]"],
    ["adapter.modules_to_save=[lm_head]", "model.quantize=nf4"],
], ids=["lora", "qlora"])
def test_fp16_with_loss_scaling_trains_modules_to_save_in_fp32(tiny_model, tmp_path, sets):
    """precision fp16 (what `auto` picks on GPUs before compute capability 8.0) runs on the CPU
    with torch's GradScaler. peft upcasts only its adapter layers: a modules_to_save copy left
    in fp16 stopped the scaler at step 1 ("Attempting to unscale FP16 gradients")."""
    recipe, run = _prepared(tiny_model, tmp_path, sets, train={"max_steps": 6, "lr": 5e-3, "precision": "fp16"})
    summary = train_module.train(recipe, run).manifest["summary"]
    assert summary["precision"] == "fp16" and summary["eval_loss"] < summary["eval_loss_before"]

    from llmtune import model_sources

    model = build.adapter_model(recipe, model_sources.resolve(str(tiny_model)), "fp16")
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    trainable = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
    assert any("modules_to_save" in name for name in trainable)
    assert set(trainable.values()) == {torch.float32}
    # outside autocast (GRPO generates there, with peft casting its layers' inputs) the fp32
    # copy takes and gives the frozen dtype
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = True
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[5, 6, 7]])).logits.dtype == torch.float16


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_a_sharding_strategy_in_one_process_trains_as_usual_and_says_so(tiny_model, tmp_path, strategy, capsys):
    recipe, run = _prepared(tiny_model, tmp_path, [f"distributed.strategy={strategy}"],
                            train={"max_steps": 2})
    summary = train_module.train(recipe, run).manifest["summary"]
    assert summary["steps"] == 2
    assert f"distributed.strategy {strategy} applies to several processes" in capsys.readouterr().out


def test_strategies_in_several_processes_map_to_the_trainer_or_are_refused():
    from llmtune.errors import InputError
    from llmtune.stages.train.distributed import process_group_backend, strategy_arguments

    ddp = strategy_arguments(DistributedSection(timeout_minutes=45), "cuda", "none", processes=2)
    assert ddp == {"ddp_find_unused_parameters": False, "ddp_timeout": 2700}
    assert strategy_arguments(DistributedSection(strategy="fsdp"), "cpu", "none", processes=1) == {}
    with pytest.raises(InputError, match="needs CUDA"):
        strategy_arguments(DistributedSection(strategy="fsdp"), "cpu", "none", processes=2)
    fsdp = strategy_arguments(DistributedSection(strategy="fsdp", cpu_offload=True), "cuda", "none", processes=2)
    assert fsdp["fsdp_config"]["cpu_ram_efficient_loading"] and fsdp["fsdp_config"]["cpu_offload"]
    qlora = strategy_arguments(DistributedSection(strategy="fsdp"), "cuda", "nf4", processes=2)
    assert not qlora["fsdp_config"]["cpu_ram_efficient_loading"]  # accelerate leaves 4-bit weights out
    # DeepSpeed's optimizer offload runs its CPU AdamW whatever the recipe's optimizer says
    with pytest.raises(InputError, match="in place of train.optimizer adamw_8bit"):
        strategy_arguments(DistributedSection(strategy="deepspeed", cpu_offload=True), "cuda", "none",
                           "adamw_8bit", processes=2)
    # FSDP's offloaded parameters and gradient-norm reduction are CPU tensors: gloo beside NCCL
    assert process_group_backend(DistributedSection(strategy="fsdp"), "cuda") == "cuda:nccl,cpu:gloo"
    assert process_group_backend(DistributedSection(strategy="ddp"), "cuda") is None
    assert process_group_backend(DistributedSection(strategy="fsdp"), "cpu") is None


def test_torchrun_without_the_newer_flags_gets_none_of_them(monkeypatch):
    """torch before 2.12: torchrun refuses --signals-to-handle and --shutdown-timeout
    ("unrecognized arguments"), and SIGUSR1 would end torchrun itself: the stop goes as SIGTERM."""
    import argparse

    import torch.distributed.run as torchrun

    from llmtune import cluster

    older = argparse.ArgumentParser()
    older.add_argument("--nproc-per-node")
    monkeypatch.setattr(torchrun, "get_args_parser", lambda: older)
    features = cluster.torchrun_features()
    assert features == frozenset()
    args = cluster.torchrun_args(2, features=features)
    assert args == ["--nproc-per-node=2", "--standalone"]
    assert cluster.stop_signal(features) == "TERM"
    script = cluster.sbatch_script(cluster.SlurmJob(
        job_name="j", recipe="r.yaml", llmtune_args=(), python="python3", workdir="/w", log_file="l",
        torchrun_features=features))
    assert "--signals-to-handle" not in script and "--shutdown-timeout" not in script
    assert "step TERM srun" in script and "30 s to save" in script
    monkeypatch.undo()
    assert cluster.torchrun_features() == cluster.NEWER_TORCHRUN  # this torch (2.13) has both


STAND_IN_PYTHON = """#!/bin/bash
# stand-in python for the sbatch script: each llmtune step records itself; `run` takes a while
echo "$*" >> "$STEPS_LOG"
case "$*" in
  *"llmtune run"*) touch "$RUN_STARTED"; exec sleep 30 ;;
esac
exit 0
"""


def test_sbatch_script_requeues_when_the_signal_comes_during_merge_and_export(tmp_path):
    """SLURM's warning during the final `llmtune run` (merge, export) requeued nothing before:
    the job ran into its time limit. Every step now stops on the signal and the job requeues.
    Also: CPUs per task by default, srun told them, a rendezvous port from the job id."""
    import os
    import signal as signals
    import subprocess
    import time

    from llmtune import cluster

    python = tmp_path / "python"
    python.write_text(STAND_IN_PYTHON)
    python.chmod(0o755)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == -* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text('#!/bin/bash\ncase "$1" in show) echo localhost ;; '
                                      'requeue) echo "requeue $2" >> "$SCONTROL_LOG" ;; esac\n')
    for name in ("srun", "scontrol"):
        (bin_dir / name).chmod(0o755)
    job = cluster.SlurmJob(job_name="j", recipe="r.yaml", llmtune_args=(), python=str(python),
                           workdir=str(tmp_path), log_file="l", nproc_per_node=2)
    script = tmp_path / "job.sbatch"
    script.write_text(cluster.sbatch_script(job))
    text = script.read_text()
    assert "#SBATCH --cpus-per-task=8" in text and 'SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK' in text
    assert "RDZV_PORT=$((20000 + SLURM_JOB_ID % 20000))" in text

    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "localhost", "SCONTROL_LOG": str(tmp_path / "scontrol.log"),
           "STEPS_LOG": str(tmp_path / "steps.log"), "RUN_STARTED": str(tmp_path / "run-started")}
    process = subprocess.Popen(["bash", str(script)], env=env, cwd=tmp_path, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not (tmp_path / "run-started").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0]
        time.sleep(0.05)
    started = time.monotonic()
    process.send_signal(signals.SIGUSR1)
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 0, out
    assert time.monotonic() - started < 20  # the 30 s step was stopped, not waited for
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    steps = (tmp_path / "steps.log").read_text()
    assert "llmtune prepare" in steps and "torch.distributed.run" in steps and "llmtune run" in steps
    assert "--rdzv-endpoint=localhost:24242" in steps


def test_ranks_wait_the_recipes_timeout_and_the_base_is_fetched_before_they_start(tiny_model, tmp_path,
                                                                                   monkeypatch, capsys):
    """A big base's download, conversion or hashing on rank 0 outlasted torch's 10-minute
    collective timeout while the other ranks waited: the group waits distributed.timeout_minutes,
    and `llmtune prepare` (one process, before any launcher) fetches and fingerprints the base."""
    import json
    from datetime import timedelta

    import accelerate

    from llmtune.stages.train import distributed

    made = []
    monkeypatch.setattr(accelerate, "PartialState", lambda **kwargs: made.append(kwargs))
    monkeypatch.setenv("WORLD_SIZE", "2")
    distributed.start("cuda", DistributedSection(strategy="fsdp", timeout_minutes=45))
    assert made == [{"cpu": False, "timeout": timedelta(minutes=45), "backend": "cuda:nccl,cpu:gloo"}]
    monkeypatch.setenv("WORLD_SIZE", "1")

    recipe = load_recipe(write_recipe(tmp_path, tiny_model, rows=40))
    prepare(recipe, tmp_path / "runs" / "tiny", fetch_base=True)
    assert "ready for training" in capsys.readouterr().out
    from llmtune.model_sources import cache_dir

    known = json.loads((cache_dir() / "file-hashes.json").read_text())
    assert any(name.endswith("model.safetensors") and str(tiny_model) in name for name in known)


def test_losses_keep_no_layer_outputs_and_softcapped_heads_are_chunked_too(tiny_model, tokenizer):
    """Evaluation's loss took the last hidden state from output_hidden_states=True, which keeps
    every layer's output for the batch (an 8B Llama at 8 x 2048 tokens: 4.4 GB); Gemma's
    soft-capped head built the batch's full logits and an fp32 copy. Both now come in chunks from
    the decoder's output alone, equal to the model's own loss."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma2Config

    from helpers import chat_rows
    from llmtune.data.chat import encode_sample
    from llmtune.serve.inference import mean_token_loss
    from llmtune.stages.collate import PadCollator
    from llmtune.stages.train import loss as loss_module

    examples = [encode_sample(tokenizer, row) for row in chat_rows(3)]
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    batch = PadCollator(tokenizer.pad_token_id)(rows)
    torch.manual_seed(0)
    gemma = AutoModelForCausalLM.from_config(Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, final_logit_softcapping=3.0,
        pad_token_id=tokenizer.pad_token_id))
    llama = AutoModelForCausalLM.from_pretrained(tiny_model)
    for model in (llama, gemma):
        assert loss_module.chunked_loss_supported(model.config)
        seen = []
        model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True)
        with torch.no_grad():
            expected = float(model(**batch).loss)
            summed, count, _ = loss_module.summed_token_loss(model, dict(batch))
            mean = mean_token_loss(model, rows, tokenizer.pad_token_id, batch_size=2)
        assert float(summed) / count == pytest.approx(expected, abs=1e-5)
        assert mean == pytest.approx(expected, abs=1e-5)
        assert not any(kwargs.get("output_hidden_states") for kwargs in seen[1:])


def test_plan_counts_what_the_device_and_the_sharding_hold(tmp_path):
    """plan priced every device like the CPU, whose attention kernel materialises the scores
    (GPU kernels do not), and ignored FSDP/ZeRO sharding: both now count, per process."""
    from helpers import REPO
    from llmtune.stages.plan import plan

    path = REPO / "recipes" / "library" / "llama-3.2-1b-lora.yaml"
    run = tmp_path / "run"
    cpu = plan(load_recipe(path, ["train.precision=bf16"]), run, device="cpu")["memory_bytes"]
    gpu = plan(load_recipe(path), run, device="cuda")["memory_bytes"]
    scores = 4 * 32 * 2048 * 2048 * 2  # one layer's attention probabilities (recomputed in backward)
    assert cpu["activations"] - gpu["activations"] == scores
    ddp = plan(load_recipe(path), run, processes=2, device="cuda")["memory_bytes"]
    assert ddp == gpu  # DDP: every GPU holds everything
    fsdp = plan(load_recipe(path, ["distributed.strategy=fsdp"]), run, processes=2, device="cuda")["memory_bytes"]
    assert fsdp["weights"] == gpu["weights"] // 2 and fsdp["optimizer"] == gpu["optimizer"] // 2
    zero2 = plan(load_recipe(path, ["distributed.strategy=deepspeed", "distributed.cpu_offload=true"]), run,
                 processes=2, device="cuda")["memory_bytes"]
    assert zero2["weights"] == gpu["weights"] and zero2["optimizer"] == 0
    one = plan(load_recipe(path, ["distributed.strategy=fsdp"]), run, processes=1, device="cuda")["memory_bytes"]
    assert one == gpu  # one process ignores the section


def test_free_gpu_memory_counts_what_the_caching_allocator_holds_unused(monkeypatch):
    """mem_get_info counts the blocks torch's caching allocator keeps for reuse as taken: after
    eval dropped base+adapter, generation batches for the merged model were sized as if that
    memory were gone. Faked device figures: 2 GB free, 10 GB reserved of which 4 GB allocated."""
    import torch

    from llmtune import models

    gb = 10**9
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2 * gb, 80 * gb))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 10 * gb)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 4 * gb)
    assert models.free_memory(torch.device("cuda", 0)) == 8 * gb
    # merge, eval's merged model and the GGUF check go to the CPU when their model does not fit
    monkeypatch.setattr(models, "local_device", lambda: torch.device("cuda", 0))
    assert models.fitting_device(5 * gb, "merge") == torch.device("cuda", 0)
    assert models.fitting_device(7 * gb, "merge") == torch.device("cpu")


def test_a_qlora_adapter_is_evaluated_on_the_base_quantized_as_trained(tiny_model, tmp_path):
    """eval, preview, generate and chat loaded a QLoRA adapter's base unquantized: on the GPU it
    was trained on, an 8B base in bf16 (16 GB) where 4-bit training took 6 GB."""
    from llmtune import model_sources
    from llmtune.serve.inference import adapter_on_base

    recipe, run = _prepared(tiny_model, tmp_path, ["model.quantize=nf4"], train={"max_steps": 2})
    train_module.train(recipe, run)
    model = adapter_on_base(run / "adapter", model_sources.resolve(str(tiny_model)), "fp32")
    packed = {type(p).__name__ for name, p in model.named_parameters() if "q_proj.base_layer" in name}
    assert packed == {"Params4bit"}
