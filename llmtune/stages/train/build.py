"""What training is made of: the tokenizer with the template the data was prepared with, the
base model with a fresh adapter (build), the prepared sets in the order the objective reads them,
and the collator that batches them. Each reads the objective's row (llmtune/objectives.py)."""

from __future__ import annotations

import functools
import re
import typing
from pathlib import Path

import pyarrow.compute as pc
import torch
from datasets import load_from_disk
from peft import LoftQConfig, LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

from llmtune import models
from llmtune.data.probe import end_turns_for_servers
from llmtune.data.templates import TEMPLATE_FILE
from llmtune.errors import InputError
from llmtune.objectives import objective
from llmtune.recipe.schema import AdapterSection
from llmtune.stages.collate import ImageCollator, PadCollator
from llmtune.stages.train import distributed, trl


def tokenizer(ref, prepared_dir: Path):
    """The base's tokenizer with the chat template the data was rendered with; the adapter's
    tokenizer, then the merged one, stop where turns end."""
    template = prepared_dir / TEMPLATE_FILE
    loaded = models.load_tokenizer(ref, template.read_text(encoding="utf-8") if template.is_file() else None)
    if template.is_file():
        end_turns_for_servers(loaded, loaded.chat_template)
    return loaded


def processor(ref, prepared_dir: Path):
    """A vision-language base's processor, for data prepared as image chats (else None), with
    the chat template the data was rendered with."""
    from llmtune.manifest import read_manifest

    if not read_manifest(prepared_dir)["summary"].get("vision_language"):
        return None
    loaded = models.load_processor(ref)
    template = prepared_dir / TEMPLATE_FILE
    if template.is_file():
        loaded.chat_template = loaded.tokenizer.chat_template = template.read_text(encoding="utf-8")
        end_turns_for_servers(loaded.tokenizer, loaded.chat_template)
    return loaded


def datasets(prepared_dir: Path, row, seed: int, group_by_length: bool):
    """(train set, validation set or None) as the objective reads them: grouped by length (the
    sampler reads a `length` column instead of decoding every row), shuffled once by the seed
    (KTO: TRL reads its batches in order), or as they are (GRPO batches its prompts itself).
    An objective that evaluates no loss in training (GRPO would sample completions for every
    validation prompt) gets none: its held-out figures are `llmtune eval`'s."""
    train_set = load_from_disk(str(prepared_dir / "train"))
    if row.batches == "shuffled":
        train_set = train_set.shuffle(seed=seed).flatten_indices()
    elif row.batches == "grouped" and group_by_length:
        train_set = train_set.add_column("length", _lengths(train_set, row))
    validation = load_from_disk(str(prepared_dir / "validation"))
    if not (len(validation) and row.evaluates):
        return train_set, None
    validation = validation.remove_columns("sample")
    if row.trl is not None and row.batches == "grouped" and group_by_length:
        validation = validation.add_column("length", _lengths(validation, row))  # as the Trainer groups it
    return train_set, validation


def _lengths(dataset, row) -> list[int]:
    if row.kind == "sft":
        return pc.list_value_length(dataset.data.column("input_ids")).to_pylist()
    return trl.lengths(dataset)  # a prompt and its longer answer


def collator(row, tokenizer, image_processor=None, prepared_dir: Path | None = None):
    """llmtune's padding collator for SFT examples (image chats: ImageCollator), else the
    objective's TRL collator."""
    if image_processor is not None:
        return ImageCollator(image_processor, prepared_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return PadCollator(pad_id) if row.trl is None else trl.collator(row, pad_id)


def adapter_model(recipe, ref, precision: str, pad_token_id: int | None = None):
    """The base (quantized for QLoRA), frozen weights in the compute dtype, with a fresh
    LoRA/DoRA adapter on it; with a score head for an objective that trains a reward model
    (`pad_token_id` marks where each sequence ends)."""
    quantize = recipe.model.quantize
    sharded = distributed.shards(recipe.distributed)  # FSDP and DeepSpeed place the weights themselves
    base = models.load_model(ref, precision, quantize=quantize, double_quant=recipe.model.double_quant,
                             compute_dtype=recipe.model.compute_dtype,
                             shardable=distributed.shards_quantized_weights(recipe.distributed, quantize),
                             device=None if sharded else "local", head=objective(recipe.train.objective).head,
                             pad_token_id=pad_token_id)
    # With a cache, transformers does not read packed position ids as sequence boundaries, and
    # packed examples would attend to each other; training never uses the cache anyway.
    # (GRPO generates its completions: there the cache is what makes generation fast.)
    base.config.use_cache = objective(recipe.train.objective).generates
    if quantize != "none":
        _keep_4bit_weights_trainable(base)
    # QLoRA needs nothing more: the Trainer enables gradient checkpointing (non-reentrant, so
    # inputs need not require grads). peft's prepare_model_for_kbit_training would also cast
    # every weight it does not quantize (embeddings, output head, norms) to fp32: for an 8B
    # Llama 3 that is 2.1 GB more, for stability that bf16 autocast does not need.
    try:
        model = get_peft_model(base, lora_config(recipe, base))
    except ValueError as exc:  # peft names the modules it could not find
        raise InputError(f"adapter: {exc}", hint="check adapter.target_modules against the model's "
                         "module names, or use target_modules: all-linear") from None
    _trainable_in_fp32(model)
    # Where a PEFT loader looks for the base: the hub id, or the local folder we trained on.
    model.peft_config["default"].base_model_name_or_path = (
        ref.source if ref.kind == "hub" else str(ref.local_dir))
    if precision in ("bf16", "fp16") and not objective(recipe.train.objective).generates:
        # (GRPO generates outside autocast: there peft's cast is what makes the dtypes meet.)
        # The Trainer runs every forward under autocast (accelerate wraps it), where a matmul
        # takes mixed dtypes; peft's cast of each LoRA input to the adapter's fp32 then only
        # makes fp32 copies of the activations. Off: SmolLM2 on 64 GSM8K chats peaked at
        # 2.1-2.2 GB of RSS instead of 2.6-3.2 GB, and trained as fast or faster (bench_train).
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False
    return model


def _trainable_in_fp32(model) -> None:
    """Every trained parameter in fp32, whatever the frozen weights' dtype. peft upcasts its
    adapter layers only: modules_to_save copies (embed_tokens, lm_head) keep the base's 16-bit
    dtype and would train as pure bf16, or under fp16 stop the loss scaler at the first step
    ("Attempting to unscale FP16 gradients"). The optimizer then holds fp32 master weights for
    all of them, and autocast computes in 16 bits. Outside autocast (GRPO generates there) such
    a module takes and gives the frozen dtype, as before."""
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad and p.dtype != torch.float32]
        if not own:
            continue
        frozen_dtype = own[0].dtype
        for param in own:
            param.data = param.data.float()
        module.register_forward_pre_hook(_inputs_to_fp32_outside_autocast)
        module.register_forward_hook(functools.partial(_output_to_outside_autocast, frozen_dtype))


def _autocasting(module) -> bool:
    return torch.is_autocast_enabled(next(module.parameters()).device.type)


def _inputs_to_fp32_outside_autocast(module, args):
    if _autocasting(module):
        return None
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _output_to_outside_autocast(dtype, module, args, output):
    if _autocasting(module) or not torch.is_tensor(output) or not output.is_floating_point():
        return None
    return output.to(dtype)


def _keep_4bit_weights_trainable(model) -> None:
    """bitsandbytes 0.50, on a CPU with AVX512-BF16, repacks a 4-bit layer's weights for a
    faster kernel the first time the layer runs in eval mode, and that kernel has no backward:
    training after an evaluation (the loss before training) then got gradients 133% off through
    every 4-bit layer (SmolLM2, measured; tests/test_train.py). Never repack a model in training."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "loftq": "loftq"}


def lora_config(recipe, model=None) -> LoraConfig:
    """The peft LoraConfig for the recipe's adapter section (plan builds the same on the meta
    device). peft takes layers_to_transform only with a list of module names: with all-linear,
    the names of `model`'s linear layers but the output head are listed."""
    adapter = recipe.adapter
    extra = {}
    targets = adapter.target_modules
    to_save = list(adapter.modules_to_save)
    vision_language = model is not None and getattr(model.config, "vision_config", None) is not None
    if adapter.vision != "frozen" and model is not None and not vision_language:
        raise InputError(f"adapter.vision: {adapter.vision} is for vision-language models; this base has no "
                         "vision tower", hint="remove adapter.vision")
    if vision_language:
        if adapter.layers_to_transform is not None:
            raise InputError("adapter.layers_to_transform is not supported for vision-language models yet",
                             hint="remove it, or name the modules with a regex in adapter.target_modules")
        if targets == "all-linear" or isinstance(targets, list):  # a regex is taken as written
            targets, projector_to_save = vision_language_targets(model, adapter.vision,
                                                                 None if targets == "all-linear" else targets)
            to_save += [name for name in projector_to_save if name not in to_save]
    if adapter.layers_to_transform is not None and targets == "all-linear" and model is not None:
        targets = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                          if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")})
    if adapter.init == "loftq":
        if recipe.model.quantize != "none":
            raise InputError("adapter.init: loftq quantizes the base itself; use it with model.quantize: none")
        extra["loftq_config"] = LoftQConfig(loftq_bits=4)
    return LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        layers_to_transform=adapter.layers_to_transform,
        rank_pattern=dict(adapter.rank_pattern),
        alpha_pattern=dict(adapter.alpha_pattern),
        lora_dropout=adapter.dropout,
        target_modules=targets,
        modules_to_save=to_save or None,
        use_dora=adapter.method == "dora",
        use_rslora=adapter.rslora,
        init_lora_weights=_INIT[adapter.init],
        # a score head is trained in full beside the adapter (peft adds it to modules_to_save)
        task_type="SEQ_CLS" if objective(recipe.train.objective).head == "score" else "CAUSAL_LM",
        **extra,
    )


# --- vision-language models (issue 31) ------------------------------------------------------------
VISION_CHOICES = typing.get_args(AdapterSection.model_fields["vision"].annotation)  # adapter.vision


def vision_language_targets(model, vision: str = "frozen", only: list[str] | None = None) -> tuple[str, list[str]]:
    """LoRA's target_modules (a regular expression, which peft matches against whole module
    names) and modules_to_save for a vision-language model. peft's own `all-linear` also adapts
    the vision tower and the projector (it did on both tiny families, peft 0.21); here the
    language model's linear layers are the default, `vision: lora` adds the tower's, and
    `vision: train_projector` trains the projector in full besides. `only`: the linear
    layers of these names (adapter.target_modules as a list), else all of them."""
    if vision not in VISION_CHOICES:
        raise ValueError(f"vision: {vision} (choices: {', '.join(VISION_CHOICES)})")
    decoder = model.get_decoder()
    names = {id(module): name for name, module in model.named_modules()}
    language = names[id(decoder)]
    parts = [language]
    tower, projector = models.vision_parts(model)
    if vision == "lora" and tower:
        parts.append(tower)
    leaves = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if isinstance(module, torch.nn.Linear) and any(name.startswith(p + ".") for p in parts)
                     and (only is None or name.rsplit(".", 1)[-1] in only)})
    if not leaves:
        raise InputError(f"adapter.target_modules: none of {only} is a linear layer of the language model")
    pattern = rf"({'|'.join(re.escape(p) for p in parts)})\..*\.({'|'.join(map(re.escape, leaves))})"
    to_save = [projector.rsplit(".", 1)[-1]] if vision == "train_projector" and projector else []
    return pattern, to_save
