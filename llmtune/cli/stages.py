"""The pipeline commands: prepare, train, merge, export, run, plan, inspect, push, data preview."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from llmtune import __version__
from llmtune.cli.options import (
    AddressOpt,
    ForceOpt,
    GpusPerWorkerOpt,
    NoVerifyOpt,
    RecipeArg,
    ResumeOpt,
    RunDirOpt,
    SetOpt,
    WorkersOpt,
    app,
    brief,
    data_app,
    open_run,
    print_outcome,
    resume_flag,
    run_stage,
)
from llmtune.console import console
from llmtune.errors import LlmtuneError


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


@app.command()
def train(recipe: RecipeArg, set: SetOpt = [], run_dir: RunDirOpt = None, force: ForceOpt = False,
          resume: ResumeOpt = None):
    """Train a LoRA adapter on <run>/prepared into <run>/adapter (exit 75: interrupted, resumable)."""
    loaded, run_path = open_run(recipe, set, run_dir)
    run_stage("train", loaded, run_path, force, resume=resume_flag(resume))


@app.command()
def merge(recipe: RecipeArg, set: SetOpt = [], run_dir: RunDirOpt = None, force: ForceOpt = False):
    """Merge <run>/adapter into its base model, checked, into <run>/merged."""
    _stage("merge", recipe, set, run_dir, force)


@app.command()
def export(recipe: RecipeArg, set: SetOpt = [], run_dir: RunDirOpt = None, force: ForceOpt = False,
           no_verify: NoVerifyOpt = False):
    """Export <run>/merged in the recipe's formats into <run>/exported (GGUF checked in llama.cpp)."""
    loaded, run_path = open_run(recipe, set, run_dir)
    run_stage("export", loaded, run_path, force, verify=not no_verify)


@app.command()
def run(recipe: RecipeArg, set: SetOpt = [], run_dir: RunDirOpt = None, force: ForceOpt = False,
        resume: ResumeOpt = None, no_verify: NoVerifyOpt = False,
        rehash: Annotated[bool, typer.Option(
            "--rehash", help="Re-hash every output before calling a stage up to date (as inspect does; "
            "without it, a file's size is checked, not its content).")] = False,
        engine: Annotated[str, typer.Option(
            help="local: every stage in this process; ray: training on a Ray cluster (llmtune launch --engine ray), "
            "the other stages here.")] = "local",
        workers: WorkersOpt = 2, gpus_per_worker: GpusPerWorkerOpt = None, address: AddressOpt = None):
    """Run every stage; stages whose inputs are unchanged are skipped as up to date."""
    if engine not in ("local", "ray"):
        raise LlmtuneError(f"--engine {engine}: the choices are local and ray")
    loaded, run_path = open_run(recipe, set, run_dir)
    from llmtune.pipeline import run as run_pipeline

    if engine == "ray":  # prepare here, train on Ray; the rest below finds training up to date
        from llmtune.cli.cluster import launch_on_ray

        run_stage("prepare", loaded, run_path, force)
        launch_on_ray(recipe, loaded, run_path, set, run_dir, workers, gpus_per_worker, 1, address, force, resume,
                      dry_run=False)
        force = False  # merge and export follow the new adapter as they would any change

    def after(stage, outcome):
        print_outcome(stage, run_path, outcome)
        if stage == "export":
            _print_results(run_path)

    result = run_pipeline(loaded, run_path, force, resume_flag(resume), not no_verify, on_stage=after, rehash=rehash)
    if result.preview:
        _print_preview(result.preview, loaded.preview.show)
    if result.pushed:
        _print_push(result.pushed, loaded.export.hub.repo)
    console.print(f"[bold green]done:[/] {run_path}", markup=True)


@app.command()
def push(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.", show_default=False)],
    repo: Annotated[str, typer.Option("--repo", help="ORG/NAME on the Hugging Face Hub.")],
    what: Annotated[str, typer.Option(help="adapter | merged | gguf | all")] = "all",
    private: Annotated[bool, typer.Option("--private", help="Create the repository private.")] = False,
    revision: Annotated[str | None, typer.Option(help="A branch to push to (created if missing).")] = None,
):
    """Upload a finished run's outputs with a model card and the recipe (token: HF_TOKEN or hf auth login)."""
    from llmtune.stages.export.push import WHAT

    if what not in WHAT:
        raise LlmtuneError(f"--what {what}: expected one of {', '.join(WHAT)}")
    if not run_dir.is_dir():
        raise LlmtuneError(f"{run_dir}: no such run directory")
    _push(run_dir, repo, what, private, revision)


def _push(run_path: Path, repo: str, what: str, private: bool, revision: str | None) -> None:
    from llmtune.pipeline import push as push_run

    _print_push(push_run(run_path, repo, what, private, revision), repo)


def _print_push(result: dict, repo: str) -> None:
    console.print(f"push: {len(result['files'])} files -> {repo} ({result['revision']})"
                  + (f": {result['url']}" if result["url"] else ""))


@app.command()
def plan(recipe: RecipeArg, set: SetOpt = [], run_dir: RunDirOpt = None,
         as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
         nproc: Annotated[int, typer.Option("--nproc", min=1, help="Data-parallel processes "
                                            "(llmtune launch --nproc x nodes).")] = 1,
         device: Annotated[str, typer.Option(help="auto (this machine's) | cuda | cpu: the device to plan for.")] = "auto",
         gpu_memory: Annotated[float | None, typer.Option(
             "--gpu-memory", min=1, help="The GPU's memory in GB (default: this machine's GPU): stages whose "
             "model does not fit run on the CPU.")] = None):
    """Before training: parameters, trainable parameters, tokens, steps, and each stage's
    estimated peak memory on the device it runs on (per process). Offline for library models."""
    if device not in ("auto", "cuda", "cpu"):
        raise LlmtuneError(f"--device {device}: expected auto, cuda or cpu")
    loaded, run_path = open_run(recipe, set, run_dir, record=False)  # plan writes nothing
    from llmtune.stages.plan import plan as make_plan

    if as_json:
        console.file = sys.stderr  # progress lines go to stderr, stdout holds only the JSON
    result = make_plan(loaded, run_path, nproc, device, gpu_memory)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    table = Table("plan", "value", show_header=False)
    nested = ("memory_bytes", "eval_memory_bytes", "optimizer_state_bytes_by_choice", "peak_bytes_by_stage",
              "peak_gpu_bytes_by_stage", "stages_on_the_cpu", "notes", "gpu_memory_bytes")
    for key, value in result.items():
        if key not in nested:
            shown = "unknown" if value is None else f"{value:,}" if isinstance(value, int) else str(value)
            table.add_row(key.replace("_", " "), shown)
    for key, value in result["memory_bytes"].items():
        table.add_row(f"train memory: {key}" + (" (estimate)" if key == "total" else ""), f"{value / 1e9:.2f} GB")
    table.add_row("optimizer state by train.optimizer", ", ".join(
        f"{name} {value / 1e9:.3f} GB" for name, value in result["optimizer_state_bytes_by_choice"].items()))
    for key, value in result["eval_memory_bytes"].items():
        table.add_row(f"eval memory: {key}" + (" (estimate)" if key == "total" else ""), f"{value / 1e9:.2f} GB")
    where = "GPU" if result["device"] == "cuda" else "CPU"
    if result["gpu_memory_bytes"]:
        table.add_row("GPU memory", f"{result['gpu_memory_bytes'] / 1e9:.1f} GB")
    for stage, value in result["peak_bytes_by_stage"].items():
        table.add_row(f"peak {where} memory: {stage}", f"{value / 1e9:.2f} GB"
                      + (" (runs on the CPU)" if value == 0 and result["device"] == "cuda" else ""))
    for note in result["notes"]:
        table.add_row("note", note)
    console.print(table)
    for note in result["notes"]:
        if note.startswith("WARNING"):
            console.print(note, style="yellow", markup=False)


@app.command()
def inspect(run_dir: Annotated[Path, typer.Argument(help="A run directory.", show_default=False)]):
    """Show a run's stages, their summaries, and whether every output still matches its hash."""
    from llmtune.manifest import STAGE_DIRS, partial_dir, read_manifest, stage_dir, verify_outputs

    if not run_dir.is_dir():
        raise LlmtuneError(f"{run_dir}: no such run directory")
    table = Table("stage", "state", "created (UTC)", "summary", "outputs")
    damaged = False
    for stage in STAGE_DIRS:
        path = stage_dir(run_dir, stage)
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
            brief(manifest["summary"]),
            outputs,
        )
    console.print(table)
    if damaged:
        raise typer.Exit(3)


# --- data ------------------------------------------------------------------------------------


@data_app.command("preview")
def data_preview(
    recipe: RecipeArg,
    n: Annotated[int, typer.Option("-n", min=1, help="How many rows to show.")] = 3,
    split: Annotated[str, typer.Option(help="train or validation.")] = "train",
    set: SetOpt = [],
    run_dir: RunDirOpt = None,
):
    """Prepare (if needed) and show rows with the trained tokens highlighted.

    On a terminal, trained tokens are bold green and the rest dim; otherwise trained text is
    wrapped in ⟦ ⟧ and each packed example starts on a line of its own after "── example".
    """
    from llmtune.manifest import stage_dir
    from llmtune.model_sources import resolve_section
    from llmtune.models import load_tokenizer
    from llmtune.stages.prepare.shown import shown_rows

    if split not in ("train", "validation"):
        raise LlmtuneError(f"--split {split}: expected train or validation")
    loaded, run_path = open_run(recipe, set, run_dir)
    run_stage("prepare", loaded, run_path, force=False, fetch_base=False)
    tokenizer = load_tokenizer(resolve_section(loaded.model, weights=False))
    styled = console.is_terminal
    for row in shown_rows(stage_dir(run_path, "prepare"), split, n, tokenizer):
        console.rule(row.title)
        for piece in row.pieces:
            if piece.new_example:
                console.print("\n── example", style="dim" if styled else None)
            if piece.label:
                console.print(f"\n── {piece.label}:", style="dim" if styled else None)
            if styled:
                console.print(piece.text, style="bold green" if piece.trained else "dim", end="", markup=False)
            else:
                console.print(f"⟦{piece.text}⟧" if piece.trained else piece.text, end="", markup=False)
        console.print()
        for note in row.notes:
            console.print(f"── {note}", markup=False)


# --- helpers ---------------------------------------------------------------------------------


def _stage(stage: str, recipe_file: Path, sets: list[str], run_dir: Path | None, force: bool) -> None:
    loaded, run_path = open_run(recipe_file, sets, run_dir)
    run_stage(stage, loaded, run_path, force)


def _print_results(run_path: Path) -> None:
    from llmtune.manifest import read_manifest, stage_dir

    summary = (read_manifest(stage_dir(run_path, "train")) or {}).get("summary", {})
    before, after = summary.get("eval_loss_before"), summary.get("eval_loss")
    if before is not None and after is not None:
        console.print(f"eval loss: before training {before:.4f}, after {after:.4f}")


def _print_preview(result: dict, show: int) -> None:
    count = result["count"]
    console.print(
        f"held-out exact match: base {result['base_exact_match']}/{count}, "
        f"tuned {result['tuned_exact_match']}/{count}"
    )
    for name in (result.get("rewards") or {}).get("tuned", {}):
        console.print(f"held-out mean reward {name}: base {result['rewards']['base'][name]}, "
                      f"tuned {result['rewards']['tuned'][name]}")
    if show == 0:
        return
    table = Table("prompt", "expected", "base", "tuned", show_lines=True)
    for example in result["examples"][:show]:
        reference = "-" if example["reference"] is None else str(example["reference"])
        table.add_row(example["prompt"], reference, example["base"], example["tuned"])
    console.print(table)
