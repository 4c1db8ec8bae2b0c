"""eval: what the fine-tune changed. Base, adapter and merged model side by side on the held-out
validation set and on `eval.sources`: loss and perplexity on the trained tokens (for preference
data: preference accuracy and margin of summed answer log-probabilities); greedy
generations scored by exact match, contains, a regex-extracted answer, and how often they end
with EOS before the length limit. Writes eval/report.json and eval/generations.jsonl."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path

from datasets import load_from_disk

from llmtune import model_sources, models
from llmtune.console import console
from llmtune.data.chat import IGNORE
from llmtune.data.formats import to_sample
from llmtune.data.pairs import encode_pairs, encode_prompts
from llmtune.data.sources import read_source
from llmtune.data.special_text import encode_samples
from llmtune.data.tools import answer_of, calls_in_text, same_call
from llmtune.errors import InputError, VerificationError
from llmtune.manifest import (
    Outcome,
    finish_stage,
    is_up_to_date,
    read_manifest,
    require_stage,
    sha256_file,
    stage_dir,
    start_stage,
    upstream_dir,
    upstream_ref,
)
from llmtune.metrics import contains, exact_match, regex_match
from llmtune.recipe import Recipe, section_sha256
from llmtune.rewards import build as reward_functions
from llmtune.serve.inference import (
    adapter_on_base,
    answer_logps,
    generate,
    mean_token_loss,
    open_images,
    perplexity,
    prompt_and_answer,
    sequence_scores,
    shown_text,
    trained_precision,
)
from llmtune.serve.serving import as_prompt, report_empty, serving_defaults
from llmtune.stages.collate import ImageCollator


def evaluate(recipe: Recipe, run: Path, force: bool = False, only: str | None = None) -> Outcome:
    """`only`: "benchmarks" runs eval.benchmarks alone (lm-eval), not the eval sets."""
    adapter_dir, merged_dir, out_dir = (stage_dir(run, stage) for stage in ("train", "merge", "eval"))
    adapter_manifest = require_stage(adapter_dir, "train", f"llmtune train {run / 'recipe.yaml'}")
    cfg = recipe.eval
    if only == "benchmarks" and cfg.benchmarks is None:
        raise InputError("--only benchmarks: the recipe has no eval.benchmarks",
                         hint="add eval.benchmarks: {tasks: [...]} (docs/eval.md)")
    inputs = {"adapter": upstream_ref(adapter_dir, out_dir)}
    if read_manifest(merged_dir) is not None:
        inputs["merged"] = upstream_ref(merged_dir, out_dir)
    inputs["eval_files"] = {s.path: sha256_file(s.path) for s in recipe.eval.sources
                            if s.path and Path(s.path).is_file()}
    if cfg.benchmarks is not None:
        inputs["benchmark_files"] = _files_sha256(cfg.benchmarks.include)
    if only is not None:
        inputs["only"] = only
    recipe_sha = section_sha256(recipe, "eval", "data", "rewards")
    if not force and is_up_to_date(out_dir, "eval", recipe_sha, inputs):
        return Outcome(read_manifest(out_dir), up_to_date=True)

    manager = None
    if cfg.benchmarks is not None:  # unknown tasks and unreachable datasets: refused before any model loads
        if models.head_of(adapter_dir) == "score":
            raise InputError("eval.benchmarks: a reward model scores sequences; lm-eval's tasks need a language model",
                             hint="remove eval.benchmarks from a reward model's recipe")
        from llmtune.serve import benchmarks

        manager = benchmarks.task_manager(cfg.benchmarks)
    partial = start_stage(out_dir)
    serving = serving_defaults(adapter_dir)  # prompts as training saw them
    precision = trained_precision(adapter_dir)
    base = model_sources.resolve_section(adapter_manifest["inputs"]["base_model"])
    report: dict = {"sets": {}}
    summary: dict = {}
    if only != "benchmarks":
        report, summary = _eval_sets(recipe, partial, adapter_dir, merged_dir, adapter_manifest, inputs, serving,
                                     precision, base)
    if cfg.benchmarks is not None:
        report["benchmarks"] = _benchmarks(cfg.benchmarks, manager, base.local_dir, adapter_dir,
                                           merged_dir if "merged" in inputs else None, serving, precision)
        summary["forgetting"] = sum(row["forgetting"] for row in report["benchmarks"]["comparison"])
    (partial / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    manifest = finish_stage(partial, out_dir, stage="eval", recipe_sha256=recipe_sha,
                            inputs=inputs, summary=summary)
    return Outcome(manifest, up_to_date=False)


def _files_sha256(paths: list[str]) -> dict[str, str]:
    """The content hash of every file under `paths` (files or folders): a changed task re-runs."""
    hashes = {}
    for path in map(Path, paths):
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()
                                                     and "__pycache__" not in p.parts)
        hashes.update({str(file): sha256_file(file) for file in files})
    return hashes


def _benchmarks(cfg, manager, base_dir: Path, adapter_dir: Path, merged_dir: Path | None, serving,
                precision: str) -> dict:
    from llmtune.serve import benchmarks

    device = str(models.local_device())
    run = benchmarks.settings(cfg, benchmarks.model_args(base_dir, adapter_dir, merged_dir, precision), device,
                              serving.chat, serving.system_prompt)
    results, identity, higher, seconds, skipped = {}, {}, {}, {}, {}
    for name in run["model_args"]:
        started = time.monotonic()
        try:
            output = benchmarks.evaluate_one(run, name, manager)
        except Exception as exc:
            # lm-eval's peft= path ties the base's embeddings after loading the adapter, which
            # fails on peft's modules_to_save copy of a tied output head (transformers 5): the
            # merged model holds the same weights, so it stands for the adapter.
            saved = json.loads((adapter_dir / "adapter_config.json").read_text()).get("modules_to_save")
            if name != "adapter" or merged_dir is None or not saved:
                raise
            skipped[name] = f"lm-eval could not load the adapter with peft= ({type(exc).__name__}: {exc}); " \
                            "the merged model stands for it"
            console.print(f"eval: benchmarks: {skipped[name]}", markup=False)
            continue
        seconds[name] = round(time.monotonic() - started, 1)
        results[name] = benchmarks.scores(output)
        identity = identity or benchmarks.task_identity(output)
        higher = higher or output.get("higher_is_better", {})
    lm_eval = benchmarks.lm_eval_module()
    return {
        "settings": {**run, "lm_eval_version": getattr(lm_eval, "__version__", None), "task_identity": identity,
                     "commands": {name: benchmarks.command_line(run, name) for name in results},
                     "seconds": seconds, "skipped": skipped},
        "results": results,
        "comparison": benchmarks.compare(results, higher),
    }


def _eval_sets(recipe: Recipe, partial: Path, adapter_dir: Path, merged_dir: Path, adapter_manifest: dict,
               inputs: dict, serving, precision: str, base) -> tuple[dict, dict]:
    """The eval sets (validation and eval.sources) scored on base, adapter and merged: the
    report's `sets`, and the summary's figures; generations.jsonl is written beside them."""
    cfg = recipe.eval
    tokenizer = models.load_tokenizer(adapter_dir)  # with the template trained with
    prepared = upstream_dir(adapter_dir, adapter_manifest, "prepared")
    # image chats: their images batched and expanded by the model's processor, in loss and answers
    vision = (models.load_processor(adapter_dir), prepared) if models.is_vision_language(base) else None
    if vision and cfg.sources:
        raise InputError("eval.sources: evaluating image chats from other sources is not supported yet",
                         hint="remove eval.sources: the held-out image chats (validation) are evaluated")
    eval_sets = {"validation": _prepared_rows(prepared / "validation", cfg.max_samples)}
    for index, source in enumerate(cfg.sources):
        name = f"{index}:{Path(source.path).name if source.path else source.hub}"
        eval_sets[name] = _source_rows(source, recipe, tokenizer, serving.special_text)
    eval_sets = {name: rows for name, rows in eval_sets.items() if rows}
    if not eval_sets:
        raise InputError("nothing to evaluate: the validation set is empty and eval.sources gives no rows",
                         hint="set data.validation.fraction or add eval.sources")

    rewards = reward_functions(recipe.rewards) if recipe.rewards else []
    # One model in memory at a time: base and adapter are the same PEFT model (the adapter
    # disabled for the base; a QLoRA base quantized as trained), then it is dropped and the
    # merged model loaded, on the GPU where it fits.
    results: dict[str, dict] = {name: {} for name in eval_sets}
    generations: list[dict] = []
    tuned = adapter_on_base(adapter_dir, base, precision)
    for name, rows in eval_sets.items():
        console.print(f"eval: {name}: {len(rows)} examples")
        with tuned.disable_adapter():
            results[name]["base"] = _score(tuned, tokenizer, rows, cfg, name, "base", generations, serving, rewards,
                                           vision)
        results[name]["adapter"] = _score(tuned, tokenizer, rows, cfg, name, "adapter", generations, serving, rewards,
                                          vision)
    del tuned
    models.release_memory(models.local_device())
    if "merged" in inputs:
        device = models.fitting_device(models.weight_bytes(merged_dir, precision), "eval: the merged model")
        merged = models.load_model(merged_dir, precision, device=device).eval()
        for name, rows in eval_sets.items():
            results[name]["merged"] = _score(merged, tokenizer, rows, cfg, name, "merged", generations, serving,
                                             rewards, vision)
        del merged
    report = {"sets": {name: {"examples": len(rows), "models": results[name]} for name, rows in eval_sets.items()}}
    broken = [f"{model} on {name}" for name in results for model, metrics in results[name].items()
              if metrics.get("loss") is not None and not math.isfinite(metrics["loss"])]
    if broken:  # NaN compares false against everything: never let it pass as a number
        raise VerificationError(f"eval: the loss is NaN or infinite for {', '.join(broken)}",
                                hint="a model with non-finite weights or an fp16 overflow; evaluate "
                                "in bf16 or fp32, and retrain if the adapter itself holds NaN")

    with open(partial / "generations.jsonl", "w", encoding="utf-8") as handle:
        for entry in generations:
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
    first = next(iter(report["sets"].values()))["models"]
    summary = {f"{label}_{key}": value for label, metrics in first.items()
               for key, value in metrics.items()
               if key in ("loss", "exact_match", "regex_match", "preference_accuracy", "margin",
                          "tool_call_accuracy")}
    return report, summary


def _score(model, tokenizer, rows, cfg, set_name, label, generations, serving, rewards, vision=None) -> dict:
    """`vision`: (processor, prepared folder) for image chats."""
    pad_id = tokenizer.pad_token_id or 0
    if models.scores_sequences(model):  # a reward model: how it ranks the pairs, nothing to generate
        return _reward_model_scores(model, rows, pad_id)
    if "extra" in rows[0]:  # grpo prompts: the recipe's rewards on greedy completions
        return _reward_scores(model, tokenizer, rows, cfg, set_name, label, generations, serving, rewards)
    if "input_ids" in rows[0]:
        collate = None
        if vision:
            collate = ImageCollator(*vision)
            collate.counting = False
        loss = mean_token_loss(model, rows, pad_id, cfg.batch_size, collate)
        metrics = {"loss": _round(loss), "perplexity": _round(perplexity(loss))}
    else:
        metrics = _preference_scores(model, rows, pad_id)
    samples = [row["sample"] for row in rows if row["sample"]]
    with_calls = [sample for sample in samples if has_tool_calls(sample)]
    if with_calls:
        metrics.update(_tool_call_scores(model, tokenizer, with_calls, cfg, set_name, label, generations, serving))
    pairs = [(pair, sample) for sample in samples if not has_tool_calls(sample)
             if (pair := prompt_and_answer(sample)) is not None]
    if not pairs:
        return metrics
    images = ({"processor": vision[0], "images": [open_images(sample, pair[0]) for pair, sample in pairs]}
              if vision else {})
    prompts, references = zip(*[pair for pair, _ in pairs])
    prompts = [as_prompt(prompt, serving) for prompt in prompts]
    outputs = generate(model, tokenizer, prompts, cfg.max_new_tokens, batch_size=cfg.batch_size,
                       special_text=serving.special_text, **images)
    metrics["empty_answers"] = report_empty(outputs, f"eval: {set_name}, {label}")
    counts = Counter()
    for prompt, reference, output in zip(prompts, references, outputs):
        answer = answer_of(output.text)[1]  # a reasoning model's answer follows its reasoning
        scores = {"exact_match": exact_match(answer, reference),
                  "contains": contains(answer, reference),
                  "ended_with_eos": output.ended_with_eos}
        if cfg.answer_regex:
            scores["regex_match"] = regex_match(answer, reference, cfg.answer_regex)
        counts.update({k: int(v) for k, v in scores.items()})
        generations.append({"set": set_name, "model": label, "reference": reference,
                            "output": output.text, **scores,
                            "prompt": shown_text(prompt)})
    metrics.update({key: round(value / len(outputs), 4) for key, value in counts.items()})
    metrics["generated"] = len(outputs)
    return metrics


def has_tool_calls(sample: dict) -> bool:
    return any(m.get("tool_calls") for m in sample.get("messages", ()))


def _tool_call_scores(model, tokenizer, samples, cfg, set_name, label, generations, serving) -> dict:
    """Tool data: each assistant turn that calls tools is generated (greedy) from the
    conversation before it and its tool definitions; it matches when it makes the reference's
    calls, in order, with the same names and arguments (compared as JSON values)."""
    turns = [(sample["messages"][:index], sample.get("tools"), message["tool_calls"])
             for sample in samples for index, message in enumerate(sample["messages"])
             if message["role"] == "assistant" and message.get("tool_calls")]
    prompts = [as_prompt(prompt, serving) for prompt, _, _ in turns]
    outputs = generate(model, tokenizer, prompts, cfg.max_new_tokens, batch_size=cfg.batch_size,
                       special_text=serving.special_text, tools=[tools for _, tools, _ in turns])
    counts = Counter()
    for (prompt, _, reference), output in zip(turns, outputs):
        _, calls = calls_in_text(answer_of(output.text)[1])
        names = [call["function"]["name"] for call in reference]
        scores = {"tool_call_match": len(calls) == len(reference) and all(map(same_call, calls, reference)),
                  "tool_name_match": [call["name"] for call in calls] == names}
        counts.update({key: int(value) for key, value in scores.items()})
        generations.append({"set": set_name, "model": label, "prompt": prompt[-1]["content"],
                            "reference": [call["function"] for call in reference], "output": output.text,
                            "tool_calls": calls, **scores})
    return {"tool_call_accuracy": round(counts["tool_call_match"] / len(turns), 4),
            "tool_name_accuracy": round(counts["tool_name_match"] / len(turns), 4),
            "tool_call_turns": len(turns)}


def _preference_scores(model, rows: list[dict], pad_id: int) -> dict:
    """Preference pairs: the share where the model gives the chosen answer a higher summed
    log-probability than the rejected one (answer tokens only), and the mean margin between the
    two. kto rows: the mean log-probability of the good and of the bad answers, and their gap."""
    if "chosen_ids" in rows[0]:
        chosen = answer_logps(model, [(r["prompt_ids"], r["chosen_ids"]) for r in rows], pad_id)
        rejected = answer_logps(model, [(r["prompt_ids"], r["rejected_ids"]) for r in rows], pad_id)
        margins = [c - r for c, r in zip(chosen, rejected)]
        return {"preference_accuracy": round(sum(m > 0 for m in margins) / len(margins), 4),
                "margin": _round(sum(margins) / len(margins)),
                "chosen_logp": _round(sum(chosen) / len(chosen)),
                "rejected_logp": _round(sum(rejected) / len(rejected))}
    logps = answer_logps(model, [(r["prompt_ids"], r["completion_ids"]) for r in rows], pad_id)
    good = [lp for lp, r in zip(logps, rows) if r["label"]]
    bad = [lp for lp, r in zip(logps, rows) if not r["label"]]
    metrics = {"desirable_logp": _round(sum(good) / len(good)) if good else None,
               "undesirable_logp": _round(sum(bad) / len(bad)) if bad else None}
    if good and bad:
        metrics["margin"] = _round(metrics["desirable_logp"] - metrics["undesirable_logp"])
    return metrics


def _reward_model_scores(model, rows: list[dict], pad_id: int) -> dict:
    """A reward model on preference pairs: the share where it scores the chosen answer (with its
    prompt) above the rejected one, the mean margin, and the mean of each side's scores."""
    chosen = sequence_scores(model, [[*r["prompt_ids"], *r["chosen_ids"]] for r in rows], pad_id)
    rejected = sequence_scores(model, [[*r["prompt_ids"], *r["rejected_ids"]] for r in rows], pad_id)
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {"preference_accuracy": round(sum(m > 0 for m in margins) / len(margins), 4),
            "margin": _round(sum(margins) / len(margins)),
            "chosen_score": _round(sum(chosen) / len(chosen)),
            "rejected_score": _round(sum(rejected) / len(rejected))}


def _reward_scores(model, tokenizer, rows, cfg, set_name, label, generations, serving, rewards) -> dict:
    """Prompt data: each reward's mean over greedy completions (eval.max_samples prompts, up to
    eval.max_new_tokens), the share of completions that got every reward's best, and the share
    that ended with EOS. A reward that raises counts as 0 there, as in training."""
    prompts = [as_prompt(row["sample"]["prompt"], serving) for row in rows]
    outputs = generate(model, tokenizer, prompts, cfg.max_new_tokens, batch_size=cfg.batch_size,
                       special_text=serving.special_text)
    texts = [output.text for output in outputs]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    # as in training: the prompt as rendered with the chat template (what the model was given)
    fields = [{"prompt": row["prompt"], "answer": row["answer"], "extra": row["extra"],
               "where": row.get("where", "?")} for row in rows]
    scores = {function.name: function.score(texts, ids, fields) for function in rewards}
    full = [all(scores[f.name][i] >= f.best for f in rewards) for i in range(len(texts))]
    for i, (row, output) in enumerate(zip(rows, outputs)):
        generations.append({"set": set_name, "model": label, "reference": row["answer"], "output": output.text,
                            "rewards": {name: values[i] for name, values in scores.items()},
                            "ended_with_eos": output.ended_with_eos})
    return {"rewards": {name: round(sum(values) / len(values), 4) for name, values in scores.items()},
            "full_reward": round(sum(full) / len(full), 4),
            "ended_with_eos": round(sum(o.ended_with_eos for o in outputs) / len(outputs), 4),
            "empty_answers": report_empty(outputs, f"eval: {set_name}, {label}"),
            "generated": len(outputs)}


PREPARED_COLUMNS = ("input_ids", "labels", "prompt_ids", "chosen_ids", "rejected_ids", "completion_ids", "label",
                    "prompt", "answer", "extra", "where", "text", "images", "image_hashes")


def _prepared_rows(path: Path, limit: int) -> list[dict]:
    if not path.is_dir():
        return []
    data = load_from_disk(str(path))
    columns = [name for name in PREPARED_COLUMNS if name in data.column_names]
    # "sample" is "" for a row's later examples (turns.assistant_spans): they are scored for loss only
    return [{**{name: r[name] for name in columns}, "sample": json.loads(r["sample"]) if r["sample"] else None}
            for r in data.select(range(min(limit, len(data))))]


def _source_rows(source, recipe: Recipe, tokenizer, special_text: str) -> list[dict]:
    """An eval source rendered and masked exactly as training data; bad rows are skipped."""
    if source.format in ("preference", "kto", "prompt"):
        return _source_pairs(source, recipe, tokenizer, special_text)
    samples = _read_samples(source, recipe)
    pieces = encode_samples(tokenizer, samples, None, recipe.data.train_on, special_text, recipe.data.reasoning)
    limit = recipe.data.max_seq_len
    return [{"input_ids": e.input_ids[:limit], "labels": e.labels[:limit], "sample": s}
            for s, examples in zip(samples, pieces) for e in examples
            if e.labels[:limit].count(IGNORE) < len(e.labels[:limit])]


def _read_samples(source, recipe: Recipe) -> list[dict]:
    """Up to eval.max_samples samples of an eval source; bad rows are skipped and counted."""
    samples, skipped = [], 0
    for record in read_source(source):
        sample, reason = (None, record.error) if record.error else to_sample(
            record.data, source.format, source.fields, recipe.data.system_prompt, source.separator)
        if reason:
            skipped += 1
            continue
        samples.append(sample)
        if len(samples) == recipe.eval.max_samples:
            break
    if skipped:
        console.print(f"eval: skipped {skipped} unusable rows in {source.path or source.hub}")
    return samples


def _source_pairs(source, recipe: Recipe, tokenizer, special_text: str) -> list[dict]:
    """A preference or kto eval source as prepare writes such rows, pairs cut to max_seq_len."""
    samples = _read_samples(source, recipe)
    if source.format == "prompt":
        return [{**row.columns(), "sample": sample, "where": f"{source.path or source.hub}#{index + 1}"}
                for index, (sample, row) in enumerate(zip(samples, encode_prompts(tokenizer, None, special_text, samples)))]
    pairs = encode_pairs(tokenizer, None, special_text, samples)
    rows = []
    for sample, pair in zip(samples, pairs):
        if pair is not None and pair.longest > recipe.data.max_seq_len:
            pair = pair.limited(recipe.data.max_seq_len)
        if pair is not None:
            rows.append({**pair.columns(), "sample": sample})
    return rows


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 5)
