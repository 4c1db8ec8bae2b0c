"""One command at a time writes a run folder. Two `llmtune run` of one recipe started together
used to interleave their stages (one crashed, the other finished with the first one's metrics
lines in its adapter). A command that writes takes an OS lock on `<run>/.llmtune.lock` for as
long as it runs: the OS drops it when the process ends, however it ends (kill -9 included), so
a crash never leaves it stuck. A second command is refused at once, naming the folder and the
process holding it.

The processes a holder starts (the ranks `llmtune launch` starts through torchrun) run under its
lock; under a launcher that llmtune did not start, rank 0 takes it.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from llmtune.errors import RunBusy

LOCK_FILE = ".llmtune.lock"
HELD_ENV = "LLMTUNE_RUN_LOCK"  # the run folder whose lock a parent process holds
_held: dict[str, int] = {}  # resolved run folder -> the descriptor holding its lock


def hold(run_dir: Path, command: str) -> bool:
    """Take the run folder's lock for the rest of this process (again: nothing to do). Returns
    False where there is nothing to lock: a read-only folder, which no command can write either."""
    key = str(run_dir.resolve())
    if key in _held or os.environ.get(HELD_ENV) == key or os.environ.get("RANK", "0") != "0":
        return True
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            return False
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunBusy(f"{run_dir} is in use by another llmtune command ({holder})",
                      hint="wait for it to end, or stop it (a command that was killed leaves no lock "
                      "behind); a second run needs its own folder: --run-dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()}: {command}".encode())
    _held[key] = fd
    os.environ[HELD_ENV] = key  # the processes this one starts work under its lock
    return True


def release_all() -> None:
    """Let go of every run folder this process holds: the command is over (`run_cli` calls this,
    so a command run in-process, as the tests do, does not keep the folder after it returns)."""
    for key, fd in list(_held.items()):
        os.close(fd)
        del _held[key]
        if os.environ.get(HELD_ENV) == key:
            del os.environ[HELD_ENV]
