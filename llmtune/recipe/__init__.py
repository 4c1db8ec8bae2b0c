"""The recipe: its typed schema (schema.py), loading with `extends` and `--set` (load.py),
readable errors (errors.py), the JSON Schema and reference page (docs.py), and `RECIPE.lock`
(lock.py). What stages and commands use is importable from here."""

from llmtune.recipe.load import dump_recipe, load_recipe, parse_yaml, run_dir, section_sha256
from llmtune.recipe.schema import (
    EMBEDDED_DEFAULT,
    FORMAT_FIELDS,
    AdapterExportOptions,
    AdapterSection,
    DataSection,
    DataSource,
    DistributedSection,
    EvalSection,
    ExportSection,
    GgufOptions,
    GrpoSection,
    HubExport,
    MergeSection,
    ModelSection,
    PreviewSection,
    Recipe,
    Reward,
    Section,
    TrainSection,
    ValidationSplit,
)

__all__ = [
    "EMBEDDED_DEFAULT", "FORMAT_FIELDS", "AdapterExportOptions", "AdapterSection", "DataSection", "DataSource",
    "DistributedSection", "EvalSection", "ExportSection", "GgufOptions", "GrpoSection", "HubExport",
    "MergeSection", "ModelSection", "PreviewSection", "Recipe", "Reward", "Section", "TrainSection",
    "ValidationSplit", "dump_recipe", "load_recipe", "parse_yaml", "run_dir", "section_sha256",
]
