"""plan: what a run will cost before it runs — parameters, trainable parameters, tokens per
epoch, steps, and the peak memory of every stage on the device it will run on.

The model is built on PyTorch's meta device (shapes only, no memory), with the recipe's adapter
applied, so counts are exact. A library model's config comes from architectures.py, so plan
works offline; another hub model's config.json (and tokenizer) is fetched, never its weights.
Memory is an estimate from those counts and the batch shape (memory.py). Tokens are counted by
preparing the data (from `<run>/prepared` when it is up to date, else in a temporary folder);
where the tokenizer or the data cannot be read here, they are reported unknown.
"""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from llmtune import model_sources, models
from llmtune.architectures import KNOWN_MODELS
from llmtune.console import console
from llmtune.errors import InputError
from llmtune.objectives import objective
from llmtune.recipe import Recipe
from llmtune.stages import memory
from llmtune.stages.memory import sequence_length
from llmtune.stages.prepare import prepare, up_to_date
from llmtune.stages.train import lora_config


def plan(recipe: Recipe, run: Path, processes: int = 1, device: str = "auto",
         gpu_memory: float | None = None) -> dict:
    """The plan for training on `processes` data-parallel processes (memory is per process), on
    `device` (auto: this machine's; cuda plans for a GPU from anywhere), with `gpu_memory` GB
    (default: this machine's GPU, if any) deciding which stages run on the GPU and which on the
    CPU. Writes nothing."""
    target = device if device != "auto" else models.pick_device()
    config = model_config(recipe)
    precision, assumed = plan_precision(recipe, target)
    gpu_bytes = _gpu_bytes(target, gpu_memory)
    counts = _model_counts(config, recipe)
    tokens = token_counts(recipe, run)
    if tokens.get("images_per_epoch") is not None and tokens["train_examples"]:
        counts["images_per_example"] = tokens["images_per_epoch"] / tokens["train_examples"]
    estimate = memory.train_memory(config, recipe, precision, counts, target, processes)
    cfg = recipe.train
    per_step = cfg.batch_size * cfg.grad_accum * processes  # the global batch
    steps = cfg.max_steps or (math.ceil(math.ceil(tokens["train_examples"] / per_step) * cfg.epochs)
                              if tokens["train_examples"] is not None else None)
    row = objective(cfg.objective)
    stages = memory.stage_peaks(config, recipe, precision, counts, estimate, target, gpu_bytes)
    result = {
        "model": recipe.model.path,
        "objective": cfg.objective,
        "sequences_per_example": _sequences(row),
        "parameters": counts["total"],
        **({"vision_tower_parameters": counts["vision_tower"]} if "vision_tower" in counts else {}),
        "trainable_parameters": counts["trainable"],
        **tokens,
        "steps": steps,
        "micro_batch": f"{cfg.batch_size} x {sequence_length(recipe)} tokens",
        "processes": processes,
        "global_batch": per_step,
        "device": target,
        "precision": precision + (f" ({assumed})" if assumed else ""),
        "gpu_memory_bytes": gpu_bytes,
        "gradient_checkpointing": "on" if cfg.gradient_checkpointing else "off",
        "memory_bytes": estimate,
        "optimizer": cfg.optimizer,
        "optimizer_state_bytes_by_choice": counts["optimizer_states"],
        "eval_memory_bytes": memory.eval_memory(config, recipe, precision, counts, target),
        "peak_bytes_by_stage": stages["peaks"],
        "stages_on_the_cpu": stages["on_cpu"],
        "notes": _size_notes(estimate, recipe, target) + stages["notes"],
    }
    if target == "cuda":
        result["peak_gpu_bytes_by_stage"] = stages["peaks"]
    return result


# Per process: no GPU has this much memory, and few machines have it as RAM (2 TB).
_BEYOND_ANY_MACHINE = {"cuda": 1e12, "cpu": 2e12}


def _size_notes(estimate: dict, recipe: Recipe, target: str) -> list[str]:
    """A warning when the estimate is beyond any machine: a batch size or sequence length typo."""
    total = estimate["total"]
    if total <= _BEYOND_ANY_MACHINE.get(target, 2e12):
        return []
    return [f"WARNING: {total / 1e9:,.0f} GB per process is beyond any {'GPU' if target == 'cuda' else 'machine'}: "
            f"check train.batch_size ({recipe.train.batch_size}) and data.max_seq_len ({recipe.data.max_seq_len})"]


def _sequences(row) -> str:
    """What one example costs: the sequences trained and those run forward only."""
    forward = f" + {row.forward_only} forward only ({row.forward_only_for})" if row.forward_only else ""
    sampled = ", each a prompt and a sampled completion" if row.generates else ""
    return f"{row.trained_sequences} trained{forward}{sampled}"


def model_config(recipe: Recipe):
    """The model's config: a library model's from architectures.py (no network), another's from
    its folder or the hub (config.json and tokenizer only)."""
    known = KNOWN_MODELS.get(recipe.model.path)
    if known is not None:
        values = dict(known.config)
        return AutoConfig.for_model(values.pop("model_type"), **values)
    return models.load_config(model_sources.resolve_section(recipe.model, weights=False))


def plan_precision(recipe: Recipe, target: str) -> tuple[str, str | None]:
    """train.precision on the target device, and what was assumed to decide it: planning for a
    GPU on a machine without one assumes compute capability 8.0 or more (bf16)."""
    choice = recipe.train.precision
    if choice != "auto" or target != "cuda" or torch.cuda.is_available():
        return models.precision(choice, target), None
    return "bf16", "assumed: a GPU of compute capability 8.0 or newer; fp16 before that"


def _gpu_bytes(target: str, gpu_memory: float | None) -> int | None:
    if gpu_memory is not None:
        return int(gpu_memory * 1e9)
    if target == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(models.local_device()).total_memory
    return None


def _model_counts(config, recipe: Recipe) -> dict:
    """Parameter counts from the model built on the meta device with the recipe's adapter:
    total and trainable (peft's), the base alone, the linear layers quantization applies to,
    the shapes of the trainable tensors and each optimizer's state for them."""
    loader = AutoModelForCausalLM
    vision_language = getattr(config, "vision_config", None) is not None
    if vision_language:
        from transformers import AutoModelForImageTextToText

        loader = AutoModelForImageTextToText
    if objective(recipe.train.objective).head == "score":  # a reward model: one score per sequence
        loader, config = AutoModelForSequenceClassification, copy.deepcopy(config)
        config.num_labels = 1
    with torch.device("meta"):
        # the recipe's choice, always: left out, transformers prompts [y/N] for a config with auto_map
        base = loader.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
        base_params = sum(p.numel() for p in base.parameters())
        # quantization applies to the linear layers of the blocks, not the output head
        # (a vision-language model's tower and projector stay in the compute dtype: models.py)
        linear = sum(m.weight.numel() for name, m in base.named_modules()
                     if isinstance(m, torch.nn.Linear) and not name.endswith(("lm_head", "score"))
                     and not any(part in name for part in models.VISION_MODULES))
        model = get_peft_model(base, lora_config(recipe, base))
    trainable, total = model.get_nb_trainable_parameters()
    shapes = [tuple(p.shape) for p in model.parameters() if p.requires_grad]
    counts = {"total": total, "trainable": trainable, "base": base_params, "linear": linear,
              "optimizer_states": memory.optimizer_state_bytes(shapes)}
    if vision_language:
        tower, _ = models.vision_parts(base)
        counts["vision_tower"] = sum(p.numel() for p in base.get_submodule(tower).parameters()) if tower else 0
    return counts


def token_counts(recipe: Recipe, run: Path) -> dict:
    """Examples and tokens per epoch, from the prepared data when it is up to date, else by
    preparing into a temporary folder that is then removed; unknown (None, with the reason)
    where the tokenizer or the data cannot be read here (a library model not downloaded yet,
    offline)."""
    if recipe.model.path in KNOWN_MODELS and not model_sources.available_offline(recipe.model):
        return _unknown(f"{recipe.model.path}'s tokenizer is not downloaded here (llmtune prepare fetches it)")
    try:
        prepared = up_to_date(recipe, run)
        counted = "prepared data (up to date)"
        if prepared is None:
            console.print("plan: counting tokens by preparing the data in a temporary folder")
            with tempfile.TemporaryDirectory(prefix="llmtune-plan-") as folder:
                prepared = prepare(recipe, Path(folder) / "run").manifest
            counted = "the data, prepared in a temporary folder (llmtune prepare keeps it)"
    except InputError as exc:
        if recipe.model.path not in KNOWN_MODELS:
            raise
        return _unknown(f"the data could not be prepared here: {exc.message.splitlines()[0]}")
    summary = prepared["summary"]
    counts = {"train_examples": summary["train_examples"], "tokens_per_epoch": summary["train_tokens"],
              "tokens_counted_from": counted}
    if "train_images" in summary:  # image chats: what of the sequence the images take
        counts.update({"images_per_epoch": summary["train_images"],
                       "image_tokens_per_epoch": summary["train_image_tokens"]})
    return counts


def _unknown(reason: str) -> dict:
    return {"train_examples": None, "tokens_per_epoch": None, "tokens_counted_from": f"unknown: {reason}"}
