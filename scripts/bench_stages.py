#!/usr/bin/env python3
"""Every stage on a ~1B model on this machine: wall time and peak RSS against the weights' size.

    python scripts/bench_stages.py [--work /tmp/llmtune-bench-1b] [--steps 8] [--data PATH]

Builds (once, under --work) a random model shaped like Llama 3.2 where memory is concerned:
hidden 2048, 8 layers, 32 heads (8 KV heads), MLP 8192, 128,256 vocabulary, untied output head,
llama3 rope scaling, bf16 on disk, no pad token, end-of-turn ids [end_of_text, eom, eot], the
Llama-3-shaped test tokenizer (llmtune.testing) — 1.01B parameters, 2.02 GB in bf16, 4.05 GB
in fp32. Then runs each command as its own process and reads that process's peak RSS (wait4):
prepare (GSM8K chats), plan, train (LoRA r16 all-linear, batch 2 x 256 tokens, defaults
otherwise: precision auto, gradient checkpointing), merge (merge.dtype auto), export (hf, and
gguf q8_0), the GGUF check on its own (random weights make its figures meaningless), eval, then
`llmtune run` (every stage up to date; it makes the preview) and `llmtune run` again (nothing
left to do), and the
conversion of that model, written as an f16 GGUF file, into a base model (--gguf). Prints a
markdown table for docs/benchmarks.md, with plan's estimate beside train's measured peak.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from benchutil import gsm8k_train, measure  # noqa: E402

SHAPE = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 8, "num_attention_heads": 32,
         "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "tie_word_embeddings": False}
# --small: the same structure at a size that runs in seconds on a CPU (the GPU check's dry run)
SMALL = {**SHAPE, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 8192}


def build_model(folder: Path, data: Path, shape: dict = SHAPE) -> Path:
    """The 1B model (random weights, seed 0) with byte-level BPE learnt from `data`, written once."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from llmtune.testing import build_llama3_tokenizer

    rows = [json.loads(line) for line in data.read_text().splitlines()]
    tokenizer = build_llama3_tokenizer([r["question"] + "\n" + r["answer"] for r in rows], vocab_size=8192)
    ends = [tokenizer.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
    # the vocabulary holds the tokenizer's special tokens too (its BPE stops at 8192 ids)
    shape = {**shape, "vocab_size": max(shape["vocab_size"], len(tokenizer))}
    config = LlamaConfig(**shape, max_position_embeddings=131072, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=ends, dtype="bfloat16",
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192})
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=ends)
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(partial, max_shard_size="1GB")
    tokenizer.save_pretrained(partial)
    partial.rename(folder)
    return folder


def write_recipe(work: Path, model: Path, data: Path, steps: int) -> Path:
    import yaml

    rows = [json.loads(line) for line in data.read_text().splitlines()[:80]]
    chats = work / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["question"]},
                                                      {"role": "assistant", "content": r["answer"]}]}) + "\n"
                             for r in rows))
    recipe = work / "bench-1b.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "bench-1b", "output_dir": str(work / "runs"),
        "model": {"path": str(model)},
        "data": {"train": [{"path": str(chats), "format": "chat"}], "validation": {"fraction": 0.1},
                 "max_seq_len": 256},
        "adapter": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "train": {"max_steps": steps, "batch_size": 2},
        "export": {"formats": ["hf", "gguf"], "gguf": {"quant": "q8_0"}},
        "preview": {"count": 2, "show": 0, "max_new_tokens": 16},
        "eval": {"max_samples": 4, "max_new_tokens": 16, "batch_size": 4},
    }, sort_keys=False))
    return recipe


GGUF_CHECK = """
from pathlib import Path
from llmtune import models
from llmtune.manifest import read_manifest
from llmtune.stages.export import gguf_check_precision
from llmtune.stages.export.gguf_verify import verify_gguf
from llmtune.stages.merge.check import check_rows
models.quiet_libraries()
run = Path({run!r})
rows = check_rows(run / "adapter", read_manifest(run / "adapter"), 8, 256)
model = models.load_model(run / "merged", gguf_check_precision(run / "merged")).eval()
print(verify_gguf(run / "exported" / "gguf" / "bench-1b-q8_0.gguf", model, models.load_tokenizer(run / "merged"), rows))
"""


def convert_gguf_command(gguf_file: Path) -> list[str]:
    code = ("import sys; from llmtune import model_sources, models; models.quiet_libraries(); "
            f"model_sources.resolve({str(gguf_file)!r})")
    return [sys.executable, "-c", code]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/llmtune-bench-1b"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--data", help="GSM8K train.jsonl (default: the slice in tests/data/gsm8k)")
    parser.add_argument("--gguf", action="store_true", help="also time converting an f16 GGUF of it into a base")
    parser.add_argument("--small", action="store_true", help="a small model of the same structure (a dry run)")
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    data = gsm8k_train(args.data)
    start = time.perf_counter()
    model = build_model(args.work / ("model-small" if args.small else "model"), data, SMALL if args.small else SHAPE)
    print(f"model: {model} ({time.perf_counter() - start:.0f} s)", flush=True)
    weights = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    recipe = write_recipe(args.work, model, data, args.steps)
    llmtune = [sys.executable, "-m", "llmtune"]
    rows = []
    run = args.work / "runs" / "bench-1b"
    stages = {
        "prepare": ["prepare", "--force"],
        "plan": ["plan", "--json"],
        "train": ["train", "--force"],
        "merge": ["merge", "--force"],
        # random weights leave near-ties everywhere, and the tokenizer is not one llama.cpp
        # knows: the check's figures mean nothing here, so it is timed on its own below
        "export (hf, gguf q8_0 unchecked)": ["export", "--force", "--no-verify"],
        "GGUF check (llama.cpp vs transformers)": None,
        "eval": ["eval", "--force"],
        "run (up to date; makes the preview)": ["run", "--no-verify"],
        "run again (nothing to do)": ["run", "--no-verify"],
    }
    if importlib.util.find_spec("llama_cpp") is None:
        del stages["GGUF check (llama.cpp vs transformers)"]
        print("GGUF check: skipped, llama-cpp-python is not installed", flush=True)
    for stage, command in stages.items():
        command = ([*llmtune, command[0], str(recipe), *command[1:]] if command
                   else [sys.executable, "-c", GGUF_CHECK.format(run=str(run))])
        done = measure(command, args.work)
        rows.append((stage, done))
        print(f"{stage}: {done.seconds:.1f} s, peak RSS {done.peak_rss_gb:.2f} GB"
              + (f", peak GPU memory {done.peak_gpu_gb:.2f} GB" if done.peak_gpu_gb is not None else ""), flush=True)
        if stage == "plan":
            plan = json.loads(done.output[done.output.index("{"):])
    if args.gguf:
        from llmtune.stages.export.gguf_write import write_gguf

        gguf_file = args.work / "model-f16.gguf"
        if not gguf_file.is_file():
            write_gguf(model, gguf_file, "f16", "bench-1b")
        env = {**os.environ, "LLMTUNE_CACHE": str(args.work / f"cache-{os.getpid()}")}
        done = measure(convert_gguf_command(gguf_file), args.work, env)
        rows.append(("convert GGUF base (f16)", done))
        print(f"convert: {done.seconds:.1f} s, peak RSS {done.peak_rss_gb:.2f} GB", flush=True)
    floor = measure([sys.executable, "-c", "import torch, transformers, peft, datasets"], args.work).peak_rss_gb

    gpu = any(done.peak_gpu_gb is not None for _, done in rows)
    size = weights / 1e9
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores; weights {size:.2f} GB "
          f"bf16 ({2 * size:.2f} GB fp32); imports alone peak at {floor:.2f} GB")
    print("| stage | wall time | peak RSS | peak RSS / bf16 weights |" + (" peak GPU memory |" if gpu else ""))
    print("|---|---|---|---|" + ("---|" if gpu else ""))
    for stage, done in rows:
        print(f"| {stage} | {done.seconds:.1f} s | {done.peak_rss_gb:.2f} GB | {done.peak_rss_gb / size:.2f}x |"
              + (f" {done.peak_gpu_gb or 0:.2f} GB |" if gpu else ""))
    estimate = plan["memory_bytes"]["total"] / 1e9
    train = next(done for stage, done in rows if stage == "train")
    measured = train.peak_gpu_gb if gpu else train.peak_rss_gb
    print(f"\nplan's estimate for train ({plan['precision']}, {plan['micro_batch']}): {estimate:.2f} GB; "
          f"measured {measured:.2f} GB ({'GPU' if gpu else 'RSS'}); estimate/measured {estimate / measured:.2f}")
    evaluation = next(done for stage, done in rows if stage == "eval")
    eval_measured = evaluation.peak_gpu_gb if gpu else evaluation.peak_rss_gb
    eval_estimate = plan["eval_memory_bytes"]["total"] / 1e9
    print(f"plan's estimate for eval: {eval_estimate:.2f} GB; measured {eval_measured:.2f} GB; "
          f"estimate/measured {eval_estimate / eval_measured:.2f}")
    print("GB = 10^9 bytes.")


if __name__ == "__main__":
    main()
