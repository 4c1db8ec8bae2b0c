"""plan: what a training run will cost before it runs — parameters, trainable parameters,
tokens per epoch, steps, and an estimate of peak memory.

The model is built on PyTorch's meta device (shapes only, no memory), with the recipe's adapter
applied, so counts are exact. Memory is an estimate from those counts and the batch shape:
weights, adapter, gradients, AdamW state, activations kept for backward (per token and layer,
plus attention probabilities, or only layer inputs with gradient checkpointing), and the logits
(the whole batch for the standard loss, one chunk for the chunked loss), plus ~1 GB of runtime.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from llmtune import models
from llmtune.manifest import read_manifest
from llmtune.recipe import Recipe
from llmtune.stages.loss import CHUNK, chunked_loss_supported
from llmtune.stages.prepare import prepare
from llmtune.stages.train import _lora_config, _precision

RUNTIME_BYTES = 1.0e9  # Python, torch and library state, measured ~1 GB on CPU
QUANTIZED_BYTES = {"none": None, "nf4": 0.53, "fp4": 0.53, "int8": 1.0}  # per weight, with constants


def plan(recipe: Recipe, run: Path, processes: int = 1) -> dict:
    """The plan for training on `processes` data-parallel processes (memory is per process)."""
    ref = models.resolve_section(recipe.model)
    config = AutoConfig.from_pretrained(ref.local_dir, trust_remote_code=ref.trust_remote_code)
    precision = _precision(recipe.train.precision, models.pick_device())
    estimate = estimate_memory(config, recipe, precision)

    prepare(recipe, run)  # token counts come from the prepared data (cached when up to date)
    summary = read_manifest(run / "prepared")["summary"]
    cfg = recipe.train
    per_step = cfg.batch_size * cfg.grad_accum * processes  # the global batch
    steps = cfg.max_steps or math.ceil(math.ceil(summary["train_examples"] / per_step) * cfg.epochs)
    return {
        "model": ref.source,
        "parameters": estimate["parameters"],
        "trainable_parameters": estimate["trainable_parameters"],
        "train_examples": summary["train_examples"],
        "tokens_per_epoch": summary["train_tokens"],
        "steps": steps,
        "micro_batch": f"{cfg.batch_size} x {recipe.data.max_seq_len} tokens",
        "processes": processes,
        "global_batch": per_step,
        "precision": precision,
        "gradient_checkpointing": "on" if cfg.gradient_checkpointing else "off",
        "memory_bytes": estimate["memory_bytes"],
    }


def estimate_memory(config, recipe: Recipe, precision: str) -> dict:
    """Parameter counts (exact, from the model built on the meta device with the recipe's
    adapter) and the peak-memory estimate by part, for micro-batches of the recipe's shape."""
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config)
        # quantization applies to the linear layers of the blocks, not the output head
        linear = sum(m.weight.numel() for name, m in base.named_modules()
                     if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"))
        model = get_peft_model(base, _lora_config(recipe))
    trainable, total = model.get_nb_trainable_parameters()
    cfg = recipe.train
    act_bytes = 2 if precision in ("bf16", "fp16") else 4
    frozen = total - trainable
    quantized = QUANTIZED_BYTES[recipe.model.quantize]
    weights = frozen * 4 if quantized is None else linear * quantized + (frozen - linear) * 4
    memory = {
        "weights": weights,
        "adapter": trainable * 4,
        "gradients": trainable * 4,
        "optimizer": trainable * 8,  # AdamW: two fp32 moments
        "activations": _activations(config, cfg, recipe.data.max_seq_len, act_bytes),
        "logits": _logits(config, cfg, recipe.data.max_seq_len,
                          cfg.loss == "chunked" or (cfg.loss == "auto" and chunked_loss_supported(config))),
        "runtime": RUNTIME_BYTES,
    }
    memory["total"] = sum(memory.values())
    return {"parameters": total, "trainable_parameters": trainable,
            "memory_bytes": {key: int(value) for key, value in memory.items()}}


def _activations(config, cfg, seq: int, act_bytes: int) -> float:
    tokens = cfg.batch_size * seq
    hidden, layers = config.hidden_size, config.num_hidden_layers
    inter = getattr(config, "intermediate_size", 4 * hidden)
    heads = config.num_attention_heads
    one_layer = _layer(tokens, hidden, inter, heads, cfg.batch_size, seq, act_bytes)
    if cfg.gradient_checkpointing:  # layer inputs, plus one layer recomputed at a time
        return tokens * hidden * layers * act_bytes + one_layer
    return layers * one_layer


def _layer(tokens, hidden, inter, heads, batch, seq, act_bytes) -> float:
    # Saved for backward per token: ~16 hidden-sized tensors (norms, q/k/v/o, residuals, LoRA
    # inputs) and 4 intermediate-sized ones (gate, up, activation, product); the attention
    # probabilities when the kernel materialises them (CPU SDPA does).
    return tokens * (16 * hidden + 4 * inter) * act_bytes + batch * heads * seq * seq * act_bytes


def _logits(config, cfg, seq: int, chunked: bool) -> float:
    rows = CHUNK if chunked else cfg.batch_size * seq
    return 2 * rows * config.vocab_size * 4  # fp32 logits and their gradient
