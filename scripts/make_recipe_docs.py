#!/usr/bin/env python3
"""Write docs/recipes.md and recipes/recipe.schema.json from the recipe schema (llmtune/recipe.py).

    python scripts/make_recipe_docs.py

Run it after changing the schema; tests/test_recipes.py fails while either file is stale.
"""

from pathlib import Path

from llmtune.recipe.docs import reference_markdown, schema_json

ROOT = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    (ROOT / "docs" / "recipes.md").write_text(reference_markdown(), encoding="utf-8")
    (ROOT / "recipes" / "recipe.schema.json").write_text(schema_json(), encoding="utf-8")
    print("wrote docs/recipes.md and recipes/recipe.schema.json")
