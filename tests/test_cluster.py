"""Scale-out on CPU (gloo): 2-process DDP through torchrun equals 1 process with the same global
batch; SIGTERM stops every rank at one checkpoint and --resume auto completes the run; the
generated sbatch script survives a preemption with stand-in srun/scontrol commands."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import (
    DDP_TOLERANCE,
    DDP_TRAIN,
    adapter_weights,
    ddp_recipe,
    free_port,
    llmtune,
    max_difference,
    wait_for_mark,
    write_recipe,
)
from llmtune import cluster
from llmtune.stages.train import checkpoints


def test_torchrun_command_lines():
    assert cluster.torchrun_args(2) == [
        "--nproc-per-node=2", "--standalone",
        "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout=120"]
    multi = cluster.torchrun_args(8, nnodes=4, rdzv_endpoint="node1:29500", rdzv_id="job7")
    assert multi[:5] == ["--nproc-per-node=8", "--nnodes=4", "--rdzv-backend=c10d",
                         "--rdzv-endpoint=node1:29500", "--rdzv-id=job7"]
    with pytest.raises(ValueError, match="rendezvous endpoint"):
        cluster.torchrun_args(8, nnodes=2)


def test_other_stages_refuse_to_run_under_a_launcher(tiny_model, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model)
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    result = subprocess.run([sys.executable, "-m", "llmtune", "run", str(recipe)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "prepare runs in one process" in result.stderr
    assert not (tmp_path / "runs" / "tiny" / "prepared").exists()


@pytest.mark.slow
def test_launch_checks_its_inputs_before_starting_torchrun(tiny_model, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model)
    result = llmtune("launch", recipe, "--nnodes", "2", cwd=tmp_path)
    assert result.returncode == 2 and "--rdzv-endpoint" in result.stderr
    unprepared = llmtune("launch", recipe, "--nproc", "2", cwd=tmp_path)  # said once, before torchrun
    assert unprepared.returncode == 2 and unprepared.stderr.count("no finished prepare stage") == 1
    assert "run: llmtune prepare" in unprepared.stderr and "launch:" not in unprepared.stdout


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(one_process, tiny_model, tmp_path):
    recipe = ddp_recipe(tmp_path, tiny_model)
    result = llmtune("launch", recipe, "--nproc", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "launch: " in result.stdout and "--nproc-per-node=2 --standalone" in result.stdout
    assert "2 processes (ddp)" in result.stdout
    assert result.stdout.count("train: done") == 1  # rank 0 alone reports and writes
    metrics = (tmp_path / "runs" / "tiny" / "adapter" / "metrics.jsonl").read_text().splitlines()
    assert sum('"loss"' in line for line in metrics) == DDP_TRAIN["max_steps"]  # one row per step
    assert max_difference(adapter_weights(tmp_path / "runs" / "tiny"), one_process) <= DDP_TOLERANCE


def test_qlora_under_fsdp_stores_its_4bit_weights_in_the_compute_dtype(tiny_model):
    """FSDP shards tensors of one dtype: QLoRA's 4-bit weights are stored in the compute dtype
    then (peft's QLoRA + FSDP recipe), in uint8 otherwise. Sharding itself needs GPUs
    (accelerate applies FSDP to GPU process groups only); scripts/gpu_check.sh runs it."""
    import torch

    from llmtune import model_sources, models

    ref = model_sources.resolve(str(tiny_model))
    for shardable, storage in ((True, torch.bfloat16), (False, torch.uint8)):
        model = models.load_model(ref, "bf16", quantize="nf4", shardable=shardable, device=None)
        packed = {p.dtype for n, p in model.named_parameters() if type(p).__name__ == "Params4bit"}
        assert packed == {storage}


@pytest.mark.slow
def test_accelerate_launch_trains_the_same(one_process, tiny_model, tmp_path):
    """`llmtune train` unchanged under accelerate's launcher (its --multi_gpu mode is torchrun
    underneath; on a CPU-only machine the ranks use gloo)."""
    recipe = ddp_recipe(tmp_path, tiny_model)
    accelerate = Path(sys.executable).with_name("accelerate")
    result = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "llmtune", "train", str(recipe)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "2 processes (ddp)" in result.stdout
    assert max_difference(adapter_weights(tmp_path / "runs" / "tiny"), one_process) <= DDP_TOLERANCE


@pytest.mark.slow
def test_sigterm_checkpoints_every_rank_at_one_step_then_resumes(one_process, tiny_model, tmp_path):
    recipe = ddp_recipe(tmp_path, tiny_model)
    job = subprocess.Popen([sys.executable, "-m", "llmtune", "launch", str(recipe), "--nproc", "2"],
                           cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_mark(tmp_path, 20, job)
    job.send_signal(signal.SIGTERM)
    out, err = job.communicate(timeout=180)  # no hang
    assert job.returncode == 75, err
    assert "interrupted at step" in err and "--resume auto" in err
    newest = checkpoints.newest_good(tmp_path / "runs" / "tiny" / "adapter.partial" / "checkpoints")
    assert newest is not None and checkpoints.step_of(newest) > 20  # saved where it stopped
    assert (newest / "rng_state_0.pth").is_file() and (newest / "rng_state_1.pth").is_file()

    resumed = llmtune("launch", recipe, "--nproc", "2", "--resume", "auto", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    assert max_difference(adapter_weights(tmp_path / "runs" / "tiny"), one_process) <= DDP_TOLERANCE


STAND_IN_SRUN = """#!/bin/bash
# stand-in srun: one task on this machine; drops srun's own options and becomes the command
while [[ "$1" == -* ]]; do shift; done
exec "$@"
"""
STAND_IN_SCONTROL = """#!/bin/bash
# stand-in scontrol: the node list is this machine; a requeue is recorded
case "$1 $2" in
  "show hostnames") echo localhost ;;
  requeue*) echo "requeue $2" >> "$SCONTROL_LOG" ;;
  *) echo "stand-in scontrol: unexpected $*" >&2; exit 1 ;;
esac
"""


@pytest.mark.slow
def test_sbatch_script_survives_preemption_and_requeue(one_process, tiny_model, tmp_path):
    recipe = ddp_recipe(tmp_path, tiny_model)
    made = llmtune("slurm", recipe, "--nodes", "1", "--gpus-per-node", "0", "--nproc-per-node", "2",
                   "--time", "00:30:00", "--partition", "debug", "--port", str(free_port()), cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    script = tmp_path / "runs" / "tiny" / "slurm.sbatch"
    assert f"sbatch {script.relative_to(tmp_path)}" in made.stdout
    text = script.read_text()
    assert "#SBATCH --signal=B:USR1@90" in text and "#SBATCH --requeue" in text
    assert "#SBATCH --partition=debug" in text and "--gpus-per-node" not in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", STAND_IN_SRUN), ("scontrol", STAND_IN_SCONTROL)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "localhost", "SCONTROL_LOG": str(tmp_path / "scontrol.log")}

    def job(**extra):
        return subprocess.Popen(["bash", str(script)], cwd=tmp_path, env={**env, **extra},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    first = job()
    wait_for_mark(tmp_path, 20, first)
    first.send_signal(signal.SIGUSR1)  # what SLURM sends the batch shell 90 s before the limit
    out, _ = first.communicate(timeout=180)
    assert first.returncode == 0, out
    assert "USR1 received" in out and "requeued job 4242" in out
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    partial = tmp_path / "runs" / "tiny" / "adapter.partial"
    assert checkpoints.step_of(checkpoints.newest_good(partial / "checkpoints")) > 20

    second = job(SLURM_RESTART_COUNT="1")  # the requeued job
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, out
    assert "resuming from" in out and "merge: done" in out and "export: done" in out
    assert max_difference(adapter_weights(tmp_path / "runs" / "tiny"), one_process) <= DDP_TOLERANCE

    third = job(SLURM_RESTART_COUNT="2")  # a finished job run again
    out, _ = third.communicate(timeout=300)
    assert third.returncode == 0, out
    assert "train: up to date" in out and "step 1/" not in out and "merge: up to date" in out
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"  # no further requeue


def test_plain_slurm_template_is_the_generated_script():
    from llmtune.cluster import TEMPLATE_JOB, sbatch_script

    template = Path(__file__).resolve().parent.parent / "scripts" / "slurm" / "llmtune.sbatch"
    assert template.read_text() == sbatch_script(TEMPLATE_JOB), "run: python scripts/make_slurm_template.py"
    assert subprocess.run(["bash", "-n", str(template)]).returncode == 0


def test_distributed_strategies_map_to_the_trainer_or_are_refused(monkeypatch):
    from llmtune.errors import InputError
    from llmtune.recipe import DistributedSection
    from llmtune.stages.train.distributed import shards_quantized_weights, strategy_arguments

    assert strategy_arguments(DistributedSection(), "cpu", "nf4", processes=2) == {
        "ddp_find_unused_parameters": False, "ddp_timeout": 1800}
    with pytest.raises(InputError, match="needs CUDA"):
        strategy_arguments(DistributedSection(strategy="fsdp"), "cpu", "none", processes=2)
    with pytest.raises(InputError, match="int8"):
        strategy_arguments(DistributedSection(strategy="deepspeed"), "cuda", "int8", processes=2)
    fsdp = strategy_arguments(DistributedSection(strategy="fsdp", cpu_offload=True), "cuda", "nf4", processes=2)
    assert fsdp["fsdp"] is True and fsdp["fsdp_config"]["version"] == 2 and fsdp["fsdp_config"]["cpu_offload"]
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        with pytest.raises(InputError, match="needs the deepspeed package"):
            strategy_arguments(DistributedSection(strategy="deepspeed"), "cuda", "none", processes=2)
    # QLoRA's 4-bit weights are stored shardable exactly when the strategy shards weights, which
    # takes several processes
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert shards_quantized_weights(DistributedSection(strategy="fsdp"), "nf4")
    assert shards_quantized_weights(DistributedSection(strategy="deepspeed", zero_stage=3), "fp4")
    assert not shards_quantized_weights(DistributedSection(strategy="deepspeed", zero_stage=2), "nf4")
    assert not shards_quantized_weights(DistributedSection(strategy="ddp"), "nf4")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not shards_quantized_weights(DistributedSection(strategy="fsdp"), "nf4")
