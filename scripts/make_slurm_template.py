"""Writes scripts/slurm/llmtune.sbatch: the script `llmtune slurm` generates, with placeholder
settings, for people who write their own (tests/test_cluster.py checks it is current)."""

from pathlib import Path

from llmtune.cluster import TEMPLATE_JOB, sbatch_script

target = Path(__file__).resolve().parent / "slurm" / "llmtune.sbatch"
target.write_text(sbatch_script(TEMPLATE_JOB), encoding="utf-8")
target.chmod(0o755)
print(f"wrote {target}")
