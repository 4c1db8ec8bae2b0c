"""Stage directories: atomic completion, up-to-date checks, verification, friendly errors."""

from __future__ import annotations

import json

import pytest

from llmtune.errors import InputError
from llmtune.manifest import (
    finish_stage,
    is_up_to_date,
    manifest_sha256,
    partial_dir,
    read_manifest,
    require_stage,
    start_stage,
    upstream_ref,
    verify_outputs,
)


def _finish(out, payload=b"weights", inputs=None):
    partial = start_stage(out)
    (partial / "sub").mkdir()
    (partial / "sub" / "w.bin").write_bytes(payload)
    return finish_stage(partial, out, stage="train", recipe_sha256="r1",
                        inputs=inputs or {"x": 1}, summary={"steps": 3})


def test_finish_writes_manifest_last_and_renames(tmp_path):
    out = tmp_path / "adapter"
    manifest = _finish(out)
    assert not partial_dir(out).exists()
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["outputs"]["sub/w.bin"]["bytes"] == 7
    assert manifest["stage"] == "train" and manifest["summary"] == {"steps": 3}
    for key in ("python", "torch", "transformers", "peft", "device", "git_sha"):
        assert key in manifest["env"]


def test_unfinished_stage_is_never_accepted(tmp_path):
    out = tmp_path / "adapter"
    partial = start_stage(out)
    (partial / "adapter_model.safetensors").write_bytes(b"half")
    assert read_manifest(out) is None
    with pytest.raises(InputError) as caught:
        require_stage(out, "train", "llmtune train r.yaml")
    assert "adapter.partial exists, an unfinished or interrupted run" in caught.value.message
    assert caught.value.hint == "run: llmtune train r.yaml"
    with pytest.raises(InputError, match="does not exist"):
        require_stage(tmp_path / "nothing", "train", "x")


def test_rerun_replaces_previous_stage(tmp_path):
    out = tmp_path / "adapter"
    _finish(out, b"one")
    _finish(out, b"second")
    assert (out / "sub" / "w.bin").read_bytes() == b"second"
    assert not (tmp_path / "adapter.old").exists()


def test_up_to_date_needs_same_recipe_inputs_and_files(tmp_path):
    out = tmp_path / "adapter"
    _finish(out, inputs={"prepared": "abc"})
    assert is_up_to_date(out, "train", "r1", {"prepared": "abc"})
    assert not is_up_to_date(out, "train", "r2", {"prepared": "abc"})
    assert not is_up_to_date(out, "train", "r1", {"prepared": "abd"})
    assert not is_up_to_date(out, "merge", "r1", {"prepared": "abc"})
    (out / "sub" / "w.bin").unlink()
    assert not is_up_to_date(out, "train", "r1", {"prepared": "abc"})


def test_verify_outputs_detects_changes(tmp_path):
    out = tmp_path / "adapter"
    manifest = _finish(out, b"weights")
    assert verify_outputs(out, manifest) == {"sub/w.bin": "ok"}
    (out / "sub" / "w.bin").write_bytes(b"weightz")
    assert verify_outputs(out, manifest) == {"sub/w.bin": "modified"}
    (out / "sub" / "w.bin").unlink()
    assert verify_outputs(out, manifest) == {"sub/w.bin": "missing"}


def test_upstream_ref_is_relative_and_hashes_the_manifest(tmp_path):
    _finish(tmp_path / "run" / "prepared")
    ref = upstream_ref(tmp_path / "run" / "prepared", tmp_path / "run" / "adapter")
    assert ref == {"path": "../prepared",
                   "manifest_sha256": manifest_sha256(tmp_path / "run" / "prepared")}
