"""OBJECTIVES: what each `train.objective` is, one row each (design.md §1). Every place that
differs by objective reads its row: the recipe's checks, what prepare makes of the data, the
trainer and its settings, how batches are drawn and collated, what plan prices, what eval
scores. Adding an objective is a row here and, for a TRL trainer that takes prepared rows in a
new shape, one entry in stages/train/trl.py.

Plain data and functions of the recipe: nothing here imports torch or the trainers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

# TRL's defaults, where llmtune needs the number itself (plan, vLLM's context)
GRPO_COMPLETION = 512  # max_completion_length
VLLM_MEMORY_SHARE = 0.3  # vllm_gpu_memory_utilization
# GRPO settings that go to TRL's config as they are (a key left out takes TRL's default)
TRL_GRPO_KEYS = ("num_generations", "max_completion_length", "temperature", "top_p", "beta", "epsilon", "loss_type")


@dataclass(frozen=True)
class Objective:
    name: str
    description: str
    formats: tuple[str, ...]  # the data formats it trains on
    kind: str  # what prepare makes of them: sft examples, preference pairs, kto answers, prompts
    # TRL's trainer and config ("module:Class"); None: transformers' Trainer with llmtune's loss
    trl: tuple[str, str] | None = None
    settings: Callable = field(default=lambda recipe: {})  # the objective's own config values
    # how the prepared rows reach the trainer (stages/train/trl.py): "examples" (llmtune's
    # collator), "pairs", "answers", "orpo" (TRL's collators), "prompts" (the trainer batches)
    rows: str = "examples"
    # batches: "grouped" by length (the seeded sampler), "shuffled" once by the seed and read in
    # order (KTO estimates its KL term from each batch), "trainer" (GRPO repeats each prompt)
    batches: str = "grouped"
    evaluates: bool = True  # an eval loss on the validation set during training
    min_batch_size: int = 1
    min_batch_reason: str = ""
    rewards: bool = False  # trains on the recipe's reward functions
    generates: bool = False  # samples completions while training (the KV cache stays on)
    reference: Callable = field(default=lambda recipe: "none (the objective needs none)")
    owns: tuple[str, ...] = ()  # train keys that only this objective reads
    # plan: sequences trained per example, sequences run forward only (the reference, KL), and
    # whether the log-probabilities come without the batch's full logits (None: train.loss says)
    trained_sequences: int = 1
    forward_only: int = 0
    forward_only_for: str = "reference"
    fused_logps: bool | None = None
    # eval on the validation set: "loss" (perplexity too), "preference" (accuracy and margin of
    # the answers' log-probabilities), "kto", "rewards" (the reward functions on generations)
    eval: str = "loss"
    # the model's output: "causal-lm" (next-token logits: it writes), "score" (one number per
    # sequence: a reward model, which merges and exports as a transformers folder, never a GGUF)
    head: str = "causal-lm"
    logs: dict = field(default_factory=dict)  # what its trainer logs -> metrics.jsonl's names
    eval_logs: dict = field(default_factory=dict)  # what its trainer's evaluate says -> the summary's names


def _beta(recipe) -> dict:
    return {} if recipe.train.beta is None else {"beta": recipe.train.beta}  # unset: TRL's default


def _dpo(recipe) -> dict:
    # prepare has cut each pair to max_seq_len already; the reference log-probs are computed
    # with the adapter disabled, step by step (no second model, no precompute pass)
    return {**_beta(recipe), "loss_type": [recipe.train.dpo_loss], "max_length": None,
            "precompute_ref_log_probs": False}


def _kto(recipe) -> dict:
    # TRL estimates KTO's KL term from each batch's answers paired with other prompts, in a
    # fixed order: the train set is shuffled once by the seed instead of grouped by length
    return {**_beta(recipe), "max_length": None, "precompute_ref_log_probs": False,
            "train_sampling_strategy": "sequential"}


def _orpo(recipe) -> dict:
    return {**_beta(recipe), "max_length": recipe.data.max_seq_len}


def _simpo(recipe) -> dict:
    # SimPO is CPO's loss "simpo" without CPO's added NLL term (TRL's docs: cpo_alpha 0)
    return {**_beta(recipe), "loss_type": "simpo", "cpo_alpha": 0.0, "max_length": recipe.data.max_seq_len}


def _reward(recipe) -> dict:
    # prepare has cut each pair to max_seq_len already; the adapter's dropout is the recipe's
    return {"max_length": None, "disable_dropout": False}


def _grpo(recipe) -> dict:
    grpo = recipe.train.grpo
    own = {key: value for key, value in grpo.model_dump().items() if key in TRL_GRPO_KEYS and value is not None}
    own.update(reward_weights=[reward.weight for reward in recipe.rewards], log_completions=False,
               train_sampling_strategy="random")  # TRL's sampler repeats each prompt num_generations times
    if grpo.generation == "vllm":
        own.update(vllm_settings(recipe))
    return own


def vllm_settings(recipe) -> dict:
    """TRL's vLLM colocate settings. Its context is the longest prompt plus the completion: left
    to TRL, it is the model's whole context (131,072 tokens for Llama 3.x), whose KV cache vLLM
    refuses to reserve on most GPUs."""
    grpo = recipe.train.grpo
    settings = {"use_vllm": True, "vllm_mode": "colocate", "vllm_enable_sleep_mode": grpo.vllm_sleep,
                "vllm_max_model_length": recipe.data.max_seq_len + (grpo.max_completion_length or GRPO_COMPLETION)}
    if grpo.vllm_gpu_memory_utilization is not None:
        settings["vllm_gpu_memory_utilization"] = grpo.vllm_gpu_memory_utilization
    return settings


_ADAPTER_DISABLED = "the base with the adapter disabled"
# TRL's preference trainers log the implicit rewards of the chosen and rejected answers (KTO no
# accuracy, and a margin only when a batch has good and bad answers) and KL
_PREFERENCE_LOGS = {"rewards/chosen": "reward_chosen", "rewards/rejected": "reward_rejected",
                    "rewards/margins": "reward_margin", "rewards/accuracies": "reward_accuracy", "kl": "kl"}
_PREFERENCE_EVAL = {"eval_rewards/margins": "eval_reward_margin", "eval_rewards/accuracies": "eval_reward_accuracy"}

OBJECTIVES: dict[str, Objective] = {row.name: row for row in (
    Objective("sft", "supervised: the trained tokens of each example",
              formats=("chat", "sharegpt", "alpaca", "completion", "text"), kind="sft"),
    Objective("dpo", "chosen vs rejected answers (Direct Preference Optimization)",
              formats=("preference",), kind="preference", trl=("trl:DPOTrainer", "trl:DPOConfig"),
              settings=_dpo, rows="pairs", reference=lambda recipe: _ADAPTER_DISABLED, owns=("dpo_loss",),
              trained_sequences=2, forward_only=2, fused_logps=True, eval="preference",
              logs=_PREFERENCE_LOGS, eval_logs=_PREFERENCE_EVAL),
    Objective("orpo", "chosen vs rejected answers, with the NLL of the chosen (no reference)",
              formats=("preference",), kind="preference",
              trl=("trl.experimental.orpo:ORPOTrainer", "trl.experimental.orpo:ORPOConfig"),
              settings=_orpo, rows="orpo", trained_sequences=2, fused_logps=False, eval="preference",
              logs=_PREFERENCE_LOGS, eval_logs=_PREFERENCE_EVAL),
    Objective("simpo", "chosen vs rejected answers by length-normalised log-probabilities (no reference)",
              formats=("preference",), kind="preference",
              trl=("trl.experimental.cpo:CPOTrainer", "trl.experimental.cpo:CPOConfig"),
              settings=_simpo, rows="orpo", trained_sequences=2, fused_logps=False, eval="preference",
              logs=_PREFERENCE_LOGS, eval_logs=_PREFERENCE_EVAL),
    Objective("kto", "answers marked good or bad (Kahneman-Tversky Optimization)",
              formats=("kto",), kind="kto", trl=("trl:KTOTrainer", "trl:KTOConfig"), settings=_kto,
              rows="answers", batches="shuffled", min_batch_size=2,
              min_batch_reason="its KL term is estimated from the other answers of the micro-batch (TRL)",
              reference=lambda recipe: _ADAPTER_DISABLED,
              trained_sequences=1, forward_only=3, forward_only_for="reference, KL", fused_logps=True, eval="kto",
              logs=_PREFERENCE_LOGS, eval_logs=_PREFERENCE_EVAL),
    Objective("reward", "a reward model: a score head trained to score the chosen answer above the rejected",
              formats=("preference",), kind="preference", trl=("trl:RewardTrainer", "trl:RewardConfig"),
              settings=_reward, rows="sequences", head="score", trained_sequences=2, fused_logps=False,
              eval="preference", logs={"accuracy": "reward_accuracy", "margin": "reward_margin"},
              eval_logs={"eval_margin": "eval_reward_margin", "eval_accuracy": "eval_reward_accuracy"}),
    Objective("grpo", "completions sampled per prompt and scored by reward functions",
              formats=("prompt",), kind="prompt", trl=("trl:GRPOTrainer", "trl:GRPOConfig"), settings=_grpo,
              rows="prompts", batches="trainer", evaluates=False, rewards=True, generates=True,
              reference=lambda recipe: _ADAPTER_DISABLED if recipe.train.grpo.beta else "none (grpo.beta is 0)",
              trained_sequences=1, forward_only=1, fused_logps=True, eval="rewards",
              # the mean reward (and per function: callbacks.trl_metrics), completion length, KL
              logs={"reward": "reward_mean", "reward_std": "reward_std", "kl": "kl",
                    "completions/mean_length": "completion_length"}),
)}


def objective(name: str) -> Objective:
    return OBJECTIVES[name]


def objectives_for(fmt: str) -> list[str]:
    """The objectives that train on data of format `fmt`."""
    return [row.name for row in OBJECTIVES.values() if fmt in row.formats]


def kind_of(fmt: str) -> str:
    """What prepare makes of data of format `fmt` (every objective of a format agrees)."""
    return next(row.kind for row in OBJECTIVES.values() if fmt in row.formats)


def logged_metrics(evaluation: bool = False) -> dict:
    """Every objective's trainer log keys (or its evaluate's) -> llmtune's names; the keys of
    different objectives do not collide."""
    return {key: name for row in OBJECTIVES.values() for key, name in (row.eval_logs if evaluation else row.logs).items()}

