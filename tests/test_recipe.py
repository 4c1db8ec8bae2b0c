"""The recipe: schema, extends, --set, path resolution and error reporting."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helpers import REPO, llmtune, write_jsonl
from llmtune.errors import RecipeError
from llmtune.recipe import EMBEDDED_DEFAULT, dump_recipe, load_recipe, section_sha256


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def _minimal(tmp_path):
    write_jsonl(tmp_path / "data" / "a.jsonl", [])
    return {"name": "demo", "data": {"train": [{"path": "data/a.jsonl"}]}}


def test_defaults_and_relative_paths_resolve_against_the_recipe(tmp_path, monkeypatch):
    recipe_file = _write(tmp_path / "recipes" / "r.yaml", {"name": "demo",
                         "data": {"train": [{"path": "../data/a.jsonl"}]}})
    write_jsonl(tmp_path / "data" / "a.jsonl", [])
    monkeypatch.chdir(REPO)  # run from elsewhere: paths still resolve against the recipe file
    recipe = load_recipe(recipe_file)
    assert recipe.data.train[0].path == str(tmp_path / "data" / "a.jsonl")
    assert recipe.model.path == EMBEDDED_DEFAULT
    assert recipe.adapter.target_modules == "all-linear"
    assert recipe.data.validation.effective_fraction == 0.1


def test_extends_merges_sections_and_child_paths_resolve_against_child(tmp_path):
    write_jsonl(tmp_path / "base" / "data" / "base.jsonl", [])
    write_jsonl(tmp_path / "child" / "mine.jsonl", [])
    _write(tmp_path / "base" / "base.yaml", {
        "name": "base", "data": {"train": [{"path": "data/base.jsonl"}], "max_seq_len": 256},
        "train": {"lr": 1.0e-4, "batch_size": 2},
    })
    child = _write(tmp_path / "child" / "child.yaml", {
        "extends": "../base/base.yaml", "name": "child", "train": {"lr": 3.0e-4},
    })
    recipe = load_recipe(child)
    assert recipe.name == "child"
    assert recipe.train.lr == 3.0e-4 and recipe.train.batch_size == 2  # deep merge
    assert recipe.data.train[0].path == str(tmp_path / "base" / "data" / "base.jsonl")
    assert recipe.data.max_seq_len == 256

    child2 = _write(tmp_path / "child" / "child2.yaml", {
        "extends": "../base/base.yaml", "name": "child2", "data": {"train": [{"path": "mine.jsonl"}]},
    })
    assert load_recipe(child2).data.train[0].path == str(tmp_path / "child" / "mine.jsonl")


def test_set_overrides_parse_as_yaml_scalars(tmp_path):
    recipe_file = _write(tmp_path / "r.yaml", _minimal(tmp_path))
    recipe = load_recipe(recipe_file, ["train.lr=1e-4", "train.max_steps=5",
                                       "adapter.target_modules=[q_proj, v_proj]", "name=other"])
    assert recipe.train.lr == 1e-4 and recipe.train.max_steps == 5
    assert recipe.adapter.target_modules == ["q_proj", "v_proj"]
    assert recipe.name == "other"
    hashed = load_recipe(recipe_file, ["eval.answer_regex=#### *(-?[0-9.,]+)", "model.revision=null"])
    assert hashed.eval.answer_regex == "#### *(-?[0-9.,]+)" and hashed.model.revision is None


def test_every_problem_reported_at_once_with_file_and_key_path(tmp_path):
    data = _minimal(tmp_path)
    data["adapter"] = {"rank": 8}                       # unknown key
    data["train"] = {"lr": "fast"}                      # wrong type
    data["data"]["train"].append({"path": "data/missing.jsonl"})  # missing data file
    recipe_file = _write(tmp_path / "bad.yaml", data)
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe_file)
    message = caught.value.message
    assert "3 problems" in message
    assert "bad.yaml: adapter.rank: unknown key (did you mean 'r'?)" in message
    assert "bad.yaml: train.lr: Input should be a valid number" in message
    assert "bad.yaml: data.train.1.path: file not found:" in message and "missing.jsonl" in message


def test_keys_other_tools_use_point_to_ours(tmp_path):
    data = {**_minimal(tmp_path), "train": {"learning_rate": 1e-4, "gradient_accumulation_steps": 2,
                                            "optim": "adamw_8bit"}, "adapter": {"lora_alpha": 16}}
    with pytest.raises(RecipeError) as caught:
        load_recipe(_write(tmp_path / "axolotl.yaml", data))
    message = caught.value.message
    for theirs, ours in (("train.learning_rate", "lr"), ("train.gradient_accumulation_steps", "grad_accum"),
                         ("train.optim", "optimizer"), ("adapter.lora_alpha", "alpha")):
        assert f"{theirs}: unknown key (did you mean '{ours}'?)" in message


def test_errors_name_the_file_that_set_the_key(tmp_path):
    _write(tmp_path / "base.yaml", {**_minimal(tmp_path), "train": {"batch_size": 0}})
    child = _write(tmp_path / "child.yaml", {"extends": "base.yaml", "merge": {"dtyp": "float32"}})
    with pytest.raises(RecipeError) as caught:
        load_recipe(child, ["train.epochs=-1"])
    message = caught.value.message
    assert "base.yaml: train.batch_size:" in message
    assert "child.yaml: merge.dtyp: unknown key (did you mean 'dtype'?)" in message
    assert "--set: train.epochs:" in message


def test_an_unknown_section_that_only_set_wrote_is_blamed_on_set(tmp_path):
    recipe_file = _write(tmp_path / "r.yaml", _minimal(tmp_path))
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe_file, ["nosuch.key=1"])
    assert "--set: nosuch: unknown key" in caught.value.message


def test_yaml_syntax_error_names_line(tmp_path):
    recipe_file = _write(tmp_path / "r.yaml", "name: x\ndata: [unclosed\n")
    with pytest.raises(RecipeError, match=r"r.yaml:\d+: not valid YAML"):
        load_recipe(recipe_file)


def test_extends_cycle_and_missing_parent(tmp_path):
    _write(tmp_path / "a.yaml", {"extends": "b.yaml", "name": "a"})
    _write(tmp_path / "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")
    _write(tmp_path / "c.yaml", {"extends": "nope.yaml", "name": "c"})
    with pytest.raises(RecipeError, match="nope.yaml: recipe file not found"):
        load_recipe(tmp_path / "c.yaml")


def test_validation_fraction_and_sources_are_exclusive(tmp_path):
    data = _minimal(tmp_path)
    data["data"]["validation"] = {"fraction": 0.2, "sources": [{"path": "data/a.jsonl"}]}
    with pytest.raises(RecipeError, match="either 'fraction' or 'sources'"):
        load_recipe(_write(tmp_path / "r.yaml", data))


def test_section_hash_depends_only_on_named_sections(tmp_path):
    recipe_file = _write(tmp_path / "r.yaml", _minimal(tmp_path))
    a, b = load_recipe(recipe_file), load_recipe(recipe_file, ["train.lr=1e-5"])
    assert section_sha256(a, "data") == section_sha256(b, "data")
    assert section_sha256(a, "train") != section_sha256(b, "train")


def test_dump_round_trips(tmp_path):
    recipe = load_recipe(_write(tmp_path / "r.yaml", _minimal(tmp_path)))
    again = load_recipe(_write(tmp_path / "again.yaml", dump_recipe(recipe)))
    assert again == recipe


def test_shipped_recipes_validate():
    """Every quickstart recipe loads, names its run after its file and reads data that exists."""
    paths = sorted((REPO / "recipes").glob("*.yaml"))
    assert [path.stem for path in paths] == ["grpo-quickstart", "preference-quickstart", "quickstart",
                                             "tools-quickstart"]
    for path in paths:
        recipe = load_recipe(path)
        assert recipe.name == path.stem
        assert all(Path(source.path).is_file() for source in recipe.data.train)


def test_cli_exits_2_with_one_message_and_no_traceback(tmp_path):
    data = _minimal(tmp_path)
    data["adapter"] = {"rank": 8}
    data["train"] = {"lr": "fast"}
    data["data"]["train"].append({"path": "data/missing.jsonl"})
    _write(tmp_path / "bad.yaml", data)
    result = llmtune("recipe", "validate", "bad.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in ("adapter.rank", "train.lr", "data.train.1.path", "bad.yaml", "hint:"):
        assert fragment in result.stderr
    # the same recipe stops every stage command the same way
    assert llmtune("prepare", "bad.yaml", cwd=tmp_path).returncode == 2


def test_cli_show_prints_resolved_yaml(tmp_path):
    _write(tmp_path / "r.yaml", _minimal(tmp_path))
    result = llmtune("recipe", "show", "r.yaml", "--set", "train.lr=0.5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["train"]["lr"] == 0.5
    assert shown["data"]["train"][0]["path"] == str(tmp_path / "data" / "a.jsonl")
