"""`llmtune launch --engine ray` (and `llmtune run --engine ray`) on this CPU (a local Ray instance, two workers, gloo): the same
adapter as one process with the same global batch (which test_cluster.py shows equals torchrun's
two processes); a stop asked of the launcher saves a checkpoint (exit 75) and --resume auto
finishes; a worker killed mid-run is replaced by Ray, which restarts the group from the newest
checkpoint, and the adapter is still the uninterrupted one, every step logged once; an error a
restart would meet again ends the launch with its own message and exit code."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from helpers import DDP_TOLERANCE, DDP_TRAIN, adapter_weights, ddp_recipe, llmtune, max_difference, wait_for_mark
from llmtune import ray_launch
from llmtune.stages.train import checkpoints

RUN = Path("runs") / "tiny"


def _launch(folder: Path, recipe: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llmtune", "launch", str(recipe), "--engine", "ray",
                             "--workers", "2", *extra], cwd=folder,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _workers(process: subprocess.Popen) -> list[psutil.Process]:
    """The Ray Train workers the launcher's local Ray instance runs (its descendants)."""
    return [child for child in psutil.Process(process.pid).children(recursive=True)
            if child.name().startswith("ray::RayTrainW") or "RayTrainWorker" in " ".join(child.cmdline()[:1])]


def _steps_logged(folder: Path) -> list[int]:
    lines = (folder / RUN / "adapter" / "metrics.jsonl").read_text().splitlines()
    return [entry["step"] for entry in map(json.loads, lines) if "loss" in entry]


@pytest.mark.slow
def test_two_ray_workers_train_what_one_process_trains(one_process, tiny_model, tmp_path):
    """`llmtune run --engine ray`: prepare here, training on Ray, merge and export here."""
    recipe = ddp_recipe(tmp_path, tiny_model)
    result = llmtune("run", recipe, "--engine", "ray", "--workers", "2", cwd=tmp_path)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "Ray Train, 2 worker(s) x no GPU (gloo)" in out and "2 processes (ddp)" in out
    assert out.count("train: done") == 1 and "launch: done" in out  # rank 0 alone reports
    assert "train: up to date" in out and "merge: done" in out and "export: done" in out
    assert _steps_logged(tmp_path) == list(range(1, DDP_TRAIN["max_steps"] + 1))
    assert max_difference(adapter_weights(tmp_path / RUN), one_process) <= DDP_TOLERANCE
    assert not (tmp_path / RUN / "ray" / "train").exists()  # Ray's checkpoint copies, spent


@pytest.mark.slow
def test_a_stop_then_a_lost_worker_still_train_the_uninterrupted_adapter(one_process, tiny_model, tmp_path):
    recipe = ddp_recipe(tmp_path, tiny_model)
    first = _launch(tmp_path, recipe)
    wait_for_mark(tmp_path, 20, first, timeout=300)
    first.send_signal(signal.SIGTERM)  # what a scheduler sends: save a checkpoint and stop
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 75, out
    assert "interrupted at step" in out and "--engine ray --workers 2 --resume auto" in out
    partial = tmp_path / RUN / "adapter.partial"
    stopped_at = checkpoints.step_of(checkpoints.newest_good(partial / "checkpoints"))
    assert stopped_at >= 20
    reported = tmp_path / RUN / "ray" / "train" / f"checkpoint-{stopped_at}"
    assert checkpoints.is_good(reported)  # Ray's copy of it, with the resume state beside
    assert (reported / checkpoints.RESUME_STATE).is_file()

    second = _launch(tmp_path, recipe, "--resume", "auto")
    wait_for_mark(tmp_path, (stopped_at // 20 + 1) * 20, second, timeout=300)  # the next checkpoint
    workers = _workers(second)
    assert len(workers) == 2, [w.cmdline() for w in workers]
    workers[-1].kill()  # a lost worker (a node gone, OOM-killed): Ray restarts the group
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, out
    assert out.count("resuming from") >= 2  # the resume asked for, then Ray's restart
    assert _steps_logged(tmp_path) == list(range(1, DDP_TRAIN["max_steps"] + 1))  # every step once
    assert max_difference(adapter_weights(tmp_path / RUN), one_process) <= DDP_TOLERANCE


@pytest.mark.slow
def test_an_error_a_restart_would_meet_again_ends_the_launch(tiny_model, tmp_path):
    recipe = ddp_recipe(tmp_path, tiny_model)
    no_gpu = llmtune("launch", recipe, "--engine", "ray", "--workers", "2", "--gpus-per-worker", "1", cwd=tmp_path)
    assert no_gpu.returncode == 2 and "need 2 GPU(s); this machine has 0" in no_gpu.stderr  # not a wait forever

    result = llmtune("launch", recipe, "--engine", "ray", "--workers", "2",
                     "--set", "train.optimizer=paged_adamw_8bit", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "paged" in result.stderr and "Ray stopped" not in result.stderr
    assert result.stderr.count("error:") == 1


def test_ray_copy_of_a_checkpoint_is_restored_where_the_run_folder_lost_it(tmp_path):
    saved = tmp_path / "ray-copy" / "checkpoint-40"
    saved.mkdir(parents=True)
    (saved / "adapter_model.safetensors").write_bytes(b"weights")
    checkpoints.mark_good(saved)
    (saved / checkpoints.RESUME_STATE).write_text('{"depends_on": {}}\n')
    partial = tmp_path / "adapter.partial"

    restored = ray_launch.restore_checkpoint(saved, "checkpoint-40", partial)  # the folder was lost
    assert restored == partial / "checkpoints" / "checkpoint-40" and checkpoints.is_good(restored)
    assert checkpoints.read_resume_state(partial) == {"depends_on": {}}
    assert ray_launch.restore_checkpoint(saved, "checkpoint-40", partial) is None  # has it already

    shutil.rmtree(partial)
    (saved / "adapter_model.safetensors").write_bytes(b"changed")  # a copy that fails its mark
    assert ray_launch.restore_checkpoint(saved, "checkpoint-40", partial) is None
    assert checkpoints.newest_good(partial / "checkpoints") is None
