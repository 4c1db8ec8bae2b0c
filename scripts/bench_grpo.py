#!/usr/bin/env python3
"""GRPO, whole processes side by side: llmtune (train.objective grpo) vs TRL's GRPOTrainer used
directly, with the same prompts, settings and reward.

    python scripts/bench_grpo.py [--prompts 64] [--steps 4] [--batch 16] [--generations 4]
                                 [--completion 32] [--precision auto] [--rounds 1] [--model FOLDER]

The prompts are the GRPO quickstart's (recipes/data/grpo-quickstart.jsonl: small sums, the
answer a number); the reward is the quickstart's match reward ('= *(-?[0-9]+)' against the
answer), written once and handed to both. Both run as their own process (peak RSS its own) on
the same model folder (default: the embedded SmolLM2-135M-Instruct as llmtune converts it), with
LoRA r16 alpha 32 dropout 0 all-linear, the same batch of completions, generations per prompt,
completion length, temperature 1, beta 0.04 (a reference forward with the adapter disabled),
learning rate, steps and seed, gradient checkpointing off. TRL gets the prompts as messages (it
applies the chat template itself). --precision auto: each as its defaults load a bf16 folder.

Printed: wall time, training-loop seconds, completions per second, peak RSS, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import child_result  # noqa: E402

PROMPTS = Path(__file__).resolve().parent.parent / "recipes" / "data" / "grpo-quickstart.jsonl"
LR = 2e-4
PATTERN = re.compile(r"= *(-?[0-9]+)")


def correct(completions, answer, **_) -> list[float]:
    """The quickstart's match reward, TRL's signature (text completions)."""
    def last(text):
        found = PATTERN.findall(text)
        return found[-1] if found else None
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float(last(t) == str(a)) for t, a in zip(texts, answer)]


def rows(args) -> list[dict]:
    return [json.loads(line) for line in PROMPTS.read_text().splitlines()][: args.prompts]


def run_llmtune(args, folder: Path) -> dict:
    import yaml

    from llmtune.recipe import load_recipe
    from llmtune.stages.prepare import prepare
    from llmtune.stages.train import train

    data = folder / "prompts.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows(args)))
    recipe_file = folder / "bench.yaml"
    recipe_file.write_text(yaml.safe_dump({
        "name": "bench", "output_dir": str(folder / "runs"), "model": {"path": args.model},
        "data": {"train": [{"path": str(data), "format": "prompt"}], "validation": {"fraction": 0.0},
                 "max_seq_len": 256, "dedup": False},
        "adapter": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "train": {"objective": "grpo", "max_steps": args.steps, "batch_size": args.batch, "lr": LR,
                  "precision": args.precision, "gradient_checkpointing": False, "seed": 0,
                  "grpo": {"num_generations": args.generations, "max_completion_length": args.completion,
                           "temperature": 1.0, "beta": 0.04}},
        "rewards": [{"type": "match", "answer_regex": PATTERN.pattern, "name": "correct"}],
        "preview": {"count": 0},
    }))
    recipe = load_recipe(recipe_file, args.llmtune_set)
    run = folder / "runs" / "bench"
    prepare(recipe, run)
    summary = train(recipe, run).manifest["summary"]
    return {"seconds": summary["train_seconds"], "precision": summary["precision"]}


def run_trl(args, folder: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    settings = {}
    if args.precision != "auto":
        settings = {"bf16": args.precision == "bf16",
                    "model_init_kwargs": {"dtype": {"fp32": "float32", "bf16": "bfloat16"}[args.precision]}}
    config = GRPOConfig(
        output_dir=str(folder / "trl"), per_device_train_batch_size=args.batch, max_steps=args.steps,
        learning_rate=LR, num_generations=args.generations, max_completion_length=args.completion,
        temperature=1.0, beta=0.04, use_cpu=args.device == "cpu", report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, seed=0, gradient_checkpointing=False, **settings)
    trainer = GRPOTrainer(model=args.model, reward_funcs=correct, args=config,
                          train_dataset=Dataset.from_list(rows(args)),
                          peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    clock = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            clock["start"] = time.perf_counter()

        def on_train_end(self, *_, **__):
            clock["end"] = time.perf_counter()

    trainer.add_callback(Clock())
    trainer.train()
    trainer.save_model(str(folder / "trl" / "adapter"))
    precision = "bf16" if config.bf16 else "fp16" if config.fp16 else "fp32"
    return {"seconds": clock["end"] - clock["start"],
            "precision": f"{precision}, weights {next(trainer.model.parameters()).dtype}".replace("torch.", "")}


def child(args) -> None:
    from llmtune.models import quiet_libraries

    quiet_libraries()
    with tempfile.TemporaryDirectory() as folder:
        result = run_llmtune(args, Path(folder)) if args.child == "llmtune" else run_trl(args, Path(folder))
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16, help="completions per step")
    parser.add_argument("--generations", type=int, default=4, help="completions per prompt")
    parser.add_argument("--completion", type=int, default=32, help="max completion tokens")
    parser.add_argument("--model", help="a transformers model folder (default: the embedded model, bf16)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--llmtune-set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.model is None:
        from llmtune import model_sources

        args.model = str(model_sources.resolve("embedded:smollm2-135m-instruct").local_dir)
    if args.device == "auto":
        code = "import torch; print(torch.cuda.is_available())"
        cuda = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "True"
        args.device = "cuda" if cuda else "cpu"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else None
    passed = ["--prompts", str(args.prompts), "--steps", str(args.steps), "--batch", str(args.batch),
              "--generations", str(args.generations), "--completion", str(args.completion), "--model", args.model,
              "--precision", args.precision, "--device", args.device,
              *[f"--llmtune-set={item}" for item in args.llmtune_set]]
    completions = args.steps * args.batch
    print(f"model {args.model}; {args.steps} steps x {args.batch} completions ({args.generations} per prompt, "
          f"up to {args.completion} tokens), LoRA r16 all-linear, beta 0.04, precision {args.precision}, {args.device}")
    print("| round | variant | precision | wall time | train s | completions/s | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for round_ in range(1, args.rounds + 1):
        results = {}
        for name in ("llmtune", "trl"):
            r = child_result([sys.executable, __file__, *passed, "--child", name], env)
            r["speed"] = completions / r["seconds"]
            results[name] = r
            print(f"| {round_} | {name} | {r['precision']} | {r['wall']:.1f} s | {r['seconds']:.1f} | "
                  f"{r['speed']:.2f} | {r['rss']:.2f} GB |", flush=True)
        mine, theirs = results["llmtune"], results["trl"]
        print(f"round {round_}: llmtune / TRL completions/s {mine['speed'] / theirs['speed']:.2f}x, "
              f"peak RSS {mine['rss'] / theirs['rss']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
