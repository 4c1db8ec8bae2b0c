"""`llmtune push` against a local stand-in of the Hub's HTTP API (tests/hub_standin.py) that the
real huggingface_hub client talks to. The stand-in declares every file a "regular" upload, so
the client sends it inline in the commit; the LFS/Xet transfer of large files is the client's
own and is not exercised here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from helpers import write_recipe
from hub_standin import Hub

TOKEN = "hf_standin_secret_token_123"


@pytest.fixture(scope="module")
def finished_run(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("push")
    recipe = write_recipe(folder, tiny_model, rows=24, train={"max_steps": 2}, preview={"count": 0},
                          export={"formats": ["hf", "adapter"]})
    result = _llmtune(["run", str(recipe)], folder, {})
    assert result.returncode == 0, result.stderr
    return folder, recipe


def _llmtune(args, cwd, env, hub=None):
    environment = {**os.environ, "HF_HUB_OFFLINE": "0", **env}
    environment.pop("HF_TOKEN", None)
    if hub is not None:
        environment["HF_ENDPOINT"] = hub.endpoint
    environment.update(env)
    return subprocess.run([sys.executable, "-m", "llmtune", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_push_uploads_the_run_with_its_card_and_recipe_and_no_secrets(finished_run, tmp_path):
    folder, _ = finished_run
    with Hub() as hub:
        result = _llmtune(["push", "runs/tiny", "--repo", "me/tiny-tuned", "--private"], folder,
                          {"HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf")}, hub)
        assert result.returncode == 0, result.stdout + result.stderr
        files = hub.files("me/tiny-tuned")
        assert hub.repos["me/tiny-tuned"]["private"] is True
        assert any(headers.get("authorization") == f"Bearer {TOKEN}" for _, _, headers in hub.requests)
    # the merged model at the root, the adapter beside it, the card and the recipe
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "recipe.yaml",
            "adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= set(files)
    assert "manifest.json" not in files
    card = files["README.md"].decode()
    assert card.startswith("---\n") and "## This repository" in card and "tiny" in card
    recipe = yaml.safe_load(files["recipe.yaml"])
    assert recipe["data"]["train"][0]["path"] == "data/train.jsonl"
    # no token and no path of this machine in anything that was sent
    local = str(folder.resolve())
    for name, content in files.items():
        assert TOKEN.encode() not in content, name
        if not name.endswith(".safetensors"):
            assert local not in content.decode(), name
            assert str(tmp_path) not in content.decode(), name
    assert TOKEN not in result.stdout + result.stderr
    config = json.loads(files["adapter/adapter_config.json"])
    assert not os.path.isabs(config["base_model_name_or_path"])
    # the weights were hard-linked and the text copied: the run's own files are as they were
    assert _llmtune(["inspect", "runs/tiny"], folder, {}).returncode == 0


def test_push_of_the_adapter_alone_to_a_branch(finished_run, tmp_path):
    folder, _ = finished_run
    with Hub() as hub:
        result = _llmtune(["push", "runs/tiny", "--repo", "me/tiny-adapter", "--what", "adapter",
                           "--revision", "v1"], folder, {"HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf")}, hub)
        assert result.returncode == 0, result.stdout + result.stderr
        files = hub.files("me/tiny-adapter", "v1")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "recipe.yaml"} <= set(files)
    assert "model.safetensors" not in files and "library_name: peft" in files["README.md"].decode()


def test_push_refuses_a_changed_output_an_unfinished_stage_and_a_missing_token(finished_run, tmp_path, monkeypatch):
    folder, _ = finished_run
    env = {"HF_HOME": str(tmp_path / "hf")}
    with Hub() as hub:
        missing = _llmtune(["push", "runs/tiny", "--repo", "me/x"], folder, env, hub)
        assert missing.returncode == 2 and "no Hugging Face token" in missing.stderr
        assert not hub.repos  # nothing was created
    # offline, or a Hub that cannot be reached: one line, where it used to be a traceback
    offline = _llmtune(["push", "runs/tiny", "--repo", "me/x"], folder, {**env, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 2 and "push to me/x: offline (HF_HUB_OFFLINE is set)" in offline.stderr
    unreachable = _llmtune(["push", "runs/tiny", "--repo", "me/x"], folder,
                           {**env, "HF_TOKEN": TOKEN, "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert unreachable.returncode == 2 and "push to me/x: cannot reach the Hub" in unreachable.stderr
    assert "Traceback" not in offline.stderr + unreachable.stderr and TOKEN not in unreachable.stderr
    # the other refusals in-process (the CLI's exit codes: 2 for InputError, 3 for VerificationError)
    from llmtune.errors import InputError, VerificationError
    from llmtune.stages.export.push import push

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    run = folder / "runs" / "tiny"
    with pytest.raises(InputError, match="no GGUF file"):
        push(run, "me/x", "gguf")
    config = run / "merged" / "config.json"
    original = config.read_text()
    config.write_text(original.replace("{", "{ ", 1))
    try:
        with pytest.raises(VerificationError, match="outputs changed since the stage finished"):
            push(run, "me/x")
    finally:
        config.write_text(original)
    unfinished = tmp_path / "runs" / "empty"
    unfinished.mkdir(parents=True)
    (unfinished / "recipe.yaml").write_text("name: empty\n")
    with pytest.raises(InputError, match="the merge stage is not finished"):
        push(unfinished, "me/x")


@pytest.mark.slow
def test_export_hub_pushes_at_the_end_of_run(finished_run, tmp_path):
    folder, recipe = finished_run
    with Hub() as hub:
        result = _llmtune(["run", str(recipe), "--set", "export.hub={repo: me/from-run, what: merged}"], folder,
                          {"HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf")}, hub)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "export: up to date" in result.stdout  # pushing re-runs nothing
        files = hub.files("me/from-run")
    assert "model.safetensors" in files and "adapter/adapter_config.json" not in files
