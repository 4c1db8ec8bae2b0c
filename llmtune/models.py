"""The one place that loads models, tokenizers and their configs, and the one loading policy.

Every stage and command that needs a model asks here; no other module calls `from_pretrained`
(tests/test_models.py checks). The policy:
- device: the local rank's GPU when there is one (LOCAL_RANK under torchrun), else the CPU;
- precision (`train.precision: auto`): bf16 where bf16 matmuls are native (GPUs of compute
  capability 8.0 and up, CPUs with AVX512-BF16 or AMX); fp16 with loss scaling on older GPUs,
  whose bf16 is emulated; fp32 elsewhere. Frozen weights are loaded in that dtype, so no fp32
  copy is cast on every matmul; the adapter's own weights and the optimizer stay fp32 (peft);
- bitsandbytes (QLoRA) places its quantized weights on the local GPU through `device_map`;
- tokenizers without a pad token get one that is already in their vocabulary (see
  `ensure_pad_token`); the vocabulary and embeddings never change.

Where base models come from and how they are fingerprinted: model_sources.py.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import warnings
from pathlib import Path

import torch
import transformers
from rich.markup import escape
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
)

from llmtune.console import console
from llmtune.errors import InputError
from llmtune.model_ref import CONVERTED_MARKER, ModelRef

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_OF = {dtype: name for name, dtype in DTYPES.items()}
# recipe spellings of dtypes (model.compute_dtype, merge.dtype: torch's names, or the
# precision names train.precision uses) -> precision names, which llmtune uses throughout
DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}
# Reserved padding tokens some vocabularies carry (Llama 3.1+: <|finetune_right_pad_id|>).
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|padding|>")


def quiet_libraries() -> None:
    """Keep library chatter (per-tensor progress bars, optional-kernel notices) off the terminal."""
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # peft calls transformers APIs that transformers has deprecated; users cannot act on it
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    import datasets

    datasets.disable_progress_bars()


# --- the policy --------------------------------------------------------------------------------


def local_device() -> torch.device:
    """The local rank's GPU when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def pick_device() -> str:
    return local_device().type


def auto_precision(device: str, capability: tuple[int, int] | None = None,
                   cpu_native_bf16: bool = False) -> str:
    """What `precision: auto` means on a device: bf16 where its matmuls are native, fp16 (with
    loss scaling) on GPUs before compute capability 8.0 (T4, V100: bf16 only emulated, which
    torch.cuda.is_bf16_supported() counts), fp32 on CPUs without AVX512-BF16 or AMX (torch
    emulates bf16 there, slower than fp32)."""
    if device == "cuda":
        return "bf16" if capability is not None and tuple(capability) >= (8, 0) else "fp16"
    return "bf16" if cpu_native_bf16 else "fp32"


def precision(choice: str = "auto", device: str | None = None) -> str:
    """The recipe's `train.precision` made concrete for `device` (default: the local device)."""
    if choice != "auto":
        return choice
    device = device or pick_device()
    if device == "cuda":
        return auto_precision("cuda", torch.cuda.get_device_capability(local_device()))
    return auto_precision("cpu", cpu_native_bf16=cpu_has_native_bf16())


def free_memory(device: torch.device) -> int:
    """Bytes free for more work on `device`. On a GPU: the driver's free memory plus what torch's
    caching allocator holds without using (reserved − allocated), which mem_get_info counts as
    taken although the next allocation reuses it. On the CPU: the system's available memory."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not limit


def room_needed(weight_bytes: int) -> int:
    """Device memory a model of `weight_bytes` needs to be run once more by merge, eval or the
    GGUF check: its weights and a margin for their activations and the few examples' logits
    (several fp32 copies of 4 x 128 tokens x a 128k vocabulary are ~1 GB). plan uses it too."""
    return int(weight_bytes * 1.1 + 2e9)


def fitting_device(weight_bytes: int, what: str) -> torch.device:
    """The local GPU when a model of `weight_bytes` fits in its free memory, else the CPU. Merge,
    eval's merged model and the GGUF check are bound by memory, not compute: on the CPU they are
    slower but finish (a QLoRA run's float model may be twice its GPU)."""
    device = local_device()
    if device.type != "cuda":
        return device
    free = free_memory(device)
    if room_needed(weight_bytes) <= free:
        return device
    console.print(f"{what}: {weight_bytes / 1e9:.1f} GB of weights do not fit the GPU's {free / 1e9:.1f} GB "
                  "free; running on the CPU (slower, same result)")
    return torch.device("cpu")


def weight_bytes(source: ModelRef | Path, precision: str) -> int:
    """The bytes of a model folder's weights in `precision`, from the safetensors headers."""
    from safetensors import safe_open

    count = 0
    for path in Path(_folder(source)[0]).glob("*.safetensors"):
        with safe_open(str(path), "pt") as reader:
            for key in reader.keys():
                shape = reader.get_slice(key).get_shape()
                count += int(torch.Size(shape).numel())
    return count * DTYPES[precision].itemsize


def release_memory(device: torch.device) -> None:
    """Hand the memory of models dropped since back to the device: the next model loaded (eval's
    merged after base+adapter) and other processes see it free, and batch sizing counts it."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX (recent Xeons, AMD Zen 4+). Private in torch 2.13 (torch.cpu._is_*);
    a torch without them counts as no native bf16."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def ensure_pad_token(tokenizer) -> str | None:
    """Give a tokenizer without a pad token (Llama 3.x, Mistral v0.3) one from its own
    vocabulary: a reserved padding token if it has one, else its unknown token, else its EOS.
    Never a new token: that would resize the embeddings, and adapters and servers would then
    disagree about the vocabulary. Padding is masked by position everywhere (labels -100,
    attention masks), never by id, so any id serves. Returns the token chosen, or None."""
    if tokenizer.pad_token is not None:
        return None
    vocab = tokenizer.get_vocab()
    chosen = next((token for token in PAD_CANDIDATES if token in vocab), None)
    chosen = chosen or tokenizer.unk_token or tokenizer.eos_token
    if chosen is not None:
        tokenizer.pad_token = chosen
    return chosen


# --- loading -----------------------------------------------------------------------------------


def load_tokenizer(source: ModelRef | Path, chat_template: str | None = None):
    """The tokenizer of a base model (ModelRef) or of a folder we wrote (adapter, merged), with
    the pad-token rule applied and, when given, the chat template the data was prepared with."""
    folder, trust = _folder(source)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust)
    if isinstance(source, ModelRef):  # what messages call it (data/probe.py): the recipe's name for it
        tokenizer.llmtune_source = source.source
    ensure_pad_token(tokenizer)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


# where vision-language models keep their vision tower and projector (transformers 5 names:
# LLaVA, Gemma 3: vision_tower + multi_modal_projector; Idefics3/SmolVLM: vision_model +
# connector; mllama: vision_model + multi_modal_projector; Qwen2.5-VL: visual, its merger inside)
VISION_TOWERS = ("vision_tower", "vision_model", "visual")
VISION_PROJECTORS = ("multi_modal_projector", "connector", "merger")
VISION_MODULES = VISION_TOWERS + VISION_PROJECTORS


def vision_parts(model) -> tuple[str | None, str | None]:
    """The module names of a vision-language model's vision tower and projector (None where
    it has none)."""
    names = [name for name, _ in model.named_modules()]
    tower = next((name for name in names if name.endswith(VISION_TOWERS)), None)
    projector = next((name for name in names if name.endswith(VISION_PROJECTORS)), None)
    return tower, projector


def is_vision_language(source: ModelRef | Path) -> bool:
    """Whether a model folder holds a vision-language model, from its config alone (no recipe
    switch): a vision tower in the config, and a model type transformers loads as
    AutoModelForImageTextToText (Qwen2.5-VL, Gemma 3, Idefics3/SmolVLM, LLaVA, mllama, ...).
    Gemma 3's text-only checkpoints (gemma3_text) are language models."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    try:
        config = json.loads((Path(_folder(source)[0]) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return config.get("model_type") in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and "vision_config" in config


def load_processor(source: ModelRef | Path):
    """A vision-language model's processor (image processor, tokenizer, chat template), with the
    pad-token rule applied to its tokenizer."""
    from transformers import AutoProcessor

    folder, trust = _folder(source)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=trust)
    ensure_pad_token(processor.tokenizer)
    return processor


def load_config(source: ModelRef | Path):
    folder, trust = _folder(source)
    return AutoConfig.from_pretrained(folder, trust_remote_code=trust)


def load_generation_config(source: ModelRef | Path) -> GenerationConfig:
    """The folder's generation settings, or the defaults when it has none."""
    try:
        return GenerationConfig.from_pretrained(_folder(source)[0])
    except OSError:
        return GenerationConfig()


def load_lora_config(adapter_dir: Path):
    from peft import LoraConfig

    return LoraConfig.from_pretrained(str(adapter_dir))


def stored_dtype(source: ModelRef | Path) -> torch.dtype:
    """The dtype a model folder's weights are stored in (config `dtype`, else the first
    safetensors tensor's), float32 when neither says."""
    folder = Path(_folder(source)[0])
    config = json.loads((folder / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype")
    if isinstance(name, str) and getattr(torch, name, None) in DTYPES.values():
        return getattr(torch, name)
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as reader:
            for key in reader.keys():
                return _SAFETENSORS_DTYPES.get(reader.get_slice(key).get_dtype(), torch.float32)
    return torch.float32


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def load_model(source: ModelRef | Path, precision: str = "fp32", *, quantize: str = "none",
               double_quant: bool = True, compute_dtype: str = "auto", shardable: bool = False,
               device: torch.device | str | None = "local", head: str | None = None,
               pad_token_id: int | None = None):
    """A base model (ModelRef) or a folder we wrote, frozen weights in `precision`'s dtype, on
    `device` ("local": the local device; None: the CPU, for FSDP and DeepSpeed to place), or
    quantized by bitsandbytes (QLoRA) when `quantize` says so. `compute_dtype` (QLoRA's
    model.compute_dtype) then overrides the dtype of what is not quantized; `shardable`: 4-bit
    weights stored in that dtype, so FSDP and ZeRO-3 can shard them like any tensor. `head`:
    "causal-lm" (next-token logits) or "score" (one number per sequence, a reward model; its
    `pad_token_id` marks each sequence's last token); None: as the folder's config says."""
    folder, trust = _folder(source)
    head = head or head_of(Path(folder))
    vision_language = head != "score" and is_vision_language(source)  # loaded as AutoModelForImageTextToText
    allow_pickle = isinstance(source, ModelRef) and source.allow_pickle
    dtype = DTYPES[precision]
    device = local_device() if device == "local" else device
    extra = {}
    if quantize != "none":
        if compute_dtype != "auto":
            dtype = DTYPES[DTYPE_NAMES[compute_dtype]]
        from transformers import BitsAndBytesConfig

        # a vision-language model's tower and projector stay in the compute dtype: QLoRA quantizes
        # the language model (the head is never quantized either way)
        # (transformers 5 matches these from the name's start, as regular expressions, or as suffixes)
        skip = ({"llm_int8_skip_modules": [*(f".*{m}" for m in VISION_MODULES), "lm_head"]}
                if vision_language else {})
        if quantize == "int8":
            extra["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True, **skip)
        else:
            extra["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=quantize,
                bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=dtype,
                bnb_4bit_quant_storage=dtype if shardable else torch.uint8, **skip)
    if device is not None and torch.device(device).type == "cuda":
        # bitsandbytes quantizes while loading onto the GPU; plain weights go straight there too
        extra["device_map"] = {"": torch.device(device)}
    # use_safetensors=True: transformers never falls back to a pickle file next to the
    # safetensors. With allow_pickle it may; torch.load there runs with weights_only=True.
    if head == "score":
        extra["num_labels"] = 1  # a new score head on a language model: initialised, and trained in full
    loader = AutoModelForSequenceClassification if head == "score" else AutoModelForCausalLM
    if vision_language:
        from transformers import AutoModelForImageTextToText

        loader = AutoModelForImageTextToText
    try:
        model = loader.from_pretrained(
            folder, dtype=dtype, use_safetensors=None if allow_pickle else True,
            trust_remote_code=trust, **extra,
        )
    except pickle.UnpicklingError:  # model.allow_pickle on a file that holds more than tensors
        raise InputError(f"{folder}: a pickle file there holds more than weights, and torch's weights-only "
                         "loader refused it (nothing in it ran)",
                         hint="convert the weights to safetensors where you trust them, or use another model") from None
    if head == "score" and pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    _contiguous_head_input(model)
    return model


def scores_sequences(model) -> bool:
    """Whether a loaded model (or PEFT model) is a reward model: a score head, no vocabulary."""
    from peft import PeftModel

    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    return type(inner).__name__.endswith("ForSequenceClassification")


def head_of(folder: Path) -> str:
    """"score" for a reward model (a PEFT adapter for sequence classification, or a model folder
    whose architecture scores sequences), else "causal-lm"."""
    for name, is_score in (("adapter_config.json", lambda c: c.get("task_type") == "SEQ_CLS"),
                           ("config.json", lambda c: any(a.endswith("ForSequenceClassification")
                                                         for a in c.get("architectures") or []))):
        try:
            if is_score(json.loads((folder / name).read_text())):
                return "score"
        except (OSError, ValueError):
            continue
    return "causal-lm"


def _contiguous_head_input(model) -> None:
    """Hand the output head a contiguous input. Generation runs it on the last position only,
    a [batch, 1, hidden] slice of the hidden states; with bf16 weights that need no gradient,
    torch 2.13's CPU matmul serves such a slice by expanding the whole weight per row: 2.1 GB
    and ~8 s for a batch of 4 with a 128k vocabulary, against 2 ms on a contiguous copy."""
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]) if args else None)


def load_adapter(model, adapter_dir: Path):
    """The PEFT adapter in `adapter_dir` on `model`, in eval mode. peft keeps the adapter's
    weights in fp32 on a 16-bit base (autocast_adapter_dtype)."""
    from peft import PeftModel

    if not (adapter_dir / "adapter_model.safetensors").is_file():
        pickled = sorted(p.name for p in adapter_dir.glob("adapter_model.*") if p.suffix in (".bin", ".pt", ".pth"))
        if pickled:  # a pickle can run code when opened; llmtune writes and loads safetensors only
            raise InputError(f"{adapter_dir / pickled[0]}: a pickle-based adapter, which can run code when loaded; "
                             "llmtune loads adapters in safetensors only",
                             hint="convert it (load it with peft where you trust it, then save_pretrained "
                             "with safe_serialization=True)")
    return PeftModel.from_pretrained(model, str(adapter_dir)).eval()


def convert_gguf(gguf_path: Path, target: Path, marker: dict) -> None:
    """Dequantize a GGUF file once into a plain transformers folder, holding one copy of the
    weights: in bf16 for quantized and bf16 files (the dequantized values lose nothing a 4- to
    8-bit file had), in the file's own type for f16 and f32 files."""
    # One folder per process: ranks of a distributed job may convert into the same cache at once.
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    if partial.exists():
        shutil.rmtree(partial)
    dtype = _gguf_float_type(gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name
    console.print(f"model: converting {name} once into a {str(dtype).removeprefix('torch.')} model "
                  f"under {target.parent}")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    config = loaded.config
    # A GGUF-loaded model carries quantization_config (quant_method: gguf), which makes
    # transformers refuse to train and save it: rebuild it as a plain model around the same
    # tensors (built on the meta device and assigned, so there is never a second copy).
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    del loaded
    plain.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_token_ids(tokenizer, config),
        pad_token_id=tokenizer.pad_token_id,
    )
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / CONVERTED_MARKER).write_text(json.dumps(marker, indent=2))
    if (target / CONVERTED_MARKER).is_file():  # another process finished first
        shutil.rmtree(partial)
        return
    if target.exists():
        shutil.rmtree(target)
    try:
        partial.rename(target)
    except OSError:
        if not (target / CONVERTED_MARKER).is_file():
            raise
        shutil.rmtree(partial)


def _gguf_float_type(path: Path) -> torch.dtype:
    """f32 or f16 when every matrix in the file is stored so (exact), else bf16."""
    from gguf import GGMLQuantizationType, GGUFReader

    kinds = {tensor.tensor_type for tensor in GGUFReader(path).tensors if len(tensor.shape) > 1}
    if kinds == {GGMLQuantizationType.F32}:
        return torch.float32
    if kinds == {GGMLQuantizationType.F16}:
        return torch.float16
    return torch.bfloat16


def eos_token_ids(tokenizer, model_config) -> list[int]:
    """Every id that ends a turn: the tokenizer's EOS and the model's configured EOS ids."""
    ids = []
    for value in (tokenizer.eos_token_id, getattr(model_config, "eos_token_id", None)):
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, int) and item not in ids:
                ids.append(item)
    return ids


def _folder(source: ModelRef | Path) -> tuple[str, bool]:
    if isinstance(source, ModelRef):
        if source.trust_remote_code:
            announce_remote_code(source.local_dir)
        return str(source.local_dir), source.trust_remote_code
    return str(source), False


def remote_code_files(folder: Path) -> list[tuple[str, str]]:
    """The Python files in a model folder (what transformers may import under trust_remote_code,
    the module auto_map names and what it imports beside it), each with its sha256."""
    from llmtune.model_ref import file_sha256

    return [(path.name, file_sha256(path)) for path in sorted(Path(folder).glob("*.py"))]


_announced: set[str] = set()


def announce_remote_code(folder: Path) -> None:
    """Say, once per folder and before transformers imports any of it, which code
    model.trust_remote_code lets run: its files and their hashes, and code auto_map takes from
    other repositories. transformers never prompts: llmtune always passes the recipe's choice."""
    key = str(Path(folder).resolve())
    if key in _announced:
        return
    _announced.add(key)
    files = remote_code_files(Path(folder))
    listed = ", ".join(f"{name} (sha256 {digest[:12]}…)" for name, digest in files) or "no Python files"
    console.print(f"model.trust_remote_code: true: transformers may run the code in {escape(str(folder))}: "
                  f"{escape(listed)}")
    elsewhere = sorted({value for value in _auto_map_values(Path(folder)) if "--" in value})
    if elsewhere:
        console.print(f"  and code from other repositories that its auto_map names: {escape(', '.join(elsewhere))}")


def _auto_map_values(folder: Path) -> list[str]:
    values = []
    for name in ("config.json", "tokenizer_config.json"):
        try:
            auto_map = json.loads((folder / name).read_text()).get("auto_map") or {}
        except (OSError, ValueError):
            continue
        for value in auto_map.values():
            values += [item for item in (value if isinstance(value, list) else [value]) if isinstance(item, str)]
    return values
