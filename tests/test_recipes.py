"""The recipe library: every recipe validates and fits its model's real architecture; the recipe
commands (list, new, schema, lock); the generated reference and schema are current."""

from __future__ import annotations

import importlib.util
import json

import pytest

from helpers import REPO, llmtune, write_recipe
from llmtune.architectures import KNOWN_MODELS, check_recipe
from llmtune.recipe import load_recipe
from llmtune.recipe.docs import reference_markdown, schema_json

# recipes/benchmarks holds lm-eval task files, not recipes (llmtune recipe list skips it too)
RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if "benchmarks" not in p.relative_to(REPO / "recipes").parts)
LIBRARY = sorted((REPO / "recipes" / "library").glob("*.yaml"))


def test_the_library_covers_the_families_people_fine_tune():
    models = {load_recipe(path).model.path for path in LIBRARY}
    for family in ("Llama-3.2-1B", "Llama-3.2-3B", "Llama-3.1-8B", "Mistral-7B", "Qwen2.5-0.5B",
                   "Qwen2.5-7B", "gemma-2", "gemma-3", "Phi-3", "Phi-4", "SmolLM2"):
        assert any(family in model for model in models), family
    quantized = {load_recipe(path).model.quantize for path in LIBRARY}
    assert quantized == {"none", "nf4"}  # LoRA and QLoRA variants


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_validates_and_fits_its_architecture(path):
    recipe = load_recipe(path)
    assert recipe.model.path in KNOWN_MODELS, f"{path.name}: add {recipe.model.path} to llmtune/architectures.py"
    assert check_recipe(recipe) == []


@pytest.mark.slow
def test_memory_notes_in_descriptions_are_current():
    spec = importlib.util.spec_from_file_location("recipe_memory", REPO / "scripts" / "recipe_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for path in LIBRARY:
        recipe = load_recipe(path)
        assert recipe.description.endswith(module.note_for(recipe)), \
            f"{path.name}: stale memory note; run python scripts/recipe_memory.py --write"


@pytest.mark.slow
def test_a_misspelled_target_module_names_it_and_the_candidates(tmp_path):
    recipe = REPO / "recipes" / "library" / "qwen2.5-0.5b-lora.yaml"
    result = llmtune("recipe", "validate", recipe, "--set", "adapter.target_modules=[q_proj, v_prj]",
                     cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no module named 'v_prj' in qwen2 (did you mean v_proj?)" in result.stderr
    assert "candidates: down_proj, embed_tokens, gate_proj, k_proj" in result.stderr


def test_a_template_the_tokenizer_cannot_write_is_refused():
    recipe = load_recipe(REPO / "recipes" / "library" / "llama-3.2-1b-lora.yaml", ["data.template=chatml"])
    assert any("chatml writes <|im_start|>" in problem for problem in check_recipe(recipe))


def test_a_local_model_folder_is_checked_too(tiny_model, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, tiny_model, adapter={"target_modules": ["qproj"]}))
    assert "no module named 'qproj' in llama (did you mean q_proj?)" in check_recipe(recipe)[0]


def test_list_shows_each_recipe_with_its_description(tmp_path):
    result = llmtune("recipe", "list", REPO / "recipes", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "qwen2.5-7b-qlora.yaml" in result.stdout and "Qwen2.5 7B Instruct, QLoRA nf4" in result.stdout
    assert f"{len(RECIPES)} recipe(s)" in result.stdout


def test_new_writes_an_editable_recipe_that_extends_the_original(tmp_path):
    base = REPO / "recipes" / "library" / "smollm2-135m-instruction.yaml"
    result = llmtune("recipe", "new", "mine", "--from", base, "--dir", tmp_path / "work", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    written = tmp_path / "work" / "mine.yaml"
    assert "extends: " in written.read_text()
    mine, original = load_recipe(written), load_recipe(base)
    assert mine.name == "mine" and mine.data == original.data and mine.adapter == original.adapter
    again = llmtune("recipe", "new", "mine", "--from", base, "--dir", tmp_path / "work", cwd=tmp_path)
    assert again.returncode != 0 and "exists" in again.stderr


def test_schema_has_descriptions_and_the_committed_copy_is_current(tmp_path):
    result = llmtune("recipe", "schema", cwd=tmp_path)
    schema = json.loads(result.stdout)
    assert "extends" in schema["properties"]
    assert schema["$defs"]["TrainSection"]["properties"]["lr"]["description"].startswith("peak learning rate")
    assert (REPO / "recipes" / "recipe.schema.json").read_text() == schema_json(), \
        "stale: run python scripts/make_recipe_docs.py"


def test_docs_recipes_md_is_generated_and_current():
    text = (REPO / "docs" / "recipes.md").read_text()
    assert text == reference_markdown(), "docs/recipes.md is stale: run python scripts/make_recipe_docs.py"
    for key in ("`train.lr`", "`data.packing`", "`export.gguf.quant`", "`adapter.target_modules`"):
        assert key in text


@pytest.mark.slow
def test_lock_then_an_edited_data_file_stops_run_naming_the_file(tiny_model, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model)
    locked = llmtune("recipe", "lock", recipe, cwd=tmp_path)
    assert locked.returncode == 0, locked.stderr
    lock = json.loads((tmp_path / "recipe.yaml.lock").read_text())
    assert list(lock["data"]) == ["data/train.jsonl"] and lock["model"]["fingerprint"].startswith("sha256:")
    with open(tmp_path / "data" / "train.jsonl", "a") as handle:
        handle.write(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "hello"}]}) + "\n")
    result = llmtune("run", recipe, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "data file data/train.jsonl changed since the recipe was locked" in result.stderr
    assert "llmtune recipe lock" in result.stderr
    assert not (tmp_path / "runs" / "tiny" / "prepared").exists()


@pytest.mark.slow
def test_plan_answers_offline_for_every_stage_and_every_memory_claim_holds(tmp_path):
    """`llmtune plan` needs no hub for a library model, and gives each stage's peak on the GPU;
    a recipe's "fits a N GB GPU" holds for its largest stage on such a GPU (where merge, the
    merged model's eval or the GGUF check run on the CPU, the description says so)."""
    import re

    from llmtune.stages.plan import plan

    result = llmtune("plan", REPO / "recipes" / "library" / "llama-3.1-8b-qlora.yaml", "--json",
                     "--device", "cuda", "--gpu-memory", "16", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    planned = json.loads(result.stdout)
    assert planned["train_examples"] is None and planned["tokens_counted_from"].startswith("unknown")
    peaks = planned["peak_gpu_bytes_by_stage"]
    assert set(peaks) == {"train", "merge", "eval", "export"} and max(peaks.values()) <= 16e9 * 0.9
    assert planned["stages_on_the_cpu"] == ["merge", "eval of the merged model", "the GGUF check"]
    # every description's claim is plan's own figure (test_memory_notes_in_descriptions_are_current);
    # here plan itself on a few shapes: LoRA, QLoRA, GRPO
    for name in ("llama-3.1-8b-lora.yaml", "qwen2.5-7b-qlora.yaml", "qwen2.5-1.5b-grpo-gsm8k.yaml"):
        recipe = load_recipe(REPO / "recipes" / "library" / name)
        claimed = int(re.search(r"fits an? (\d+) GB GPU", recipe.description).group(1))
        planned = plan(recipe, tmp_path / "run", device="cuda", gpu_memory=claimed)
        peaks = planned["peak_gpu_bytes_by_stage"]
        assert max(peaks.values()) <= claimed * 1e9 * 0.9, (name, peaks)
        assert all(stage in recipe.description for stage in planned["stages_on_the_cpu"]), name
