"""eval.benchmarks: lm-eval tasks on base, adapter and merged, as lm-eval itself scores them,
offline, with forgetting flagged; unknown tasks and unreachable datasets refused before a model
loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import REPO, write_jsonl, write_recipe
from llmtune.cli import run_cli
from llmtune.errors import InputError
from llmtune.recipe import load_recipe
from llmtune.serve import benchmarks
from llmtune.stages.merge import merge
from llmtune.stages.prepare import prepare
from llmtune.stages.train import train

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.tasks import TaskManager  # noqa: E402 (after the importorskip)


def choice_task(folder: Path, name: str, docs: list[dict]) -> None:
    """A multiple-choice task (log-likelihood of each choice) over local JSON lines."""
    write_jsonl(folder / f"{name}.jsonl", docs)
    (folder / f"{name}.yaml").write_text(yaml.safe_dump({
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(folder / f"{name}.jsonl")}},
        "output_type": "multiple_choice", "test_split": "test", "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0}}))


def answer_task(folder: Path, name: str, docs: list[dict]) -> None:
    """A generate-until task (greedy answer, exact match) over local JSON lines."""
    write_jsonl(folder / f"{name}.jsonl", docs)
    (folder / f"{name}.yaml").write_text(yaml.safe_dump({
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(folder / f"{name}.jsonl")}},
        "output_type": "generate_until", "test_split": "test", "doc_to_text": "{{question}}",
        "doc_to_target": "{{answer}}", "generation_kwargs": {"until": ["\n"], "max_gen_toks": 12, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0}}))


def _answers(text: str, count: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Say it. (#{i})"}, {"role": "assistant", "content": text}]}
            for i in range(count)]


def test_compare_flags_a_drop_of_more_than_two_standard_errors():
    results = {
        "base": {"t": {"acc": 0.8, "acc_stderr": 0.05, "loss": 1.0, "loss_stderr": 0.1, "exact_match,strict": 0.5,
                       "exact_match_stderr,strict": 0.1}},
        "adapter": {"t": {"acc": 0.6, "acc_stderr": 0.05, "loss": 1.1, "loss_stderr": 0.1, "exact_match,strict": 0.4,
                          "exact_match_stderr,strict": 0.1}},
    }
    rows = {row["metric"]: row for row in benchmarks.compare(results, {"t": {"acc": True, "loss": False}})}
    assert rows["acc"]["tuned"] == "adapter" and rows["acc"]["change"] == pytest.approx(-0.2)
    assert rows["acc"]["change_stderr"] == pytest.approx(0.0707, abs=1e-4) and rows["acc"]["forgetting"]
    assert not rows["loss"]["forgetting"]  # lower is better: up by 0.1, within two standard errors (0.28)
    assert not rows["exact_match,strict"]["forgetting"]  # down 0.1, within 0.28
    assert set(rows) == {"acc", "loss", "exact_match,strict"}  # stderr rows are not metrics


@pytest.mark.slow  # an unknown name is looked for in lm-eval's own tasks too: indexing them takes ~9 s
def test_unknown_tasks_missing_include_and_missing_lm_eval_are_one_line(tmp_path, monkeypatch):
    choice_task(tmp_path, "tiny_choice", [{"question": "q", "choices": ["a", "b"], "label": 0}])
    recipe = write_recipe(tmp_path, "embedded:smollm2-135m-instruct", rows=4,
                          eval={"benchmarks": {"tasks": ["tiny_choise"], "include": [str(tmp_path)]}})
    cfg = load_recipe(recipe).eval.benchmarks
    with pytest.raises(InputError, match=r"no task named 'tiny_choise' \(did you mean tiny_choice"):
        benchmarks.task_manager(cfg)
    with pytest.raises(InputError, match="eval.benchmarks.include: .*nowhere does not exist"):
        benchmarks.task_manager(cfg.model_copy(update={"include": [str(tmp_path / "nowhere")]}))
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(InputError) as error:
        benchmarks.task_manager(cfg)
    assert "pip install 'llmtune[bench]'" in error.value.hint


def test_a_task_whose_dataset_is_not_here_offline_is_refused_naming_it(tmp_path):
    (tmp_path / "hub_task.yaml").write_text(yaml.safe_dump({
        "task": "hub_task", "dataset_path": "someone/not-cached-anywhere", "dataset_name": "main",
        "output_type": "multiple_choice", "test_split": "test", "doc_to_text": "{{q}}", "doc_to_choice": "{{c}}",
        "doc_to_target": 0, "metric_list": [{"metric": "acc"}]}))
    script = ("from llmtune.serve import benchmarks\nfrom llmtune.recipe.schema import BenchmarksSection\n"
              f"benchmarks.task_manager(BenchmarksSection(tasks=['hub_task'], include=[{str(tmp_path)!r}]))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode != 0
    assert "hub_task: its dataset 'someone/not-cached-anywhere/main' could not be loaded" in done.stderr


@pytest.mark.slow
def test_llmtune_eval_gives_lm_evals_own_figures_for_base_adapter_and_merged(tiny_model, tmp_path, monkeypatch,
                                                                             capsys):
    """A local multiple-choice and a local generate-until task through `llmtune eval`, then
    through lm-eval directly with the settings report.json records: the same figures."""
    tasks = tmp_path / "tasks"
    choice_task(tasks, "tiny_choice", [{"question": f"Say it. (#{i})", "choices": ["xy xy xy", "ab ab ab", "cd cd cd"],
                                        "label": 1} for i in range(18)])
    answer_task(tasks, "tiny_answer", [{"question": f"Say it. (#{i})", "answer": "ab ab ab"} for i in range(6)])
    recipe = write_recipe(tmp_path, tiny_model, rows=16, train={"max_steps": 20, "batch_size": 4, "lr": 1e-2},
                          eval={"max_samples": 2, "benchmarks": {"tasks": ["tiny_choice", "tiny_answer"],
                                                                 "include": ["tasks"], "batch_size": 4}})
    write_jsonl(tmp_path / "data" / "train.jsonl", _answers("ab ab ab", 16))
    loaded, run = load_recipe(recipe), tmp_path / "runs" / "tiny"
    prepare(loaded, run)
    train(loaded, run)
    merge(loaded, run)

    # an unknown task: refused before any model loads
    from llmtune.serve import eval as eval_stage

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(eval_stage, "adapter_on_base", lambda *a: pytest.fail("a model was loaded"))
    assert run_cli(["eval", str(recipe), "--set", "eval.benchmarks.tasks=[tiny_choise]"]) == 2
    assert "no task named 'tiny_choise'" in capsys.readouterr().err
    monkeypatch.undo()

    monkeypatch.chdir(tmp_path)
    assert run_cli(["eval", str(recipe), "--only", "benchmarks"]) == 0
    out = capsys.readouterr().out
    assert "benchmarks (lm-eval):" in out and "tiny_choice acc (higher is better): base" in out
    report = json.loads((run / "eval" / "report.json").read_text())
    assert "sets" not in report or not report["sets"]  # --only benchmarks: no eval sets
    settings, results = report["benchmarks"]["settings"], report["benchmarks"]["results"]
    assert set(results) == {"base", "adapter", "merged"} and settings["apply_chat_template"] is True
    assert settings["lm_eval_version"] == lm_eval.__version__
    assert set(settings["task_identity"]) == {"tiny_choice", "tiny_answer"}
    assert results["adapter"] != results["base"]  # training moved the figures
    manager = TaskManager(include_path=settings["include_path"], include_defaults=False)
    for name in ("base", "adapter", "merged"):
        direct = lm_eval.simple_evaluate(
            model="hf", model_args=dict(settings["model_args"][name]), tasks=settings["tasks"],
            num_fewshot=settings["num_fewshot"], limit=settings["limit"], batch_size=settings["batch_size"],
            device=settings["device"], apply_chat_template=settings["apply_chat_template"],
            system_instruction=settings["system_instruction"], fewshot_as_multiturn=settings["fewshot_as_multiturn"],
            task_manager=manager, log_samples=False)
        assert benchmarks.scores(direct) == results[name], name
    assert results["merged"]["tiny_choice"]["acc"] == pytest.approx(results["adapter"]["tiny_choice"]["acc"])


@pytest.mark.slow
def test_forgetting_is_flagged_when_the_tuned_model_must_lose(tiny_model, tmp_path, monkeypatch, capsys):
    """Each question's right choice is one the base model prefers to "zq zq zq"; the tuned
    model is trained to say nothing but "zq zq zq", so it picks the wrong one everywhere."""
    tasks = tmp_path / "tasks"
    words = ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op", "rs", "tu", "vw", "xy"]
    candidates = [{"question": f"Say it. (#{i})", "choices": [" ".join(words[(i * k) % 12] for k in (1, 5, 7)), "zq zq zq"],
                   "label": 0} for i in range(40)]
    # modules_to_save: the tiny model's output head, trained in full, makes it learn in 20 steps;
    # lm-eval cannot load such an adapter with peft= (transformers 5 re-ties the embeddings over
    # peft's copy), so the merged model stands for it, and says so
    recipe = write_recipe(tmp_path, tiny_model, rows=16, train={"max_steps": 20, "batch_size": 4, "lr": 1e-2},
                          adapter={"modules_to_save": ["lm_head"]},
                          eval={"max_samples": 2, "benchmarks": {"tasks": ["lose"], "include": ["tasks"]}})
    write_jsonl(tmp_path / "data" / "train.jsonl", _answers("zq zq zq", 16))
    # keep the questions whose right choice the base model prefers, scored as lm-eval scores it
    choice_task(tasks, "lose", candidates)
    base = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(tiny_model), "dtype": "float32"},
                                   tasks=["lose"], device="cpu", batch_size=8, apply_chat_template=True,
                                   fewshot_as_multiturn=True,
                                   task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                                   log_samples=True)
    kept = [candidates[s["doc_id"]] for s in base["samples"]["lose"] if s["acc"] == 1.0]
    assert len(kept) >= 8, "the base model should prefer the short choice often"
    choice_task(tasks, "lose", kept)

    loaded, run = load_recipe(recipe), tmp_path / "runs" / "tiny"
    prepare(loaded, run)
    train(loaded, run)
    merge(loaded, run)
    monkeypatch.chdir(tmp_path)
    assert run_cli(["eval", str(recipe), "--only", "benchmarks"]) == 0
    out = capsys.readouterr().out
    assert "forgetting: lose acc got worse than the base model by more than two standard errors" in " ".join(out.split())
    report = json.loads((tmp_path / "runs" / "tiny" / "eval" / "report.json").read_text())
    assert "the merged model stands for it" in report["benchmarks"]["settings"]["skipped"]["adapter"]
    assert set(report["benchmarks"]["results"]) == {"base", "merged"}
    [row] = report["benchmarks"]["comparison"]
    assert row["base"] >= 0.9 and row["merged"] < 0.2 and row["forgetting"]
    assert json.loads((tmp_path / "runs" / "tiny" / "eval" / "manifest.json").read_text())["summary"]["forgetting"] == 1


def test_the_shipped_gsm8k_tasks_load_offline():
    manager = TaskManager(include_path=str(REPO / "recipes" / "benchmarks" / "gsm8k_local"),
                                        include_defaults=False)
    tasks = manager.load(["gsm8k_local", "gsm8k_local_nll"])["tasks"]
    task = tasks["gsm8k_local"]
    assert len(task.test_docs()) == 100 and task.config.num_fewshot == 5
    assert task.doc_to_target(task.test_docs()[0]).endswith("#### 18")
    nll = tasks["gsm8k_local_nll"]
    doc = nll.test_docs()[0]
    assert nll.process_results(doc, [(-10.0, False)]) == {"nats_per_char": pytest.approx(10 / (len(doc["answer"]) + 1))}
