"""export: the merged model in the formats the recipe asks for, one folder per format."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from llmtune.console import console
from llmtune.manifest import (
    MANIFEST,
    Outcome,
    finish_stage,
    is_up_to_date,
    read_manifest,
    require_stage,
    space_warning,
    start_stage,
    upstream_ref,
)
from llmtune.recipe import Recipe, section_sha256


def export(recipe: Recipe, run: Path, force: bool = False) -> Outcome:
    merged_dir, out_dir = run / "merged", run / "exported"
    require_stage(merged_dir, "merge", f"llmtune merge {run / 'recipe.yaml'}")
    inputs = {"merged": upstream_ref(merged_dir, out_dir)}
    recipe_sha = section_sha256(recipe, "export")
    if not force and is_up_to_date(out_dir, "export", recipe_sha, inputs):
        return Outcome(read_manifest(out_dir), up_to_date=True)

    partial = start_stage(out_dir)
    # Hard links cost no space; a copy (another filesystem) costs the merged model's size.
    if os.stat(merged_dir).st_dev != os.stat(partial).st_dev:
        needed = sum(p.stat().st_size for p in merged_dir.iterdir() if p.is_file())
        warning = space_warning(partial, needed * len(recipe.export.formats), "the export")
        if warning:
            console.print(f"[yellow]warning:[/] {warning}", markup=True)
    sizes = {}  # "<format>_bytes" -> bytes written
    for name in recipe.export.formats:
        if name == "hf":
            sizes[f"{name}_bytes"] = _export_hf(merged_dir, partial / "hf")
        console.print(f"export: {name} -> {out_dir / name}")
    manifest = finish_stage(
        partial,
        out_dir,
        stage="export",
        recipe_sha256=recipe_sha,
        inputs=inputs,
        summary={"formats": ",".join(recipe.export.formats), **sizes},
    )
    return Outcome(manifest, up_to_date=False)


def _export_hf(merged_dir: Path, target: Path) -> int:
    """The merged transformers folder as it is (hard links where the filesystem allows)."""
    target.mkdir(parents=True)
    total = 0
    for path in sorted(merged_dir.iterdir()):
        if not path.is_file() or path.name == MANIFEST:
            continue
        try:
            # Stages replace folders by rename, never edit files in place: a link is safe.
            os.link(path, target / path.name)
        except OSError:
            shutil.copy2(path, target / path.name)
        total += path.stat().st_size
    return total
