"""The `llmtune` command line. Each command loads the recipe, calls a stage, prints a summary.

options.py holds the Typer apps and what the commands share; the commands live in stages.py
(prepare, train, merge, export, run, plan, inspect, data preview), inference.py (eval,
generate, chat, plot), recipes.py (recipe …) and cluster.py (launch, slurm). No command module
imports another; importing them here registers them on `app`.
"""

from __future__ import annotations

import errno
import os
import re
import sys

from rich.markup import escape

from llmtune import run_lock

# Importing the command modules registers their commands, in this order in `llmtune --help`.
from llmtune.cli import cluster, inference, recipes, stages  # noqa: F401,I001
from llmtune.cli.options import app
from llmtune.console import error_console
from llmtune.errors import LlmtuneError

__all__ = ["app", "main", "run_cli"]

# Exit codes (README's table): 0 done, 2 a problem with the input (message and hint, no
# traceback), 3 an output failed its check, 4 the disk is full, 5 training diverged (a NaN or
# infinite loss or gradient), 6 the run folder is in use by another command, 7 training made the
# eval loss worse (`run` stops before merge), 75 training interrupted and resumable, 130 Ctrl-C
# outside training (typer's), 1 a bug.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
# torch.save (a training checkpoint's optimizer.pt) failing part-way through a file: its C++
# writer says "[enforce fail at inline_container.cc:…] . unexpected pos …" and nothing more.
_TORCH_WRITE_FAILED = re.compile(r"inline_container\.cc.*(unexpected pos|file write failed)|PytorchStreamWriter failed writing")


def main() -> None:
    sys.exit(run_cli(sys.argv[1:]))


def run_cli(args: list[str]) -> int:
    """Run the command line and return its exit code; user errors become one message."""
    from llmtune.console import console

    if os.environ.get("RANK", "0") != "0":
        console.quiet = True  # under torchrun, rank 0 alone reports progress (errors still print)
    try:
        return _run_command(args)
    finally:
        run_lock.release_all()  # the run folder this command wrote is free again


def _run_command(args: list[str]) -> int:
    try:
        app(args=args, prog_name="llmtune")  # usage errors print and exit 2 (SystemExit)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except LlmtuneError as exc:
        rank = os.environ.get("RANK", "0")
        if rank == "0":
            _print_error(exc.message, exc.hint)
        elif exc.exit_code != 75:  # an interruption is reported once, by rank 0
            _print_error(f"rank {rank}: {exc.message}", exc.hint)
        return exc.exit_code
    except Exception as exc:
        cause = _disk_full_cause(exc)
        if cause is None:
            raise
        _print_error(
            f"out of disk space: {cause}",
            "free some space and run the same command again: finished stages are kept, "
            "the unfinished one restarts",
        )
        return 4
    return 0


def _disk_full_cause(exc: BaseException) -> str | None:
    """A one-line description when `exc` (or what caused it) is a full disk or a file-size
    limit, else None. Rust writers (safetensors, tokenizers) report these as plain text."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return f"{exc.strerror} writing {exc.filename or 'a file'}"
        if re.search(r"os error (%s)\b" % "|".join(map(str, DISK_FULL_ERRNOS)), str(exc)):
            return str(exc).splitlines()[0]
        if _TORCH_WRITE_FAILED.search(str(exc)):  # torch.save's C++ writer keeps no errno
            return f"torch could not write a file ({str(exc).splitlines()[0]}); the disk is most likely full"
        exc = exc.__cause__ or exc.__context__
    return None


def _print_error(message: str, hint: str | None) -> None:
    error_console.print(f"[bold red]error:[/] {escape(message)}", markup=True)
    if hint:
        error_console.print(f"[bold]hint:[/] {escape(hint)}", markup=True)
