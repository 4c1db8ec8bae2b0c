"""The objectives that TRL's trainers run (a row in llmtune/objectives.py with `trl` set): the
trainer class, its config, and how the prepared rows reach it, by the row's `rows`:

- "pairs" (DPO), "answers" (KTO): the prepared rows already hold TRL's token columns; TRL's
  collators pad them.
- "orpo" (ORPO, CPO/SimPO): TRL's row tokenizer passes the prepared pair through and the collator
  takes it reshaped as its `tokenize_row` would have written it.
- "prompts" (GRPO): the trainer batches the prompts itself; prepare tokenised them with the chat
  template and the generation prompt, and they are not tokenised again.
- "sequences" (reward models): each answer with its prompt as one sequence, scored at its end.

Everything else (losses, the reference model as the base with the adapter disabled, metrics) is
TRL's. A new objective whose rows come in a new shape adds an entry to ROWS.
"""

from __future__ import annotations

import importlib
import os

from llmtune.console import console
from llmtune.data.chat import IGNORE
from llmtune.errors import InputError


def _load(path: str):
    module, name = path.split(":")
    # ORPO and CPO are TRL's experimental modules, which warn on every import; pyproject.toml
    # bounds the TRL version llmtune is tested with instead
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    return getattr(importlib.import_module(module), name)


def trainer_class(row, base):
    """TRL's trainer for the objective with llmtune's `base` (the sampler, LoRA+ optimizer and
    loss checks of trainer.GroupedTrainer), taking the prepared rows as ROWS says."""
    trainer = _load(row.trl[0])
    return type(f"Llmtune{trainer.__name__}", (ROWS[row.rows]["mixin"], base, trainer), {})


def config(row, recipe, arguments: dict):
    """TRL's config for the objective: the Trainer arguments SFT uses, and the objective's own."""
    if recipe.train.grpo.generation == "vllm" and row.generates:
        _check_vllm()
    return _load(row.trl[1])(**{**arguments, **row.settings(recipe)})


def _check_vllm() -> None:
    import importlib.util

    import torch

    if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
        raise InputError("train.grpo.generation: vllm needs a CUDA GPU and the vllm package "
                         f"({'not installed' if importlib.util.find_spec('vllm') is None else 'no GPU here'})",
                         hint="pip install vllm on a GPU machine, or use generation: transformers (the default)")


def collator(row, pad_id: int):
    """The objective's TRL collator, wrapped to count tokens and remember the rows of a step
    (a trainer that batches its own prompts counts from its completions, see _PreparedPrompts)."""
    inner = ROWS[row.rows]["collator"]
    return CountingCollator(inner(pad_id) if inner else None, ROWS[row.rows].get("to_rows"))


def extra_arguments(row, recipe, counts) -> dict:
    """What the objective's trainer takes besides the model, data and arguments."""
    if row.rewards:  # it batches its prompts itself, and scores them with the rewards
        return {"reward_funcs": reward_functions(recipe), "prompt_counts": counts}
    return {"data_collator": counts}


def lengths(dataset) -> list[int]:
    """The padded length of each pair (prompt and its longer answer), for length grouping."""
    import pyarrow.compute as pc

    table = dataset.data
    prompt = pc.list_value_length(table.column("prompt_ids"))
    answers = [pc.list_value_length(table.column(name)) for name in ("chosen_ids", "rejected_ids", "completion_ids")
               if name in table.column_names]
    longest = answers[0] if len(answers) == 1 else pc.max_element_wise(*answers)
    return pc.add(prompt, longest).to_pylist()


class CountingCollator:
    """A TRL collator that also counts real and trained tokens for the progress line, and keeps
    where the rows of a step were read (file:line), as PadCollator does for SFT."""

    def __init__(self, inner, to_rows=None):
        self.inner, self.to_rows = inner, to_rows
        self.tokens = self.trained_tokens = 0
        self.counting = True  # off while the Trainer evaluates
        self.step_rows: list[str] = []

    def __call__(self, rows: list[dict]) -> dict:
        if self.inner is None:  # a trainer that batches its own prompts
            raise RuntimeError("this trainer batches its prompts itself")
        batch = self.inner([self.to_rows(row) for row in rows] if self.to_rows else rows)
        if self.counting:
            self.step_rows += [row["where"] for row in rows if "where" in row]
            self.tokens += sum(int(value.sum()) for key, value in batch.items() if key.endswith("attention_mask"))
            self.trained_tokens += sum(int(value.sum()) for key, value in batch.items() if key.endswith("completion_mask"))
            self.trained_tokens += sum(int((value != IGNORE).sum()) for key, value in batch.items()
                                       if key in ("chosen_labels", "rejected_labels"))
        return batch


def _orpo_row(row: dict) -> dict:
    """A prepared pair in the shape ORPO's and CPO's collator takes (TRL's `tokenize_row` output)."""
    prompt = list(row["prompt_ids"])
    out = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for name in ("chosen", "rejected"):
        answer = list(row[f"{name}_ids"])
        out[f"{name}_input_ids"] = prompt + answer
        out[f"{name}_attention_mask"] = [1] * (len(prompt) + len(answer))
        out[f"{name}_labels"] = [IGNORE] * len(prompt) + answer
    return out


class _PreparedTokens:
    """DPO and KTO: the prepared rows already hold TRL's token columns."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if getattr(self, "calculate_KL", False):
            # as KTOTrainer does: each answer of a batch paired with the previous prompt, for the KL term
            def add_kl_completion_ids(rows):
                rows["KL_completion_ids"] = [rows["completion_ids"][-1]] + rows["completion_ids"][:-1]
                return rows

            dataset = dataset.map(add_kl_completion_ids, batched=True,
                                  batch_size=args.per_device_train_batch_size, desc=None)
        return dataset


class _PreparedPrompts:
    """GRPO: the prompts as prepare tokenised them (with the chat template and the generation
    prompt, as chat and generate do), not tokenised again; token counts and the rows of each
    step for the progress line and the non-finite checks."""

    def __init__(self, *args, prompt_counts=None, **kwargs):
        self.counts = prompt_counts
        super().__init__(*args, **kwargs)

    def _generate_and_score_completions(self, inputs):
        self._prepared_prompt_ids = [list(row["prompt_ids"]) for row in inputs]
        output = super()._generate_and_score_completions(inputs)
        if self.counts is not None and self.model.training:
            self.counts.step_rows += [row["where"] for row in inputs[::max(1, self.num_generations)]]
            prompt, completion = int(output["prompt_mask"].sum()), int(output["completion_mask"].sum())
            self.counts.tokens += prompt + completion
            self.counts.trained_tokens += completion
        return output

    def _tokenize_prompts(self, prompts):
        return self._prepared_prompt_ids, None, {}


def reward_functions(recipe) -> list:
    """The recipe's rewards as TRL reward functions (named, one value per completion)."""
    from llmtune.rewards import build

    return [_for_trl(function) for function in build(recipe.rewards, recipe.train.grpo.reward_errors == "error")]


def _for_trl(function):
    shown = 3  # errors printed per reward; all are counted

    def reward(prompts, completions, completion_ids, **columns):
        rows = [{"prompt": prompt, "answer": answer, "extra": extra, "where": where}
                for prompt, answer, extra, where in zip(prompts, columns["answer"], columns["extra"], columns["where"])]
        before = function.errors
        values = function.score(completions, completion_ids, rows)
        errors = function.errors - before
        for message in function.messages[before:shown]:
            console.print(f"[yellow]train: {message} (counted as 0)[/yellow]")
        if errors and "log_metric" in columns:
            columns["log_metric"](f"reward_errors/{function.name}", errors)
        return values

    reward.__name__ = function.name
    return reward


class _PreparedRows:
    """ORPO and CPO: their row tokenizer passes the prepared row through (the collator reshapes it)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.use_dpo_data_collator = True  # it is TRL's, wrapped by CountingCollator

    def tokenize_row(self, feature, model=None):
        return feature


class _PreparedSequences:
    """Reward models: each answer with its prompt, one whole sequence each (RewardTrainer's
    chosen_ids and rejected_ids), scored at its last token."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        def whole(rows):
            for name in ("chosen_ids", "rejected_ids"):
                rows[name] = [prompt + answer for prompt, answer in zip(rows["prompt_ids"], rows[name])]
            return rows

        return dataset.map(whole, batched=True, desc=None)


def _reward_collator(pad_id: int):
    from trl.trainer.reward_trainer import DataCollatorForPreference

    return DataCollatorForPreference(pad_token_id=pad_id)


def _dpo_collator(pad_id: int):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    return DataCollatorForPreference(pad_token_id=pad_id, pad_to_multiple_of=None)


def _kto_collator(pad_id: int):
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    return DataCollatorForUnpairedPreference(pad_token_id=pad_id, pad_to_multiple_of=None)


def _orpo_collator(pad_id: int):
    from trl.experimental.utils import DPODataCollatorWithPadding

    return DPODataCollatorWithPadding(pad_token_id=pad_id)


# Objective.rows -> the trainer mixin that takes prepared rows, TRL's collator, and a reshaping
ROWS = {
    "pairs": {"mixin": _PreparedTokens, "collator": _dpo_collator},
    "answers": {"mixin": _PreparedTokens, "collator": _kto_collator},
    "orpo": {"mixin": _PreparedRows, "collator": _orpo_collator, "to_rows": _orpo_row},
    "prompts": {"mixin": _PreparedPrompts, "collator": None},
    "sequences": {"mixin": _PreparedSequences, "collator": _reward_collator},
}
