"""Resumable training checkpoints in `<adapter>.partial/checkpoints/checkpoint-N/`.

The transformers Trainer writes each checkpoint (adapter, optimizer, scheduler, RNG states,
trainer state with the data position). A checkpoint counts as good only once `mark_good` has
recorded every file's hash in it, last; a checkpoint cut short by a kill, or edited since, is
never resumed from. Rotation keeps the newest `keep` good checkpoints and never the last good one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from llmtune.errors import InputError
from llmtune.manifest import sha256_file

CHECKPOINTS = "checkpoints"
MARK = "llmtune-checkpoint.json"
RESUME_STATE = "resume.json"


def step_of(folder: Path) -> int:
    match = re.fullmatch(r"checkpoint-(\d+)", folder.name)
    return int(match.group(1)) if match else -1


def mark_good(folder: Path) -> None:
    files = {p.relative_to(folder).as_posix(): sha256_file(p)
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARK}
    tmp = folder / (MARK + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump({"step": step_of(folder), "files": files}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.rename(folder / MARK)


def is_good(folder: Path) -> bool:
    try:
        files = json.loads((folder / MARK).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    return bool(files) and all(
        (folder / name).is_file() and sha256_file(folder / name) == digest
        for name, digest in files.items()
    )


def checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under `root`, newest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) >= 0]
    return sorted(found, key=step_of, reverse=True)


def newest_good(root: Path) -> Path | None:
    return next((c for c in checkpoints(root) if is_good(c)), None)


def rotate(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` good checkpoints, and any unfinished one older than
    the newest good one. Called right after a checkpoint is marked good."""
    good_seen = 0
    for folder in checkpoints(root):
        if (folder / MARK).is_file():
            good_seen += 1
            if good_seen > keep:
                shutil.rmtree(folder)
        elif good_seen:
            shutil.rmtree(folder)


def discard_after(root: Path, step: int) -> None:
    """Resuming from `step` abandons every later checkpoint (cut short, corrupt, or from the
    run that was interrupted): remove them so they are neither resumed from nor kept."""
    for folder in checkpoints(root):
        if step_of(folder) > step:
            shutil.rmtree(folder)


def write_resume_state(partial: Path, state: dict) -> None:
    (partial / RESUME_STATE).write_text(json.dumps(state, indent=2) + "\n")


def read_resume_state(partial: Path) -> dict | None:
    try:
        return json.loads((partial / RESUME_STATE).read_text())
    except (OSError, ValueError):
        return None


def check_same_run(saved: dict, now: dict, command: str) -> None:
    """Refuse to resume when what the run depends on changed, naming what."""
    changed = [name for name in now if saved.get(name) != now[name]]
    if changed:
        raise InputError(
            f"cannot resume: {', '.join(changed)} changed since this training started",
            hint=f"undo the change, or start over with: {command} --force",
        )
