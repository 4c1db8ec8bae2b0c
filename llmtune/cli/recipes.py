"""`llmtune recipe …`: validate, show, list, new, schema, lock."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from llmtune.cli.options import RecipeArg, SetOpt, recipe_app
from llmtune.console import console
from llmtune.errors import LlmtuneError, RecipeError

REPO_RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@recipe_app.command("validate")
def recipe_validate(recipe: RecipeArg, set: SetOpt = []):
    """Check a recipe, and its adapter and template against the model's architecture when the
    model is a library model or a local folder: every problem at once; exit code 2 if any."""
    from llmtune.architectures import check_recipe
    from llmtune.recipe import load_recipe

    loaded = load_recipe(recipe, set)
    problems = check_recipe(loaded)
    if problems:
        raise RecipeError(f"{recipe}:\n" + "\n".join(f"  {problem}" for problem in problems),
                          hint="fix the keys named above, then run llmtune recipe validate again")
    console.print(f"{recipe}: valid (run directory {Path(loaded.output_dir) / loaded.name})")


@recipe_app.command("show")
def recipe_show(recipe: RecipeArg, set: SetOpt = []):
    """Print the resolved recipe (extends and --set applied, defaults filled in) as YAML."""
    from llmtune.recipe import dump_recipe, load_recipe

    typer.echo(dump_recipe(load_recipe(recipe, set)), nl=False)


@recipe_app.command("list")
def recipe_list(
    folder: Annotated[Path | None, typer.Argument(help="Where to look (default: ./recipes, else the "
                                                       "recipes shipped with llmtune).")] = None,
):
    """The recipes in a folder (and its subfolders), each with its one-line description."""
    from llmtune.recipe import load_recipe

    folder = folder or (Path("recipes") if Path("recipes").is_dir() else REPO_RECIPES)
    if not folder.is_dir():
        raise LlmtuneError(f"{folder}: no such folder")
    count = 0
    # a `benchmarks` folder holds lm-eval task files (eval.benchmarks.include), not recipes
    for path in sorted(p for p in folder.rglob("*.yaml") if "benchmarks" not in p.relative_to(folder).parts):
        shown = _shown(path)
        try:
            loaded = load_recipe(path)
        except LlmtuneError:
            console.print(f"{shown}  [red]invalid[/]: llmtune recipe validate {shown}", markup=True)
            continue
        console.print(f"[bold]{escape(shown)}[/]  {escape(loaded.model.path)}", markup=True)
        if loaded.description:
            console.print(f"    {escape(loaded.description)}", markup=True)
        count += 1
    console.print(f"{count} recipe(s) in {_shown(folder)}")


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@recipe_app.command("new")
def recipe_new(
    name: Annotated[str, typer.Argument(help="Name of the new recipe (and its run directory).")],
    from_recipe: Annotated[Path, typer.Option("--from", help="The recipe to build on.", show_default=False)],
    folder: Annotated[Path, typer.Option("--dir", help="Where to write NAME.yaml.")] = Path("."),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
):
    """Write NAME.yaml: an editable recipe that extends another and overrides what you change."""
    from llmtune.recipe import load_recipe

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or ".." in name:
        # a name is a file in --dir and a run folder's name: a path ("../x") would write elsewhere
        raise LlmtuneError(f"recipe new {name}: a name is letters, digits, '.', '_' and '-' (no folders)",
                           hint="put the folder in --dir: recipe new NAME --from RECIPE --dir FOLDER")
    base = load_recipe(from_recipe)  # refuse to build on a broken recipe
    target = folder / f"{name}.yaml"
    if target.exists() and not force:
        raise LlmtuneError(f"{target} exists", hint="pick another name, or --force to overwrite it")
    folder.mkdir(parents=True, exist_ok=True)
    extends = Path(os.path.relpath(from_recipe.resolve(), folder.resolve())).as_posix()
    lines = []
    schema = _schema_near(folder)
    if schema:
        lines.append(f"# yaml-language-server: $schema={schema}")
    lines += [
        f"# Based on {from_recipe}: every key of it applies unless set here (lists are replaced).",
        f"# `llmtune recipe show {target}` prints the whole recipe with defaults.",
        f"extends: {extends}",
        f"name: {name}",
        f"description: {base.description or 'based on ' + base.name}",
        "# Your data (paths relative to this file), e.g.:",
        "# data:",
        "#   train:",
        "#     - {path: data/train.jsonl, format: chat}",
        "# A smaller or larger adapter, e.g.:",
        f"# adapter: {{r: {base.adapter.r}, alpha: {base.adapter.alpha:g}}}",
    ]
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    load_recipe(target)
    console.print(f"wrote {target} (extends {extends}); check it with: llmtune recipe validate {target}")


@recipe_app.command("schema")
def recipe_schema():
    """Print the recipe JSON Schema, for editors (see docs/recipes.md for the yaml-language-server line)."""
    from llmtune.recipe.docs import schema_json

    typer.echo(schema_json(), nl=False)


@recipe_app.command("lock")
def recipe_lock(recipe: RecipeArg):
    """Write RECIPE.lock: the model revision, every data file's sha256 and the llmtune version.
    Stage commands then refuse to run when any of them changed."""
    from llmtune.models import quiet_libraries
    from llmtune.recipe import load_recipe
    from llmtune.recipe.lock import write_lock

    quiet_libraries()
    target, lock = write_lock(load_recipe(recipe), recipe)
    model = lock["model"]
    images = f"{len(lock['images'])} image(s), " if lock["images"] else ""
    console.print(f"wrote {target}: model {model['source']} "
                  f"({model['revision'] or model['fingerprint'][:19] + '…'}), {len(lock['data'])} data file(s), "
                  f"{images}llmtune {lock['llmtune_version']}")


def _schema_near(folder: Path) -> str | None:
    """A relative path to recipes/recipe.schema.json when the new recipe sits in this repository."""
    schema = REPO_RECIPES / "recipe.schema.json"
    if not schema.is_file():
        return None
    try:
        folder.resolve().relative_to(REPO_RECIPES.parent)
    except ValueError:
        return None
    return Path(os.path.relpath(schema, folder.resolve())).as_posix()
