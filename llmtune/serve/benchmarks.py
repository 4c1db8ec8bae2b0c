"""Standard benchmarks through EleutherAI's lm-evaluation-harness (lm-eval): did the fine-tune
help, and what did it cost elsewhere?

The base, the adapter (lm-eval's `peft=`, no merge needed) and the merged model run the recipe's
`eval.benchmarks` tasks one after the other, one model in memory at a time, through lm-eval's
own `simple_evaluate` with its `hf` model, on the training device in the dtype the adapter was
trained in. Every argument that changes a score is recorded (report.json's
`benchmarks.settings`, with an `lm_eval` command line per model), so anyone can reproduce a
figure with lm-eval alone. A drop of more than two standard errors is flagged as forgetting.

lm-eval is an optional extra (pip install 'llmtune[bench]'); the tasks and their datasets are
checked before any model loads.
"""

from __future__ import annotations

import difflib
import gc
import hashlib
import json
import logging
import math
import shlex
from pathlib import Path

from llmtune import models
from llmtune.console import console
from llmtune.errors import InputError

LM_EVAL_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def lm_eval_module():
    """lm_eval, or a one-line error with the command that installs it."""
    try:
        import lm_eval
    except ImportError:
        raise InputError("eval.benchmarks needs EleutherAI's lm-evaluation-harness (lm-eval), which is not installed",
                         hint="pip install 'llmtune[bench]' (or pip install lm-eval), or remove eval.benchmarks") from None
    # lm-eval logs every request batch and task setting at INFO/WARNING; its errors still show
    logging.getLogger("lm-eval").setLevel(logging.ERROR)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    return lm_eval


def task_manager(cfg):
    """lm-eval's TaskManager over its own tasks and `include`, with every task named in the
    recipe known and its dataset loadable here (offline: from a local file or the datasets
    cache). Raises InputError, naming the task or dataset, before any model is loaded."""
    lm_eval_module()
    from lm_eval.tasks import TaskManager

    for path in cfg.include:
        if not Path(path).exists():
            raise InputError(f"eval.benchmarks.include: {path} does not exist",
                             hint="give task YAML files or folders of them, relative to the recipe")
    # lm-eval's own ~230 task folders take seconds to index: only when a task is not in `include`
    # (a name in `include` wins over lm-eval's own either way, so the figures are the same)
    manager = TaskManager(include_path=list(cfg.include), include_defaults=False) if cfg.include else None
    if manager is None or not set(cfg.tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=list(cfg.include) or None)
    known = set(manager.all_tasks)
    for name in cfg.tasks:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            raise InputError(f"eval.benchmarks.tasks: lm-eval has no task named {name!r}"
                             + (f" (did you mean {', '.join(close)}?)" if close else ""),
                             hint="lm_eval ls tasks lists them; a local task's YAML goes in eval.benchmarks.include")
    for name in cfg.tasks:
        try:
            manager.load([name])
        except Exception as exc:  # datasets raises many kinds: offline, not found, no cache
            raise InputError(f"eval.benchmarks.tasks: {name}: its dataset {_dataset_of(manager, name)} could not be "
                             f"loaded ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})",
                             hint="offline, the dataset must be in the datasets cache (load it once where there is "
                             "network) or be a local file a task in eval.benchmarks.include reads") from None
    return manager


def _dataset_of(manager, name: str) -> str:
    entry = manager.task_index.get(name)
    config = (entry.cfg if entry is not None else None) or {}
    path, subset = config.get("dataset_path"), config.get("dataset_name")
    if path is None:
        return "(a custom loader)"
    return repr(f"{path}/{subset}" if subset else path)


def model_args(base_dir: Path, adapter_dir: Path, merged_dir: Path | None, precision: str) -> dict[str, dict]:
    """lm-eval's `hf` model arguments for each model. Base and adapter take their tokenizer (and
    so the chat template trained with) from the adapter folder; the merged folder has its own."""
    dtype = LM_EVAL_DTYPES[precision]
    base_dir, adapter_dir = base_dir.resolve(), adapter_dir.resolve()  # the commands work from anywhere
    merged_dir = merged_dir.resolve() if merged_dir is not None else None
    args = {"base": {"pretrained": str(base_dir), "tokenizer": str(adapter_dir), "dtype": dtype},
            "adapter": {"pretrained": str(base_dir), "peft": str(adapter_dir), "tokenizer": str(adapter_dir),
                        "dtype": dtype}}
    if merged_dir is not None:
        args["merged"] = {"pretrained": str(merged_dir), "dtype": dtype}
    return args


def settings(cfg, args: dict[str, dict], device: str, chat: bool, system_prompt: str | None) -> dict:
    """Every lm-eval argument that changes a score, as simple_evaluate takes them."""
    apply = chat if cfg.chat_template == "auto" else bool(cfg.chat_template)
    limit = None if cfg.limit is None else (int(cfg.limit) if cfg.limit >= 1 else cfg.limit)
    return {
        "model": "hf",
        "model_args": args,
        "tasks": list(cfg.tasks),
        "include_path": list(cfg.include),
        "num_fewshot": cfg.num_fewshot,
        "limit": limit,
        "batch_size": cfg.batch_size,
        "device": device,
        "apply_chat_template": apply,
        "system_instruction": system_prompt if apply else None,
        "fewshot_as_multiturn": apply,  # lm-eval's own choice: few-shot examples as turns with a template
    }


def command_line(run: dict, name: str) -> str:
    """The `lm_eval` command that reproduces model `name`'s figures."""
    parts = ["lm_eval", "--model", "hf", "--model_args",
             ",".join(f"{key}={value}" for key, value in run["model_args"][name].items()),
             "--tasks", ",".join(run["tasks"]), "--device", run["device"], "--batch_size", str(run["batch_size"])]
    if run["include_path"]:
        parts += ["--include_path", ",".join(run["include_path"])]
    if run["num_fewshot"] is not None:
        parts += ["--num_fewshot", str(run["num_fewshot"])]
    if run["limit"] is not None:
        parts += ["--limit", str(run["limit"])]
    if run["apply_chat_template"]:
        parts += ["--apply_chat_template", "--fewshot_as_multiturn"]
        if run["system_instruction"]:
            parts += ["--system_instruction", run["system_instruction"]]
    else:
        parts += ["--fewshot_as_multiturn", "false"]
    return shlex.join(parts)


def evaluate_one(run: dict, name: str, manager) -> dict:
    """lm-eval's simple_evaluate for one model, exactly as `run` records it; the model is gone
    (and its memory released) when this returns."""
    lm_eval = lm_eval_module()
    console.print(f"eval: benchmarks on the {name} model: {', '.join(run['tasks'])}")
    output = lm_eval.simple_evaluate(
        model=run["model"], model_args=dict(run["model_args"][name]), tasks=list(run["tasks"]),
        num_fewshot=run["num_fewshot"], limit=run["limit"], batch_size=run["batch_size"], device=run["device"],
        apply_chat_template=run["apply_chat_template"], system_instruction=run["system_instruction"],
        fewshot_as_multiturn=run["fewshot_as_multiturn"], task_manager=manager, log_samples=False)
    gc.collect()
    models.release_memory(models.local_device())
    return output


def scores(output: dict) -> dict[str, dict[str, float | None]]:
    """Per task, each metric and its standard error, as `metric[,filter]` and
    `metric_stderr[,filter]` (lm-eval's keys without its ",none")."""
    table = {}
    for task, metrics in output["results"].items():
        table[task] = {key.removesuffix(",none"): _number(value) for key, value in metrics.items()
                       if "," in key and key not in ("alias",)}
    return table


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def task_identity(output: dict) -> dict:
    """Each task's version, few-shot count, documents scored and config hash: what must match
    for two runs' figures to be comparable."""
    return {task: {"version": output.get("versions", {}).get(task),
                   "num_fewshot": output.get("n-shot", {}).get(task),
                   "samples": output.get("n-samples", {}).get(task),
                   "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()}
            for task, config in output.get("configs", {}).items()}


def compare(results: dict[str, dict], higher_is_better: dict[str, dict]) -> list[dict]:
    """One row per task and metric: each model's figure, the change from base to the tuned model
    (merged when there is one, else the adapter), its standard error (the two models' standard
    errors combined) and whether it is a drop of more than two of them: forgetting."""
    tuned = "merged" if "merged" in results else "adapter"
    rows = []
    for task, metrics in results["base"].items():
        for key, base in metrics.items():
            metric, _, filter_ = key.partition(",")
            if metric.endswith("_stderr") or base is None:
                continue
            stderr_key = f"{metric}_stderr" + (f",{filter_}" if filter_ else "")
            after = results[tuned].get(task, {}).get(key)
            errors = [results[m].get(task, {}).get(stderr_key) for m in ("base", tuned)]
            stderr = math.sqrt(sum(e * e for e in errors)) if None not in errors else None
            change = None if after is None else after - base
            higher = (higher_is_better.get(task) or {}).get(metric, True)
            worse = None if change is None else (-change if higher else change)
            rows.append({"task": task, "metric": key, **{m: results[m].get(task, {}).get(key) for m in results},
                         "higher_is_better": higher, "tuned": tuned, "change": change, "change_stderr": stderr,
                         "forgetting": bool(worse is not None and stderr is not None and worse > 0 and worse > 2 * stderr)})
    return rows
