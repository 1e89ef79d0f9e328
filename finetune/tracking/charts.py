"""Charts logged with a run: where the predicted memory goes, and the loss curves.

matplotlib with the Agg backend (no display needed); small PNGs that the MLflow UI shows
in the artifact view.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

GiB = 1 << 30


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def memory_breakdown(plan: dict[str, Any], path: Path) -> Path:
    """A stacked bar of the plan's predicted peak by part, beside the budget (and the measured peak)."""
    plt = _pyplot()
    parts = sorted(((k, v / GiB) for k, v in plan["breakdown_bytes"].items() if v > 0), key=lambda kv: -kv[1])
    fig, ax = plt.subplots(figsize=(8, 3.2))
    left = 0.0
    colors = plt.get_cmap("tab20").colors
    for i, (name, gib) in enumerate(parts):
        ax.barh(["predicted"], [gib], left=left, color=colors[i % len(colors)], label=f"{name} {gib:.2f}")
        left += gib
    measured = plan.get("measured") or {}
    if measured.get("peak_reserved_bytes"):
        ax.barh(["measured"], [measured["peak_reserved_bytes"] / GiB], color="grey", label="measured reserved")
    ax.axvline(plan["budget_bytes"] / GiB, color="red", linestyle="--", label=f"budget {plan['budget_bytes'] / GiB:.1f}")
    c = plan["choices"]
    ax.set_title(f"{plan['model']['name']}: {c['quantization']}, micro-batch {c['micro_batch_size']}, "
                 f"seq {c['max_seq_len']}, checkpointing {'on' if c['gradient_checkpointing'] else 'off'}", fontsize=9)
    ax.set_xlabel("GiB")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loss_curves(train: list[tuple[int, float]], evals: list[tuple[int, float]], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], label="train loss", linewidth=1)
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def reward_curves(history: dict[str, list[tuple[int, float]]], path: Path) -> Path:
    """GRPO: the mean reward of each step's sampled completions, the weighted total and each function's."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for name, points in sorted(history.items(), key=lambda kv: kv[0] != "reward"):
        ax.plot([s for s, _ in points], [v for _, v in points], label="total" if name == "reward" else name,
                linewidth=2 if name == "reward" else 1)
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
