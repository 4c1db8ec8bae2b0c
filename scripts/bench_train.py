#!/usr/bin/env python3
"""Training throughput and memory: llmtune vs TRL's SFTTrainer (defaults, packing, padding-free).

    pip install trl     # the baseline; not a dependency of llmtune
    python scripts/bench_train.py [--steps 5] [--seq 512] [--batch 8] [--variants ...] [--device auto]

One invocation runs every variant, each in its own subprocess (so its peak RSS is its own), on
the same model (the embedded SmolLM2-135M-Instruct), data (GSM8K train from
../shared/datasets/gsm8k as prompt/completion, the loss on the answer), sequence length, batch,
LoRA (r16, alpha 32, dropout 0, all-linear), precision (--precision: fp32, or bf16 autocast for
every variant; auto, the default, is what llmtune's `precision: auto` picks on this machine) and
number of optimizer steps, with the same learning rate, on the same device (--device: cuda when
there is one, else cpu; cpu hides the GPUs from every variant). Gradient checkpointing is each tool's
default (on for both); --llmtune-set changes llmtune's recipe.

Printed per variant: non-padding tokens per second of training wall time, padding share, peak
RSS (and peak GPU memory allocated by torch, on cuda), and model-FLOPs utilisation against a matmul peak (in the benchmark's precision) measured
in the same run. Model
FLOPs per token: 2 x parameters forward, 2 x frozen parameters backward (input gradients only),
4 x trainable parameters backward, plus causal attention (6 x layers x hidden x mean context
forward and backward). Ratios are llmtune over each TRL variant.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GSM8K = ROOT.parent / "shared" / "datasets" / "gsm8k" / "train.jsonl"
VARIANTS = ("llmtune", "trl-defaults", "trl-packing", "trl-padding-free")
LR = 2e-4


def rows_needed(args) -> list[dict]:
    """The whole GSM8K train split: length grouping and packing need a real dataset to work on.
    With --longest N, only its N longest rows: then every variant trains on the same rows and
    meets batches of the same lengths, which makes peak memory comparable."""
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()]
    if args.longest:
        rows = sorted(rows, key=lambda row: len(row["question"]) + len(row["answer"]), reverse=True)
        rows = rows[:args.longest]
    return rows


def run_llmtune(args, folder: Path) -> dict:
    import yaml

    from llmtune.recipe import load_recipe
    from llmtune.stages import collate
    from llmtune.stages.prepare import prepare
    from llmtune.stages.train import train

    data = folder / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows_needed(args)))
    recipe_file = folder / "bench.yaml"
    recipe_file.write_text(yaml.safe_dump({
        "name": "bench", "output_dir": str(folder / "runs"),
        "data": {"train": [{"path": str(data), "format": "completion",
                            "fields": {"prompt": "question", "completion": "answer"}}],
                 "validation": {"fraction": 0.0}, "max_seq_len": args.seq, "dedup": False},
        "adapter": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "train": {"max_steps": args.steps, "batch_size": args.batch, "lr": LR, "precision": args.precision,
                  "save_every": None},
        "preview": {"count": 0},
    }))
    padded = {"cells": 0}
    original = collate.PadCollator.__call__

    def counting(self, rows):
        batch = original(self, rows)
        padded["cells"] += batch["input_ids"].numel()
        return batch

    collate.PadCollator.__call__ = counting
    recipe = load_recipe(recipe_file, args.llmtune_set)
    run = folder / "runs" / "bench"
    prepare(recipe, run)
    summary = train(recipe, run).manifest["summary"]
    tokens = summary["tokens_per_second"] * summary["train_seconds"]
    return {"tokens": tokens, "seconds": summary["train_seconds"], "padded_cells": padded["cells"]}


def run_trl(args, variant: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from llmtune import models

    ref = models.resolve("embedded:smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(ref.local_dir)
    model = AutoModelForCausalLM.from_pretrained(ref.local_dir, dtype=torch.float32)
    rows = [{"prompt": row["question"], "completion": row["answer"]} for row in rows_needed(args)]
    config = SFTConfig(
        # padding-free without packing cannot truncate: TRL asks for max_length=None there
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch,
        max_length=None if variant == "trl-padding-free" else args.seq,
        max_steps=args.steps, learning_rate=LR, bf16=args.precision == "bf16", use_cpu=args.device == "cpu",
        report_to="none",
        save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
        packing=variant == "trl-packing", padding_free=variant == "trl-padding-free",
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer,
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                target_modules="all-linear"))
    counts = {"tokens": 0, "cells": 0}
    collator = trainer.data_collator

    def counting(examples):
        batch = collator(examples)
        cells = batch["input_ids"].numel()
        mask = batch.get("attention_mask")
        counts["cells"] += cells
        counts["tokens"] += int(mask.sum()) if mask is not None else cells
        return batch

    trainer.data_collator = counting

    class Clock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            counts["start"] = time.perf_counter()

        def on_train_end(self, *_, **__):
            counts["end"] = time.perf_counter()

    trainer.add_callback(Clock())
    trainer.train()
    return {"tokens": counts["tokens"], "seconds": counts["end"] - counts["start"],
            "padded_cells": counts["cells"]}


def model_flops_per_token(seq: int) -> float:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmtune import models

    config = AutoConfig.from_pretrained(models.resolve("embedded:smollm2-135m-instruct").local_dir)
    with torch.device("meta"):
        model = get_peft_model(AutoModelForCausalLM.from_config(config),
                               LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    trainable, total = model.get_nb_trainable_parameters()
    frozen = total - trainable
    attention = 6 * config.num_hidden_layers * config.hidden_size * seq / 2
    return 2 * total + 2 * frozen + 4 * trainable + attention


def matmul_peak(precision: str, device: str) -> float:
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    size = 8192 if device == "cuda" else 2048  # a GPU needs larger matrices to reach its peak
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    best = float("inf")
    for _ in range(10):
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def child(args) -> None:
    from llmtune.models import quiet_libraries

    quiet_libraries()
    with tempfile.TemporaryDirectory() as folder:
        if args.child == "llmtune":
            result = run_llmtune(args, Path(folder))
        elif args.child == "peak":
            result = {"matmul_flops": matmul_peak(args.precision, args.device),
                      "flops_per_token": model_flops_per_token(args.seq)}
        else:
            result = run_trl(args, args.child)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if args.device == "cuda":
        import torch

        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where every variant trains; auto: cuda when torch sees a GPU")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="for every variant: fp32, or bf16 autocast (fp32 weights); auto: what "
                        "llmtune's precision: auto picks here")
    parser.add_argument("--longest", type=int, default=0, metavar="N",
                        help="train every variant on GSM8K's N longest rows only (same batches' lengths)")
    parser.add_argument("--llmtune-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override for the llmtune variant, e.g. train.group_by_length=false")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    import torch

    from llmtune.models import has_fast_bf16

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU here")
    if args.precision == "auto":
        args.precision = "bf16" if has_fast_bf16(args.device) else "fp32"
    # llmtune trains on a GPU whenever torch sees one: hiding them is how every variant runs on cpu
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else None
    results = {}
    for name in ["peak", *args.variants]:
        command = [sys.executable, __file__, "--steps", str(args.steps), "--seq", str(args.seq),
                   "--batch", str(args.batch), "--longest", str(args.longest), "--precision", args.precision,
                   "--device", args.device, "--child", name,
                   *[f"--llmtune-set={item}" for item in args.llmtune_set]]
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            print(f"{name} failed:\n{done.stderr[-3000:]}")
            continue
        results[name] = json.loads(line.removeprefix("RESULT "))
        print(f"{name}: {results[name]}", flush=True)
    peak, per_token = results["peak"]["matmul_flops"], results["peak"]["flops_per_token"]
    gpu = args.device == "cuda"
    print(f"\n{args.device}: {args.precision} matmul peak {peak / 1e9:.1f} GFLOP/s; "
          f"model FLOPs per token {per_token / 1e9:.3f} G")
    print(f"steps {args.steps}, batch {args.batch}, seq {args.seq}, LoRA r16 all-linear, {args.precision}")
    print(f"{'variant':18s} {'tok/s':>8s} {'padding':>8s} {'peak RSS':>9s} {'MFU':>6s}"
          + (f" {'peak GPU':>9s}" if gpu else ""))
    speed = {}
    for name in args.variants:
        if name not in results:
            continue
        r = results[name]
        speed[name] = r["tokens"] / r["seconds"]
        padding = 1 - r["tokens"] / r["padded_cells"] if r["padded_cells"] else 0.0
        mfu = speed[name] * per_token / peak
        print(f"{name:18s} {speed[name]:8.1f} {padding:8.1%} {r['peak_rss_gb']:8.2f}G {mfu:6.1%}"
              + (f" {r['peak_gpu_gb']:8.2f}G" if gpu else ""))
    if "llmtune" in speed:
        for name in speed:
            if name != "llmtune":
                memory = "peak_gpu_gb" if gpu else "peak_rss_gb"
                print(f"llmtune / {name}: tokens/s {speed['llmtune'] / speed[name]:.2f}x, peak "
                      f"{'GPU memory' if gpu else 'RSS'} {results['llmtune'][memory] / results[name][memory]:.2f}x")


if __name__ == "__main__":
    main()
