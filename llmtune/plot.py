"""Training curves: adapter/metrics.jsonl rendered to a PNG (train loss, eval loss, lr; the reward
margin for preference objectives, the mean reward for grpo)."""

from __future__ import annotations

import json
from pathlib import Path

from llmtune.errors import InputError


def plot_metrics(metrics_path: Path, png_path: Path) -> Path:
    try:
        import matplotlib
    except ImportError:  # a dependency, but a bare GPU image may lack it: training still counts
        raise InputError("training curves need matplotlib, which is not installed",
                         hint="pip install matplotlib, then: llmtune plot RUN_DIR") from None

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    if not metrics_path.is_file():
        raise InputError(f"{metrics_path}: no training metrics", hint="train first: llmtune train RECIPE")
    entries = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [e for e in entries if "loss" in e]
    evals = [e for e in entries if "eval_loss" in e]
    figure, loss_axis = plt.subplots(figsize=(8, 4.5), dpi=100)
    loss_axis.plot([e["step"] for e in train], [e["loss"] for e in train], label="train loss")
    if evals:
        loss_axis.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], "o--",
                       label="eval loss")
    margins = [e for e in train if "reward_margin" in e]
    if margins:  # preference objectives: how far the chosen answers' reward is above the rejected
        loss_axis.plot([e["step"] for e in margins], [e["reward_margin"] for e in margins], color="tab:green",
                       label="reward margin (chosen - rejected)")
    rewards = [e for e in train if "reward_mean" in e]
    if rewards:  # grpo: the mean reward of each step's completions
        loss_axis.plot([e["step"] for e in rewards], [e["reward_mean"] for e in rewards], color="tab:purple",
                       label="mean reward")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("loss, margin" if margins else "loss, reward" if rewards else "loss")
    lr_axis = loss_axis.twinx()
    lr_axis.plot([e["step"] for e in train], [e.get("lr") or 0 for e in train], color="grey",
                 alpha=0.5, label="learning rate")
    lr_axis.set_ylabel("learning rate")
    lines = loss_axis.get_legend_handles_labels()
    more = lr_axis.get_legend_handles_labels()
    loss_axis.legend(lines[0] + more[0], lines[1] + more[1], loc="upper right")
    loss_axis.set_title(f"training curves ({metrics_path.parent.parent.name})")
    figure.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png_path)
    plt.close(figure)
    return png_path
