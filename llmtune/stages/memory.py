"""How much memory each stage needs: plain arithmetic on a model's config, the recipe and the
parameter counts plan takes from the model built on the meta device. Used by plan, and at run
time to size generation batches (generation_bytes_per_row).

Training: weights (quantized or in the compute dtype), adapter, gradients, optimizer state,
activations kept for backward (per token and layer, plus the attention probabilities where the
kernel materialises them, as CPU SDPA does and GPU kernels do not; only layer inputs with
gradient checkpointing), logits (the whole batch for the standard loss, one chunk for the
chunked loss), ~1 GB of runtime; FSDP and ZeRO divide what they shard across processes.
Merge, eval and the GGUF check need the model they load (models.room_needed) on the device
where it fits (models.fitting_device); on a GPU too small for it they run on the CPU.
"""

from __future__ import annotations

import math

from llmtune import models
from llmtune.objectives import GRPO_COMPLETION, VLLM_MEMORY_SHARE, objective
from llmtune.recipe import Recipe
from llmtune.stages.train.loss import chunk_rows, chunked_loss_supported

RUNTIME_BYTES = 1.0e9  # Python, torch and library state, measured ~1 GB on CPU
QUANTIZED_BYTES = {"none": None, "nf4": 0.53, "fp4": 0.53, "int8": 1.0}  # per weight, with constants
ACTIVATION_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def sequence_length(recipe: Recipe) -> int:
    """Tokens per training sequence: max_seq_len, and for grpo the prompt (max_seq_len at most)
    and its sampled completion (grpo.max_completion_length, TRL's 512 when unset)."""
    if objective(recipe.train.objective).generates:
        return recipe.data.max_seq_len + (recipe.train.grpo.max_completion_length or GRPO_COMPLETION)
    return recipe.data.max_seq_len


def weight_bytes(recipe: Recipe, counts: dict, precision: str) -> float:
    """The frozen weights as training loads them: in the compute dtype, or quantized (QLoRA,
    whose model.compute_dtype covers what is not quantized)."""
    compute = recipe.model.compute_dtype
    quantized = QUANTIZED_BYTES[recipe.model.quantize]
    act_bytes = ACTIVATION_BYTES[precision]
    plain = act_bytes if compute == "auto" or quantized is None else ACTIVATION_BYTES[models.DTYPE_NAMES[compute]]
    frozen = counts["total"] - counts["trainable"]
    if quantized is None:
        return frozen * plain
    return counts["linear"] * quantized + (frozen - counts["linear"]) * plain


def train_memory(config, recipe: Recipe, precision: str, counts: dict, device: str = "cpu",
                 processes: int = 1) -> dict:
    """Peak memory of training by part, per process, for micro-batches of the recipe's shape."""
    cfg = recipe.train
    act_bytes = ACTIVATION_BYTES[precision]
    # a pair's chosen and rejected answers are one batch of two; the sequences run forward only
    # (the reference, KTO's KL answers) keep no activations (see _activations)
    row = objective(cfg.objective)
    fused = row.fused_logps  # TRL's fused head computes log-probabilities without full logits
    rows = cfg.batch_size * row.trained_sequences  # trained sequences per micro-batch
    chunked = fused if fused is not None else (
        cfg.loss == "chunked" or (cfg.loss == "auto" and chunked_loss_supported(config)))
    trainable = counts["trainable"]
    parts = {
        "weights": weight_bytes(recipe, counts, precision),
        "adapter": trainable * 4,
        "gradients": trainable * 4,
        "optimizer": counts["optimizer_states"][cfg.optimizer],
        "activations": _activations(config, cfg, sequence_length(recipe), act_bytes, rows, device == "cpu"),
        # a score head gives one number per sequence: no vocabulary logits
        "logits": _logits(config, rows, sequence_length(recipe), chunked) if row.head == "causal-lm" else 0,
        "runtime": RUNTIME_BYTES,
    }
    vision = getattr(config, "vision_config", None)
    if vision is not None:  # image chats: the vision tower on the micro-batch's images
        parts["vision"] = vision_activations(
            vision, recipe, act_bytes, cfg.batch_size * counts.get("images_per_example", 1.0), device == "cpu")
    _shard(parts, recipe.distributed, processes, device)
    parts["total"] = sum(parts.values())
    return {key: int(value) for key, value in parts.items()}


def _shard(parts: dict, section, processes: int, device: str) -> None:
    """What FSDP and DeepSpeed take off each GPU (one process applies neither, see
    distributed.py): FSDP shards weights, adapter, gradients and optimizer state (cpu_offload:
    all of them in CPU memory); ZeRO-2 shards gradients and optimizer state, ZeRO-3 the weights
    too (cpu_offload: the optimizer state in CPU memory)."""
    if processes == 1 or device != "cuda" or section.strategy == "ddp":
        return
    if section.strategy == "fsdp":
        sharded = ("weights", "adapter", "gradients", "optimizer")
        offloaded = sharded if section.cpu_offload else ()
    else:
        sharded = ("gradients", "optimizer") + (("weights", "adapter") if section.zero_stage == 3 else ())
        offloaded = ("optimizer",) if section.cpu_offload else ()
    for part in sharded:
        parts[part] = 0 if part in offloaded else parts[part] / processes


def eval_memory(config, recipe: Recipe, precision: str, counts: dict, device: str = "cpu",
                room: float | None = None) -> dict:
    """Peak memory of `llmtune eval` (and the preview, generate, chat) with base+adapter: one
    model at a time (QLoRA's base quantized as trained), generation of eval.batch_size prompts up
    to max_seq_len tokens plus eval.max_new_tokens, or the chunked loss of a batch, whichever is
    larger. Generation batches shrink to what fits (inference.fitting_batch_size): with `room`
    (the device's memory), the batch that fits in it is counted."""
    weights = weight_bytes(recipe, counts, precision) + counts["trainable"] * 4
    parts = {"weights": weights, "generation or loss": _work_bytes(config, recipe, precision, device, room, weights),
             "runtime": RUNTIME_BYTES}
    parts["total"] = sum(parts.values())
    return {key: int(value) for key, value in parts.items()}


def _work_bytes(config, recipe: Recipe, precision: str, device: str, room: float | None = None,
                weights: float = 0) -> float:
    act_bytes = ACTIVATION_BYTES[precision]
    cfg = recipe.eval
    tokens = recipe.data.max_seq_len + cfg.max_new_tokens
    per_row = generation_bytes_per_row(config, tokens, act_bytes, device == "cpu")
    rows = cfg.batch_size
    if room is not None:  # as fitting_batch_size: the rows whose estimate fits in 80% of what is free
        rows = min(rows, max(1, int((0.8 * (room - weights - RUNTIME_BYTES)) // per_row)))
    config = config.get_text_config()
    loss = (cfg.batch_size * recipe.data.max_seq_len * config.hidden_size * act_bytes * 4
            + _logits(config, cfg.batch_size, recipe.data.max_seq_len, chunked_loss_supported(config)))
    return max(rows * per_row, loss)


def stage_peaks(config, recipe: Recipe, precision: str, counts: dict, train: dict, device: str,
                gpu_bytes: int | None) -> dict:
    """Each stage's peak on the target device: {"peaks": {train, merge, eval, export}, "on_cpu":
    the stages (or parts) a GPU of `gpu_bytes` is too small for, which then run on the CPU and
    take 0 of it, "notes"}. Without `gpu_bytes`, every stage is counted on the GPU."""
    notes, on_cpu = [], []

    def room(what: str, weights: float) -> float:
        """models.room_needed for a model of `weights`, or 0 where it runs on the CPU instead."""
        needed = models.room_needed(int(weights))
        if device == "cuda" and gpu_bytes is not None and needed > gpu_bytes:
            on_cpu.append(what)
            return 0
        return needed

    train_peak = train["total"]
    if objective(recipe.train.objective).generates and recipe.train.grpo.generation == "vllm":
        share = recipe.train.grpo.vllm_gpu_memory_utilization or VLLM_MEMORY_SHARE
        if gpu_bytes is not None:
            train_peak += share * gpu_bytes
        else:
            notes.append(f"train: plus vLLM's {share:.0%} of the GPU (give --gpu-memory to count it)")
    merged_dtype = _merge_precision(recipe, config)
    merge = room("merge", counts["base"] * ACTIVATION_BYTES[merged_dtype])
    if recipe.model.quantize != "none":  # checked against the 4-bit base it was trained on, as trained
        merge = max(merge, models.room_needed(int(weight_bytes(recipe, counts, precision))))
    merged_weights = counts["base"] * ACTIVATION_BYTES[precision]
    merged_eval = merged_weights + _work_bytes(config, recipe, precision, device, gpu_bytes, merged_weights)
    if not room("eval of the merged model", merged_weights):
        merged_eval = 0
    evaluation = max(eval_memory(config, recipe, precision, counts, device, gpu_bytes)["total"],
                     merged_eval + RUNTIME_BYTES if merged_eval else 0)
    export = 0
    if {"gguf", "ollama"} & set(recipe.export.formats):
        check_precision = "fp32" if merged_dtype == "fp32" else precision  # export.gguf_check_precision
        export = room("the GGUF check", counts["base"] * ACTIVATION_BYTES[check_precision])
    peaks = {"train": train_peak, "merge": merge, "eval": evaluation, "export": export}
    return {"peaks": {key: int(value) for key, value in peaks.items()}, "on_cpu": on_cpu, "notes": notes}


def _merge_precision(recipe: Recipe, config) -> str:
    """merge.dtype as a precision; auto is the base's stored dtype (bf16 for the library)."""
    if recipe.merge.dtype != "auto":
        return models.DTYPE_NAMES[recipe.merge.dtype]
    stored = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "bfloat16")
    return models.DTYPE_NAMES.get(stored.removeprefix("torch."), "bf16")


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


def generation_bytes_per_row(config, tokens: int, dtype_bytes: int, materialised_attention: bool = True) -> int:
    """Memory one sequence of `tokens` (prompt and answer) takes while it is generated: its KV
    cache, the prompt's largest transient in the prefill (the MLP's intermediate tensors, and
    the attention scores where the kernel materialises them, as CPU SDPA does), and one step's
    fp32 logits over the vocabulary with their processed copy (generate keeps the last
    position's logits only)."""
    config = config.get_text_config()  # a vision-language model's language model
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    inter = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
    kv_cache = 2 * config.num_hidden_layers * kv_heads * head_dim * tokens * dtype_bytes
    scores = heads * tokens * tokens * dtype_bytes if materialised_attention else 0
    prefill = max(3 * tokens * inter * dtype_bytes, scores)
    return int(kv_cache + prefill + 2 * config.vocab_size * 4)


def _activations(config, cfg, seq: int, act_bytes: int, batch: int, materialised_attention: bool) -> float:
    """Kept for backward: forward-only passes (the reference) keep none, and free a layer's
    working memory before the next, so they add no more than the one recomputed layer."""
    tokens = batch * seq
    config = config.get_text_config()
    hidden, layers = config.hidden_size, config.num_hidden_layers
    inter = getattr(config, "intermediate_size", 4 * hidden)
    heads = config.num_attention_heads
    one_layer = _layer(tokens, hidden, inter, heads, batch, seq, act_bytes, materialised_attention)
    if cfg.gradient_checkpointing:  # layer inputs, plus one layer recomputed at a time
        return tokens * hidden * layers * act_bytes + one_layer
    return layers * one_layer


def _layer(tokens, hidden, inter, heads, batch, seq, act_bytes, materialised_attention) -> float:
    # Saved for backward per token: ~16 hidden-sized tensors (norms, q/k/v/o, residuals, LoRA
    # inputs) and 4 intermediate-sized ones (gate, up, activation, product); the attention
    # probabilities where the kernel materialises them (CPU SDPA does, GPU kernels do not).
    scores = batch * heads * seq * seq * act_bytes if materialised_attention else 0
    return tokens * (16 * hidden + 4 * inter) * act_bytes + scores


def _logits(config, batch: int, seq: int, chunked: bool) -> float:
    config = config.get_text_config()
    rows = chunk_rows(config.vocab_size) if chunked else batch * seq
    return 2 * rows * config.vocab_size * 4  # fp32 logits and their gradient


def vision_activations(vision, recipe: Recipe, act_bytes: int, images: float, materialised_attention: bool) -> float:
    """The vision tower's memory for `images` images a micro-batch: each is image_size /
    patch_size squared patch tokens through the tower. A frozen tower keeps nothing for backward
    (one layer's working set at a time); with adapter.vision: lora every layer's activations
    are kept (or their inputs, under gradient checkpointing) as for the language model."""
    # (Qwen2.5-VL's tower takes any size: counted at 448 pixels; mllama's as one tile)
    patches = (getattr(vision, "image_size", 448) // getattr(vision, "patch_size", 14)) ** 2
    batch = max(1, math.ceil(images))
    tokens = batch * patches
    hidden = vision.hidden_size
    layers = getattr(vision, "num_hidden_layers", None) or vision.depth  # Qwen2.5-VL: depth
    heads = next(getattr(vision, key) for key in ("num_attention_heads", "num_heads", "attention_heads")
                 if getattr(vision, key, None))
    inter = getattr(vision, "intermediate_size", 4 * hidden)
    one_layer = _layer(tokens, hidden, inter, heads, batch, patches, act_bytes, materialised_attention)
    if recipe.adapter.vision != "lora":
        return one_layer
    if recipe.train.gradient_checkpointing:
        return tokens * hidden * layers * act_bytes + one_layer
    return layers * one_layer

