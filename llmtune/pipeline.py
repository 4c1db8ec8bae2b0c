"""The pipeline as Python: the stages in order (`run_stage`, `run`), then the preview of base vs
tuned answers and the push to the Hub that `llmtune run` ends with. The CLI only prints what
these return; a script can do what `llmtune run` does:

    from llmtune.pipeline import run
    from llmtune.recipe import load_recipe, run_dir
    recipe = load_recipe("recipes/quickstart.yaml")
    result = run(recipe, run_dir(recipe))

Stages are imported when they run, so that importing this module stays light.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from llmtune.errors import GotWorse, LlmtuneError
from llmtune.manifest import Outcome
from llmtune.recipe import Recipe

PIPELINE = ("prepare", "train", "merge", "export")  # what `llmtune run` runs, in order


def stage_function(stage: str) -> Callable[..., Outcome]:
    """The function of a pipeline stage: llmtune.stages.<stage>.<stage>."""
    if stage not in PIPELINE:
        raise ValueError(f"not a pipeline stage: {stage}")
    return getattr(importlib.import_module(f"llmtune.stages.{stage}"), stage)


def run_stage(stage: str, recipe: Recipe, run: Path, force: bool = False, resume: bool = False,
              verify: bool = True, fetch_base: bool = True) -> Outcome:
    """One stage. Under a launcher (several processes) only train runs: every rank would write
    the same stage directory at once."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if stage != "train" and processes > 1:
        raise LlmtuneError(f"{stage} runs in one process, not under torchrun/accelerate launch "
                           f"({processes} processes)",
                           hint="launch only `llmtune train`; run prepare before it and merge/export "
                           "(or `llmtune run`) after it, in one process (see docs/cluster.md)")
    extra = {"train": {"resume": resume}, "export": {"verify": verify},
             "prepare": {"fetch_base": fetch_base}}.get(stage, {})
    return stage_function(stage)(recipe, run, force=force, **extra)


@dataclass
class RunResult:
    outcomes: dict[str, Outcome] = field(default_factory=dict)  # by stage, in pipeline order
    preview: dict | None = None  # serve.preview's result, when recipe.preview.count > 0
    pushed: dict | None = None  # export.push's result, when recipe.export.hub is set


def run(recipe: Recipe, run_path: Path, force: bool = False, resume: bool = False, verify: bool = True,
        on_stage: Callable[[str, Outcome], None] | None = None, rehash: bool = False) -> RunResult:
    """Every stage (each up to date is skipped), then the preview and the push. `on_stage` is
    told each stage's outcome as it ends (the CLI prints it). `rehash` re-hashes every output
    before calling a stage up to date (manifest.rehashing)."""
    from llmtune.manifest import rehashing

    with rehashing(rehash):
        return _run(recipe, run_path, force, resume, verify, on_stage)


def _run(recipe: Recipe, run_path: Path, force: bool, resume: bool, verify: bool,
         on_stage: Callable[[str, Outcome], None] | None) -> RunResult:
    result = RunResult()
    for stage in PIPELINE:
        outcome = run_stage(stage, recipe, run_path, force, resume=resume and stage == "train", verify=verify)
        result.outcomes[stage] = outcome
        if on_stage is not None:
            on_stage(stage, outcome)
        if stage == "train" and not force:
            _refuse_a_worse_model(outcome.manifest["summary"], recipe, run_path)
    from llmtune.serve.preview import preview

    result.preview = preview(recipe, run_path)
    hub = recipe.export.hub
    if hub is not None:  # a cluster job publishes its result
        result.pushed = push(run_path, hub.repo, hub.what, hub.private, hub.revision)
    return result


def _refuse_a_worse_model(summary: dict, recipe: Recipe, run_path: Path) -> None:
    """Merge and export would ship a model worse than its base on the held-out data: stop."""
    if summary.get("eval_loss_rose"):
        recipe_file = run_path / "recipe.yaml"
        raise GotWorse(
            f"training made the eval loss worse ({summary['eval_loss_before']} before, {summary['eval_loss']} "
            "after); merge and export were not run",
            hint="lower train.lr or check that the validation data is like the training data, then train "
            f"again (--force); to ship it anyway: llmtune merge {recipe_file} and llmtune export {recipe_file}")


def push(run_path: Path, repo: str, what: str = "all", private: bool = True, revision: str | None = None) -> dict:
    """Upload a finished run to the Hub (llmtune.stages.export.push)."""
    from llmtune.stages.export.push import push as push_run

    return push_run(run_path, repo, what, private, revision)
