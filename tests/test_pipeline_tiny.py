"""End to end through the real CLI on the tiny model: run, skip, re-run, load, inspect, kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import llmtune, stage_manifest, write_recipe

STAGE_DIRS = ("prepared", "adapter", "merged", "exported")


@pytest.fixture(scope="module")
def tiny_run(tiny_model, tmp_path_factory):
    """One full `llmtune run` on the tiny model, shared by the tests below."""
    folder = tmp_path_factory.mktemp("tiny-run")
    recipe = write_recipe(folder, tiny_model, rows=40)
    result = llmtune("run", recipe, cwd=folder)
    assert result.returncode == 0, result.stdout + result.stderr
    return folder, recipe, result


@pytest.mark.slow
def test_run_writes_every_stage_with_astage_manifest(tiny_run):
    folder, _, result = tiny_run
    run = folder / "runs" / "tiny"
    for stage_dir in STAGE_DIRS:
        manifest = stage_manifest(run, stage_dir)
        assert manifest["manifest_version"] == 1 and manifest["outputs"]
    assert (run / "recipe.yaml").is_file()
    train = stage_manifest(run, "adapter")["summary"]
    assert train["eval_loss"] < train["eval_loss_before"]
    assert "eval loss: before training" in result.stdout
    assert "held-out exact match" in result.stdout
    lines = (run / "adapter" / "metrics.jsonl").read_text().splitlines()
    assert any("loss" in json.loads(line) and "lr" in json.loads(line) for line in lines)
    # the merged folder, loaded as a user loads it, computes what base + adapter compute (fp32:
    # only the order of additions differs)
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 45, 97, 120, 33, 7, 250, 3]])
    merged = AutoModelForCausalLM.from_pretrained(run / "merged").eval()
    base_path = json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), run / "adapter").eval()
    with torch.no_grad():
        difference = (merged(input_ids=ids).logits - tuned(input_ids=ids).logits).abs().max()
        assert float(difference) < 1e-4
        with tuned.disable_adapter():  # and the adapter changed something
            assert float((tuned(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max()) > 1e-3
    stats = json.loads((run / "prepared" / "stats.json").read_text())
    assert stats["rows_read"] == 40 == stats["rows_kept"] + stats["rows_skipped"]


@pytest.mark.slow
def test_second_run_is_up_to_date_and_set_reruns_only_downstream(tiny_run):
    folder, recipe, _ = tiny_run
    again = llmtune("run", recipe, cwd=folder)
    assert again.returncode == 0, again.stderr
    for stage in ("prepare", "train", "merge", "export"):
        assert f"{stage}: up to date" in again.stdout

    changed = llmtune("run", recipe, "--set", "train.lr=1e-4", cwd=folder)
    assert changed.returncode == 0, changed.stderr
    assert "prepare: up to date" in changed.stdout
    for stage in ("train", "merge", "export"):
        assert f"{stage}: done" in changed.stdout
    forced = llmtune("prepare", recipe, "--set", "train.lr=1e-4", "--force", cwd=folder)
    assert "prepare: done" in forced.stdout


def test_outputs_load_in_peft_and_transformers_and_generate(tiny_run, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tiny_run[0] / "runs" / "tiny"
    tokenizer = AutoTokenizer.from_pretrained(run / "merged")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Repeat apple three times."}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), run / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(run / "merged")
    exported = AutoModelForCausalLM.from_pretrained(run / "exported" / "hf")
    outputs = [m.generate(**prompt, max_new_tokens=6, do_sample=False) for m in (adapted, merged, exported)]
    assert all(o.shape[1] > prompt["input_ids"].shape[1] for o in outputs)
    assert outputs[0].tolist() == outputs[1].tolist() == outputs[2].tolist()


def test_inspect_verifies_hashes(tiny_run, tmp_path):
    folder = tiny_run[0]
    ok = llmtune("inspect", "runs/tiny", cwd=folder)
    assert ok.returncode == 0 and ok.stdout.count("finished") == 4
    # damage a copy, not the shared run
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(folder / "runs" / "tiny"), str(copy)], check=True)
    with open(copy / "adapter" / "adapter_config.json", "a") as handle:
        handle.write(" ")
    damaged = llmtune("inspect", copy, cwd=folder)
    assert damaged.returncode == 3 and "adapter_config.json modified" in damaged.stdout


@pytest.mark.slow
def test_killed_training_leaves_nothing_merge_accepts(tiny_model, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model, rows=40, train={"max_steps": 100000, "batch_size": 1})
    assert llmtune("prepare", recipe, cwd=tmp_path).returncode == 0
    process = subprocess.Popen([sys.executable, "-m", "llmtune", "train", str(recipe)], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "runs" / "tiny" / "adapter.partial" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and metrics.stat().st_size > 0):
        time.sleep(0.2)
    assert metrics.exists(), "training never started"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert not (tmp_path / "runs" / "tiny" / "adapter").exists()
    merge = llmtune("merge", recipe, cwd=tmp_path)
    assert merge.returncode == 2
    assert "no finished train stage" in merge.stderr and "adapter.partial" in merge.stderr
    assert "Traceback" not in merge.stderr


@pytest.mark.slow
def test_merge_refuses_a_different_base(tiny_model, tmp_path):
    from llmtune.testing import build_tiny_model

    base = build_tiny_model(tmp_path / "base", seed=0)
    from llmtune.recipe import load_recipe
    from llmtune.stages.prepare import prepare
    from llmtune.stages.train import train

    recipe = write_recipe(tmp_path, base, rows=12, train={"max_steps": 2}, preview={"count": 0})
    loaded, run = load_recipe(recipe), tmp_path / "runs" / "tiny"
    prepare(loaded, run)  # in-process: the CLI is tested on the merge
    train(loaded, run)
    build_tiny_model(base, seed=1)  # same place, different weights
    merge = llmtune("merge", recipe, cwd=tmp_path)
    assert merge.returncode == 2
    assert "is not the one the adapter was trained on" in merge.stderr


def test_missing_upstream_names_the_command(tiny_model, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model)
    result = llmtune("export", recipe, cwd=tmp_path)
    assert result.returncode == 2
    assert "no finished merge stage" in result.stderr and "llmtune merge" in result.stderr


@pytest.mark.slow
def test_run_trusts_sizes_and_run_rehash_catches_a_byte_changed_in_place(tiny_model, tmp_path):
    """One flipped byte in merged/model.safetensors, its modification time restored: `run`
    checks sizes (fast; the README says so) and calls it up to date, `run --rehash` re-hashes,
    says which file changed and merges again."""
    copy = tmp_path  # a run of its own: the shared one changes with the tests above
    write_recipe(copy, tiny_model, rows=16, train={"max_steps": 2}, preview={"count": 0})
    assert llmtune("run", "recipe.yaml", cwd=copy).returncode == 0
    weights = copy / "runs" / "tiny" / "merged" / "model.safetensors"
    stat = weights.stat()
    with open(weights, "r+b") as handle:
        handle.seek(stat.st_size - 3)
        byte = handle.read(1)
        handle.seek(stat.st_size - 3)
        handle.write(bytes([byte[0] ^ 0x01]))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    plain = llmtune("run", "recipe.yaml", cwd=copy)
    assert plain.returncode == 0 and "merge: up to date" in plain.stdout
    rehashed = llmtune("run", "recipe.yaml", "--rehash", cwd=copy)
    assert rehashed.returncode == 0, rehashed.stderr
    assert "merged/model.safetensors changed since it was written: running it again" in rehashed.stdout
    assert "prepare: up to date" in rehashed.stdout and "merge: done" in rehashed.stdout
    assert llmtune("inspect", "runs/tiny", cwd=copy).returncode == 0
