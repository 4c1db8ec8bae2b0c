"""Loading a recipe: YAML (safe, no duplicate keys, no alias bombs), `extends`, `--set` overrides,
paths resolved, then the schema. Relative paths inside a recipe resolve against the folder of the
file that wrote them, so a recipe folder can be shared in git and run from anywhere. `--set`
paths resolve against the current directory; `output_dir` always does (outputs go where the
user runs the command)."""

from __future__ import annotations

import hashlib
import json
import os
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from llmtune.errors import RecipeError
from llmtune.recipe.errors import SET_ORIGIN, Origins, format_errors, hint, shown_path
from llmtune.recipe.schema import Recipe

# Keys whose values are filesystem paths, as key paths with "*" for any list index.
_PATH_KEYS = [
    ("data", "train", "*", "path"),
    ("data", "validation", "sources", "*", "path"),
    ("eval", "sources", "*", "path"),
    ("rewards", "*", "path"),
    ("rewards", "*", "schema"),
    ("eval", "benchmarks", "include", "*"),
]


def load_recipe(path: str | os.PathLike, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read a recipe file, follow `extends`, apply `--set` overrides and validate."""
    top = Path(path)
    raw, origins = _load_file(top, chain=())
    for item in overrides:
        _apply_override(raw, origins, item)
    _resolve_paths(raw, origins)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(format_errors(exc, origins, top), hint=hint(top)) from None


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


# Keys added after runs were made with recipes that lacked them: hashed only when set to something
# other than their default, so that the new key leaves existing stages up to date.
ADDED_KEYS = {("data", "allow_image_urls"): False, ("adapter", "vision"): "frozen"}


def section_sha256(recipe: Recipe, *sections: str, exclude: dict | None = None) -> str:
    """Hash of just the recipe sections a stage depends on, so other edits do not re-run it;
    `exclude` leaves out keys inside them (pydantic's exclude)."""
    data = recipe.model_dump(mode="json", include=set(sections), exclude=exclude)
    for (section, key), default in ADDED_KEYS.items():  # at their default: as before they existed
        if section in data and data[section].get(key, default) == default:
            data[section].pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def run_dir(recipe: Recipe, override: str | os.PathLike | None = None) -> Path:
    return Path(override) if override else Path(recipe.output_dir) / recipe.name


# --- loading ---------------------------------------------------------------------------------


def _load_file(path: Path, chain: tuple[Path, ...]) -> tuple[dict, Origins]:
    path = Path(os.path.abspath(path))
    label = shown_path(path)
    if path in chain:
        cycle = " -> ".join(shown_path(p) for p in (*chain, path))
        raise RecipeError(f"{label}: 'extends' forms a cycle: {cycle}")
    if not path.is_file():
        where = f" (extended by {shown_path(chain[-1])})" if chain else ""
        raise RecipeError(f"{label}: recipe file not found{where}")
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise RecipeError(f"{label}: not a text file (not UTF-8)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        if problem.startswith("duplicate key") and getattr(exc, "context", None):
            problem += f" ({exc.context}); keep one of the two"  # the context names the first line
        raise RecipeError(f"{label}{line}: not valid YAML: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{label}: a recipe must be a mapping of keys, got {type(raw).__name__}")

    parent_ref = raw.pop("extends", None)
    origins: Origins = {}
    _record_origins(raw, (), str(path), origins)
    if parent_ref is None:
        return raw, origins
    if not isinstance(parent_ref, str):
        raise RecipeError(f"{label}: extends: expected a path to another recipe file")
    parent, parent_origins = _load_file(path.parent / parent_ref, (*chain, path))
    _deep_merge(parent, raw)
    # A scalar or list set by the child replaces the parent's value whole, children included.
    replaced = list(_non_mapping_keys(raw, ()))
    merged = {
        key: origin
        for key, origin in parent_origins.items()
        if not any(len(key) > len(r) and key[: len(r)] == r for r in replaced)
    }
    merged.update(origins)
    return parent, merged


# Anchors and aliases are handy in recipes, but a few nested aliases can stand for billions of
# nodes ("billion laughs"). Refuse documents that would expand past this many nodes.
MAX_YAML_NODES = 100_000


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no Python objects), refusing duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (list, dict)):
                raise yaml.constructor.ConstructorError(
                    None, None, "a mapping key must be a plain value", key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    f"also on line {seen[key] + 1}", node.start_mark,
                    f"duplicate key {key!r}", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """Safe-load one YAML document: duplicate keys and alias bombs are errors."""
    loader = _RecipeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {})
        if size > MAX_YAML_NODES:
            raise yaml.YAMLError(
                f"the document expands to more than {MAX_YAML_NODES:,} values through anchors "
                "and aliases; refusing it")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(node, memo: dict) -> int:
    """How many nodes the document has once every alias is expanded (memoised per node)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a node reached again while counting it (a cycle) counts once
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(child, memo) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    else:
        size = 1
    memo[id(node)] = min(size, MAX_YAML_NODES + 1)
    return memo[id(node)]


def _non_mapping_keys(node: dict, prefix: tuple):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _non_mapping_keys(value, (*prefix, key))
        else:
            yield (*prefix, key)


def _record_origins(node: Any, prefix: tuple, origin: str, origins: Origins) -> None:
    if prefix:
        origins[prefix] = origin
    if isinstance(node, dict):
        for key, value in node.items():
            _record_origins(value, (*prefix, key), origin, origins)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            _record_origins(value, (*prefix, index), origin, origins)


def _deep_merge(base: dict, child: dict) -> None:
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value


def _apply_override(raw: dict, origins: Origins, item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {item}: expected KEY=VALUE, for example --set train.lr=1e-4")
    try:
        value = parse_yaml(text)
    except yaml.YAMLError:
        value = text
    if value is None and text.strip() not in ("", "null", "Null", "NULL", "~"):
        value = text  # e.g. a regex starting with "#", which YAML reads as a comment
    parts: list[Any] = [int(p) if p.isascii() and p.isdigit() else p for p in key.strip().split(".")]
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        nxt = parts[depth + 1]
        if isinstance(node, list):
            if not (isinstance(part, int) and part < len(node)):
                raise RecipeError(f"--set {key}: index {part} is out of range")
            node = node[part]
            continue
        if not isinstance(node.get(part), (dict, list)):
            node[part] = [] if isinstance(nxt, int) else {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        if not (isinstance(last, int) and last <= len(node)):
            raise RecipeError(f"--set {key}: index {last} is out of range")
        node[last:last + 1] = [value]
    else:
        node[last] = value
    for existing in [k for k in origins if k[: len(parts)] == tuple(parts)]:
        del origins[existing]
    _record_origins(value, tuple(parts), SET_ORIGIN, origins)


def _resolve_paths(raw: dict, origins: Origins) -> None:
    for pattern in _PATH_KEYS:
        for key, parent, leaf in _find(raw, pattern, ()):
            value = parent[leaf]
            if isinstance(value, str):
                parent[leaf] = _absolute(value, origins.get(key))
    data = raw.get("data")
    template = data.get("template") if isinstance(data, dict) else None
    if isinstance(template, str) and template.endswith((".jinja", ".j2")):
        data["template"] = _absolute(template, origins.get(("data", "template")))
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("path"), str):
        value = model["path"]
        base = _base_dir(origins.get(("model", "path")))
        if _looks_local(value, base):
            model["path"] = _absolute(value, origins.get(("model", "path")))


def _find(node: Any, pattern: tuple, prefix: tuple):
    """Yield (key path, parent container, last key) for every match of a "*" pattern."""
    if not pattern:
        return
    head, rest = pattern[0], pattern[1:]
    if head == "*":
        items = list(enumerate(node)) if isinstance(node, list) else []
    else:
        items = [(head, node[head])] if isinstance(node, dict) and head in node else []
    for key, child in items:
        if rest:
            yield from _find(child, rest, (*prefix, key))
        else:
            yield (*prefix, key), node, key


def _base_dir(origin: str | None) -> Path:
    return Path(origin).parent if origin and origin != SET_ORIGIN else Path.cwd()


def _absolute(value: str, origin: str | None) -> str:
    path = Path(value).expanduser()
    return os.path.normpath(path if path.is_absolute() else _base_dir(origin) / path)


def _looks_local(value: str, base: Path) -> bool:
    if value.startswith("embedded:"):
        return False
    if value.startswith((".", "/", "~")) or value.endswith(".gguf"):
        return True
    return (base / value).exists()
