#!/usr/bin/env python3
"""Training, whole processes side by side: llmtune vs TRL's SFTTrainer on the same rows.

    pip install trl     # the baseline; not a dependency of llmtune
    python scripts/bench_train.py [--rows 64] [--epochs 1] [--format chat] [--precision auto]
                                  [--model FOLDER] [--variants ...] [--device auto] [--data PATH]

Every variant runs as its own process, started from a small launcher so that its peak RSS is
its own, on the same model folder (default: the embedded SmolLM2-135M-Instruct as llmtune
converts it, bf16 on disk: what a bf16 hub model looks like), the same rows (GSM8K's first
--rows, as chats or as prompt/completion; --longest N takes its N longest instead), sequence
length, batch, LoRA (r16, alpha 32, dropout 0, all-linear), learning rate and epochs (or
--steps), on the same device (--device: cuda when there is one; cpu hides the GPUs).

--precision auto: each tool as its defaults load a bf16 folder. llmtune: precision auto (bf16
where the device has native bf16 matmuls, fp32 elsewhere), frozen weights in that dtype,
gradient checkpointing. TRL (given the folder's path): the stored dtype, bf16 autocast and
gradient checkpointing (its defaults since 0.2x). --precision fp32 or bf16: the same for both
(weights and compute), gradient checkpointing on for both.

Printed per variant: whole-process wall time (start, imports, loading, data preparation,
training, saving), training-loop seconds, non-padding tokens per second of training, padding
share, peak RSS (and peak GPU memory allocated by torch on cuda), MFU against the matmul peak
in the benchmark's precision measured in the same run. Model FLOPs per token: 2 x parameters
forward, 2 x frozen parameters backward (input gradients), 4 x trainable parameters backward,
causal attention; gradient checkpointing's recomputation is not counted as useful work.
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
from benchutil import gsm8k_train, measure  # noqa: E402

VARIANTS = ("llmtune", "trl-defaults", "trl-packing", "trl-padding-free")
LR = 2e-4


def rows_needed(args) -> list[dict]:
    """GSM8K's first --rows rows (or its --longest N), as chats or prompt/completion rows."""
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    if args.longest:
        rows = sorted(rows, key=lambda row: len(row["question"]) + len(row["answer"]), reverse=True)
        rows = rows[:args.longest]
    elif args.rows:
        rows = rows[:args.rows]
    if args.format == "chat":
        return [{"messages": [{"role": "user", "content": r["question"]},
                              {"role": "assistant", "content": r["answer"]}]} for r in rows]
    return [{"prompt": r["question"], "completion": r["answer"]} for r in rows]


def run_llmtune(args, folder: Path) -> dict:
    import yaml

    from llmtune.recipe import load_recipe
    from llmtune.stages import collate
    from llmtune.stages.prepare import prepare
    from llmtune.stages.train import train

    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows_needed(args)))
    source = {"path": str(data), "format": args.format}
    recipe_file = folder / "bench.yaml"
    recipe_file.write_text(yaml.safe_dump({
        "name": "bench", "output_dir": str(folder / "runs"),
        "model": {"path": args.model},
        "data": {"train": [source], "validation": {"fraction": 0.0}, "max_seq_len": args.seq, "dedup": False},
        "adapter": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "train": {"epochs": args.epochs, "max_steps": args.steps, "batch_size": args.batch, "lr": LR,
                  "precision": args.precision, "save_every": None},
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
    seconds = summary["train_seconds"]
    return {"tokens": summary["tokens_per_second"] * seconds, "seconds": seconds,
            "trained_tokens": summary["trained_tokens_per_second"] * seconds,
            "padded_cells": padded["cells"], "precision": summary["precision"]}


def run_trl(args, variant: str, folder: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    # Defaults: what TRL does when handed a model folder and nothing else (stored dtype, bf16
    # autocast, gradient checkpointing). Otherwise the benchmark's precision, for both tools.
    settings = {}
    if args.precision != "auto":
        settings = {"bf16": args.precision == "bf16", "gradient_checkpointing": True,
                    "model_init_kwargs": {"dtype": {"fp32": "float32", "bf16": "bfloat16"}[args.precision]}}
    config = SFTConfig(
        # padding-free without packing cannot truncate: TRL asks for max_length=None there
        output_dir=str(folder / "trl"), per_device_train_batch_size=args.batch,
        max_length=None if variant == "trl-padding-free" else args.seq,
        num_train_epochs=args.epochs, max_steps=args.steps or -1, learning_rate=LR,
        use_cpu=args.device == "cpu", report_to="none", save_strategy="no", logging_steps=1,
        disable_tqdm=True, seed=0, packing=variant == "trl-packing",
        padding_free=variant == "trl-padding-free", **settings,
    )
    trainer = SFTTrainer(model=args.model, args=config, train_dataset=Dataset.from_list(rows_needed(args)),
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                target_modules="all-linear"))
    counts = {"tokens": 0, "cells": 0, "trained": 0}
    collator = trainer.data_collator

    def counting(examples):
        batch = collator(examples)
        cells = batch["input_ids"].numel()
        mask = batch.get("attention_mask")
        counts["cells"] += cells
        counts["tokens"] += int(mask.sum()) if mask is not None else cells
        counts["trained"] += int((batch["labels"] != -100).sum())
        return batch

    trainer.data_collator = counting

    class Clock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            counts["start"] = time.perf_counter()

        def on_train_end(self, *_, **__):
            counts["end"] = time.perf_counter()

    trainer.add_callback(Clock())
    trainer.train()
    trainer.save_model(str(folder / "trl" / "adapter"))  # as llmtune saves its adapter
    precision = "bf16" if config.bf16 else "fp16" if config.fp16 else "fp32"
    return {"tokens": counts["tokens"], "seconds": counts["end"] - counts["start"],
            "trained_tokens": counts["trained"], "padded_cells": counts["cells"],
            "precision": f"{precision}, weights {next(trainer.model.parameters()).dtype}".replace("torch.", "")}


def model_flops_per_token(model: str, seq: int) -> float:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        peft_model = get_peft_model(AutoModelForCausalLM.from_config(config),
                                    LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    trainable, total = peft_model.get_nb_trainable_parameters()
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
            from llmtune import models

            result = {"matmul_flops": matmul_peak(args.peak_precision, args.device),
                      "flops_per_token": model_flops_per_token(args.model, args.seq),
                      "llmtune_precision": models.precision("auto", args.device)}
        else:
            result = run_trl(args, args.child, Path(folder))
    if args.device == "cuda":
        import torch

        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64, help="GSM8K's first N rows (0: all)")
    parser.add_argument("--longest", type=int, default=0, metavar="N", help="GSM8K's N longest rows instead")
    parser.add_argument("--format", choices=["chat", "completion"], default="chat")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps instead of --epochs")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--model", help="a transformers model folder (default: the embedded model, bf16)")
    parser.add_argument("--data", help="GSM8K train.jsonl (default: the slice in tests/data/gsm8k)")
    parser.add_argument("--variants", nargs="+", default=["llmtune", "trl-defaults"], choices=VARIANTS)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where every variant trains; auto: cuda when torch sees a GPU")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto: each tool's defaults; fp32 or bf16: the same for both")
    parser.add_argument("--llmtune-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override for the llmtune variant, e.g. train.group_by_length=false")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--peak-precision", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    args.data = str(gsm8k_train(args.data))
    if args.model is None:
        from llmtune import model_sources

        args.model = str(model_sources.resolve("embedded:smollm2-135m-instruct").local_dir)
    if args.device == "auto":
        args.device = "cuda" if _cuda_available() else "cpu"
    # llmtune trains on a GPU whenever torch sees one: hiding them is how every variant runs on cpu
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else None
    passed = ["--rows", str(args.rows), "--longest", str(args.longest), "--format", args.format,
              "--epochs", str(args.epochs), "--seq", str(args.seq), "--batch", str(args.batch),
              "--model", args.model, "--data", args.data, "--precision", args.precision, "--device", args.device,
              *(["--steps", str(args.steps)] if args.steps else []),
              *[f"--llmtune-set={item}" for item in args.llmtune_set]]
    results = {}
    # MFU against the matmul peak in the precision training computes in: auto is bf16 where it is
    # native (a CPU without native bf16 emulates it, and its "peak" took minutes to measure)
    peak_precision = args.precision
    if peak_precision == "auto":
        from llmtune.models import precision

        peak_precision = precision("auto", args.device) if args.device == "cpu" else "bf16"
    for name in ["peak", *args.variants]:
        extra = ["--peak-precision", peak_precision] if name == "peak" else []
        command = [sys.executable, __file__, *passed, "--child", name, *extra]
        try:
            done = measure(command, Path.cwd(), env)
        except SystemExit as failed:
            print(f"{name} failed: {str(failed)[-3000:]}")
            continue
        line = next(line for line in done.output.splitlines() if line.startswith("RESULT "))
        results[name] = {**json.loads(line.removeprefix("RESULT ")), "wall": done.seconds,
                         "peak_rss_gb": done.peak_rss_gb}
        print(f"{name}: {results[name]}", flush=True)
    report(args, results)


def report(args, results: dict) -> None:
    peak, per_token = results["peak"]["matmul_flops"], results["peak"]["flops_per_token"]
    gpu = args.device == "cuda"
    what = (f"first {args.rows} rows" if args.rows and not args.longest else
            f"{args.longest} longest rows" if args.longest else "all rows")
    print(f"\n{args.device}: matmul peak {peak / 1e9:.1f} GFLOP/s "
          f"({'bf16' if args.precision == 'auto' else args.precision}); model FLOPs per token {per_token / 1e9:.3f} G")
    print(f"model {args.model}; GSM8K {what} as {args.format}, "
          f"{f'{args.steps} steps' if args.steps else f'{args.epochs:g} epoch(s)'}, batch {args.batch}, "
          f"seq {args.seq}, LoRA r16 all-linear, precision {args.precision}")
    print("| variant | precision | wall time | train s | tok/s | trained tok/s | padding | peak RSS | MFU |"
          + (" peak GPU |" if gpu else ""))
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else ""))
    speed = {}
    for name in args.variants:
        if name not in results:
            continue
        r = results[name]
        speed[name] = r["tokens"] / r["seconds"]
        padding = 1 - r["tokens"] / r["padded_cells"] if r["padded_cells"] else 0.0
        print(f"| {name} | {r['precision']} | {r['wall']:.1f} s | {r['seconds']:.1f} | {speed[name]:.1f} | "
              f"{r['trained_tokens'] / r['seconds']:.1f} | {padding:.1%} | {r['peak_rss_gb']:.2f} GB | "
              f"{speed[name] * per_token / peak:.1%} |" + (f" {r['peak_gpu_gb']:.2f} GB |" if gpu else ""))
    if "llmtune" in speed:
        memory = "peak_gpu_gb" if gpu else "peak_rss_gb"
        for name in speed:
            if name != "llmtune":
                print(f"llmtune / {name}: wall time {results[name]['wall'] / results['llmtune']['wall']:.2f}x "
                      f"faster, tokens/s {speed['llmtune'] / speed[name]:.2f}x, peak "
                      f"{'GPU memory' if gpu else 'RSS'} {results['llmtune'][memory] / results[name][memory]:.2f}x")


def _cuda_available() -> bool:
    code = "import torch; print(torch.cuda.is_available())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "True"


if __name__ == "__main__":
    main()
