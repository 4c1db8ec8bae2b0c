"""Recipe errors as a person reads them: every problem at once, each with the file (or --set)
that set the key, the key path, and a "did you mean" for unknown keys."""

from __future__ import annotations

import difflib
import os
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from llmtune.recipe.schema import Recipe

SET_ORIGIN = "--set"
Origins = dict[tuple, str]  # key path -> the file (or "--set") that set it


def format_errors(exc: ValidationError, origins: Origins, top: Path) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        origin = _origin_of(loc, origins, top)
        if err["type"] == "extra_forbidden":
            message = "unknown key" + _did_you_mean(loc)
        elif err["type"] == "missing":
            message = "required key is missing"
        else:
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] not in ("value_error", "assertion_error") and "input" in err:
                message += f" (got {err['input']!r})"
        lines.append(f"{origin}: {dotted}: {message}")
    count = len(lines)
    head = f"{shown_path(top)}: {count} problem{'s' if count != 1 else ''} in the recipe"
    return "\n".join([head, *("  " + line for line in lines)])


def _origin_of(loc: tuple, origins: Origins, top: Path) -> str:
    for end in range(len(loc), 0, -1):
        origin = origins.get(loc[:end])
        if origin is not None:
            return origin if origin == SET_ORIGIN else shown_path(Path(origin))
    # an unknown key that only --set wrote (--set nosuch.key=1): its origin is recorded below it
    below = {origin for key, origin in origins.items() if key[:len(loc)] == loc and len(key) > len(loc)}
    if below == {SET_ORIGIN}:
        return SET_ORIGIN
    return shown_path(Path(os.path.abspath(top)))


# What Axolotl, LLaMA-Factory, TRL and peft call some of our keys: people bring these names along.
OTHER_NAMES = {"rank": "r", "lora_r": "r", "lora_rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
               "learning_rate": "lr", "num_epochs": "epochs", "num_train_epochs": "epochs",
               "micro_batch_size": "batch_size", "per_device_train_batch_size": "batch_size",
               "gradient_accumulation_steps": "grad_accum", "optim": "optimizer", "sequence_len": "max_seq_len",
               "cutoff_len": "max_seq_len", "max_length": "max_seq_len", "lora_target_modules": "target_modules",
               "lm_eval_tasks": "benchmarks"}


def _did_you_mean(loc: tuple) -> str:
    model = _model_at(loc[:-1])
    if model is None:
        return ""
    key, known = str(loc[-1]), list(model.model_fields)
    close = [OTHER_NAMES[key]] if OTHER_NAMES.get(key) in known else []
    close = close or difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    close = close or [k for k in known if key.startswith(k) or k.startswith(key)][:1]
    if close:
        return f" (did you mean '{close[0]}'?)"
    return f" (known keys: {', '.join(model.model_fields)})"


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The schema class that describes the mapping at `loc`, following fields and list items."""
    model: type[BaseModel] | None = Recipe
    for part in loc:
        if model is None:
            return None
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        model = _model_in(field.annotation) if field else None
    return model


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def hint(top: Path) -> str:
    return f"fix the keys above, then check with: llmtune recipe validate {shown_path(top)}"


def shown_path(path: Path) -> str:
    """A path as the user best reads it: relative when under the current directory."""
    try:
        relative = os.path.relpath(path)
    except ValueError:
        return str(path)
    return str(path) if relative.startswith("..") else relative
