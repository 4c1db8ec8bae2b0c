"""What tests share: the data shipped with them, awkward texts, small recipes on the tiny model,
running the real CLI as a user does, waiting for a checkpoint, and reading adapters.
(conftest.py holds the fixtures.)"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
# A slice of GSM8K (MIT) shipped with the tests; see tests/data/gsm8k/README.md.
GSM8K_TRAIN = REPO / "tests" / "data" / "gsm8k" / "train.jsonl"
GSM8K_TEST = REPO / "tests" / "data" / "gsm8k" / "test.jsonl"

# A multi-turn conversation with a system prompt and non-ASCII text, for masking tests.
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! Ünïcode ✓"},
    {"role": "user", "content": "Again?"},
    {"role": "assistant", "content": "Sure."},
]


# Texts where token and character boundaries disagree: multi-byte characters (which the tiny
# tokenizer splits into one token per byte), emoji, combining marks, special tokens inside
# content, spaces around the span edges, an empty completion.
AWKWARD = [
    {"prompt": "Q: 2+2?\nA:", "completion": " 4"},
    {"prompt": "Übersetze: ", "completion": "naïve café — 東京 🚀"},
    {"prompt": "e\u0301 ", "completion": "n\u0303o\u0308"},
    {"prompt": "say <|im_end|> twice", "completion": "<|im_end|><|im_end|>"},
    {"prompt": "trailing  ", "completion": "  spaces  "},
    {"prompt": "nothing to add", "completion": ""},
    {"text": "raw 🚀 text"},
    {"messages": CONVERSATION},
    {"messages": [{"role": "user", "content": "¿Qué?"}, {"role": "assistant", "content": "¡Sí! 🎉"}]},
]


def encode_both_ways(tokenizer, samples, monkeypatch):
    """encode() as prepare runs it, and with the tokenizer's own offsets only."""
    from llmtune.data import chat, turns

    rendered = [piece for s in samples for piece in turns.render_sample(s, tokenizer)]
    fast = chat.encode(tokenizer, rendered)
    with monkeypatch.context() as patch:
        patch.setattr(chat, "_token_byte_lengths", lambda backend: None)
        with_offsets = chat.encode(tokenizer, rendered)
    return fast, with_offsets


def chat_rows(count: int, seed: int = 0) -> list[dict]:
    """Small conversations with a learnable answer: the assistant repeats a word three times."""
    words = ["apple", "river", "stone", "cloud", "maple", "tiger", "lemon", "ocean", "piano", "amber"]
    rows = []
    for i in range(count):
        word = words[(i * 7 + seed) % len(words)]
        rows.append({"messages": [
            {"role": "user", "content": f"Repeat {word} three times. (#{i})"},
            {"role": "assistant", "content": f"{word} {word} {word}"},
        ]})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_recipe(folder: Path, base: str | Path, rows: int = 40, **sections) -> Path:
    """A recipe in `folder` training the `base` model on `rows` chat rows written next to it;
    `sections` are merged into the recipe's sections."""
    write_jsonl(folder / "data" / "train.jsonl", chat_rows(rows))
    recipe = {
        "name": "tiny",
        "output_dir": "runs",
        "model": {"path": str(base)},
        "data": {"train": [{"path": "data/train.jsonl", "format": "chat"}],
                 "validation": {"fraction": 0.1}, "max_seq_len": 128},
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.0},
        # fp32: tests compare adapters within 1e-5 (auto is bf16 on CPUs with native bf16)
        "train": {"epochs": 1, "batch_size": 4, "lr": 1.0e-3, "seed": 0, "precision": "fp32"},
        "preview": {"count": 2, "show": 1, "max_new_tokens": 8},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def start_training_until(folder: Path, recipe: Path, step: int, *extra: str,
                         timeout: float = 180) -> subprocess.Popen:
    """Start `llmtune train RECIPE EXTRA...` in `folder` (run "tiny") and return once its
    checkpoint-`step` is marked good, for tests that interrupt it there."""
    process = subprocess.Popen([sys.executable, "-m", "llmtune", "train", str(recipe), *extra], cwd=folder,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_mark(folder, step, process, timeout=timeout, poll=0.02)
    return process


def wait_for_mark(folder: Path, step: int, *processes: subprocess.Popen, timeout: float = 240,
                  poll: float = 0.05) -> None:
    """Return once run "tiny" in `folder` has its checkpoint-`step` marked good, while every one
    of `processes` (the training's) is still running."""
    from llmtune.stages.train import checkpoints

    mark = folder / "runs" / "tiny" / "adapter.partial" / "checkpoints" / f"checkpoint-{step}" / checkpoints.MARK
    deadline = time.monotonic() + timeout
    while not mark.exists():
        for process in processes:
            assert process.poll() is None, ("training ended before the checkpoint: "
                                            + "".join(filter(None, process.communicate())))
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(poll)


def free_port() -> int:
    """A TCP port free on this machine now (a rendezvous for processes the test starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def adapter_weights(run: Path) -> dict:
    """The trained adapter's tensors of a run directory."""
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def max_difference(a: dict, b: dict) -> float:
    """The largest absolute difference between two adapters' tensors (same names)."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def stage_manifest(run: Path, folder: str) -> dict:
    """The manifest.json of one of a run's stage folders (prepared, adapter, merged, ...)."""
    return json.loads((run / folder / "manifest.json").read_text())


def llmtune(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real CLI as a user would: `python -m llmtune ...` in `cwd`."""
    return subprocess.run(
        [sys.executable, "-m", "llmtune", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --- preference data: a learnable preference on the tiny model -------------------------------

WORDS = ["apple", "river", "stone", "cloud", "maple", "tiger", "lemon", "ocean", "piano", "amber"]


def pairs(count: int) -> list[dict]:
    """A learnable preference: repeat the word asked for (chosen), not another word (rejected)."""
    rows = []
    for i in range(count):
        word, other = WORDS[i % 10], WORDS[(i * 3 + 1) % 10]
        other = other if other != word else WORDS[(i + 5) % 10]
        rows.append({"prompt": f"Repeat {word} three times. (#{i})", "chosen": f"{word} {word} {word}",
                     "rejected": f"{other} {other} {other}"})
    return rows


def kto_rows(count: int) -> list[dict]:
    return [{"prompt": row["prompt"], "completion": row[answer], "label": answer == "chosen"}
            for row in pairs(count // 2) for answer in ("chosen", "rejected")]


def write_preference_recipe(folder, base, objective="dpo", rows=None, **sections):
    fmt = "kto" if objective == "kto" else "preference"
    write_jsonl(folder / "data" / "train.jsonl", rows if rows is not None else
                (kto_rows(40) if fmt == "kto" else pairs(40)))
    recipe = {
        "name": "tiny",
        "model": {"path": str(base)},
        "data": {"train": [{"path": "data/train.jsonl", "format": fmt}], "validation": {"fraction": 0.1},
                 "max_seq_len": 128},
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"objective": objective, "epochs": 1, "batch_size": 4, "lr": 5e-3, "seed": 0, "precision": "fp32"},
        "preview": {"count": 0},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


# --- several processes: torchrun, accelerate, SLURM, Ray (test_cluster.py, test_ray.py) ------------

# 2 processes x batch 1 per process; the 1-process reference (the one_process fixture) runs batch 2:
# the same global batch. Enough steps that a signal sent after the first checkpoint lands well
# before the end.
DDP_TRAIN = {"max_steps": 160, "batch_size": 1, "save_every": 20, "keep_checkpoints": 2, "lr": 1e-3}
# fp32 on CPU; measured 8e-7 after 6 steps (gradient all-reduce order is the only difference)
DDP_TOLERANCE = 1e-5


def ddp_recipe(folder: Path, tiny_model) -> Path:
    """DDP_TRAIN's recipe in `folder` (run "tiny"), prepared in-process: the launchers are what is tested."""
    from llmtune.recipe import load_recipe
    from llmtune.stages.prepare import prepare

    recipe = write_recipe(folder, tiny_model, rows=40, train=DDP_TRAIN, preview={"count": 0})
    prepare(load_recipe(recipe), folder / "runs" / "tiny")
    return recipe


def chunked_and_standard_loss(model, batch: dict) -> tuple[float, float, float]:
    """(the chunked loss, the model's own loss, the largest gradient difference between them) of
    a batch: ChunkedLossTrainer's compute_loss against the model's forward with labels."""
    import types

    from llmtune.stages.train.trainer import ChunkedLossTrainer

    def loss_and_grads(compute):
        model.zero_grad()
        value = compute()
        value.backward()
        return float(value), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    standard, standard_grads = loss_and_grads(lambda: model(**batch).loss)
    chunked, chunked_grads = loss_and_grads(
        lambda: ChunkedLossTrainer.compute_loss(types.SimpleNamespace(), model, dict(batch)))
    return chunked, standard, max(float((a - b).abs().max()) for a, b in zip(chunked_grads, standard_grads))

