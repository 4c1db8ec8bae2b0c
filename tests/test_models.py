"""Model sources: hub ids through the offline cache, local folders, fingerprints, errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from llmtune import models
from llmtune.errors import InputError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _resolve_in_subprocess(source: str, hub_cache) -> subprocess.CompletedProcess:
    # huggingface_hub reads HF_HUB_CACHE when imported, so use a fresh interpreter
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    code = (
        "from llmtune import models\n"
        "from llmtune.errors import InputError\n"
        f"try:\n    r = models.resolve({source!r})\n    print(r.kind, r.revision, r.fingerprint, r.local_dir)\n"
        "except InputError as e:\n    print('InputError:', e.message)\n"
    )
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_hub_id_resolves_from_the_offline_cache(tiny_model, tmp_path):
    snapshot = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / COMMIT
    shutil.copytree(tiny_model, snapshot)
    (tmp_path / "hub" / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny" / "refs" / "main").write_text(COMMIT)
    result = _resolve_in_subprocess("acme/tiny", tmp_path / "hub")
    assert result.returncode == 0, result.stderr
    kind, revision, fingerprint, local = result.stdout.split()
    assert (kind, revision, fingerprint) == ("hub", COMMIT, f"hub:acme/tiny@{COMMIT}")
    assert local.endswith(COMMIT)


def test_hub_id_missing_offline_is_a_clear_error(tmp_path):
    result = _resolve_in_subprocess("acme/absent", tmp_path / "empty-hub")
    assert result.returncode == 0, result.stderr
    assert "InputError: model.path: could not get 'acme/absent' from the hub cache" in result.stdout


def test_local_folder_fingerprint_follows_the_weights(tiny_model, tmp_path):
    from llmtune.testing import build_tiny_model

    first = models._folder_fingerprint(tiny_model)
    assert first == models._folder_fingerprint(tiny_model)
    other = build_tiny_model(tmp_path / "other", seed=1)
    assert models._folder_fingerprint(other) != first
    ref = models.resolve(str(tiny_model))
    assert ref.kind == "local" and ref.fingerprint == first


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(InputError, match="GGUF file not found"):
        models.resolve(str(tmp_path / "missing.gguf"))
    with pytest.raises(InputError, match="without config.json"):
        models.resolve(str(tmp_path))
    with pytest.raises(InputError, match="not found"):
        models.resolve("./nowhere")
    with pytest.raises(InputError, match="unknown embedded model"):
        models.resolve("embedded:gpt-9")
