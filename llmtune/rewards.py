"""Reward functions for train.objective grpo and for eval on prompt data: what a program can check
in a completion. Each takes the completion's text and its row (prompt, answer, other columns) and
returns a number (a python reward may instead take TRL's batch form: `completions` first, a list
back); `score` applies one to many completions, turning a reward that raises into 0
(counted and reported with the row's file:line) or a stop, as train.grpo.reward_errors says.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from llmtune.errors import InputError
from llmtune.recipe import Reward

NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")


def normalise(text: str) -> str:
    """Whitespace collapsed, case folded; a number without thousands separators, trailing
    zeros, a trailing dot or a leading plus ('1,000.50' -> '1000.5')."""
    text = " ".join(str(text).split()).casefold()
    plain = text.replace(",", "").rstrip(".")
    if NUMBER.match(plain):
        value = float(plain)
        return str(int(value)) if value.is_integer() else repr(value)
    return text


def extract(text: str, pattern: re.Pattern) -> str | None:
    """The last match of `pattern` in `text` (its first group, if it has groups)."""
    found = None
    for found in pattern.finditer(text):
        pass
    if found is None:
        return None
    return found.group(1) if pattern.groups else found.group(0)


def match(completion: str, row: dict, pattern: re.Pattern) -> float:
    """1 when the completion's extracted answer equals the row's answer (itself extracted by the
    same pattern when it matches, as GSM8K's '... #### 42'), after normalising."""
    reference = row.get("answer")
    if reference is None:
        raise ValueError("the row has no answer to match")
    got = extract(completion, pattern)
    want = extract(reference, pattern) or reference
    return float(got is not None and normalise(got) == normalise(want))


def fits_format(completion: str, pattern: re.Pattern) -> float:
    """1 when the whole completion (leading and trailing whitespace aside) matches."""
    return float(pattern.fullmatch(completion.strip()) is not None)


def parses_as_json(completion: str, validator=None) -> float:
    try:
        value = json.loads(completion.strip())
    except ValueError:
        return 0.0
    return float(validator is None or validator.is_valid(value))


def length_penalty(completion_ids: list[int], max_tokens: int) -> float:
    """0 up to max_tokens; past it, -(tokens beyond) / max_tokens, at most -1."""
    over = len(completion_ids) - max_tokens
    return -min(1.0, over / max_tokens) if over > 0 else 0.0


@dataclass
class RewardFunction:
    """One recipe reward, ready to score: its name, weight, best value and how to compute it."""

    name: str
    weight: float
    best: float  # what counts as full reward (eval's share with full reward)
    compute: Callable[[str, list[int], dict], float]
    errors: int = 0
    first_error: str | None = None
    stop_on_error: bool = False
    messages: list[str] = field(default_factory=list)
    # a python reward written for TRL (Axolotl, Unsloth and open-r1 write them so): called once
    # per batch, `function(completions, prompts=[...], answer=[...], completion_ids=[...], **columns)`
    batch: Callable[..., list] | None = None

    def score(self, completions: list[str], completion_ids: list[list[int]], rows: list[dict]) -> list[float]:
        if self.batch is not None:
            return self._score_batch(completions, completion_ids, rows)
        values = []
        for completion, ids, row in zip(completions, completion_ids, rows):
            try:
                value = self.compute(completion, ids, row)
            except Exception as exc:  # a user's reward code may raise anything
                where = row.get("where", "?")
                message = f"reward {self.name} raised on the completion for {where}: {type(exc).__name__}: {exc}"
                if self.stop_on_error:
                    raise InputError(message, hint="fix the reward, or set train.grpo.reward_errors: zero "
                                     "to count such completions as 0") from None
                self.errors += 1
                self.messages.append(message)
                value = 0.0
            values.append(self._checked(value, row))
        if len(values) != len(completions):
            raise InputError(f"reward {self.name} returned {len(values)} values for {len(completions)} completions")
        return values

    def _score_batch(self, completions: list[str], completion_ids: list[list[int]], rows: list[dict]) -> list[float]:
        columns = [_fields(row) for row in rows]
        keywords = {name: [fields.get(name) for fields in columns] for name in dict.fromkeys(k for c in columns for k in c)}
        keywords["prompts"] = keywords.pop("prompt", [row.get("prompt") for row in rows])
        try:
            values = self.batch(list(completions), completion_ids=completion_ids, **keywords)
        except Exception as exc:  # a user's reward code may raise anything
            where = ", ".join(dict.fromkeys(str(row.get("where", "?")) for row in rows))
            message = f"reward {self.name} raised on a batch of {len(completions)} completions (for {where}): " \
                      f"{type(exc).__name__}: {exc}"
            if self.stop_on_error:
                raise InputError(message, hint="fix the reward, or set train.grpo.reward_errors: zero "
                                 "to count such completions as 0") from None
            self.errors += len(completions)
            self.messages.append(message)
            return [0.0] * len(completions)
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else repr(values)[:80]
            raise InputError(f"reward {self.name} returned {got} for a batch of {len(completions)} completions",
                             hint="a reward that takes `completions` returns a list with one number per completion")
        return [self._checked(value, row) for value, row in zip(values, rows)]

    def _checked(self, value, row: dict) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(
                f"reward {self.name} returned {value!r} for {row.get('where', '?')}: a reward must be a finite number",
                hint="make the function return an int or float for every completion")
        return float(value)


def build(rewards: list[Reward], stop_on_error: bool = False) -> list[RewardFunction]:
    """The recipe's rewards as functions, named by their type (numbered when a type repeats)."""
    names = [reward.name or reward.type for reward in rewards]
    functions = []
    for index, reward in enumerate(rewards):
        name = names[index] if names.count(names[index]) == 1 else f"{names[index]}_{names[:index + 1].count(names[index])}"
        compute, batch = _compute(reward), None
        if reward.type == "python" and _takes_a_batch(compute):
            compute, batch = None, compute
        elif reward.type == "python":
            compute = _per_completion(compute)
        functions.append(RewardFunction(name, reward.weight, 0.0 if reward.type == "length" else 1.0,
                                        compute, stop_on_error=stop_on_error, batch=batch))
    return functions


def _takes_a_batch(function) -> bool:
    """TRL's batch form: a first parameter named `completions` (a list of them)."""
    try:
        return list(inspect.signature(function).parameters)[:1] == ["completions"]
    except (TypeError, ValueError):  # a builtin without a signature: the per-completion form
        return False


def _per_completion(function) -> Callable[[str, list[int], dict], float]:
    return lambda completion, ids, row: function(completion, **_fields(row))


def needs_answer(rewards: list[Reward]) -> list[str]:
    """The rewards that compare with the row's answer."""
    return [reward.name or reward.type for reward in rewards if reward.type == "match"]


def _compute(reward: Reward) -> Callable:
    """How a reward scores one completion (completion, ids, row); for `python`, the user's function."""
    if reward.type == "match":
        pattern = re.compile(reward.answer_regex)
        return lambda completion, ids, row: match(completion, row, pattern)
    if reward.type == "format":
        pattern = re.compile(reward.regex, re.DOTALL)
        return lambda completion, ids, row: fits_format(completion, pattern)
    if reward.type == "json":
        validator = _validator(reward.json_schema) if reward.json_schema else None
        return lambda completion, ids, row: parses_as_json(completion, validator)
    if reward.type == "length":
        return lambda completion, ids, row: length_penalty(ids, reward.max_tokens)
    return load_python(reward.path, reward.function)


def _fields(row: dict) -> dict:
    """What a python reward is called with besides the completion: prompt, answer, and the
    row's other columns."""
    extra = json.loads(row.get("extra") or "{}")
    return {**extra, "prompt": row.get("prompt"), "answer": row.get("answer")}


def _validator(path: str):
    try:
        import jsonschema
    except ImportError:
        raise InputError("a json reward with a schema needs the jsonschema package",
                         hint="pip install jsonschema") from None
    with open(path, encoding="utf-8") as handle:
        try:
            schema = json.load(handle)
        except ValueError as exc:
            raise InputError(f"{path}: not a JSON Schema: {exc}") from None
    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise InputError(f"{path}: not a valid JSON Schema: {exc.message}") from None
    return cls(schema)


def load_python(path: str, name: str):
    """The function `name` from the file at `path`. This runs the file's code (docs/security.md):
    only here, when a recipe that names it trains or evaluates, and says so first."""
    import hashlib

    from llmtune.console import console

    try:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as exc:
        raise InputError(f"{path}: cannot read the reward file ({exc.strerror})") from None
    console.print(f"reward: running the code of {path} (sha256 {digest[:16]}…) for {name}()", markup=False)
    spec = importlib.util.spec_from_file_location(f"llmtune_reward_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise InputError(f"{path}: loading the reward file failed: {type(exc).__name__}: {exc}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise InputError(f"{path}: no function named {name!r}",
                         hint=f"define def {name}(completion, **row) -> float (or TRL's "
                         f"def {name}(completions, **kwargs) -> list[float]) in that file")
    return function
