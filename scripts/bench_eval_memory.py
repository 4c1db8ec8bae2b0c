#!/usr/bin/env python3
"""Evaluation's memory on a 1B-shaped model, each way in a process of its own (peak RSS):

    python scripts/bench_eval_memory.py [--work /tmp/llmtune-bench-1b] [--batch 8] [--tokens 1024]

1. The eval loss of a batch (bf16 weights, no gradients): the final hidden states taken from
   output_hidden_states=True (every layer's output kept for the whole batch: what llmtune did)
   against the decoder's output by a hook (loss.final_hidden_states: what it does now), both
   chunked over the vocabulary.
2. A QLoRA adapter evaluated on its base in bf16 (what eval did) against the base quantized nf4
   as trained (inference.adapter_on_base now), same loss computation.

The model is scripts/bench_stages.py's random Llama-3.2-shaped 1B (8 layers here, where the real
one has 16: the per-layer cost of (1) is half of a real 1B's).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from benchutil import child_result, gsm8k_train  # noqa: E402

WAYS = ("hidden-states", "hook", "qlora-float-base", "qlora-nf4-base")


def child(args) -> None:
    import torch

    from llmtune import models
    from llmtune.data.chat import IGNORE
    from llmtune.stages import loss

    models.quiet_libraries()
    torch.manual_seed(0)
    ids = torch.randint(0, 8000, (args.batch, args.tokens))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    if args.child.startswith("qlora"):
        from peft import LoraConfig, get_peft_model

        quantize = "nf4" if args.child.endswith("nf4-base") else "none"
        base = models.load_model(args.model, "bf16", quantize=quantize, compute_dtype="bfloat16", device="cpu")
        model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")).eval()
    else:
        model = models.load_model(args.model, "bf16", device="cpu").eval()
    if args.child == "hidden-states":  # what loss.summed_token_loss did before
        def final_hidden_states(model, forward):
            nothing = torch.empty(0, dtype=torch.long)
            outputs = model(**forward, output_hidden_states=True, logits_to_keep=nothing)
            return outputs.hidden_states[-1], outputs

        loss.final_hidden_states = final_hidden_states
    with torch.no_grad():
        summed, count, _ = loss.summed_token_loss(model, batch)
    assert count == int((batch["labels"][:, 1:] != IGNORE).sum())
    print("RESULT " + json.dumps({"loss": float(summed) / count}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/llmtune-bench-1b"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--child", choices=WAYS, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    from bench_stages import build_model

    model = build_model(args.work / "model", gsm8k_train(None))
    sizes = ["--batch", str(args.batch), "--tokens", str(args.tokens), "--model", str(model)]
    results = {way: child_result([sys.executable, __file__, "--child", way, *sizes]) for way in WAYS}
    print(f"\n1B-shaped model, bf16, eval loss of {args.batch} x {args.tokens} tokens, peak RSS per process")
    print("| way | peak RSS | loss |")
    print("|---|---|---|")
    for way, result in results.items():
        print(f"| {way} | {result['rss']:.2f} GB | {result['loss']:.4f} |")
    saved = results["hidden-states"]["rss"] - results["hook"]["rss"]
    print(f"\nthe hook saves {saved:.2f} GB ({results['hook']['rss'] / results['hidden-states']['rss']:.2f}x); "
          f"nf4 base vs bf16 base: {results['qlora-nf4-base']['rss'] / results['qlora-float-base']['rss']:.2f}x")


if __name__ == "__main__":
    main()
