#!/usr/bin/env python3
"""Evaluation's memory on a 1B-shaped model, each way in a process of its own (peak RSS):

    python scripts/bench_eval_memory.py [--work /tmp/llmtune-bench-1b] [--batch 8] [--tokens 1024]

1. The eval loss of a batch (weights in precision auto's dtype, no gradients): the final
   hidden states taken from output_hidden_states=True (every layer's output kept for the whole
   batch: what llmtune did) against the decoder's output by a hook (loss.final_hidden_states:
   what it does now), both chunked over the vocabulary.
2. A QLoRA adapter evaluated on its float base (what eval did) against the base quantized nf4
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
    from llmtune.stages.train import loss

    models.quiet_libraries()
    torch.manual_seed(0)
    ids = torch.randint(0, 8000, (args.batch, args.tokens))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    if args.child.startswith("qlora"):
        from peft import LoraConfig, get_peft_model

        quantize = "nf4" if args.child.endswith("nf4-base") else "none"
        base = models.load_model(args.model, models.precision("auto"), quantize=quantize, device="cpu")
        model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")).eval()
    else:
        model = models.load_model(args.model, models.precision("auto"), device="cpu").eval()
    if args.child == "hidden-states":  # what loss.summed_token_loss did before
        def final_hidden_states(model, forward):
            nothing = torch.empty(0, dtype=torch.long)
            outputs = model(**forward, output_hidden_states=True, logits_to_keep=nothing)
            return outputs.hidden_states[-1], outputs

        loss.final_hidden_states = final_hidden_states
    loaded = _rss("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
    with torch.no_grad():
        summed, count, _ = loss.summed_token_loss(model, batch)
    assert count == int((batch["labels"][:, 1:] != IGNORE).sum())
    print("RESULT " + json.dumps({"loss": float(summed) / count, "loaded": loaded,
                                  "during_loss": _rss("VmHWM") - loaded}), flush=True)


def _rss(field: str) -> float:
    """This process's resident memory (VmRSS) or its peak since the last reset (VmHWM), in GB."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) * 1024 / 1e9


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
    print(f"\n1B-shaped model, precision auto, eval loss of {args.batch} x {args.tokens} tokens")
    print("| way | model loaded (RSS) | more during the loss (peak) | process peak RSS | loss |")
    print("|---|---|---|---|---|")
    for way, r in results.items():
        print(f"| {way} | {r['loaded']:.2f} GB | {r['during_loss']:.2f} GB | {r['rss']:.2f} GB | {r['loss']:.4f} |")
    hidden, hook = results["hidden-states"]["during_loss"], results["hook"]["during_loss"]
    float_base, nf4 = (results[way]["loaded"] + results[way]["during_loss"] for way in ("qlora-float-base", "qlora-nf4-base"))
    print(f"\nduring the loss, the hook needs {hook:.2f} GB where output_hidden_states needed {hidden:.2f} GB "
          f"({hook / hidden:.2f}x); a QLoRA adapter on the nf4 base: {nf4:.2f} GB at the loss's peak against "
          f"{float_base:.2f} GB on the float base ({nf4 / float_base:.2f}x)")


if __name__ == "__main__":
    main()
