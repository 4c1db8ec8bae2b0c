"""plan: what a training run will cost before it runs — parameters, trainable parameters,
tokens per epoch, steps, and an estimate of peak memory.

The model is built on PyTorch's meta device (shapes only, no memory), with the recipe's adapter
applied, so counts are exact. Memory is an estimate from those counts and the batch shape:
weights, adapter, gradients, AdamW state, activations kept for backward (per token and layer,
plus attention probabilities, or only layer inputs with gradient checkpointing), and the logits
(the whole batch for the standard loss, one chunk for the chunked loss), plus ~1 GB of runtime.
Preference objectives train two sequences per pair (OBJECTIVE_COST) and run the reference forward.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from llmtune import model_sources, models
from llmtune.console import console
from llmtune.recipe import Recipe
from llmtune.stages.inference import generation_bytes_per_row
from llmtune.stages.prepare import prepare, up_to_date
from llmtune.stages.loss import chunk_rows, chunked_loss_supported
from llmtune.stages.train import lora_config

RUNTIME_BYTES = 1.0e9  # Python, torch and library state, measured ~1 GB on CPU
QUANTIZED_BYTES = {"none": None, "nf4": 0.53, "fp4": 0.53, "int8": 1.0}  # per weight, with constants
ACTIVATION_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# Per example, by train.objective: sequences the trained model runs forward and backward (a
# pair's chosen and rejected answers are one batch of two), sequences run forward only without
# gradients (the reference with the adapter disabled; KTO's mismatched KL answers), and whether
# the log-probabilities come without the batch's full logits (TRL's fused head in DPO and KTO).
OBJECTIVE_COST = {"sft": (1, 0, None), "dpo": (2, 2, True), "orpo": (2, 0, False),
                  "simpo": (2, 0, False), "kto": (1, 3, True), "grpo": (1, 1, True)}


def sequence_length(recipe: Recipe) -> int:
    """Tokens per training sequence: max_seq_len, and for grpo the prompt (max_seq_len at most)
    and its sampled completion (grpo.max_completion_length, TRL's 512 when unset)."""
    if recipe.train.objective == "grpo":
        return recipe.data.max_seq_len + (recipe.train.grpo.max_completion_length or 512)
    return recipe.data.max_seq_len


def plan(recipe: Recipe, run: Path, processes: int = 1) -> dict:
    """The plan for training on `processes` data-parallel processes (memory is per process).
    Writes nothing: token counts come from `<run>/prepared` when it is up to date, else from
    preparing into a temporary folder that is then removed."""
    ref = model_sources.resolve_section(recipe.model, weights=False)  # config and tokenizer only
    config = models.load_config(ref)
    precision = models.precision(recipe.train.precision)
    estimate = estimate_memory(config, recipe, precision)

    prepared = up_to_date(recipe, run)
    counted = "prepared data (up to date)"
    if prepared is None:
        console.print("plan: counting tokens by preparing the data in a temporary folder")
        with tempfile.TemporaryDirectory(prefix="llmtune-plan-") as folder:
            prepared = prepare(recipe, Path(folder) / "run").manifest
        counted = "the data, prepared in a temporary folder (llmtune prepare keeps it)"
    summary = prepared["summary"]
    cfg = recipe.train
    per_step = cfg.batch_size * cfg.grad_accum * processes  # the global batch
    steps = cfg.max_steps or math.ceil(math.ceil(summary["train_examples"] / per_step) * cfg.epochs)
    trained, forward_only, _ = OBJECTIVE_COST[cfg.objective]
    return {
        "model": ref.source,
        "objective": cfg.objective,
        "sequences_per_example": (f"{trained} trained" + (f" + {forward_only} forward only (reference"
                                  + (", KL" if cfg.objective == "kto" else "") + ")" if forward_only else "")
                                  + (", each a prompt and a sampled completion" if cfg.objective == "grpo" else "")),
        "parameters": estimate["parameters"],
        "trainable_parameters": estimate["trainable_parameters"],
        "train_examples": summary["train_examples"],
        "tokens_per_epoch": summary["train_tokens"],
        "tokens_counted_from": counted,
        "steps": steps,
        "micro_batch": f"{cfg.batch_size} x {sequence_length(recipe)} tokens",
        "processes": processes,
        "global_batch": per_step,
        "precision": precision,
        "gradient_checkpointing": "on" if cfg.gradient_checkpointing else "off",
        "memory_bytes": estimate["memory_bytes"],
        "optimizer": cfg.optimizer,
        "optimizer_state_bytes_by_choice": estimate["optimizer_state_bytes"],
        "eval_memory_bytes": estimate_eval_memory(config, recipe, precision, estimate["parameters"]
                                                  - estimate["trainable_parameters"]),
    }


def estimate_eval_memory(config, recipe: Recipe, precision: str, frozen: int) -> dict:
    """Peak memory of `llmtune eval` (and the preview, generate, chat): one model at a time in
    the compute dtype (the adapter, merged in or not, is small), generation of eval.batch_size
    prompts up to max_seq_len tokens plus eval.max_new_tokens, or the chunked loss of a batch,
    whichever is larger; generation batches shrink to what fits (inference.fitting_batch_size)."""
    act_bytes = ACTIVATION_BYTES[precision]
    cfg = recipe.eval
    tokens = recipe.data.max_seq_len + cfg.max_new_tokens
    generation = cfg.batch_size * generation_bytes_per_row(config, tokens, act_bytes)
    loss = (cfg.batch_size * recipe.data.max_seq_len * config.hidden_size * act_bytes * 4
            + _logits(config, recipe.train.batch_size, recipe.data.max_seq_len, chunked_loss_supported(config)))
    memory = {"weights": frozen * act_bytes, "generation or loss": max(generation, loss),
              "runtime": RUNTIME_BYTES}
    memory["total"] = sum(memory.values())
    return {key: int(value) for key, value in memory.items()}


def estimate_memory(config, recipe: Recipe, precision: str) -> dict:
    """Parameter counts (exact, from the model built on the meta device with the recipe's
    adapter) and the peak-memory estimate by part, for micro-batches of the recipe's shape."""
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config)
        # quantization applies to the linear layers of the blocks, not the output head
        linear = sum(m.weight.numel() for name, m in base.named_modules()
                     if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"))
        model = get_peft_model(base, lora_config(recipe, base))
    trainable, total = model.get_nb_trainable_parameters()
    shapes = [tuple(p.shape) for p in model.parameters() if p.requires_grad]
    states = optimizer_state_bytes(shapes)
    cfg = recipe.train
    act_bytes = ACTIVATION_BYTES[precision]
    sequences, forward_only, fused = OBJECTIVE_COST[cfg.objective]
    rows = cfg.batch_size * sequences  # trained sequences per micro-batch
    chunked = fused if fused is not None else (
        cfg.loss == "chunked" or (cfg.loss == "auto" and chunked_loss_supported(config)))
    # frozen weights are loaded in the compute dtype (models.load_model); QLoRA's compute dtype
    # may be set apart (model.compute_dtype), and covers what is not quantized
    compute = recipe.model.compute_dtype
    quantized = QUANTIZED_BYTES[recipe.model.quantize]
    weight_bytes = act_bytes if compute == "auto" or quantized is None else ACTIVATION_BYTES[models.DTYPE_NAMES[compute]]
    frozen = total - trainable
    weights = frozen * weight_bytes if quantized is None else linear * quantized + (frozen - linear) * weight_bytes
    memory = {
        "weights": weights,
        "adapter": trainable * 4,
        "gradients": trainable * 4,
        "optimizer": states[cfg.optimizer],
        "activations": _activations(config, cfg, sequence_length(recipe), act_bytes, rows),
        "logits": _logits(config, rows, sequence_length(recipe), chunked),
        "runtime": RUNTIME_BYTES,
    }
    memory["total"] = sum(memory.values())
    return {"parameters": total, "trainable_parameters": trainable,
            "memory_bytes": {key: int(value) for key, value in memory.items()},
            "optimizer_state_bytes": states}


def optimizer_state_bytes(shapes: list[tuple[int, ...]]) -> dict[str, int]:
    """The state each train.optimizer keeps for trainable tensors of these shapes. AdamW: two
    fp32 moments; bitsandbytes' 8-bit AdamW: two 1-byte moments plus an fp32 scale per block
    of 256 (tensors under 4,096 elements stay in 32 bits); Lion: one moment; Adafactor (as
    transformers configures it, no first moment): factored second moments, a row and a column
    per matrix; SGD without momentum: none."""
    def eight_bit(moments: int) -> float:
        return sum(moments * (n + 4 * -(-n // 256)) if n >= 4096 else moments * 4 * n
                   for n in (math.prod(shape) for shape in shapes))

    adafactor = sum(4 * (shape[-2] + shape[-1]) if len(shape) >= 2 else 4 * math.prod(shape) for shape in shapes)
    adamw = 8 * sum(math.prod(shape) for shape in shapes)
    paged = eight_bit(2)
    return {"adamw": adamw, "adamw_8bit": int(paged), "paged_adamw_8bit": int(paged),
            "lion_8bit": int(eight_bit(1)), "adafactor": adafactor, "sgd": 0}


def _activations(config, cfg, seq: int, act_bytes: int, batch: int) -> float:
    """Kept for backward: forward-only passes (the reference) keep none, and free a layer's
    working memory before the next, so they add no more than the one recomputed layer."""
    tokens = batch * seq
    hidden, layers = config.hidden_size, config.num_hidden_layers
    inter = getattr(config, "intermediate_size", 4 * hidden)
    heads = config.num_attention_heads
    one_layer = _layer(tokens, hidden, inter, heads, batch, seq, act_bytes)
    if cfg.gradient_checkpointing:  # layer inputs, plus one layer recomputed at a time
        return tokens * hidden * layers * act_bytes + one_layer
    return layers * one_layer


def _layer(tokens, hidden, inter, heads, batch, seq, act_bytes) -> float:
    # Saved for backward per token: ~16 hidden-sized tensors (norms, q/k/v/o, residuals, LoRA
    # inputs) and 4 intermediate-sized ones (gate, up, activation, product); the attention
    # probabilities when the kernel materialises them (CPU SDPA does).
    return tokens * (16 * hidden + 4 * inter) * act_bytes + batch * heads * seq * seq * act_bytes


def _logits(config, batch: int, seq: int, chunked: bool) -> float:
    rows = chunk_rows(config.vocab_size) if chunked else batch * seq
    return 2 * rows * config.vocab_size * 4  # fp32 logits and their gradient
