#!/usr/bin/env python3
"""Peak memory and step time of the standard vs the chunked training loss, side by side.

    python scripts/bench_loss.py [--batch 8] [--seq 512] [--steps 3]

Each variant runs in its own subprocess (so peak RSS is its own): the embedded SmolLM2 with a
LoRA r16 all-linear adapter, fp32, one AdamW step per iteration on random tokens, every position
trained. Prints seconds per step and peak RSS, and the chunked/standard ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(variant: str, batch: int, seq: int, steps: int) -> dict:
    import types

    import torch
    from peft import LoraConfig, get_peft_model

    from llmtune import model_sources, models
    from llmtune.stages.train.trainer import ChunkedLossTrainer

    models.quiet_libraries()
    torch.manual_seed(0)
    base = models.load_model(model_sources.resolve("embedded:smollm2-135m-instruct"), "fp32")
    base.config.use_cache = False
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, base.config.vocab_size, (batch, seq))
    batch_inputs = {"input_ids": ids, "labels": ids.clone()}
    trainer = types.SimpleNamespace()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        if variant == "chunked":
            loss = ChunkedLossTrainer.compute_loss(trainer, model, dict(batch_inputs))
        else:
            loss = model(**batch_inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "seconds_per_step": min(times[1:] or times), "peak_rss_gb": peak_kib / 1024**2,
            "loss": float(loss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(one(args.variant, args.batch, args.seq, args.steps)))
        return
    results = {}
    for variant in ("standard", "chunked"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--batch", str(args.batch),
                              "--seq", str(args.seq), "--steps", str(args.steps)],
                             capture_output=True, text=True, check=True)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[variant]
        print(f"{variant:9s} {r['seconds_per_step']:.2f} s/step  peak RSS {r['peak_rss_gb']:.2f} GB  loss {r['loss']:.4f}")
    s, c = results["standard"], results["chunked"]
    print(f"chunked/standard: time {c['seconds_per_step'] / s['seconds_per_step']:.2f}x, "
          f"peak RSS {c['peak_rss_gb'] / s['peak_rss_gb']:.2f}x  (batch {args.batch} x seq {args.seq})")


if __name__ == "__main__":
    main()
