"""The house rules a machine can check (CONTRIBUTING.md): no import cycle among llmtune's modules,
torch and the model libraries imported at module level only where models are run, the code
passing ruff, and every objective's row complete."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

PACKAGE = REPO / "llmtune"
HEAVY = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes")
# where torch and the model libraries may be imported at module level (CONTRIBUTING.md, rule 5)
MAY_IMPORT_HEAVY = ("llmtune/models.py", "llmtune/stages/", "llmtune/serve/", "llmtune/testing.py")


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path, module_level_only: bool = False):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if module_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []


def test_no_import_cycle_among_llmtunes_modules():
    """Imports inside functions count too: a cycle held together by them is still a cycle."""
    modules = _modules()

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for imported, names in _imports(path):
            if imported.startswith("llmtune"):
                for target in [known(f"{imported}.{n}") if f"{imported}.{n}" in modules else known(imported)
                               for n in names or [""]]:
                    if target and target != name:
                        graph[name].add(target)
    cycles, done = [], set()

    def visit(node: str, path: list[str]):
        if node in path:
            cycles.append(path[path.index(node):] + [node])
            return
        if node in done:
            return
        for target in sorted(graph[node]):
            visit(target, path + [node])
        done.add(node)

    for name in sorted(graph):
        visit(name, [])
    assert cycles == []


def test_torch_and_the_model_libraries_load_only_where_models_run():
    """`llmtune --help` and `llmtune recipe validate` start fast: the CLI, the recipe, manifests,
    data functions and objectives import no model library at module level."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(REPO).as_posix()
        if relative.startswith(MAY_IMPORT_HEAVY):
            continue
        for imported, _ in _imports(path, module_level_only=True):
            if imported.split(".")[0] in HEAVY:
                offenders.append(f"{relative}: {imported}")
    assert offenders == []
    started = subprocess.run([sys.executable, "-c", "import sys, llmtune.cli, llmtune.recipe, llmtune.objectives; "
                              "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"],
                             capture_output=True, text=True, check=True)
    assert started.stdout.strip() == "[]"


@pytest.mark.skipif(shutil.which("ruff", path=str(Path(sys.executable).parent)) is None, reason="ruff not installed")
def test_the_code_passes_ruff():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent))
    result = subprocess.run([ruff, "check", "llmtune", "tests", "scripts"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_every_objective_is_a_complete_row():
    """What each part of llmtune reads from a row is there, and consistent: the recipe accepts
    every objective, every TRL row names how its rows reach the trainer, every format has one
    kind of prepared data."""
    from llmtune.objectives import OBJECTIVES, kind_of
    from llmtune.recipe import TrainSection
    from llmtune.stages.train.trl import ROWS

    assert set(TrainSection.model_fields["objective"].annotation.__args__) == set(OBJECTIVES)
    for name, row in OBJECTIVES.items():
        assert row.name == name and row.formats and row.kind in ("sft", "preference", "kto", "prompt")
        assert (row.trl is None) == (row.rows == "examples"), name
        assert row.trl is None or row.rows in ROWS, name
        assert all(kind_of(fmt) == row.kind for fmt in row.formats), name
        assert row.batches in ("grouped", "shuffled", "trainer") and row.eval
