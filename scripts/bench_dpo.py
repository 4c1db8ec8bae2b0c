#!/usr/bin/env python3
"""DPO training, whole processes side by side: llmtune (train.objective dpo) vs TRL's own
DPOTrainer used directly, on the same pairs and settings.

    python scripts/bench_dpo.py [--pairs 64] [--steps 8] [--batch 4] [--precision auto]
                                [--model FOLDER] [--data GSM8K train.jsonl] [--device auto]

Pairs from GSM8K (its first --pairs rows; the shipped 1,000-row slice unless --data): the
question as the user's turn, its own answer chosen, the next row's answer rejected. Both run
as their own process (peak RSS its own) on the same model folder (default: the embedded
SmolLM2-135M-Instruct as llmtune converts it, bf16 on disk), with LoRA r16 alpha 32 dropout 0
all-linear, the same batch, learning rate, steps, beta 0.1 and sigmoid loss, gradient
checkpointing, and the reference as the base with the adapter disabled. TRL is handed the text
pairs (it applies the chat template and tokenises them itself), llmtune prepares them first.
--precision auto: each tool as its defaults load a bf16 folder; fp32 or bf16: the same for both.

Printed: whole-process wall time, training-loop seconds, non-padding tokens per second (of the
chosen and rejected sequences the policy trains on), padding share and peak RSS, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import child_result, gsm8k_train  # noqa: E402

LR = 5e-5
BETA = 0.1


def pairs_needed(args) -> list[dict]:
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()][: args.pairs + 1]
    return [{"prompt": [{"role": "user", "content": row["question"]}],
             "chosen": [{"role": "assistant", "content": row["answer"]}],
             "rejected": [{"role": "assistant", "content": rows[i + 1]["answer"]}]}
            for i, row in enumerate(rows[:-1])]


def run_llmtune(args, folder: Path) -> dict:
    import yaml

    from llmtune.recipe import load_recipe
    from llmtune.stages.prepare import prepare
    from llmtune.stages.train import train
    from llmtune.stages.train import trl as objectives

    data = folder / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in pairs_needed(args)))
    recipe_file = folder / "bench.yaml"
    recipe_file.write_text(yaml.safe_dump({
        "name": "bench", "output_dir": str(folder / "runs"), "model": {"path": args.model},
        "data": {"train": [{"path": str(data), "format": "preference"}], "validation": {"fraction": 0.0},
                 "max_seq_len": args.seq, "dedup": False},
        "adapter": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "train": {"objective": "dpo", "beta": BETA, "max_steps": args.steps, "batch_size": args.batch,
                  "lr": LR, "precision": args.precision, "save_every": None},
        "preview": {"count": 0},
    }))
    padded = {"cells": 0}
    original = objectives.CountingCollator.__call__

    def counting(self, rows):
        batch = original(self, rows)
        padded["cells"] += batch["input_ids"].numel()
        return batch

    objectives.CountingCollator.__call__ = counting
    recipe = load_recipe(recipe_file, args.llmtune_set)
    run = folder / "runs" / "bench"
    prepare(recipe, run)
    summary = train(recipe, run).manifest["summary"]
    seconds = summary["train_seconds"]
    return {"tokens": summary["tokens_per_second"] * seconds, "seconds": seconds,
            "padded_cells": padded["cells"], "precision": summary["precision"]}


def run_trl(args, folder: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    settings = {}
    if args.precision != "auto":
        settings = {"bf16": args.precision == "bf16",
                    "model_init_kwargs": {"dtype": {"fp32": "float32", "bf16": "bfloat16"}[args.precision]}}
    config = DPOConfig(
        output_dir=str(folder / "trl"), per_device_train_batch_size=args.batch, max_length=args.seq,
        max_steps=args.steps, learning_rate=LR, beta=BETA, loss_type=["sigmoid"],
        use_cpu=args.device == "cpu", report_to="none", save_strategy="no", logging_steps=1,
        disable_tqdm=True, seed=0, gradient_checkpointing=True, **settings)
    trainer = DPOTrainer(model=args.model, args=config, train_dataset=Dataset.from_list(pairs_needed(args)),
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    counts = {"tokens": 0, "cells": 0}
    collator = trainer.data_collator

    def counting(examples):
        batch = collator(examples)
        counts["cells"] += batch["input_ids"].numel()
        counts["tokens"] += int(batch["attention_mask"].sum())
        return batch

    trainer.data_collator = counting

    class Clock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            counts["start"] = time.perf_counter()

        def on_train_end(self, *_, **__):
            counts["end"] = time.perf_counter()

    trainer.add_callback(Clock())
    trainer.train()
    trainer.save_model(str(folder / "trl" / "adapter"))
    precision = "bf16" if config.bf16 else "fp16" if config.fp16 else "fp32"
    return {"tokens": counts["tokens"], "seconds": counts["end"] - counts["start"], "padded_cells": counts["cells"],
            "precision": f"{precision}, weights {next(trainer.model.parameters()).dtype}".replace("torch.", "")}


def child(args) -> None:
    from llmtune.models import quiet_libraries

    quiet_libraries()
    with tempfile.TemporaryDirectory() as folder:
        result = run_llmtune(args, Path(folder)) if args.child == "llmtune" else run_trl(args, Path(folder))
    if args.device == "cuda":
        import torch

        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=64, help="pairs from GSM8K's first rows")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps")
    parser.add_argument("--seq", type=int, default=1024, help="max length of a prompt and its answer")
    parser.add_argument("--batch", type=int, default=4, help="pairs per micro-batch")
    parser.add_argument("--model", help="a transformers model folder (default: the embedded model, bf16)")
    parser.add_argument("--data", help="GSM8K train.jsonl (default: the slice in tests/data/gsm8k)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--rounds", type=int, default=1, help="run both this many times, interleaved")
    parser.add_argument("--llmtune-set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    args.data = str(gsm8k_train(args.data))
    if args.model is None:
        from llmtune import model_sources

        args.model = str(model_sources.resolve("embedded:smollm2-135m-instruct").local_dir)
    if args.device == "auto":
        code = "import torch; print(torch.cuda.is_available())"
        cuda = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "True"
        args.device = "cuda" if cuda else "cpu"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else None
    passed = ["--pairs", str(args.pairs), "--steps", str(args.steps), "--seq", str(args.seq),
              "--batch", str(args.batch), "--model", args.model, "--data", args.data,
              "--precision", args.precision, "--device", args.device,
              *[f"--llmtune-set={item}" for item in args.llmtune_set]]
    print(f"model {args.model}; {args.pairs} GSM8K pairs, {args.steps} steps of {args.batch} pairs, "
          f"seq {args.seq}, LoRA r16 all-linear, DPO sigmoid beta {BETA}, precision {args.precision}, {args.device}")
    print("| round | variant | precision | wall time | train s | tok/s | padding | peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for round_ in range(1, args.rounds + 1):
        results = {}
        for name in ("llmtune", "trl"):
            r = child_result([sys.executable, __file__, *passed, "--child", name], env)
            r["speed"] = r["tokens"] / r["seconds"]
            results[name] = r
            print(f"| {round_} | {name} | {r['precision']} | {r['wall']:.1f} s | {r['seconds']:.1f} | "
                  f"{r['speed']:.1f} | {1 - r['tokens'] / r['padded_cells']:.1%} | {r['rss']:.2f} GB |", flush=True)
        mine, theirs = results["llmtune"], results["trl"]
        print(f"round {round_}: llmtune / TRL tokens/s {mine['speed'] / theirs['speed']:.2f}x, "
              f"peak RSS {mine['rss'] / theirs['rss']:.2f}x, wall time {theirs['wall'] / mine['wall']:.2f}x faster",
              flush=True)


if __name__ == "__main__":
    main()
