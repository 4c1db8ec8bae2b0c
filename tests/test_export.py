"""Export: GGUF written natively and checked in llama.cpp, an Ollama Modelfile, the adapter alone.

These run the real llama.cpp (llama-cpp-python, a test dependency) on the files we write."""

from __future__ import annotations

import json

import pytest
from gguf import GGUFReader

from helpers import llmtune, write_recipe
from llmtune.errors import InputError

FORMATS = {"formats": ["hf", "gguf", "ollama", "adapter"], "gguf": {"quant": "f16"}}


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export-run")
    recipe = write_recipe(folder, tiny_model, rows=40, export=FORMATS,
                          data={"system_prompt": "You are terse."})
    result = llmtune("run", recipe, cwd=folder)
    assert result.returncode == 0, result.stdout + result.stderr
    return folder / "runs" / "tiny", recipe, result


@pytest.mark.slow
def test_gguf_is_checked_in_llama_cpp_and_the_figures_are_in_the_manifest(exported):
    run, _, result = exported
    summary = json.loads((run / "exported" / "manifest.json").read_text())["summary"]
    check = summary["gguf_check"]
    assert summary["gguf_verified"] is True
    assert check["top1_agreement"] >= 0.99 and check["positions"] > 100
    assert check["tokenization_matches"].split("/")[0] == check["tokenization_matches"].split("/")[1]
    assert check["chat_template_matches"] is True
    assert "next-token agreement" in result.stdout


def test_gguf_metadata_carries_tokenizer_template_and_special_tokens(exported, tokenizer):
    run, _, _ = exported
    reader = GGUFReader(run / "exported" / "gguf" / "tiny-f16.gguf")
    fields = {name: field.contents() for name, field in reader.fields.items()
              if name.startswith(("general.architecture", "tokenizer.ggml.eos", "tokenizer.ggml.model",
                                  "tokenizer.chat_template", "tokenizer.ggml.padding"))}
    assert fields["general.architecture"] == "llama"
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert "<|im_start|>" in fields["tokenizer.chat_template"]
    token_types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert token_types[tokenizer.convert_tokens_to_ids("<|im_end|>")] == 3  # CONTROL: one token in chat text


def test_ollama_modelfile_has_template_system_and_stops(exported):
    run, _, _ = exported
    folder = run / "exported" / "ollama"
    modelfile = (folder / "Modelfile").read_text()
    assert "FROM ./tiny-f16.gguf" in modelfile and (folder / "tiny-f16.gguf").is_file()
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}' in modelfile
    assert 'SYSTEM """You are terse."""' in modelfile  # the system prompt it was trained with
    assert 'PARAMETER stop "<|im_end|>"' in modelfile


def test_adapter_export_loads_with_peft(exported, tiny_model):
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    run, _, _ = exported
    folder = run / "exported" / "adapter"
    config = PeftConfig.from_pretrained(folder)
    assert config.base_model_name_or_path == str(tiny_model)  # a local base: its folder
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), folder)
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0


@pytest.mark.slow
def test_no_verify_is_recorded_and_a_later_run_checks(exported):
    run, recipe, _ = exported
    skipped = llmtune("export", recipe, "--force", "--no-verify", cwd=recipe.parent)
    assert skipped.returncode == 0, skipped.stderr
    summary = json.loads((run / "exported" / "manifest.json").read_text())["summary"]
    assert summary["gguf_verified"] is False and "gguf_check" not in summary
    again = llmtune("export", recipe, cwd=recipe.parent)
    assert again.returncode == 0 and "up to date" not in again.stdout
    assert json.loads((run / "exported" / "manifest.json").read_text())["summary"]["gguf_verified"] is True


def test_a_wrong_gguf_fails_the_export(exported, monkeypatch):
    """Special tokens typed as ordinary text (a classic converter bug: the model never sees its
    end-of-turn token, so it never stops) are caught by the tokenization check."""
    import gguf

    from llmtune.errors import VerificationError
    from llmtune.recipe import load_recipe
    from llmtune.stages.export import export, gguf_write

    run, recipe, _ = exported
    right = gguf_write._vocab
    monkeypatch.setattr(gguf_write, "_vocab", lambda tokenizer, size: (
        right(tokenizer, size)[0], [gguf.TokenType.NORMAL] * size))
    with pytest.raises(VerificationError, match="tokenizes 8 of 8 conversations differently"):
        export(load_recipe(recipe), run, force=True)


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    from llmtune.stages.export.gguf_write import gguf_architecture

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(InputError) as error:
        gguf_architecture(tmp_path)
    assert "gpt2" in error.value.message and "llama, mistral, qwen2" in error.value.hint


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def _tiny_of_type(folder, model_type: str, **extra):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmtune.testing import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.3,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


@pytest.mark.parametrize("model_type, extra", [
    ("llama", {}), ("mistral", {}), ("qwen2", {}), ("llama", {"rope_parameters": LLAMA3_ROPE}),
], ids=["llama", "mistral", "qwen2", "llama3-rope-scaling"])
def test_each_supported_architecture_round_trips_through_llama_cpp(tmp_path, model_type, extra):
    """Random weights with a large init make every tensor matter: a wrong name, a missing bias
    (qwen2) or a wrong rotary layout shows as disagreement. f32 leaves only arithmetic."""
    import random

    from llmtune.stages.export import gguf_write
    from llmtune.stages.export.gguf_verify import verify_gguf

    model, tokenizer = _tiny_of_type(tmp_path / "model", model_type, **extra)
    rng = random.Random(0)
    rows = [[rng.randrange(3, len(tokenizer)) for _ in range(48)] for _ in range(4)]
    gguf_write.write_gguf(tmp_path / "model", tmp_path / "f32.gguf", "f32", "t")
    assert verify_gguf(tmp_path / "f32.gguf", model, tokenizer, rows)["top1_agreement"] >= 0.99


def test_the_round_trip_check_sees_a_wrong_rotary_layout(tmp_path, monkeypatch):
    import random

    from llmtune.stages.export import gguf_write
    from llmtune.stages.export.gguf_verify import verify_gguf

    model, tokenizer = _tiny_of_type(tmp_path / "model", "llama")
    rng = random.Random(0)
    rows = [[rng.randrange(3, len(tokenizer)) for _ in range(48)] for _ in range(4)]
    monkeypatch.setattr(gguf_write, "_permute", lambda weight, heads: weight)
    gguf_write.write_gguf(tmp_path / "model", tmp_path / "f32.gguf", "f32", "t")
    assert verify_gguf(tmp_path / "f32.gguf", model, tokenizer, rows)["top1_agreement"] < 0.9


@pytest.mark.slow
def test_ollama_alone_keeps_its_gguf_beside_the_modelfile(exported):
    run, recipe, _ = exported
    result = llmtune("export", recipe, "--set", "export.formats=[ollama]", cwd=recipe.parent)
    assert result.returncode == 0, result.stderr
    summary = json.loads((run / "exported" / "manifest.json").read_text())["summary"]
    assert summary["gguf_file"] == "ollama/tiny-f16.gguf" and summary["gguf_verified"] is True
    assert (run / "exported" / "ollama" / "tiny-f16.gguf").is_file()
    assert not (run / "exported" / "gguf").exists() and not (run / "exported" / "hf").exists()
