"""Stage directories: atomic completion, manifests, up-to-date checks and output verification.

A stage writes into `<out>.partial/`, then `finish_stage` hashes every file, writes
`manifest.json` last, fsyncs and renames the folder to `<out>`. A folder with a valid manifest is
a finished stage; anything else is not, and is never picked up as one.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from llmtune import __version__
from llmtune.errors import InputError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
# A run directory's stage folders, by the stage that writes each: the one place they are named.
STAGE_DIRS = {"prepare": "prepared", "train": "adapter", "merge": "merged", "export": "exported",
              "eval": "eval"}
_CHUNK = 4 * 1024 * 1024


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def stage_dir(run: Path, stage: str) -> Path:
    """Where `stage` writes inside the run directory `run`."""
    return run / STAGE_DIRS[stage]


def partial_dir(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".partial")


def start_stage(out_dir: Path) -> Path:
    """A fresh, empty `<out>.partial/` to write the stage's files into."""
    partial = partial_dir(out_dir)
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def finish_stage(
    partial: Path,
    out_dir: Path,
    *,
    stage: str,
    recipe_sha256: str,
    inputs: dict[str, Any],
    summary: dict[str, Any],
    device: str = "cpu",
) -> dict[str, Any]:
    """Hash the outputs, write the manifest last, fsync, and swap `<out>.partial` into `<out>`."""
    outputs = {}
    for path in sorted(p for p in partial.rglob("*") if p.is_file()):
        _fsync(path)
        outputs[path.relative_to(partial).as_posix()] = {
            "sha256": sha256_file(path),
            "bytes": path.stat().st_size,
        }
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "stage": stage,
        "llmtune_version": __version__,
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "recipe_sha256": recipe_sha256,
        "inputs": inputs,
        "outputs": outputs,
        "summary": summary,
        "env": environment(device),
    }
    tmp = partial / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    _fsync(tmp)
    tmp.rename(partial / MANIFEST)
    _fsync_dir(partial)

    old = out_dir.with_name(out_dir.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if out_dir.exists():
        out_dir.rename(old)
    partial.rename(out_dir)
    _fsync_dir(out_dir.parent)
    if old.exists():
        shutil.rmtree(old)
    return manifest


def space_warning(path: Path, needed_bytes: int, what: str) -> str | None:
    """A warning when the filesystem holding `path` clearly lacks room for `needed_bytes`."""
    free = shutil.disk_usage(path if path.exists() else path.parent).free
    if free >= needed_bytes * 1.1:
        return None
    return (f"{what} needs about {needed_bytes / 1e9:.2f} GB and only {free / 1e9:.2f} GB is free "
            f"under {path}; it will probably fail")


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    """The manifest of a finished stage, or None when there is none or it is unreadable."""
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("manifest_version") != MANIFEST_VERSION:
        return None
    return manifest


def manifest_sha256(out_dir: Path) -> str:
    return sha256_file(out_dir / MANIFEST)


def require_stage(out_dir: Path, stage: str, command: str) -> dict[str, Any]:
    """The manifest of a finished upstream stage, or a one-line error naming the command to run."""
    manifest = read_manifest(out_dir)
    if manifest is not None and manifest.get("stage") == stage:
        return manifest
    if partial_dir(out_dir).exists():
        found = f"only {partial_dir(out_dir)} exists, an unfinished or interrupted run"
    elif out_dir.exists():
        found = f"{out_dir} has no valid {MANIFEST}"
    else:
        found = f"{out_dir} does not exist"
    raise InputError(f"no finished {stage} stage: {found}", hint=f"run: {command}")


def upstream_ref(out_dir: Path, relative_to: Path) -> dict[str, str]:
    """How a downstream manifest names the stage it read: relative path and manifest hash."""
    return {
        "path": os.path.relpath(out_dir, relative_to),
        "manifest_sha256": manifest_sha256(out_dir),
    }


def upstream_dir(out_dir: Path, manifest: dict[str, Any], name: str) -> Path:
    """The folder of the upstream stage `name` that a manifest names (see upstream_ref)."""
    return (out_dir / manifest["inputs"][name]["path"]).resolve()


# Whether is_up_to_date re-hashes every output (`llmtune run --rehash`). Without it, a stage is
# up to date when its manifest's recipe hash and inputs match and each output file is there at
# its recorded size: fast, and blind to a file changed in place at the same size (which
# `llmtune inspect` and --rehash catch by hashing).
_rehash: contextvars.ContextVar[bool] = contextvars.ContextVar("rehash", default=False)


@contextlib.contextmanager
def rehashing(on: bool = True):
    """Within this block, up-to-date checks hash every output file (slow on large models)."""
    token = _rehash.set(on)
    try:
        yield
    finally:
        _rehash.reset(token)


def is_up_to_date(out_dir: Path, stage: str, recipe_sha256: str, inputs: dict[str, Any]) -> bool:
    """True when `<out>` finished with the same recipe hash and inputs, and its files are there
    (at their recorded sizes; under rehashing(), with their recorded hashes)."""
    manifest = read_manifest(out_dir)
    if manifest is None or manifest.get("stage") != stage:
        return False
    if manifest.get("recipe_sha256") != recipe_sha256 or manifest.get("inputs") != inputs:
        return False
    if _rehash.get():
        changed = [name for name, state in verify_outputs(out_dir, manifest).items() if state != "ok"]
        if changed:
            from llmtune.console import console

            console.print(f"{stage}: {out_dir / changed[0]} changed since it was written"
                          f"{f' (and {len(changed) - 1} more files)' if len(changed) > 1 else ''}: running it again")
        return not changed
    for name, info in manifest.get("outputs", {}).items():
        path = out_dir / name
        if not path.is_file() or path.stat().st_size != info.get("bytes"):
            return False
    return True


def verify_outputs(out_dir: Path, manifest: dict[str, Any]) -> dict[str, str]:
    """Each output file's state against its recorded hash: ok, modified or missing."""
    states = {}
    for name, info in manifest.get("outputs", {}).items():
        path = out_dir / name
        if not path.is_file():
            states[name] = "missing"
        elif path.stat().st_size != info.get("bytes") or sha256_file(path) != info.get("sha256"):
            states[name] = "modified"
        else:
            states[name] = "ok"
    return states


def environment(device: str = "cpu") -> dict[str, str]:
    env = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("torch", "transformers", "peft", "datasets", "accelerate", "bitsandbytes"):
        try:
            env[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            env[package] = "not installed"
    env["device"] = device
    env["git_sha"] = _git_sha()
    return env


def _git_sha() -> str:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Outcome:
    """What a stage function returns: its manifest, and whether it was already up to date."""

    manifest: dict[str, Any]
    up_to_date: bool
