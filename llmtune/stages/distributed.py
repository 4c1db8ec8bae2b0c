"""Training under torchrun or `accelerate launch`: who writes, and keeping the ranks in step.

The launchers start one process per device and set RANK, WORLD_SIZE and LOCAL_RANK; the
transformers Trainer (through accelerate) does the data-parallel work: it shards the batches,
averages the gradients, and writes each rank's RNG state into checkpoints. What llmtune adds:
rank 0 alone writes the run directory (resume state, checkpoint marks, adapter, manifest) while
the others wait at a barrier, and a stop signal seen by any rank stops all ranks at the same step.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def start(device: str) -> None:
    """Join the process group when launched with several processes: accelerate picks gloo on
    CPU, nccl on GPUs, and each rank's GPU from LOCAL_RANK, as the Trainer later expects."""
    if world_size() > 1 and not dist.is_initialized():
        from accelerate import PartialState

        PartialState(cpu=device == "cpu")


def active() -> bool:
    return world_size() > 1 and dist.is_initialized()


def barrier() -> None:
    if active():
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (say, converting a model into the shared cache), then the
    other ranks, which then find its result."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def share_from_main(compute):
    """Run `compute()` on rank 0 alone and give every rank its result. If rank 0 raises, the
    launcher (torchrun) stops the other ranks waiting here."""
    if not active():
        return compute()
    box = [compute() if is_main() else None]
    dist.broadcast_object_list(box, src=0, device=_device())
    return box[0]


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any rank (one all-reduce)."""
    if not active():
        return flag
    value = torch.tensor([int(flag)], device=_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def sum_over_ranks(values: list[int]) -> list[int]:
    if not active():
        return values
    tensor = torch.tensor(values, dtype=torch.long, device=_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def _device() -> torch.device:
    # nccl reduces on the rank's own GPU, gloo on the CPU
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def strategy_arguments(section, device: str, quantize: str) -> dict:
    """TrainingArguments for the recipe's `distributed` section; combinations that cannot work
    are refused here, before any model is loaded."""
    from llmtune.errors import InputError

    strategy = section.strategy
    if strategy == "ddp":
        # LoRA trains every adapter weight in every step: no search for unused parameters
        return {"ddp_find_unused_parameters": False}
    if device != "cuda":
        # accelerate applies FSDP and DeepSpeed to GPU process groups only: on CPU the Trainer
        # would silently train plain data-parallel (checked with accelerate 1.15)
        raise InputError(f"distributed.strategy: {strategy} shards the model across GPUs and needs CUDA",
                         hint="on CPU use distributed.strategy: ddp")
    if quantize == "int8":
        raise InputError(f"distributed.strategy: {strategy} cannot shard bitsandbytes int8 weights",
                         hint="use model.quantize: nf4 (QLoRA), or distributed.strategy: ddp")
    if strategy == "fsdp":
        return {"fsdp": True, "fsdp_config": {
            "version": 2,
            "cpu_offload": section.cpu_offload,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # one shard unit per decoder layer
            "state_dict_type": "FULL_STATE_DICT",  # checkpoints hold a standard adapter
        }}
    if importlib.util.find_spec("deepspeed") is None:
        raise InputError("distributed.strategy: deepspeed needs the deepspeed package",
                         hint="pip install deepspeed (it compiles its CUDA ops on first use)")
    zero = {"stage": section.zero_stage}
    if section.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if section.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # a whole adapter on save
    # "auto": the Trainer fills these in from the train section, so the two never disagree
    return {"deepspeed": {
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }}


def sharded_parameters(model) -> int:
    """How many of `model`'s parameters FSDP2 has sharded (DTensors) on this rank."""
    from torch.distributed.tensor import DTensor

    return sum(isinstance(param, DTensor) for param in model.parameters())


def shards_quantized_weights(section, quantize: str) -> bool:
    """QLoRA under FSDP or ZeRO-3: the 4-bit weights are stored in the compute dtype so they can
    be sharded like any other tensor (peft's QLoRA + FSDP/DeepSpeed recipe)."""
    shards_weights = section.strategy == "fsdp" or (section.strategy == "deepspeed" and section.zero_stage == 3)
    return shards_weights and quantize in ("nf4", "fp4")
