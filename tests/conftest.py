"""Fixtures: an isolated cache and no network for every test and CLI subprocess, the tiny
tokenizer and model. What tests share otherwise is in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def isolated_environment(tmp_path_factory):
    """Every test (and every CLI subprocess) uses a fresh llmtune cache and never the network."""
    os.environ["LLMTUNE_CACHE"] = str(tmp_path_factory.mktemp("llmtune-cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["COLUMNS"] = "200"  # rich wraps at the terminal width; keep messages on one line
    if os.environ.get("PYTEST_XDIST_WORKER"):  # scripts/test.sh runs two workers on two cores:
        os.environ["OMP_NUM_THREADS"] = "1"  # one thread each (and in the CLI subprocesses), not two
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    from llmtune.testing import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from llmtune.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def one_process(tiny_model, tmp_path_factory):
    """The adapter one process trains on helpers.ddp_recipe with the global batch (2): what the
    launchers' two processes must train."""
    from helpers import adapter_weights, ddp_recipe, llmtune

    folder = tmp_path_factory.mktemp("one-process")
    recipe = ddp_recipe(folder, tiny_model)
    result = llmtune("train", recipe, "--set", "train.batch_size=2", cwd=folder)
    assert result.returncode == 0, result.stderr
    return adapter_weights(folder / "runs" / "tiny")
