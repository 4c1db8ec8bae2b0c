"""The `llmtune` command line. Each command loads the recipe, calls a stage, prints a summary.

Stages (and with them torch/transformers) are imported inside the commands, so `--help` and
`recipe validate` start fast.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from llmtune import __version__
from llmtune.console import console, error_console
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

STAGE_DIRS = {"prepare": "prepared", "train": "adapter", "merge": "merged", "export": "exported"}

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


# Exit codes: 0 done, 2 a problem with the input (message and hint, no traceback), 3 an output
# failed its check, 4 the disk is full, 75 training interrupted and resumable, 1 a bug.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def main() -> None:
    sys.exit(run_cli(sys.argv[1:]))


def run_cli(args: list[str]) -> int:
    """Run the command line and return its exit code; user errors become one message."""
    if os.environ.get("RANK", "0") != "0":
        console.quiet = True  # under torchrun, rank 0 alone reports progress (errors still print)
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
        exc = exc.__cause__ or exc.__context__
    return None


def _print_error(message: str, hint: str | None) -> None:
    error_console.print(f"[bold red]error:[/] {escape(message)}", markup=True)
    if hint:
        error_console.print(f"[bold]hint:[/] {escape(hint)}", markup=True)


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        console.print(f"llmtune {__version__}")
        raise typer.Exit()


# --- stages ----------------------------------------------------------------------------------


@app.command()
def prepare(recipe: RecipeArg, set: SetOpt = [], run_dir: RunDirOpt = None, force: ForceOpt = False):
    """Tokenise and mask the recipe's data into <run>/prepared."""
    _stage("prepare", recipe, set, run_dir, force)


NoVerifyOpt = Annotated[
    bool, typer.Option("--no-verify", help="Write GGUF files without checking them in llama.cpp "
                       "(the export manifest says so).")]
ResumeOpt = Annotated[
    str | None,
    typer.Option("--resume", help="auto: continue an interrupted training from its newest good checkpoint."),
]


@app.command()
def train(recipe: RecipeArg, set: SetOpt = [], run_dir: RunDirOpt = None, force: ForceOpt = False,
          resume: ResumeOpt = None):
    """Train a LoRA adapter on <run>/prepared into <run>/adapter (exit 75: interrupted, resumable)."""
    loaded, run_path = _open_run(recipe, set, run_dir)
    _run_stage("train", loaded, run_path, force, resume=_resume_flag(resume))


@app.command()
def merge(recipe: RecipeArg, set: SetOpt = [], run_dir: RunDirOpt = None, force: ForceOpt = False):
    """Merge <run>/adapter into its base model, checked, into <run>/merged."""
    _stage("merge", recipe, set, run_dir, force)


@app.command()
def export(recipe: RecipeArg, set: SetOpt = [], run_dir: RunDirOpt = None, force: ForceOpt = False,
           no_verify: NoVerifyOpt = False):
    """Export <run>/merged in the recipe's formats into <run>/exported (GGUF checked in llama.cpp)."""
    loaded, run_path = _open_run(recipe, set, run_dir)
    _run_stage("export", loaded, run_path, force, verify=not no_verify)


@app.command()
def run(recipe: RecipeArg, set: SetOpt = [], run_dir: RunDirOpt = None, force: ForceOpt = False,
        resume: ResumeOpt = None, no_verify: NoVerifyOpt = False):
    """Run every stage; stages whose inputs are unchanged are skipped as up to date."""
    loaded, run_path = _open_run(recipe, set, run_dir)
    for stage in STAGE_DIRS:
        _run_stage(stage, loaded, run_path, force, resume=_resume_flag(resume) and stage == "train",
                   verify=not no_verify)
    _print_results(run_path)
    from llmtune.stages.preview import preview

    result = preview(loaded, run_path)
    if result:
        _print_preview(result, loaded.preview.show)
    console.print(f"[bold green]done:[/] {run_path}", markup=True)


@app.command()
def plan(recipe: RecipeArg, set: SetOpt = [], run_dir: RunDirOpt = None,
         as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
         nproc: Annotated[int, typer.Option("--nproc", min=1, help="Data-parallel processes "
                                            "(llmtune launch --nproc x nodes).")] = 1):
    """Before training: parameters, trainable parameters, tokens, steps, estimated peak memory
    (per process)."""
    loaded, run_path = _open_run(recipe, set, run_dir)
    from llmtune.stages.plan import plan as make_plan

    if as_json:
        console.file = sys.stderr  # progress lines go to stderr, stdout holds only the JSON
    result = make_plan(loaded, run_path, nproc)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    table = Table("plan", "value", show_header=False)
    for key, value in result.items():
        if key != "memory_bytes":
            table.add_row(key.replace("_", " "), f"{value:,}" if isinstance(value, int) else str(value))
    for key, value in result["memory_bytes"].items():
        table.add_row(f"memory: {key}" + (" (estimate)" if key == "total" else ""), f"{value / 1e9:.2f} GB")
    console.print(table)


@app.command()
def inspect(run_dir: Annotated[Path, typer.Argument(help="A run directory.", show_default=False)]):
    """Show a run's stages, their summaries, and whether every output still matches its hash."""
    from llmtune.manifest import partial_dir, read_manifest, verify_outputs

    if not run_dir.is_dir():
        raise LlmtuneError(f"{run_dir}: no such run directory")
    table = Table("stage", "state", "created (UTC)", "summary", "outputs")
    damaged = False
    for stage, folder in {**STAGE_DIRS, "eval": "eval"}.items():
        path = run_dir / folder
        manifest = read_manifest(path)
        if manifest is None:
            state = "unfinished" if partial_dir(path).exists() else "not run"
            table.add_row(stage, state, "", "", "")
            continue
        states = verify_outputs(path, manifest)
        bad = {name: s for name, s in states.items() if s != "ok"}
        damaged |= bool(bad)
        outputs = f"{len(states)} ok" if not bad else ", ".join(f"{n} {s}" for n, s in bad.items())
        table.add_row(
            stage,
            "[green]finished[/]" if not bad else "[red]damaged[/]",
            manifest["created_utc"].replace("+00:00", ""),
            _brief(manifest["summary"]),
            outputs,
        )
    console.print(table)
    if damaged:
        raise typer.Exit(3)


# --- data ------------------------------------------------------------------------------------


@data_app.command("preview")
def data_preview(
    recipe: RecipeArg,
    n: Annotated[int, typer.Option("-n", help="How many rows to show.")] = 3,
    split: Annotated[str, typer.Option(help="train or validation.")] = "train",
    set: SetOpt = [],
    run_dir: RunDirOpt = None,
):
    """Prepare (if needed) and show rows with the trained tokens highlighted.

    On a terminal, trained tokens are bold green and the rest dim; otherwise trained text is
    wrapped in ⟦ ⟧ and each packed example starts on a line of its own after "── example".
    """
    from datasets import load_from_disk

    from llmtune.data.chat import IGNORE, label_runs
    from llmtune.models import load_tokenizer, resolve_section

    if split not in ("train", "validation"):
        raise LlmtuneError(f"--split {split}: expected train or validation")
    loaded, run_path = _open_run(recipe, set, run_dir)
    _run_stage("prepare", loaded, run_path, force=False)
    rows = load_from_disk(str(run_path / "prepared" / split))
    tokenizer = load_tokenizer(resolve_section(loaded.model))
    styled = console.is_terminal
    for index in range(min(n, len(rows))):
        row = rows[index]
        trained = len(row["labels"]) - row["labels"].count(IGNORE)
        console.rule(f"{split} row {index}: {len(row['input_ids'])} tokens, {trained} trained")
        for tokens, is_trained, new_example in label_runs(
            row["input_ids"], row["labels"], row.get("position_ids")
        ):
            if new_example:
                console.print("\n── example", style="dim" if styled else None)
            text = tokenizer.decode(tokens)
            if styled:
                console.print(text, style="bold green" if is_trained else "dim", end="", markup=False)
            else:
                console.print(f"⟦{text}⟧" if is_trained else text, end="", markup=False)
        console.print()


# --- helpers ---------------------------------------------------------------------------------


def _open_run(recipe_file: Path, sets: list[str], run_dir: Path | None):
    """Load the recipe and record it, resolved, as <run>/recipe.yaml."""
    from llmtune.models import quiet_libraries
    from llmtune.recipe import dump_recipe, load_recipe
    from llmtune.recipe import run_dir as default_run_dir
    from llmtune.recipe_lock import verify_lock

    loaded = load_recipe(recipe_file, sets)
    locked_revision = verify_lock(loaded, recipe_file)
    if locked_revision and locked_revision != loaded.model.revision:
        # a locked hub model runs at the locked commit, whatever the recipe's revision says
        loaded = load_recipe(recipe_file, [*sets, f"model.revision={locked_revision}"])
    run_path = default_run_dir(loaded, run_dir)
    run_path.mkdir(parents=True, exist_ok=True)
    tmp = run_path / f"recipe.yaml.{os.getpid()}.tmp"  # ranks of a distributed job write it at once
    tmp.write_text(dump_recipe(loaded), encoding="utf-8")
    os.replace(tmp, run_path / "recipe.yaml")
    quiet_libraries()
    return loaded, run_path


def _stage(stage: str, recipe_file: Path, sets: list[str], run_dir: Path | None, force: bool) -> None:
    loaded, run_path = _open_run(recipe_file, sets, run_dir)
    _run_stage(stage, loaded, run_path, force)


def _resume_flag(value: str | None) -> bool:
    if value not in (None, "auto"):
        raise LlmtuneError(f"--resume {value}: the only choice is auto (the newest good checkpoint)")
    return value == "auto"


def _run_stage(stage: str, recipe, run_path: Path, force: bool, resume: bool = False,
               verify: bool = True) -> None:
    from llmtune.stages import STAGES

    if stage != "train" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # every rank would write the same stage directory at once
        raise LlmtuneError(f"{stage} runs in one process, not under torchrun/accelerate launch "
                           f"({os.environ['WORLD_SIZE']} processes)",
                           hint="launch only `llmtune train`; run prepare before it and merge/export "
                           "(or `llmtune run`) after it, in one process (see docs/cluster.md)")
    extra = {"resume": resume} if stage == "train" else {"verify": verify} if stage == "export" else {}
    outcome = STAGES[stage](recipe, run_path, force=force, **extra)
    where = run_path / STAGE_DIRS[stage]
    if outcome.up_to_date:
        console.print(f"[bold]{stage}:[/] up to date ({where})", markup=True)
    else:
        console.print(f"[bold]{stage}:[/] done -> {where}  {_brief(outcome.manifest['summary'])}")


def _brief(summary: dict) -> str:
    parts = []
    for key, value in summary.items():
        if isinstance(value, dict) or value is None:
            continue
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


def _print_results(run_path: Path) -> None:
    from llmtune.manifest import read_manifest

    summary = (read_manifest(run_path / "adapter") or {}).get("summary", {})
    before, after = summary.get("eval_loss_before"), summary.get("eval_loss")
    if before is not None and after is not None:
        console.print(f"eval loss: before training {before:.4f}, after {after:.4f}")


def _print_preview(result: dict, show: int) -> None:
    count = result["count"]
    console.print(
        f"held-out exact match: base {result['base_exact_match']}/{count}, "
        f"tuned {result['tuned_exact_match']}/{count}"
    )
    if show == 0:
        return
    table = Table("prompt", "expected", "base", "tuned", show_lines=True)
    for example in result["examples"][:show]:
        table.add_row(example["prompt"], example["reference"], example["base"], example["tuned"])
    console.print(table)


# The inference commands (eval, generate, chat, plot) and the recipe commands live in their own
# modules; importing them registers them on `app`.
from llmtune import cli_cluster, cli_inference, cli_recipe  # noqa: E402,F401
