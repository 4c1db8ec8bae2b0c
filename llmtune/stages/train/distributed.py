"""Training under torchrun or `accelerate launch`: who writes, and keeping the ranks in step.

The launchers start one process per device and set RANK, WORLD_SIZE and LOCAL_RANK; the
transformers Trainer (through accelerate) does the data-parallel work: it shards the batches,
averages the gradients, and writes each rank's RNG state into checkpoints. What llmtune adds:
rank 0 alone writes the run directory (resume state, checkpoint marks, adapter, manifest) while
the others wait at a barrier, and a stop signal seen by any rank stops all ranks at the same step.

One process uses one GPU, the local rank's: the `distributed` section (FSDP, DeepSpeed) applies
to several processes only, and a lone process on a host with several GPUs never spreads itself
over them (the Trainer would wrap the model in nn.DataParallel, which neither autocasts nor
suits bitsandbytes; see one_gpu_per_process).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from llmtune.errors import InputError

# The optimizer accelerate puts in place of the recipe's under DeepSpeed's optimizer offload
# (DeepSpeedCPUAdam, in AdamW mode): any other train.optimizer would silently become AdamW.
OFFLOAD_OPTIMIZERS = ("adamw",)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def shards(section) -> bool:
    """Whether the recipe's strategy shards the model here: FSDP or DeepSpeed, several processes."""
    return section.strategy != "ddp" and world_size() > 1


def single_process_notice(section) -> str | None:
    """What a lone process says about a `distributed.strategy` it does not apply."""
    if section.strategy == "ddp" or world_size() > 1:
        return None
    return (f"distributed.strategy {section.strategy} applies to several processes (llmtune launch, "
            "torchrun, accelerate launch); this is one process on one device, trained as usual")


def process_group_backend(section, device: str) -> str | None:
    """The process group's backend when accelerate's default does not do: FSDP on GPUs also
    needs gloo for the CPU tensors of offloaded parameters and of the gradient-norm reduction
    (accelerate picks NCCL alone when the group is made before the Trainer's FSDP settings)."""
    if device == "cuda" and section.strategy == "fsdp":
        return "cuda:nccl,cpu:gloo"
    return None


def start(device: str, section) -> None:
    """Join the process group when launched with several processes: accelerate picks gloo on
    CPU, nccl on GPUs (with gloo beside it for FSDP), each rank's GPU from LOCAL_RANK, as the
    Trainer later expects; collectives wait `distributed.timeout_minutes` (torch's default, 10
    minutes, is shorter than rank 0 takes to download, convert or hash a large base model while
    the others wait for it)."""
    if world_size() > 1 and not dist.is_initialized():
        from accelerate import PartialState

        backend = process_group_backend(section, device)
        PartialState(cpu=device == "cpu", timeout=timedelta(minutes=section.timeout_minutes),
                     **({"backend": backend} if backend else {}))


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


def any_rank(flag: bool | torch.Tensor) -> bool:
    """True on every rank when it is true on any rank (one all-reduce). A flag may be a tensor
    on the device, read once here."""
    if not active():
        return bool(flag)
    value = torch.as_tensor(flag).reshape(1).to(device=_device(), dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def sum_over_ranks(values: list[int]) -> list[int]:
    if not active():
        return values
    tensor = torch.tensor(values, dtype=torch.long, device=_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def _device() -> torch.device:
    # nccl reduces on the rank's own GPU, gloo on the CPU ("cuda:nccl,cpu:gloo" takes either)
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def one_gpu_per_process(arguments) -> None:
    """One process trains on one GPU. transformers counts every visible GPU in a process that
    was not launched distributed (TrainingArguments._setup_devices: n_gpu = device_count) and
    the Trainer then wraps the model in nn.DataParallel, which runs replicas without autocast
    (LoRA's fp32 weights meet bf16 inputs: "expected m1 and m2 to have the same dtype") and
    multiplies the batch by the GPU count onto cuda:0 for QLoRA. The model is on the local
    rank's GPU already (models.local_device)."""
    if world_size() == 1 and arguments.n_gpu > 1:  # n_gpu sets the devices up first
        arguments._n_gpu = 1


def strategy_arguments(section, device: str, quantize: str, optimizer: str = "adamw",
                       processes: int | None = None) -> dict:
    """TrainingArguments for the recipe's `distributed` section; combinations that cannot work
    are refused here, before any model is loaded. One process ignores the section."""
    processes = world_size() if processes is None else processes
    if processes == 1:
        return {}
    timeout = {"ddp_timeout": section.timeout_minutes * 60}
    strategy = section.strategy
    if strategy == "ddp":
        # LoRA trains every adapter weight in every step: no search for unused parameters
        return {"ddp_find_unused_parameters": False, **timeout}
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
            # checkpoints hold a standard adapter (transformers saves the adapter alone under
            # FSDP2; the Trainer's own save_model is replaced, see trainable_state_dict)
            "state_dict_type": "FULL_STATE_DICT",
            # ranks > 0 build the base on the meta device; rank 0 loads and broadcasts it
            # (accelerate leaves 4-bit QLoRA weights out of this)
            "cpu_ram_efficient_loading": quantize == "none",
        }, **timeout}
    if section.cpu_offload and optimizer not in OFFLOAD_OPTIMIZERS:
        raise InputError(f"distributed.cpu_offload under DeepSpeed runs DeepSpeed's CPU Adam (AdamW) in "
                         f"place of train.optimizer {optimizer}",
                         hint="use train.optimizer: adamw with cpu_offload, or turn cpu_offload off")
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
    }, **timeout}


def prepare_sharded_loading(arguments: dict) -> None:
    """FSDP's loading without a copy of the base per rank: transformers reads these variables
    when it loads the model, which happens before the Trainer (whose arguments would set them)
    exists."""
    config = arguments.get("fsdp_config") or {}
    if arguments.get("fsdp") and config.get("cpu_ram_efficient_loading"):
        os.environ["ACCELERATE_USE_FSDP"] = "true"
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "true"


def trainable_state_dict(trainer) -> dict | None:
    """The trained tensors (adapter, modules_to_save), whole, on rank 0; None where the model
    holds them whole already (one process, DDP, ZeRO-2). Every rank must call it. Only the
    trainable parameters are gathered, never the frozen base: accelerate's get_state_dict would
    gather all of it under FSDP, and fails on a PEFT model under ZeRO-3, which wants the engine."""
    if trainer.is_fsdp_enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        return get_model_state_dict(trainer.model, options=options)
    if trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
        # as the Trainer's own save_model does for PEFT models under ZeRO-3
        return trainer.model_wrapped._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)
    return None


def sharded_parameters(model) -> int:
    """How many of `model`'s parameters FSDP2 has sharded (DTensors) on this rank."""
    from torch.distributed.tensor import DTensor

    return sum(isinstance(param, DTensor) for param in model.parameters())


def shards_quantized_weights(section, quantize: str) -> bool:
    """QLoRA under FSDP or ZeRO-3: the 4-bit weights are stored in the compute dtype so they can
    be sharded like any other tensor (peft's QLoRA + FSDP/DeepSpeed recipe)."""
    shards_weights = section.strategy == "fsdp" or (section.strategy == "deepspeed" and section.zero_stage == 3)
    return shards_weights and world_size() > 1 and quantize in ("nf4", "fp4")
