"""A base model resolved to a local folder (ModelRef), and what identifies it: fingerprints that
hash file contents, each file's hash remembered by its identity (path, size, mtime, inode) in the
llmtune cache, so a base model of many gigabytes is hashed once, not by every command and every
rank. models.py loads a ModelRef; model_sources.py makes one. Nothing here imports torch."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from llmtune.manifest import sha256_file

CONVERTED_MARKER = "llmtune-converted.json"  # in a GGUF base converted into a transformers folder
# (and a vision-language model's processor: how many tokens an image expands into; text models
# have no such files, so their fingerprints are as before)
_TOKENIZER_FILES = ("tokenizer", "special_tokens", "chat_template", "vocab", "merges", "added_tokens",
                    "preprocessor_config", "processor_config")


@dataclass(frozen=True)
class ModelRef:
    """A base model resolved to a local transformers folder, with what identifies it."""

    source: str  # as the recipe wrote it
    kind: str  # embedded | gguf | local | hub
    local_dir: Path  # a transformers folder: config, tokenizer (and safetensors unless config_only)
    revision: str | None  # hub commit hash, when the source is a hub id
    allow_pickle: bool = False
    trust_remote_code: bool = False
    gguf_sha256: str | None = None  # the GGUF file's hash, for embedded and gguf sources

    @functools.cached_property
    def fingerprint(self) -> str:
        """Changes whenever the weights, config or tokenizer change; computed on first use
        (prepare and plan never need it, so they never hash the weights)."""
        if self.kind == "hub":
            return f"hub:{self.source}@{self.revision}"
        if self.gguf_sha256:
            return f"sha256:{self.gguf_sha256}"
        return folder_fingerprint(self.local_dir)

    def as_manifest(self) -> dict[str, str | bool | None]:
        return {
            "source": self.source,
            "kind": self.kind,
            "revision": self.revision,
            "fingerprint": self.fingerprint,
            "allow_pickle": self.allow_pickle,
            "trust_remote_code": self.trust_remote_code,
        }


def cache_dir() -> Path:
    return Path(os.environ.get("LLMTUNE_CACHE") or Path.home() / ".cache" / "llmtune")


def folder_fingerprint(folder: Path) -> str:
    """sha256 over every file's name and content hash (weights, config, tokenizer)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if relative.startswith(".") or relative.lower().startswith("readme"):
            continue
        digest.update(f"{relative}\0{file_sha256(path)}\n".encode())
    return f"sha256:{digest.hexdigest()}"


def tokenizer_fingerprint(ref: ModelRef) -> str:
    """sha256 over the tokenizer, chat-template and processor files: what `prepare` output
    depends on."""
    digest = hashlib.sha256()
    for path in sorted(ref.local_dir.iterdir()):
        if path.is_file() and path.name.startswith(_TOKENIZER_FILES):
            digest.update(f"{path.name}\0{file_sha256(path)}\n".encode())
    return f"sha256:{digest.hexdigest()}"


def file_sha256(path: Path) -> str:
    """A file's sha256, remembered by its identity (resolved path, size, mtime in ns, inode) in
    <llmtune cache>/file-hashes.json: a file rewritten in place gets a new mtime and is hashed
    again. Concurrent writers (ranks of one job) may drop each other's entries; that costs one
    more hash later, never a wrong one."""
    path = Path(path).resolve()
    stat = path.stat()
    identity = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
    store = cache_dir() / "file-hashes.json"
    known = _read_json(store)
    entry = known.get(str(path))
    if isinstance(entry, dict) and entry.get("identity") == identity:
        return entry["sha256"]
    digest = sha256_file(path)
    known = _read_json(store)  # re-read: another process may have added entries meanwhile
    known[str(path)] = {"identity": identity, "sha256": digest}
    store.parent.mkdir(parents=True, exist_ok=True)
    tmp = store.with_name(f"{store.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(known), encoding="utf-8")
    os.replace(tmp, store)
    return digest


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
