"""The GPU paths, reached on the CPU wherever their behaviour can be: a host with several GPUs
(faked device count), fp16 with loss scaling (torch's CPU GradScaler, the pre-Ampere path),
strategies in one process, the process group's settings, torchrun's flags on older torch, and
the memory each stage needs. What only a GPU can show is scripts/gpu_check.sh's (issue #28)."""

from __future__ import annotations

import functools
import importlib

import pytest

from conftest import write_recipe
from llmtune.recipe import DistributedSection, load_recipe
from llmtune.stages.prepare import prepare

train_module = importlib.import_module("llmtune.stages.train")


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

    model = train_module._adapter_model(recipe, model_sources.resolve(str(tiny_model)), "fp16")
    trainable = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
    assert any("modules_to_save" in name for name in trainable)
    assert set(trainable.values()) == {__import__("torch").float32}


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_a_sharding_strategy_in_one_process_trains_as_usual_and_says_so(tiny_model, tmp_path, strategy, capsys):
    recipe, run = _prepared(tiny_model, tmp_path, [f"distributed.strategy={strategy}"],
                            train={"max_steps": 2})
    summary = train_module.train(recipe, run).manifest["summary"]
    assert summary["steps"] == 2
    assert f"distributed.strategy {strategy} applies to several processes" in capsys.readouterr().out


def test_strategies_in_several_processes_map_to_the_trainer_or_are_refused():
    from llmtune.errors import InputError
    from llmtune.stages.distributed import process_group_backend, strategy_arguments

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
