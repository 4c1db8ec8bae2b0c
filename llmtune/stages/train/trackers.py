"""Experiment trackers (TensorBoard, Weights & Biases, MLflow) through transformers' own callbacks.

Asked for in `train.report_to`; each must be installed, or training stops before it starts with
the package to install. They write under `<run>/logs/` (never into the adapter folder), unless
the user's environment already points them elsewhere (TENSORBOARD_LOGGING_DIR, WANDB_DIR,
MLFLOW_TRACKING_URI, …). Credentials (WANDB_API_KEY, MLFLOW_TRACKING_TOKEN, …) come only from
the environment and are read by the tracker libraries themselves: llmtune never reads, logs or
writes them.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llmtune.errors import InputError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_installed(names: list[str]) -> None:
    missing = [name for name in names if importlib.util.find_spec(PACKAGES[name]) is None]
    if missing:
        raise InputError(f"train.report_to: {', '.join(missing)} is not installed",
                         hint=f"pip install {' '.join(PACKAGES[name] for name in missing)}, "
                              "or remove it from train.report_to")


@contextmanager
def tracker_environment(names: list[str], run: Path, run_name: str) -> Iterator[None]:
    """Point the trackers at <run>/logs for as long as training runs (the user's settings win)."""
    logs = (run / "logs").resolve()
    wanted = {}
    if "tensorboard" in names:
        wanted["TENSORBOARD_LOGGING_DIR"] = str(logs / "tensorboard")
    if "wandb" in names:
        wanted.update(WANDB_DIR=str(logs), WANDB_PROJECT="llmtune")
    if "mlflow" in names:
        wanted.update(MLFLOW_TRACKING_URI=(logs / "mlruns").as_uri(), MLFLOW_EXPERIMENT_NAME=run_name)
    added = {key: value for key, value in wanted.items() if key not in os.environ}
    if names:
        logs.mkdir(parents=True, exist_ok=True)
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)
