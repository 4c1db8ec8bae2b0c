"""What the command modules share: the Typer apps, the common options, and opening a run.

Stages (and with them torch/transformers) are imported inside the commands, so `--help` and
`recipe validate` start fast.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated

import typer

from llmtune.console import console
from llmtune.errors import LlmtuneError

app = typer.Typer(
    name="llmtune",
    help="LoRA fine-tuning from a YAML recipe: prepare -> train -> merge -> export.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals can hold tokens and whole datasets
    add_completion=False,
)
recipe_app = typer.Typer(help="Check and show recipes.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")
data_app = typer.Typer(help="See what the model will learn from your data.", no_args_is_help=True)
app.add_typer(data_app, name="data")

RecipeArg = Annotated[Path, typer.Argument(help="The recipe YAML file.", show_default=False)]
SetOpt = Annotated[
    list[str],
    typer.Option("--set", help="Override a recipe key, e.g. --set train.lr=1e-4 (repeatable)."),
]
RunDirOpt = Annotated[
    Path | None,
    typer.Option("--run-dir", help="Run directory (default: <output_dir>/<name> from the recipe)."),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Re-run even when up to date.")]
NoVerifyOpt = Annotated[
    bool, typer.Option("--no-verify", help="Write GGUF files without checking them in llama.cpp "
                       "(the export manifest says so).")]
ResumeOpt = Annotated[
    str | None,
    typer.Option("--resume", help="auto: continue an interrupted training from its newest good checkpoint."),
]
# training on Ray (llmtune launch --engine ray, llmtune run --engine ray)
WorkersOpt = Annotated[int, typer.Option("--workers", min=1, help="ray: training workers (one per GPU).")]
GpusPerWorkerOpt = Annotated[float | None, typer.Option(
    "--gpus-per-worker", min=0, help="ray: GPUs per worker (default: 1 where the cluster has GPUs, else 0).")]
AddressOpt = Annotated[str | None, typer.Option(
    "--address", help="ray: the cluster to join (auto, or its head's HOST:PORT); default: a Ray instance "
    "started on this machine for this run.")]


def open_run(recipe_file: Path, sets: list[str], run_dir: Path | None, record: bool = True, lock: bool = True):
    """Load the recipe and (with `record`) write it, resolved, as <run>/recipe.yaml, holding the
    run folder (with `lock`; a launcher on one of several nodes leaves that to rank 0)."""
    from llmtune.models import quiet_libraries
    from llmtune.recipe import dump_recipe, load_recipe
    from llmtune.recipe import run_dir as default_run_dir
    from llmtune.recipe.lock import verify_lock

    loaded = load_recipe(recipe_file, sets)
    locked_revision = verify_lock(loaded, recipe_file)
    if locked_revision and locked_revision != loaded.model.revision:
        # a locked hub model runs at the locked commit, whatever the recipe's revision says
        loaded = load_recipe(recipe_file, [*sets, f"model.revision={locked_revision}"])
    run_path = default_run_dir(loaded, run_dir)
    if record:
        _record(run_path, dump_recipe(loaded), lock)
    quiet_libraries()
    return loaded, run_path


def _record(run_path: Path, recipe_text: str, lock: bool = True) -> None:
    """Take the run folder for this command (one command at a time writes it: run_lock.py) and
    write the resolved recipe there, unless it is there already: a run whose stages are all up
    to date writes nothing, so it works on a read-only folder."""
    import sys

    from llmtune import run_lock

    if run_path.exists() and not run_path.is_dir():
        raise LlmtuneError(f"{run_path}: not a folder, so it cannot be a run directory",
                           hint="give --run-dir a folder (it is made when missing)")
    try:
        run_path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LlmtuneError(f"{run_path}: cannot make the run directory ({exc.strerror})") from None
    if lock:
        run_lock.hold(run_path, " ".join(["llmtune", *sys.argv[1:]]))
    target = run_path / "recipe.yaml"
    if target.is_file() and target.read_text(encoding="utf-8") == recipe_text:
        return
    # the ranks (and the nodes) of a distributed job write it at once: pods on two nodes may share a pid
    tmp = run_path / f"recipe.yaml.{socket.gethostname()}.{os.getpid()}.tmp"
    try:
        tmp.write_text(recipe_text, encoding="utf-8")
        os.replace(tmp, target)
    except PermissionError:
        raise LlmtuneError(f"{run_path} is not writable, and this command has to write there",
                           hint="make it writable, or give another folder: --run-dir") from None


def resume_flag(value: str | None) -> bool:
    if value not in (None, "auto"):
        raise LlmtuneError(f"--resume {value}: the only choice is auto (the newest good checkpoint)")
    return value == "auto"


def run_stage(stage: str, recipe, run_path: Path, force: bool, resume: bool = False,
              verify: bool = True, fetch_base: bool = True) -> None:
    """Run one pipeline stage and print its one-line outcome."""
    from llmtune.pipeline import run_stage as run_pipeline_stage

    print_outcome(stage, run_path, run_pipeline_stage(stage, recipe, run_path, force, resume, verify, fetch_base))


def print_outcome(stage: str, run_path: Path, outcome) -> None:
    from llmtune.manifest import stage_dir

    where = stage_dir(run_path, stage)
    if outcome.up_to_date:
        console.print(f"[bold]{stage}:[/] up to date ({where})", markup=True)
    else:
        console.print(f"[bold]{stage}:[/] done -> {where}  {brief(outcome.manifest['summary'])}")


def brief(summary: dict) -> str:
    """A stage summary on one line: its plain values, nested figures left out."""
    parts = []
    for key, value in summary.items():
        if isinstance(value, dict) or value is None:
            continue
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)
