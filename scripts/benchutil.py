"""What the benchmarks share: where GSM8K is, and a process's own wall time and peak RSS.

The full GSM8K is not shipped: pass `--data` pointing at its `train.jsonl`. Without it, the
benchmarks run on the 1,000-row slice the tests ship (tests/data/gsm8k) and say so, so a fresh
clone can run them; figures in docs/benchmarks.md name the data they were measured on.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SLICE = Path(__file__).resolve().parent.parent / "tests" / "data" / "gsm8k" / "train.jsonl"
WHERE = ("the whole GSM8K train split (7,473 rows, MIT): https://github.com/openai/grade-school-math "
         "(grade_school_math/data/train.jsonl) or https://huggingface.co/datasets/openai/gsm8k")


def gsm8k_train(path: str | None) -> Path:
    """`--data`, checked; or the shipped slice, with a note on where the whole set is."""
    if path is None:
        print(f"data: the 1,000-row GSM8K slice in {SLICE.relative_to(SLICE.parents[3])}; for {WHERE}, "
              "pass --data PATH", file=sys.stderr)
        return SLICE
    if not Path(path).is_file():
        sys.exit(f"--data {path}: no such file; get {WHERE}")
    return Path(path)


# Linux counts the RSS a process had before exec() into its peak (ru_maxrss), so the process
# measured is started by this small launcher, not by the benchmark (which may hold gigabytes).
LAUNCHER = ("import os, subprocess, sys\n"
            "process = subprocess.Popen(sys.argv[1:])\n"
            "_, status, usage = os.wait4(process.pid, 0)\n"
            "print(f'PEAK_RSS_KIB {usage.ru_maxrss}', flush=True)\n"
            "sys.exit(os.waitstatus_to_exitcode(status))\n")


@dataclass
class Measured:
    seconds: float  # wall time, start to exit
    peak_rss_gb: float  # the process's own peak resident memory
    peak_gpu_gb: float | None  # the GPUs' memory in use at its peak, above what it was before (NVML)
    output: str


def measure(command: list[str], cwd: Path, env: dict | None = None) -> Measured:
    """Run one process and measure it; exits with its output if it fails."""
    gpu = _GpuMemory()
    start = time.perf_counter()
    with gpu:
        done = subprocess.run([sys.executable, "-c", LAUNCHER, *command], cwd=cwd, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-4000:]}")
    output, _, peak = done.stdout.rpartition("PEAK_RSS_KIB ")
    return Measured(seconds, int(peak) * 1024 / 1e9, gpu.peak_gb, output)


def child_result(command: list[str], env: dict | None = None) -> dict:
    """Run a benchmark's child process (measured); its `RESULT {json}` line, with its wall time
    (`wall`) and peak RSS in GB (`rss`)."""
    import json

    done = measure(command, Path.cwd(), env)
    line = next(line for line in done.output.splitlines() if line.startswith("RESULT "))
    return {**json.loads(line.removeprefix("RESULT ")), "wall": done.seconds, "rss": done.peak_rss_gb}


class _GpuMemory:
    """Samples the memory in use on every GPU (NVML, every 20 ms) while a process runs; its peak
    above the level before it started. None without nvidia-ml-py or a GPU."""

    def __init__(self):
        self.peak_gb = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self.pynvml = pynvml if self.handles else None
        except Exception:  # no library, no driver, no GPU
            self.pynvml = None
        # without nvidia-ml-py, the driver's own nvidia-smi (slower to ask: sampled less often)
        self.smi = self.pynvml is None and _nvidia_smi_used() is not None

    def _used(self) -> int:
        if self.pynvml is None:
            return _nvidia_smi_used() or 0
        return sum(self.pynvml.nvmlDeviceGetMemoryInfo(h).used for h in self.handles)

    def __enter__(self):
        if self.pynvml is not None or self.smi:
            self.base, self.top, self.running = self._used(), 0, True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.top = max(self.top, self._used())
            time.sleep(0.2 if self.smi else 0.02)

    def __exit__(self, *exc):
        if self.pynvml is not None or self.smi:
            self.running = False
            self.thread.join()
            self.peak_gb = max(self.top - self.base, 0) / 1e9


def _nvidia_smi_used() -> int | None:
    """Bytes in use on every GPU, from nvidia-smi; None without it."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return sum(int(line) for line in done.stdout.split()) * 2**20
