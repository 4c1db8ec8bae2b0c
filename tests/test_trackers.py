"""Trackers: TensorBoard and Weights & Biases (offline) log a run under <run>/logs; a tracker that
is not installed stops training before it starts; credentials never reach the run directory."""

from __future__ import annotations

import importlib.util
import os

import pytest

from helpers import llmtune, write_recipe

SECRET = "sekrit-llmtune-test-key-4f1d"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("wandb") is None or importlib.util.find_spec("tensorboard") is None,
                    reason="the dev set-up installs tensorboard and wandb")
def test_tensorboard_and_wandb_log_the_run_and_never_see_the_key_written(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = write_recipe(tmp_path, tiny_model, rows=24,
                          train={"max_steps": 3, "report_to": ["tensorboard", "wandb"]})
    result = llmtune("run", recipe, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "runs" / "tiny"
    events = list((run / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert list((run / "logs" / "wandb").glob("offline-run-*"))
    assert not list((run / "adapter").rglob("events.out.tfevents.*"))  # logs stay out of the adapter
    for path in [*tmp_path.rglob("*")]:
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in result.stdout + result.stderr


@pytest.mark.slow
def test_a_tracker_that_is_not_installed_stops_before_training(tiny_model, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model, rows=24, train={"max_steps": 2, "report_to": ["mlflow"]})
    if importlib.util.find_spec("mlflow") is not None:
        pytest.skip("mlflow is installed here")
    result = llmtune("run", recipe, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "train.report_to: mlflow is not installed" in result.stderr and "pip install mlflow" in result.stderr
    assert not (tmp_path / "runs" / "tiny" / "adapter.partial").exists()
    assert os.environ.get("MLFLOW_TRACKING_URI") is None
