"""Write a merged transformers model as one GGUF file, natively with the `gguf` package.

llama.cpp's own converter is a script in its source tree, not part of any package; this is the
part of it our supported architectures need (tensor names from gguf's TensorNameMap, the Q/K
row permutation llama.cpp's rotary embedding expects, hyperparameters, the tokenizer with its
pre-tokenizer, special tokens and chat template). Quantization uses gguf's numpy quantizers;
k-quants are made from an f16 file by llama-cpp-python's quantize API. Files are checked
against the merged model by `gguf_verify` before export calls them done.

Tensors are read one at a time from the safetensors shards and written as they come, so memory
stays near the largest tensor.
"""

from __future__ import annotations

import json
import math
from hashlib import sha256
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open

from llmtune import models
from llmtune.console import console
from llmtune.errors import InputError
from llmtune.stages.merge.shards import base_tensors, tensor_shapes

# transformers model_type -> GGUF architecture. Mistral uses the llama graph in llama.cpp.
ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA,
                 "qwen2": gguf.MODEL_ARCH.QWEN2}
Q = gguf.GGMLQuantizationType
# Not q4_1/q5_1: gguf-py's quantizers for those round-trip oddly (q4_1 with less error than
# q8_0 on SmolLM2 weights), and the files agree worse with the model than q4_0/q5_0 do.
NATIVE_QUANTS = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0,
                 "q5_0": Q.Q5_0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0}
# The output projection (the embeddings, when tied) decides every next token; at 4-5 bits it
# cost SmolLM2-135M up to 12 points of next-token agreement (scripts/bench_gguf.py), so it
# stays 8-bit, and so do untied input embeddings (a lookup: cheap to keep precise).
OUTPUT_TENSORS = {"output.weight", "token_embd.weight"}
LOW_BIT = {Q.Q4_0, Q.Q5_0}

# llama.cpp picks its pre-tokenizer (the regex that splits text before BPE) by name. Its
# converter names it by hashing the token ids of this text; these are its hashes for the
# families we support (from llama.cpp's convert_hf_to_gguf.py).
PRE_TOKENIZER_PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български ''''''```````"
    "\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, "
    "'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5/2/2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM 1/2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
}


def gguf_architecture(model_dir: Path):
    config = models.load_config(Path(model_dir))
    if config.model_type not in ARCHITECTURES:
        raise InputError(
            f"export: GGUF export does not support model_type {config.model_type!r}",
            hint=f"supported: {', '.join(sorted(ARCHITECTURES))}; export hf and convert with "
                 "llama.cpp's convert_hf_to_gguf.py, or drop gguf/ollama from export.formats",
        )
    return config, ARCHITECTURES[config.model_type]


def write_gguf(model_dir: Path, target: Path, quant: str, name: str) -> dict:
    """Write `model_dir` (a merged transformers folder) to `target` at `quant` (a native type)."""
    config, arch = gguf_architecture(model_dir)
    tokenizer = models.load_tokenizer(Path(model_dir))
    writer = gguf.GGUFWriter(str(target), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(name)
    writer.add_file_type(FILE_TYPES[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_hyperparameters(writer, config)
    pre = _add_tokenizer(writer, tokenizer, model_dir, config.vocab_size)
    files = base_tensors(model_dir)
    shapes = tensor_shapes(files)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    plan = []  # (hf name, gguf name, type)
    for hf_name in files:
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise InputError(f"export: no GGUF name for tensor {hf_name}",
                             hint="this checkpoint has tensors the llama family does not; export hf instead")
        wanted = NATIVE_QUANTS[quant]
        if gguf_name in OUTPUT_TENSORS and wanted in LOW_BIT:
            wanted = Q.Q8_0  # what llama-quantize does too (it picks q6_k, which gguf-py lacks)
        plan.append((hf_name, gguf_name, _tensor_type(shapes[hf_name], wanted)))
    rope_factors = _llama3_rope_factors(config)
    if rope_factors is not None:
        writer.add_tensor_info(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                               rope_factors.shape, np.dtype(np.float32), rope_factors.nbytes)
    for hf_name, gguf_name, qtype in plan:
        _add_info(writer, gguf_name, shapes[hf_name], qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    if rope_factors is not None:
        writer.write_tensor_data(rope_factors)
    for hf_name, _, qtype in plan:
        writer.write_tensor_data(_convert(_read(files[hf_name], hf_name), hf_name, config, qtype))
    writer.close()
    return {"architecture": gguf.MODEL_ARCH_NAMES[arch], "pre_tokenizer": pre, "tensors": len(plan)}


def _add_hyperparameters(writer: gguf.GGUFWriter, config) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif kind == "llama3":
        pass  # written as the rope_freqs tensor: _llama3_rope_factors
    elif kind != "default":
        raise InputError(f"export: GGUF export does not handle rope_type {kind!r} yet",
                         hint="export hf and convert with llama.cpp's convert_hf_to_gguf.py")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", False):
        raise InputError("export: sliding-window attention is not written to GGUF by llmtune",
                         hint="export hf and convert with llama.cpp's convert_hf_to_gguf.py")


def _llama3_rope_factors(config) -> np.ndarray | None:
    """Llama 3.1+ frequency-dependent RoPE scaling, as the per-frequency factors llama.cpp reads
    from a rope_freqs tensor (the same formula as transformers' llama3 rope init)."""
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type") != "llama3":
        return None
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context = rope["original_max_position_embeddings"]
    factors = []
    for freq in freqs:
        wavelength = 2 * math.pi / freq
        if wavelength < old_context / high:
            factors.append(1.0)
        elif wavelength > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer, model_dir: Path, vocab_size: int) -> str:
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend["model"]
    if model["type"] != "BPE" or model.get("byte_fallback"):
        raise InputError(
            "export: GGUF export supports byte-level BPE tokenizers (Llama 3, Qwen2, SmolLM, "
            f"Mistral Nemo); this one is {model['type']}{' with byte fallback' if model.get('byte_fallback') else ''}",
            hint="export hf and convert with llama.cpp's convert_hf_to_gguf.py",
        )
    tokens, types = _vocab(tokenizer, vocab_size)
    digest = sha256(str(tokenizer.encode(PRE_TOKENIZER_PROBE)).encode()).hexdigest()
    pre = PRE_TOKENIZERS.get(digest, "default")
    if digest not in PRE_TOKENIZERS:
        console.print("[yellow]warning:[/] export: the tokenizer's pre-tokenizer is not one llmtune knows; "
                      "llama.cpp's default is written (the export check compares tokenizations)", markup=True)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in model.get("merges", [])]
    # llama.cpp refuses a BPE vocabulary without the merges key, even an empty one.
    writer.add_token_merges(merges or [""])
    special = gguf.SpecialVocab(model_dir, load_merges=False, n_vocab=vocab_size)
    special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)
    # Whether plain encoding adds BOS/EOS, as transformers does it for this tokenizer.
    plain = tokenizer("x", add_special_tokens=False).input_ids
    probe = tokenizer("x").input_ids
    writer.add_add_bos_token(len(probe) > len(plain) and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(len(probe) > len(plain) and probe[-1] == tokenizer.eos_token_id)
    return pre


def _vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens in id order with llama.cpp's types: added special tokens are CONTROL (parsed as one
    token in chat text), other added ones USER_DEFINED, ids the tokenizer lacks UNUSED."""
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _tensor_type(shape: tuple[int, ...], wanted) -> gguf.GGMLQuantizationType:
    """Norms and biases stay f32 (as llama.cpp's converter does); rows that do not split into
    whole quantization blocks fall back to f16."""
    if len(shape) == 1 or wanted == Q.F32:
        return Q.F32
    if wanted in (Q.F16, Q.BF16):
        return wanted
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    return wanted if shape[-1] % block == 0 else Q.F16


def _add_info(writer: gguf.GGUFWriter, name: str, shape: tuple[int, ...], qtype) -> None:
    """Declare a tensor before any data is written (GGUF puts every tensor's info first)."""
    if qtype in (Q.F32, Q.F16):
        dtype = np.dtype(np.float32 if qtype == Q.F32 else np.float16)
        writer.add_tensor_info(name, shape, dtype, math.prod(shape) * dtype.itemsize)
    else:
        byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
        writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=qtype)


def _read(path: Path, name: str) -> torch.Tensor:
    with safe_open(str(path), "pt") as reader:
        return reader.get_tensor(name).float()


def _convert(tensor: torch.Tensor, name: str, config, qtype) -> np.ndarray:
    if config.model_type in ("llama", "mistral"):
        # llama.cpp applies rotary embeddings to interleaved pairs; transformers to two halves.
        if name.endswith("self_attn.q_proj.weight"):
            tensor = _permute(tensor, config.num_attention_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            tensor = _permute(tensor, config.num_key_value_heads)
    data = tensor.numpy()
    if qtype == Q.F32:
        return data
    if qtype == Q.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def _permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))
