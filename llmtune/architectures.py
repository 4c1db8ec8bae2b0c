"""The models our recipe library targets, and a check of a recipe against the real architecture.

Hub downloads are not possible everywhere (CI has no hub access), so each library model's
published config is recorded here (the values from its config.json). The check builds a model
of the same `model_type` with tiny dimensions, on the meta device (no weights), with the
transformers code users will train with, and confirms that the recipe's target modules,
modules_to_save and chat template exist in it.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

# Special tokens each built-in template writes; the tokenizer must have them as single tokens.
TEMPLATE_MARKERS = {
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "llama-3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "mistral": ["[INST]", "[/INST]"],
    "alpaca": [],
}


@dataclass(frozen=True)
class KnownModel:
    config: dict  # the hub config.json values that shape the model
    special_tokens: tuple[str, ...]  # chat markers its tokenizer has as single tokens
    licence: str


def _llama(hidden, inter, layers, heads, kv, vocab, tie, head_dim=None, rope=None):
    config = {"model_type": "llama", "hidden_size": hidden, "intermediate_size": inter,
              "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv, "vocab_size": vocab, "tie_word_embeddings": tie}
    if head_dim:
        config["head_dim"] = head_dim
    if rope:
        config["rope_parameters"] = rope
    return config


_LLAMA3 = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}
_QWEN = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
_GEMMA = ("<bos>", "<start_of_turn>", "<end_of_turn>")
_PHI3 = ("<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>")


def _qwen2(hidden, inter, layers, heads, kv, vocab, tie):
    return {"model_type": "qwen2", "hidden_size": hidden, "intermediate_size": inter,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
            "vocab_size": vocab, "tie_word_embeddings": tie}


_MLLAMA_ROPE = {**_LLAMA31_ROPE, "factor": 8.0}
VISION_LANGUAGE_MODELS = {
    "Qwen/Qwen2.5-VL-3B-Instruct": KnownModel(
        {"model_type": "qwen2_5_vl", "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
         "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
         "max_position_embeddings": 128000,
         "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
         "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
         "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                           "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
                           "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                           "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2}},
        _QWEN + ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"), "qwen-research"),
    "google/gemma-3-4b-it": KnownModel(
        {"model_type": "gemma3", "mm_tokens_per_image": 256, "boi_token_index": 255999, "eoi_token_index": 256000,
         "image_token_index": 262144,
         "text_config": {"model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240,
                         "num_hidden_layers": 34, "num_attention_heads": 8, "num_key_value_heads": 4,
                         "head_dim": 256, "vocab_size": 262208, "sliding_window": 1024,
                         "max_position_embeddings": 131072},
         "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "image_size": 896,
                           "intermediate_size": 4304, "num_attention_heads": 16, "num_hidden_layers": 27,
                           "patch_size": 14, "vision_use_head": False}},
        _GEMMA + ("<start_of_image>", "<end_of_image>", "<image_soft_token>"), "gemma"),
    "HuggingFaceTB/SmolVLM-256M-Instruct": KnownModel(
        {"model_type": "idefics3", "scale_factor": 4, "image_token_id": 49190,
         "text_config": {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
                         "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                         "vocab_size": 49280, "max_position_embeddings": 8192, "tie_word_embeddings": False},
         "vision_config": {"hidden_size": 768, "image_size": 512, "intermediate_size": 3072,
                           "num_attention_heads": 12, "num_hidden_layers": 12, "patch_size": 16}},
        ("<|im_start|>", "<end_of_utterance>", "<image>", "<fake_token_around_image>"), "apache-2.0"),
    "llava-hf/llava-1.5-7b-hf": KnownModel(
        {"model_type": "llava", "image_token_index": 32000, "vision_feature_layer": -2,
         "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
         "text_config": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
                         "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                         "vocab_size": 32064, "max_position_embeddings": 4096},
         "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "image_size": 336,
                           "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
                           "patch_size": 14, "projection_dim": 768}},
        ("<s>", "</s>", "<image>"), "llama2"),
    "meta-llama/Llama-3.2-11B-Vision-Instruct": KnownModel(
        {"model_type": "mllama", "image_token_index": 128256,
         "text_config": {"model_type": "mllama_text_model", "hidden_size": 4096, "intermediate_size": 14336,
                         "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8,
                         "vocab_size": 128256, "max_position_embeddings": 131072, "rope_scaling": _MLLAMA_ROPE,
                         "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38]},
         "vision_config": {"model_type": "mllama_vision_model", "hidden_size": 1280, "intermediate_size": 5120,
                           "num_hidden_layers": 32, "num_global_layers": 8, "attention_heads": 16,
                           "image_size": 560, "patch_size": 14, "max_num_tiles": 4, "vision_output_dim": 7680,
                           "intermediate_layers_indices": [3, 7, 15, 23, 30]}},
        _LLAMA3 + ("<|image|>",), "llama3.2"),
}

KNOWN_MODELS = {
    "meta-llama/Llama-3.2-1B-Instruct": KnownModel(
        _llama(2048, 8192, 16, 32, 8, 128256, True, 64, _LLAMA31_ROPE), _LLAMA3, "llama3.2"),
    "meta-llama/Llama-3.2-3B-Instruct": KnownModel(
        _llama(3072, 8192, 28, 24, 8, 128256, True, 128, _LLAMA31_ROPE), _LLAMA3, "llama3.2"),
    "meta-llama/Llama-3.1-8B-Instruct": KnownModel(
        _llama(4096, 14336, 32, 32, 8, 128256, False, 128, {**_LLAMA31_ROPE, "factor": 8.0}), _LLAMA3, "llama3.1"),
    "mistralai/Mistral-7B-Instruct-v0.3": KnownModel(
        {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336,
         "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
         "vocab_size": 32768, "tie_word_embeddings": False}, ("<s>", "</s>", "[INST]", "[/INST]"), "apache-2.0"),
    "Qwen/Qwen2.5-0.5B-Instruct": KnownModel(_qwen2(896, 4864, 24, 14, 2, 151936, True), _QWEN, "apache-2.0"),
    "Qwen/Qwen2.5-1.5B-Instruct": KnownModel(_qwen2(1536, 8960, 28, 12, 2, 151936, True), _QWEN, "apache-2.0"),
    "Qwen/Qwen2.5-3B-Instruct": KnownModel(_qwen2(2048, 11008, 36, 16, 2, 151936, True), _QWEN, "qwen-research"),
    "Qwen/Qwen2.5-7B-Instruct": KnownModel(_qwen2(3584, 18944, 28, 28, 4, 152064, False), _QWEN, "apache-2.0"),
    "google/gemma-2-2b-it": KnownModel(
        {"model_type": "gemma2", "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
         "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 256000,
         "tie_word_embeddings": True}, _GEMMA, "gemma"),
    "google/gemma-3-1b-it": KnownModel(
        {"model_type": "gemma3_text", "hidden_size": 1152, "intermediate_size": 6912,
         "num_hidden_layers": 26, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
         "vocab_size": 262144, "tie_word_embeddings": True}, _GEMMA, "gemma"),
    "microsoft/Phi-3-mini-4k-instruct": KnownModel(
        {"model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
         "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
         "tie_word_embeddings": False}, _PHI3, "mit"),
    "microsoft/Phi-4-mini-instruct": KnownModel(
        {"model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
         "num_attention_heads": 24, "num_key_value_heads": 8, "vocab_size": 200064,
         "tie_word_embeddings": True}, _PHI3 + ("<|system|>",), "mit"),
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": KnownModel(
        _llama(2048, 8192, 24, 32, 32, 49152, True), ("<|im_start|>", "<|im_end|>"), "apache-2.0"),
    "embedded:smollm2-135m-instruct": KnownModel(
        _llama(576, 1536, 30, 9, 3, 49152, True, 64), ("<|im_start|>", "<|im_end|>"), "apache-2.0"),
    # vision-language models (issue 31): loaded with AutoModelForImageTextToText and AutoProcessor
    **VISION_LANGUAGE_MODELS,
}
# the tiny stand-in keeps each family's structure (layer types, fused projections) at small sizes
_TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512,
         "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def module_names(model_type: str, config: dict | None = None) -> dict[str, str]:
    """Every module of a tiny `model_type` causal LM built on the meta device: name -> class.
    A vision-language model is built at its own size (on the meta device: no memory), with
    AutoModelForImageTextToText: its tower's and cross-attention layers' structure follows
    from several of its sizes at once."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if config and "vision_config" in config:
        from transformers import AutoModelForImageTextToText

        full = AutoConfig.for_model(model_type, **{k: v for k, v in config.items() if k != "model_type"})
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(full)
        return {name: type(module).__name__ for name, module in model.named_modules() if name}

    values = {key: value for key, value in (config or {}).items()
              if key not in _TINY and key not in ("model_type", "rope_parameters")}
    tiny = AutoConfig.for_model(model_type, **{**values, **_TINY})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny)
    return {name: type(module).__name__ for name, module in model.named_modules() if name}


def check_recipe(recipe) -> list[str]:
    """Problems of `recipe` against its model's architecture (empty when it fits, or when the
    model is neither in the library table nor a local folder we can read the config of)."""
    from llmtune.model_sources import source_problems

    problems = source_problems(recipe.model)
    config = known_config(recipe.model.path)
    if config is None:
        return problems
    problems += _context_problems(recipe, config) + _vision_problems(recipe, config)
    modules = module_names(config["model_type"], config)
    names = list(modules)
    leaves = sorted({name.rsplit(".", 1)[-1] for name in names})
    # what LoRA can wrap: linear (and fused linear) layers and embeddings
    adaptable = sorted({name.rsplit(".", 1)[-1] for name, kind in modules.items()
                        if kind in ("Linear", "Embedding", "Conv1D")})
    targets = recipe.adapter.target_modules
    if isinstance(targets, list):
        for target in targets:
            if not any(name == target or name.endswith("." + target) for name in names):
                problems.append(_missing("adapter.target_modules", target, config["model_type"], adaptable))
    elif targets != "all-linear" and not any(re.fullmatch(targets, name) for name in names):
        problems.append(f"adapter.target_modules: the regex {targets!r} matches no module of "
                        f"{config['model_type']}; module names look like {_examples(names)}")
    for module in recipe.adapter.modules_to_save:
        if not any(name == module or name.endswith("." + module) for name in names):
            problems.append(_missing("adapter.modules_to_save", module, config["model_type"], leaves))
    template = recipe.data.template
    known = KNOWN_MODELS.get(recipe.model.path)
    if known and template in TEMPLATE_MARKERS:
        lacking = [marker for marker in TEMPLATE_MARKERS[template] if marker not in known.special_tokens]
        if lacking:
            problems.append(f"data.template: {template} writes {', '.join(lacking)}, which "
                            f"{recipe.model.path}'s tokenizer does not have as special tokens; "
                            "use auto (the model's own template)")
    return problems


def _vision_problems(recipe, config: dict) -> list[str]:
    """What image chats do not support yet (prepare and export refuse them too), or
    adapter.vision on a language model."""
    if "vision_config" not in config:
        return ["adapter.vision: for vision-language models; this model has no vision tower"] \
            if recipe.adapter.vision != "frozen" else []
    problems = []
    if recipe.data.packing:
        problems.append("data.packing: not supported for vision-language models; set it to false")
    gguf = [name for name in recipe.export.formats if name in ("gguf", "ollama")]
    if gguf:
        problems.append(f"export.formats: {', '.join(gguf)} not supported for vision-language models yet "
                        "(llama.cpp needs a separate projector file); export hf and adapter")
    if recipe.train.objective != "sft":
        problems.append(f"train.objective: {recipe.train.objective}: image chats train with sft for now")
    return problems


def _context_problems(recipe, config: dict) -> list[str]:
    """data.max_seq_len beyond the longest sequence the model's config says it takes."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        context = config.get(key) or (config.get("text_config") or {}).get(key)
        if isinstance(context, int) and recipe.data.max_seq_len > context:
            return [f"data.max_seq_len: {recipe.data.max_seq_len} is beyond the {context} tokens "
                    f"{recipe.model.path} takes ({key} in its config); lower it to {context} or less"]
    return []


def known_config(path: str) -> dict | None:
    """The config of a library model, or of a local transformers folder; None otherwise."""
    if path in KNOWN_MODELS:
        return KNOWN_MODELS[path].config
    from pathlib import Path

    config = Path(path).expanduser() / "config.json"
    if config.is_file():
        import json

        return json.loads(config.read_text())
    return None


def _missing(key: str, module: str, model_type: str, leaves: list[str]) -> str:
    close = difflib.get_close_matches(module, leaves, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    candidates = [leaf for leaf in leaves if not leaf.isdigit()]
    return (f"{key}: no module named {module!r} in {model_type}{hint}; "
            f"candidates: {', '.join(candidates)}")


def _examples(names: list[str]) -> str:
    return ", ".join(name for name in names if ".1." not in name)[:200]
