"""Merge a PEFT LoRA-family adapter into its base one safetensors shard at a time.

peft's `merge_and_unload` needs the whole base model in memory. Here each output shard is built
from the base tensors it holds: the modules the adapter targets are rebuilt as plain
`nn.Linear` / `nn.Embedding` around those tensors, peft injects the adapter into them (with its
own config matching: target modules, rank and alpha patterns, rsLoRA, DoRA) and merges them with
its own code. Peak memory is about one output shard plus the adapter; the arithmetic stays
peft's. Tests compare the result with `merge_and_unload`.

Anything this cannot map onto the base tensors (a tied weight the adapter replaces, renamed
checkpoint keys, a layer type other than Linear/Embedding) raises `Unsupported`, and the caller
merges in memory instead.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from llmtune import models

ADAPTER_PREFIX = "base_model.model."
INDEX = "model.safetensors.index.json"
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
_DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


class Unsupported(Exception):
    """The adapter does not map onto the base checkpoint's tensors one to one."""


@dataclass(frozen=True)
class AdapterParts:
    state: dict[str, torch.Tensor]  # adapter tensors, keys without the "base_model.model." prefix
    linear: set[str]  # module names with LoRA on a Linear layer
    embedding: set[str]  # module names with LoRA on an Embedding layer
    replaced: dict[str, torch.Tensor]  # base tensor name -> trained full copy (modules_to_save)


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000, '500MiB' -> 524_288_000 (the recipe schema checks the form)."""
    unit = text.lstrip("0123456789")
    return int(text[: len(text) - len(unit)]) * _UNITS[unit]


def base_tensors(base_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, in checkpoint order."""
    index = base_dir / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: base_dir / file for name, file in weight_map.items()}
    single = base_dir / "model.safetensors"
    if not single.is_file():
        raise Unsupported(f"no safetensors checkpoint in {base_dir}")
    with safe_open(str(single), "pt") as reader:
        return {name: single for name in reader.keys()}


def tensor_shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape, read from the safetensors headers (no weights loaded)."""
    shapes = {}
    for path in sorted(set(files.values())):
        with safe_open(str(path), "pt") as reader:
            for name in reader.keys():
                shapes[name] = tuple(reader.get_slice(name).get_shape())
    return shapes


def read_adapter(adapter_dir: Path, base_names: set[str]) -> AdapterParts:
    state = {key.removeprefix(ADAPTER_PREFIX): value
             for key, value in load_file(str(adapter_dir / "adapter_model.safetensors")).items()}
    linear, embedding, replaced = set(), set(), {}
    for key in state:
        module, _, part = key.partition(".lora_")
        if part.startswith("A."):
            linear.add(module)
        elif part.startswith("embedding_A"):
            embedding.add(module)
        elif ".base_layer." in key:
            continue  # peft saves the (unchanged) base embeddings next to embedding LoRA
        elif not part:
            # modules_to_save: peft saves "<module>.modules_to_save.<param>" or "<module>.<param>"
            name = key.replace(".modules_to_save.", ".")
            if name not in base_names:
                raise Unsupported(f"the adapter replaces {name}, which the base checkpoint does "
                                  "not store on its own (a tied or renamed weight)")
            replaced[name] = state[key]
    for module in linear | embedding:
        if f"{module}.weight" not in base_names:
            raise Unsupported(f"the adapter targets {module}, which has no weight in the base checkpoint")
    return AdapterParts(state, linear, embedding, replaced)


def plan_shards(names: list[str], shapes: dict[str, tuple], dtype: torch.dtype,
                max_bytes: int) -> list[list[str]]:
    """Consecutive tensors grouped into shards of at most `max_bytes` (one tensor may exceed it)."""
    shards, current, size = [], [], 0
    for name in names:
        nbytes = _DTYPE_BYTES[dtype] * math.prod(shapes[name])
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def unsupported(base_dir: Path, adapter_dir: Path) -> str | None:
    """Why this adapter cannot be merged shard by shard (and must be merged in memory), or None."""
    try:
        read_adapter(adapter_dir, set(base_tensors(base_dir)))
        config = models.load_lora_config(adapter_dir)
    except Unsupported as why:
        return str(why)
    if config.lora_bias or config.fan_in_fan_out:
        return "lora_bias and fan_in_fan_out adapters are merged in memory"
    return None


def merge_into_shards(base_dir: Path, adapter_dir: Path, out_dir: Path, dtype: torch.dtype,
                      max_shard_size: str, device: torch.device | str = "cpu") -> dict:
    """Write the merged model's safetensors (and index) into `out_dir`; return a summary.

    The arithmetic is exactly what peft's merge_and_unload does on the base loaded in `dtype` on
    `device` with the adapter on it (peft keeps the adapter in fp32 there): each weight is
    read, cast to `dtype`, and the fp32 delta added in place on `device`. So the merge stage
    can check this against that reference bit for bit, whatever the dtype."""
    why = unsupported(base_dir, adapter_dir)
    if why:
        raise Unsupported(why)
    files = base_tensors(base_dir)
    parts = read_adapter(adapter_dir, set(files))
    config = models.load_lora_config(adapter_dir)
    shapes = tensor_shapes(files)
    names = list(files)
    shards = plan_shards(names, shapes, dtype, parse_size(max_shard_size))
    merged_modules = 0
    weight_map, total = {}, 0
    for number, shard in enumerate(shards, start=1):
        tensors = _read(shard, files, dtype, device)
        merged_modules += _merge_shard(tensors, parts, config, dtype)
        file = ("model.safetensors" if len(shards) == 1
                else f"model-{number:05d}-of-{len(shards):05d}.safetensors")
        tensors = {name: tensor.to("cpu").contiguous() for name, tensor in tensors.items()}
        save_file(tensors, str(out_dir / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    expected = len(parts.linear) + len(parts.embedding)
    if merged_modules != expected:
        raise RuntimeError(f"merged {merged_modules} adapter modules, the adapter has {expected}")
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return {"shards": len(shards), "merged_modules": merged_modules,
            "replaced_tensors": len(parts.replaced), "bytes": total}


def _read(names: list[str], files: dict[str, Path], dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted({files[name] for name in names}):
        with safe_open(str(path), "pt") as reader:
            for name in names:
                if files[name] == path:
                    tensors[name] = reader.get_tensor(name).to(device=device, dtype=dtype)
    return {name: tensors[name] for name in names}


def _merge_shard(tensors: dict[str, torch.Tensor], parts: AdapterParts, config: LoraConfig,
                 dtype: torch.dtype) -> int:
    """Merge the adapter modules whose weights are in `tensors`, in place; return how many."""
    container = nn.Module()
    modules = []
    for module in sorted(parts.linear | parts.embedding):
        weight = tensors.get(f"{module}.weight")
        if weight is None:
            continue
        if module in parts.embedding:
            layer = nn.Embedding(*weight.shape, _weight=weight)
        else:
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
            layer.weight = nn.Parameter(weight)
        layer.requires_grad_(False)
        _attach(container, module, layer)
        modules.append(module)
    for name, value in parts.replaced.items():
        if name in tensors:
            tensors[name] = value.to(device=tensors[name].device, dtype=dtype)
    if not modules:
        return 0
    # As PeftModel.from_pretrained does: inject, keep the adapter in fp32 whatever the base's
    # dtype (autocast_adapter_dtype), then copy the saved fp32 values in.
    inject_adapter_in_model(config, container)
    for key, param in container.named_parameters():
        if ".lora_" in key:
            param.data = param.data.float()
    wanted = {key: value for key, value in parts.state.items()
              if key.partition(".lora_")[0] in modules and ".lora_" in key}
    result = set_peft_model_state_dict(container, wanted)
    if result.unexpected_keys:
        raise Unsupported(f"adapter tensors peft did not place: {result.unexpected_keys[:3]}")
    merged = 0
    with torch.no_grad():
        for name, layer in container.named_modules():
            if isinstance(layer, LoraLayer):
                layer.merge()
                tensors[f"{name}.weight"] = layer.get_base_layer().weight.data
                merged += 1
    return merged


def _attach(root: nn.Module, path: str, layer: nn.Module) -> None:
    *parents, leaf = path.split(".")
    for name in parents:
        if not hasattr(root, name):
            root.add_module(name, nn.Module())
        root = getattr(root, name)
    root.add_module(leaf, layer)
