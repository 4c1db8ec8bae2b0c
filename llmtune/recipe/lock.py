"""`RECIPE.lock`: what a recipe resolved to when it was locked, checked before every stage.

The lock records the model (hub commit hash, or the content fingerprint of a local, GGUF or
embedded model), the sha256 of every local data file the recipe reads, and the llmtune version.
A shared recipe plus its lock reproduces a run, or stops and says which of these changed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from llmtune import __version__
from llmtune.errors import InputError

LOCK_VERSION = 1


def lock_path(recipe_file: str | os.PathLike) -> Path:
    return Path(f"{recipe_file}.lock")


def build_lock(recipe, recipe_file: Path) -> dict:
    from llmtune import model_sources

    ref = model_sources.resolve_section(recipe.model)
    return {
        "lock_version": LOCK_VERSION,
        "llmtune_version": __version__,
        "recipe": Path(recipe_file).name,
        "model": {"source": ref.source, "revision": ref.revision, "fingerprint": ref.fingerprint},
        "data": {_relative(file, recipe_file): f"sha256:{model_sources.file_sha256(file)}"
                 for file in data_files(recipe)},
        # image chats: every image file the data lists, by content (the data files' own hashes
        # fix which ones: verify_lock checks the files listed here)
        "images": {_relative(file, recipe_file): _image_hash(file) for file in data_images(recipe)},
    }


def write_lock(recipe, recipe_file: Path) -> tuple[Path, dict]:
    target = lock_path(recipe_file)
    lock = build_lock(recipe, recipe_file)
    target.write_text(json.dumps(lock, indent=2) + "\n", encoding="utf-8")
    return target, lock


def verify_lock(recipe, recipe_file: Path) -> str | None:
    """Check the lock next to `recipe_file`, if there is one; raise on the first mismatch.
    Returns the locked hub commit, which the run must then use."""
    target = lock_path(recipe_file)
    if not target.is_file():
        return None
    from llmtune import model_sources

    lock = json.loads(target.read_text(encoding="utf-8"))
    hint = f"restore what changed, or re-lock on purpose: llmtune recipe lock {recipe_file}"
    if lock.get("llmtune_version") != __version__:
        raise InputError(f"{target}: locked with llmtune {lock.get('llmtune_version')}, this is {__version__}", hint=hint)
    files = {_relative(file, recipe_file): file for file in data_files(recipe)}
    for name in sorted(set(lock["data"]) | set(files)):
        if name not in files:
            raise InputError(f"{target}: the recipe no longer reads {name}", hint=hint)
        if name not in lock["data"]:
            raise InputError(f"{target}: the recipe reads {name}, which the lock does not list", hint=hint)
        if not files[name].is_file():
            raise InputError(f"{target}: data file {name} is missing", hint=hint)
        if f"sha256:{model_sources.file_sha256(files[name])}" != lock["data"][name]:
            raise InputError(f"{target}: data file {name} changed since the recipe was locked", hint=hint)
    base = Path(recipe_file).resolve().parent
    for name, digest in lock.get("images", {}).items():
        if _image_hash(base / name) != digest:
            raise InputError(f"{target}: image {name} {'is missing' if not (base / name).is_file() else 'changed'} "
                             "since the recipe was locked", hint=hint)
    model = lock["model"]
    if recipe.model.path != model["source"]:
        raise InputError(f"{target}: the model is now {recipe.model.path}, the lock says {model['source']}", hint=hint)
    ref = model_sources.resolve(recipe.model.path, model["revision"] or recipe.model.revision,
                                recipe.model.allow_pickle, recipe.model.trust_remote_code)
    if ref.fingerprint != model["fingerprint"]:
        raise InputError(f"{target}: model {model['source']} is not the one locked "
                         f"(fingerprint {ref.fingerprint[:19]}…, lock says {model['fingerprint'][:19]}…)", hint=hint)
    return model["revision"]


def data_files(recipe) -> list[Path]:
    """Every local file the recipe's data and eval sources read, and its reward files."""
    from llmtune.data.sources import local_files

    sources = [*recipe.data.train, *(recipe.data.validation.sources or []), *recipe.eval.sources]
    files = [file for source in sources if source.path for file in local_files(source)]
    if Path(recipe.data.template).is_file():
        files.append(Path(recipe.data.template))
    # grpo rewards: a python reward's code (it runs in training and eval) and a json reward's schema
    files += [Path(file) for reward in recipe.rewards for file in (reward.path, reward.json_schema) if file]
    return list(dict.fromkeys(files))


def data_images(recipe) -> list[Path]:
    """Every local image file the recipe's chat and ShareGPT data lists, read as prepare reads
    the rows (relative paths from the data file); rows that are not image chats, and images
    given inline or by URL, add none."""
    from llmtune.data.formats import to_sample
    from llmtune.data.rows import resolved_images
    from llmtune.data.sources import read_source

    found: dict[Path, None] = {}
    for source in [*recipe.data.train, *(recipe.data.validation.sources or [])]:
        if not source.path or source.format not in ("chat", "sharegpt"):
            continue
        for record in read_source(source):
            sample, _ = to_sample(record.data, source.format, source.fields) if record.data else (None, None)
            for reference in resolved_images((sample or {}).get("images", []), record.where):
                if "path" in reference:
                    found[Path(reference["path"])] = None
    return list(found)


def _image_hash(file: Path) -> str:
    from llmtune.data.vision import content_hash

    try:
        return content_hash(file.read_bytes())
    except OSError:
        return "missing"


def _relative(file: Path, recipe_file: Path) -> str:
    return os.path.relpath(Path(file).resolve(), Path(recipe_file).resolve().parent)
