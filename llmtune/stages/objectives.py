"""The objectives beyond SFT, each a row: TRL's trainer and config, its settings from the recipe,
and the collator that batches llmtune's prepared pairs for it (design.md §1).

prepare has already rendered, tokenised and masked the pairs (data/pairs.py), so the TRL
trainers are handed token ids and their own tokenising step is skipped: `_prepare_dataset`
(DPO, KTO) and `tokenize_row` (ORPO, CPO) pass the prepared rows through. Everything else
(losses, the reference model as the base with the adapter disabled, metrics) is TRL's.
"""

from __future__ import annotations

from llmtune.console import console
from llmtune.data.chat import IGNORE
from llmtune.errors import InputError
from llmtune.recipe import Recipe
from llmtune.stages.sampling import GroupedTrainer

# train.objective -> (TRL module, trainer, config); ORPO and CPO (SimPO) live in trl.experimental
TRL_CLASSES = {
    "dpo": ("trl", "DPOTrainer", "DPOConfig"),
    "kto": ("trl", "KTOTrainer", "KTOConfig"),
    "orpo": ("trl.experimental.orpo", "ORPOTrainer", "ORPOConfig"),
    "simpo": ("trl.experimental.cpo", "CPOTrainer", "CPOConfig"),
    "grpo": ("trl", "GRPOTrainer", "GRPOConfig"),
}


def _trl(objective: str):
    import importlib
    import os

    # ORPO and CPO are TRL's experimental modules, which warn on every import; pyproject.toml
    # bounds the TRL version llmtune is tested with instead
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

    module, trainer, config = TRL_CLASSES[objective]
    loaded = importlib.import_module(module)
    return getattr(loaded, trainer), getattr(loaded, config)


def trainer_class(objective: str):
    """TRL's trainer for the objective, with llmtune's sampler, LoRA+ optimizer and loss checks
    (GroupedTrainer), taking the prepared pairs as they are."""
    trainer, _ = _trl(objective)
    mixin = {"dpo": _PreparedTokens, "kto": _PreparedTokens, "grpo": _PreparedPrompts}.get(objective, _PreparedRows)
    return type(f"Llmtune{trainer.__name__}", (mixin, GroupedTrainer, trainer), {})


def config(objective: str, recipe: Recipe, arguments: dict):
    """TRL's config for the objective: the Trainer arguments SFT uses, and the objective's own."""
    _, config_class = _trl(objective)
    cfg = recipe.train
    own = {} if cfg.beta is None else {"beta": cfg.beta}  # unset: TRL's default for the objective
    if objective == "dpo":
        # prepare has cut each pair to max_seq_len already; the reference log-probs are computed
        # with the adapter disabled, step by step (no second model, no precompute pass)
        own.update(loss_type=[cfg.dpo_loss], max_length=None, precompute_ref_log_probs=False)
    elif objective == "kto":
        # TRL estimates KTO's KL term from each batch's answers paired with other prompts, in a
        # fixed order: the train set is shuffled once by the seed instead of grouped by length
        own.update(max_length=None, precompute_ref_log_probs=False, train_sampling_strategy="sequential")
    elif objective == "orpo":
        own.update(max_length=recipe.data.max_seq_len)
    elif objective == "grpo":
        grpo = cfg.grpo
        own = {key: value for key, value in grpo.model_dump().items()
               if key in TRL_GRPO_KEYS and value is not None}  # left out: TRL's defaults
        own.update(reward_weights=[reward.weight for reward in recipe.rewards], log_completions=False,
                   train_sampling_strategy="random")  # TRL's sampler repeats each prompt num_generations times
        if grpo.generation == "vllm":
            _check_vllm()
            own.update(vllm_arguments(recipe))
    elif objective == "simpo":
        # SimPO is CPO's loss "simpo" without CPO's added NLL term (TRL's docs: cpo_alpha 0)
        own.update(loss_type="simpo", cpo_alpha=0.0, max_length=recipe.data.max_seq_len)
    return config_class(**{**arguments, **own})


TRL_GRPO_KEYS = ("num_generations", "max_completion_length", "temperature", "top_p", "beta", "epsilon", "loss_type")


def vllm_arguments(recipe: Recipe) -> dict:
    """TRL's vLLM colocate settings. Its context is the longest prompt plus the completion:
    left to TRL, it is the model's whole context (131,072 tokens for Llama 3.x), whose KV cache
    vLLM refuses to reserve on most GPUs."""
    grpo = recipe.train.grpo
    arguments = {"use_vllm": True, "vllm_mode": "colocate", "vllm_enable_sleep_mode": grpo.vllm_sleep,
                 "vllm_max_model_length": recipe.data.max_seq_len + (grpo.max_completion_length or GRPO_COMPLETION)}
    if grpo.vllm_gpu_memory_utilization is not None:
        arguments["vllm_gpu_memory_utilization"] = grpo.vllm_gpu_memory_utilization
    return arguments


GRPO_COMPLETION = 512  # TRL's default max_completion_length
VLLM_MEMORY_SHARE = 0.3  # TRL's default vllm_gpu_memory_utilization


def _check_vllm() -> None:
    import importlib.util

    import torch

    if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
        raise InputError("train.grpo.generation: vllm needs a CUDA GPU and the vllm package "
                         f"({'not installed' if importlib.util.find_spec('vllm') is None else 'no GPU here'})",
                         hint="pip install vllm on a GPU machine, or use generation: transformers (the default)")


def collator(objective: str, pad_id: int):
    """The objective's TRL collator, wrapped to count tokens and remember the rows of a step
    (GRPO batches its own prompts: its counts come from its completions, see _PreparedPrompts)."""
    if objective == "grpo":
        return CountingCollator(None)
    if objective == "dpo":
        from trl.trainer.dpo_trainer import DataCollatorForPreference

        return CountingCollator(DataCollatorForPreference(pad_token_id=pad_id, pad_to_multiple_of=None))
    if objective == "kto":
        from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

        return CountingCollator(DataCollatorForUnpairedPreference(pad_token_id=pad_id, pad_to_multiple_of=None))
    from trl.experimental.utils import DPODataCollatorWithPadding

    return CountingCollator(DPODataCollatorWithPadding(pad_token_id=pad_id), to_rows=_orpo_row)


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
        if self.inner is None:  # GRPO: no batches of ours
            raise RuntimeError("GRPO batches its prompts itself")
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

    counts: CountingCollator | None = None

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


def reward_functions(recipe: Recipe) -> list:
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
