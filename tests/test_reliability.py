"""What a new user and a hostile tester broke (issue 30), each as they met it: a run that made the
model worse, a read-only or busy run folder, a full disk in a checkpoint, generate's files, a
path in a recipe name, pickles, Ctrl-C in chat. Each ends in one line and an exit code."""

from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys

import pytest

from helpers import llmtune, write_jsonl, write_recipe
from llmtune.cli import run_cli
from llmtune.recipe import load_recipe
from llmtune.stages.prepare import prepare

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _answers(text: str, count: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Say it. (#{i})"}, {"role": "assistant", "content": text}]}
            for i in range(count)]


@pytest.mark.slow
def test_a_run_that_made_the_held_out_loss_worse_stops_before_merge(tiny_model, tmp_path):
    """Trained on one answer, validated on another at a high learning rate: the eval loss rises.
    `run` says so with both figures, records it, and stops before merge and export (exit 7)."""
    write_jsonl(tmp_path / "data" / "other.jsonl", _answers("zq" * 20, 8))
    recipe = write_recipe(tmp_path, tiny_model, rows=8, preview={"count": 0},
                          data={"validation": {"sources": [{"path": "data/other.jsonl", "format": "chat"}]}},
                          train={"max_steps": 12, "lr": 5e-3, "batch_size": 2})
    write_jsonl(tmp_path / "data" / "train.jsonl", _answers("ab" * 20, 8))
    result = llmtune("run", recipe, cwd=tmp_path)
    assert result.returncode == 7, result.stdout + result.stderr
    assert "the eval loss rose from" in result.stdout
    assert "training made the eval loss worse" in result.stderr and "merge and export were not run" in result.stderr
    assert "Traceback" not in result.stderr
    run = tmp_path / "runs" / "tiny"
    summary = json.loads((run / "adapter" / "manifest.json").read_text())["summary"]
    assert summary["eval_loss_rose"] is True and summary["eval_loss"] > summary["eval_loss_before"]
    assert not (run / "merged").exists() and not (run / "exported").exists()


def test_a_second_command_on_a_busy_run_folder_is_refused_and_a_killed_one_leaves_no_lock(tiny_model, tmp_path,
                                                                                            monkeypatch, capsys):
    recipe = write_recipe(tmp_path, tiny_model, rows=8)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "tiny"
    run.mkdir(parents=True)
    holder = subprocess.Popen(  # a command that holds the folder, as a `llmtune run` in progress does
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\nfrom llmtune import run_lock\n"
         "run_lock.hold(Path(sys.argv[1]), 'llmtune run recipe.yaml')\nprint('held', flush=True)\ntime.sleep(300)",
         str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run_cli(["prepare", str(recipe)]) == 6
        error = capsys.readouterr().err
        assert f"runs/tiny is in use by another llmtune command (pid {holder.pid}: llmtune run recipe.yaml)" in " ".join(
            error.split())
        assert not (run / "prepared").exists() and not (run / "recipe.yaml").exists()  # nothing was written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert run_cli(["prepare", str(recipe)]) == 0  # kill -9 left no lock behind
    assert run_cli(["prepare", str(recipe)]) == 0  # and a command that ended released it


def test_run_dir_that_is_a_file_and_a_read_only_run_folder_are_one_line(tiny_model, tmp_path, monkeypatch, capsys):
    recipe = write_recipe(tmp_path, tiny_model, rows=8)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    assert run_cli(["prepare", str(recipe), "--run-dir", "afile"]) == 2
    assert "afile: not a folder, so it cannot be a run directory" in capsys.readouterr().err

    run = tmp_path / "runs" / "tiny"
    assert run_cli(["prepare", str(recipe)]) == 0
    def written():  # the lock file aside: taking the lock writes the holder's pid there
        return {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.name != ".llmtune.lock"}

    before = written()
    capsys.readouterr()
    assert run_cli(["prepare", str(recipe)]) == 0  # up to date: nothing is written, recipe.yaml included
    assert "prepare: up to date" in capsys.readouterr().out
    assert written() == before
    if IS_ROOT:  # root writes into read-only folders: the rest needs an ordinary user
        return
    for path in [run, *run.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    try:
        assert run_cli(["prepare", str(recipe)]) == 0  # up to date, read-only: fine
        assert run_cli(["prepare", str(recipe), "--set", "data.max_seq_len=64"]) == 2
        assert "is not writable, and this command has to write there" in capsys.readouterr().err
    finally:
        for path in [run, *run.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)


@pytest.mark.slow
def test_a_full_disk_while_saving_a_checkpoint_is_exit_4_and_the_rerun_resumes(tiny_model, tmp_path):
    """torch.save's C++ writer reports a failed write with no errno ("[enforce fail at
    inline_container.cc] . unexpected pos"): a file-size limit stands in for the full disk, met
    by the first checkpoint's optimizer.pt (the adapter file before it fits)."""
    recipe = write_recipe(tmp_path, tiny_model, rows=16, preview={"count": 0},
                          train={"max_steps": 8, "batch_size": 1, "save_every": 2})
    prepare(load_recipe(recipe), tmp_path / "runs" / "tiny")
    limited = ("import resource, signal, sys\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
               "resource.setrlimit(resource.RLIMIT_FSIZE, (60000, 60000))\n"
               "from llmtune.cli import run_cli\nsys.exit(run_cli(sys.argv[1:]))")
    full = subprocess.run([sys.executable, "-c", limited, "train", str(recipe)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert full.returncode == 4, full.stdout + full.stderr
    assert "out of disk space: torch could not write a file" in full.stderr and "Traceback" not in full.stderr
    assert resource.getrlimit(resource.RLIMIT_FSIZE)[0] != 60000  # the limit was the child's alone
    again = llmtune("train", recipe, cwd=tmp_path)
    assert again.returncode == 0, again.stderr  # the half-written checkpoint is not resumed from
    assert "resuming from" not in again.stdout


def test_generate_checks_its_files_before_loading_anything(tiny_model, tmp_path, monkeypatch, capsys):
    from llmtune.serve import generate

    monkeypatch.setattr(generate, "load_tuned", lambda *a: pytest.fail("the model was loaded"))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hi"}])
    (tmp_path / "answers").mkdir()
    cases = {
        ("--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "out.jsonl")): "missing.jsonl: no such file",
        ("--input", str(prompts), "--output", str(tmp_path / "answers")): "answers: a folder",
        ("--input", str(prompts), "--output", str(prompts)): "is the --input file: its prompts would be overwritten",
        ("--input", str(prompts), "--output", str(tmp_path / "no" / "out.jsonl")): "does not exist",
    }
    for args, message in cases.items():
        assert run_cli(["generate", str(tiny_model), *args]) == 2, args
        assert message in " ".join(capsys.readouterr().err.split()), args
    assert json.loads(prompts.read_text()) == {"prompt": "hi"} and not list(tmp_path.glob("*.partial"))


def test_data_preview_refuses_a_count_below_one(tiny_model, tmp_path, monkeypatch, capsys):
    recipe = write_recipe(tmp_path, tiny_model, rows=8)
    monkeypatch.chdir(tmp_path)
    assert run_cli(["data", "preview", str(recipe), "-n", "-1"]) == 2
    assert "Invalid value for '-n': Input should be greater than or equal to 1" in capsys.readouterr().err


def test_recipe_new_refuses_a_name_that_leaves_its_folder(tiny_model, tmp_path, monkeypatch, capsys):
    recipe = write_recipe(tmp_path, tiny_model, rows=8)
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    for name in ("../../escape", "/tmp/escape", "sub/name", ".."):
        assert run_cli(["recipe", "new", name, "--from", str(recipe), "--dir", "mine"]) == 2, name
        assert "a name is letters, digits" in capsys.readouterr().err
    assert not list(tmp_path.rglob("escape.yaml")) and not (work / "mine").exists()
    assert run_cli(["recipe", "new", "mine-v2", "--from", str(recipe), "--dir", "mine"]) == 0
    assert (work / "mine" / "mine-v2.yaml").is_file()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickles_are_refused_naming_the_file(tiny_model, tmp_path, monkeypatch, capsys):
    """A pickle adapter given to chat/generate, and model.allow_pickle on a pickle that holds more
    than tensors: exit 2 naming the file, no traceback, nothing in it run."""
    monkeypatch.chdir(tmp_path)
    adapter = tmp_path / "pickled-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    with open(adapter / "adapter_model.bin", "wb") as handle:
        pickle.dump({"weight": _Evil()}, handle, protocol=2)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hi"}])
    code = run_cli(["generate", str(tiny_model), "--adapter", str(adapter), "--input", str(prompts),
                    "--output", str(tmp_path / "out.jsonl")])
    assert code == 2
    assert "adapter_model.bin: a pickle-based adapter" in " ".join(capsys.readouterr().err.split())

    model = tmp_path / "pickled-model"
    shutil.copytree(tiny_model, model)
    for weights in model.glob("*.safetensors"):
        weights.unlink()
    with open(model / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"weight": _Evil()}, handle, protocol=2)
    recipe = write_recipe(tmp_path, model, rows=8, model={"allow_pickle": True})
    assert run_cli(["prepare", str(recipe)]) == 0
    assert run_cli(["train", str(recipe)]) == 2
    error = " ".join(capsys.readouterr().err.split())
    assert "pickle file there holds more than weights" in error and "nothing in it ran" in error
    assert not (tmp_path / "PWNED").exists()


def test_ctrl_c_while_an_answer_streams_stops_that_answer_and_keeps_the_chat(tiny_model, monkeypatch, capsys):
    from llmtune.serve.chat import Chat

    lines = iter(["first question", "second question"])
    said = []

    def typed(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise KeyboardInterrupt from None  # Ctrl-C at the prompt quits

    real_say = Chat.say

    def say(self, text, stream=True):
        said.append(text)
        if len(said) == 1:  # Ctrl-C while the first answer streams
            original = self.model.generate
            self.model.generate = lambda **kw: (_ for _ in ()).throw(KeyboardInterrupt())
            try:
                return real_say(self, text, stream)
            finally:
                self.model.generate = original
        reply = real_say(self, text, stream)
        assert [m["content"] for m in self.history if m["role"] == "user"] == ["second question"]
        return reply

    monkeypatch.setattr("builtins.input", typed)
    monkeypatch.setattr(Chat, "say", say)
    assert run_cli(["chat", str(tiny_model), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "(answer stopped and left out of the conversation" in out and out.rstrip().endswith("bye")
    assert said == ["first question", "second question"]


def test_the_kernels_package_says_nothing_offline(tmp_path):
    """bitsandbytes asks `kernels` for a CPU kernel on AVX512-BF16 machines; offline, kernels
    logged a publisher-trust notice on every command (into chat's and generate's output). The
    call it makes, after `import llmtune`, prints nothing."""
    pytest.importorskip("kernels")
    script = ("import llmtune\nfrom kernels import get_kernel\n"
              "try:\n    get_kernel('kernels-community/quantization-bitsandbytes', version=1)\n"
              "except Exception:\n    pass\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "publisher trust" not in done.stderr + done.stdout
    assert done.stderr.strip() == "" and done.stdout.strip() == ""


_EVIL = '''print("CUSTOM MODEL CODE RAN")
from transformers import LlamaConfig, LlamaForCausalLM


class CustomConfig(LlamaConfig):
    pass


class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig
'''


@pytest.mark.slow
def test_remote_code_is_named_before_it_runs_never_prompts_and_the_merged_card_says_so(tiny_model, tmp_path):
    """A local model with its own code (auto_map) and trust_remote_code: true. plan named no
    file, showed transformers' [y/N] prompt, then a traceback; run copied the code into merged/
    without a word. Now the files and their hashes are printed before the code runs, nothing
    prompts, and the merged model card says the folder carries code that runs when loaded."""
    from llmtune.model_ref import file_sha256
    from llmtune.stages.merge import merge
    from llmtune.stages.train import train

    custom = tmp_path / "custom"
    shutil.copytree(tiny_model, custom)
    (custom / "custom_model.py").write_text(_EVIL)
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom_model.CustomConfig", "AutoModelForCausalLM": "custom_model.CustomForCausalLM"}
    (custom / "config.json").write_text(json.dumps(config))
    recipe_file = write_recipe(tmp_path, custom, rows=8, model={"trust_remote_code": True},
                               train={"max_steps": 1, "batch_size": 2})

    planned = subprocess.run([sys.executable, "-m", "llmtune", "plan", str(recipe_file)], cwd=tmp_path,
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    out = planned.stdout + planned.stderr
    assert planned.returncode == 0, out
    assert "[y/N]" not in out and "Traceback" not in out
    digest = file_sha256(custom / "custom_model.py")
    notice = out.index(f"custom_model.py (sha256 {digest[:12]}")
    assert "CUSTOM MODEL CODE RAN" not in out[:notice]

    recipe = load_recipe(recipe_file)
    run = tmp_path / "runs" / "tiny"
    prepare(recipe, run)
    train(recipe, run)
    merge(recipe, run)
    card = (run / "merged" / "README.md").read_text()
    assert "## Remote code" in card and "`custom_model.py`" in card and digest[:16] in card
    assert 'from_pretrained("PATH/TO/THIS/FOLDER", trust_remote_code=True)' in card
    assert (run / "merged" / "custom_model.py").read_text() == _EVIL


def test_recipe_validate_finds_what_the_stages_would_refuse(tiny_model, tmp_path, monkeypatch, capsys):
    """validate said "valid" for a missing local model or GGUF, remote code without a pinned
    commit, and a max_seq_len beyond the model's context; each is now named, without loading."""
    monkeypatch.chdir(tmp_path)
    context = json.loads((tiny_model / "config.json").read_text())["max_position_embeddings"]
    cases = {
        "model.path: not found:": {"path": "./no-such-model"},
        "model.path: GGUF file not found:": {"path": "./missing.gguf"},
        "pin model.revision": {"path": "someone/custom-model", "trust_remote_code": True},
    }
    for message, model in cases.items():
        recipe = write_recipe(tmp_path, tiny_model, rows=8, model=model)
        assert run_cli(["recipe", "validate", str(recipe)]) == 2, message
        assert message in " ".join(capsys.readouterr().err.split())
    recipe = write_recipe(tmp_path, tiny_model, rows=8, data={"max_seq_len": context * 2})
    assert run_cli(["recipe", "validate", str(recipe)]) == 2
    assert f"data.max_seq_len: {context * 2} is beyond the {context} tokens" in " ".join(capsys.readouterr().err.split())
    recipe = write_recipe(tmp_path, tiny_model, rows=8, data={"max_seq_len": context})
    assert run_cli(["recipe", "validate", str(recipe)]) == 0
    assert "valid" in capsys.readouterr().out


def test_plan_warns_on_a_size_beyond_any_machine(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path, tiny_model, rows=8, train={"batch_size": 10**9})
    assert run_cli(["plan", str(recipe), "--device", "cpu"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "GB per process is beyond any machine: check train.batch_size (1000000000)" in out
    recipe = write_recipe(tmp_path, tiny_model, rows=8)
    assert run_cli(["plan", str(recipe), "--device", "cpu"]) == 0
    assert "WARNING" not in capsys.readouterr().out


def test_ctrl_c_outside_training_is_exit_130_and_frees_the_run_folder(tiny_model, tmp_path, monkeypatch, capsys):
    from llmtune import pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_stage", interrupted)
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path, tiny_model, rows=8)
    assert run_cli(["run", str(recipe)]) == 130
    assert "Traceback" not in capsys.readouterr().err
    assert run_cli(["run", str(recipe)]) == 130  # not 6: the folder's lock went with the command
