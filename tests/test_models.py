"""Model sources: hub ids through the offline cache, local folders, fingerprints, errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmtune import model_ref, model_sources, models
from llmtune.errors import InputError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _resolve_in_subprocess(source: str, hub_cache) -> subprocess.CompletedProcess:
    # huggingface_hub reads HF_HUB_CACHE when imported, so use a fresh interpreter
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    code = (
        "from llmtune import model_sources\n"
        "from llmtune.errors import InputError\n"
        f"try:\n    r = model_sources.resolve({source!r})\n    print(r.kind, r.revision, r.fingerprint, r.local_dir)\n"
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

    first = model_sources.folder_fingerprint(tiny_model)
    assert first == model_sources.folder_fingerprint(tiny_model)
    other = build_tiny_model(tmp_path / "other", seed=1)
    assert model_sources.folder_fingerprint(other) != first
    ref = model_sources.resolve(str(tiny_model))
    assert ref.kind == "local" and ref.fingerprint == first


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(InputError, match="GGUF file not found"):
        model_sources.resolve(str(tmp_path / "missing.gguf"))
    with pytest.raises(InputError, match="without config.json"):
        model_sources.resolve(str(tmp_path))
    with pytest.raises(InputError, match="not found"):
        model_sources.resolve("./nowhere")
    with pytest.raises(InputError, match="unknown embedded model"):
        model_sources.resolve("embedded:gpt-9")


# --- the loading policy ------------------------------------------------------------------------


@pytest.mark.parametrize("capability, expected", [
    ((6, 1), "fp16"), ((7, 0), "fp16"), ((7, 5), "fp16"),  # P40, V100, T4: bf16 only emulated
    ((8, 0), "bf16"), ((8, 6), "bf16"), ((8, 9), "bf16"), ((9, 0), "bf16"),  # A100, A10/3090, 4090, H100
])
def test_precision_auto_on_a_gpu_follows_its_compute_capability(capability, expected):
    assert models.auto_precision("cuda", capability) == expected


def test_precision_auto_on_a_cpu_follows_native_bf16():
    assert models.auto_precision("cpu", cpu_native_bf16=True) == "bf16"
    assert models.auto_precision("cpu", cpu_native_bf16=False) == "fp32"
    assert models.precision("fp32") == "fp32"  # an explicit choice is kept


def test_precision_auto_asks_the_gpu_for_its_capability_not_for_emulated_bf16(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # counts emulation
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4
    assert models.precision("auto") == "fp16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert models.precision("auto") == "bf16"


def test_a_tokenizer_without_a_pad_token_gets_one_of_its_own_tokens():
    from llmtune.testing import build_llama3_tokenizer, build_tiny_tokenizer

    llama3 = build_llama3_tokenizer()
    size, vocab = len(llama3), llama3.get_vocab()
    assert llama3.pad_token is None
    assert models.ensure_pad_token(llama3) == "<|finetune_right_pad_id|>"  # Llama 3.1+'s reserved pad
    assert len(llama3) == size and llama3.get_vocab() == vocab
    assert llama3.pad_token_id == vocab["<|finetune_right_pad_id|>"]
    plain = build_tiny_tokenizer()
    plain.pad_token = None
    assert models.ensure_pad_token(plain) == "<|endoftext|>"  # no reserved pad: its unknown token
    plain.pad_token, plain.unk_token = None, None
    assert models.ensure_pad_token(plain) == "<|im_end|>"  # nor an unknown token: its EOS
    assert len(plain) == len(build_tiny_tokenizer())
    assert models.ensure_pad_token(plain) is None  # a tokenizer with a pad token keeps it


def test_no_module_but_models_py_loads_a_model():
    """Every load goes through the one loading policy: no `from_pretrained` call elsewhere."""
    import ast

    package = Path(models.__file__).parent
    offenders = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "models.py" and path.parent == package:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr == "from_pretrained":
                offenders.append(f"{path.relative_to(package.parent)}:{node.lineno}")
    assert offenders == []


def test_stored_dtype_is_read_from_the_folder(tiny_model, tmp_path):
    import torch

    from llmtune.testing import build_llama3_model

    assert models.stored_dtype(tiny_model) == torch.float32
    assert models.stored_dtype(build_llama3_model(tmp_path / "llama3")) == torch.bfloat16


def test_file_hashes_are_remembered_by_file_identity(tiny_model, tmp_path, monkeypatch):
    folder = shutil.copytree(tiny_model, tmp_path / "copy")
    hashed = []
    real = model_ref.sha256_file  # where fingerprints hash files (model_sources re-exports them)
    monkeypatch.setattr(model_ref, "sha256_file", lambda path: hashed.append(path) or real(path))
    first = model_sources.folder_fingerprint(folder)
    assert len(hashed) == len([p for p in folder.iterdir() if p.is_file()])
    hashed.clear()
    assert model_sources.folder_fingerprint(folder) == first and hashed == []  # not hashed again
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # the same size, new content and mtime
    weights.write_bytes(bytes(data))
    assert model_sources.folder_fingerprint(folder) != first and hashed == [weights.resolve()]


def test_config_and_tokenizer_of_a_hub_model_are_fetched_without_its_weights(monkeypatch, tmp_path):
    import huggingface_hub

    asked = []
    snapshot = tmp_path / COMMIT
    snapshot.mkdir()
    (snapshot / "config.json").write_text("{}")

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        asked.append(allow_patterns)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    ref = model_sources.resolve("acme/tokenizer-only", weights=False)
    assert ref.revision == COMMIT and ref.fingerprint == f"hub:acme/tokenizer-only@{COMMIT}"
    assert not any(pattern.endswith(".safetensors") for pattern in asked[0])
    model_sources.resolve("acme/tokenizer-only")
    assert "*.safetensors" in asked[1]


def test_a_base_models_tokenizer_is_named_as_the_recipe_names_it(tiny_model):
    """Template errors name the model the recipe gives, not the folder it was loaded from."""
    ref = model_sources.resolve(str(tiny_model), weights=False)
    assert models.load_tokenizer(ref).llmtune_source == str(tiny_model)
    assert getattr(models.load_tokenizer(tiny_model), "llmtune_source", None) is None  # a folder we wrote
