"""DataReport: what the data stage read, kept, rejected and produced (data_report.json), and its histogram.

Every row read is accounted for: ``rows_read == rows_kept + rows_rejected +
duplicates``. ``tokens`` describes the kept examples (the preflight plans for
``tokens.max``); ``packing`` says whether training rows are packed and how full.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 2


@dataclass
class TokenStats:
    total: int = 0  # tokens in all kept examples (train + eval), each counted once
    trained: int = 0  # of those, tokens with a label (the loss is computed on these)
    p50: int = 0  # example lengths, nearest-rank percentiles
    p95: int = 0
    p99: int = 0
    max: int = 0
    mean: float = 0.0
    train_total: int = 0  # tokens in the training split as trained (after dataset.sources weights)


@dataclass
class PackingStats:
    requested: bool = False  # dataset.packing
    enabled: bool = False  # training rows are packed (padding-free); false: padded batches
    reason: str = ""
    architecture: str | None = None  # the model's model_type
    rows: int = 0  # packed training rows (0 when not packed)
    row_tokens_max: int = 0  # the longest training row (a packed row, or the longest training example)
    # Non-pad share of the training rows: tokens / (rows x max_seq_len) when packed; when not packed,
    # what packing would give (so the report says what dataset.packing=true would buy).
    efficiency: float = 0.0
    # Non-pad share of padded micro-batches of 8 examples in shuffled order (what unpacked training pads to).
    padded_efficiency: float = 0.0


@dataclass
class SourceStats:
    path: str
    format: str
    weight: float = 1.0
    rows_read: int = 0
    rows_kept: int = 0
    rows_rejected: int = 0
    duplicates: int = 0
    train_rows: int = 0  # kept rows on the training side (before the weight)
    eval_rows: int = 0
    train_examples: int = 0  # training examples after the weight (blocks, for text)
    weight_dropped: int = 0  # training rows left out by a weight below 1 (counted, not rejected)


@dataclass
class DataReport:
    source: str
    format: str  # the format used (for auto: the detected one; "mixed" for sources of several formats)
    format_detected: bool
    chat_template: str
    masking: str = "markers"  # how the loss mask was derived: markers | prefixes | none (text only)
    rows_read: int = 0
    rows_kept: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count
    rejected_examples: list[dict[str, str]] = field(default_factory=list)  # location, reason, detail
    duplicates: int = 0
    truncated: int = 0  # rows cut to max_seq_len (dataset.length_policy: truncate)
    train_rows: int = 0  # training examples (after weights; for text corpora: max_seq_len blocks)
    eval_rows: int = 0  # held-out examples
    max_seq_len: int = 0
    length_policy: str = "drop"
    tokens: TokenStats = field(default_factory=TokenStats)
    packing: PackingStats = field(default_factory=PackingStats)
    sources: list[SourceStats] = field(default_factory=list)
    documents: int = 0  # text corpora: documents kept
    files_skipped: list[dict[str, str]] = field(default_factory=list)  # files in a directory that are not data
    # special tokens of the model's tokenizer that loading fixed (finetune.models.loader.fix_special_tokens),
    # and the pad token it chose when the tokenizer had none distinct from its end tokens
    tokenizer_fixes: list[str] = field(default_factory=list)
    # dataset.multi_turn: the setting, how many conversations each policy applied to (whole: one example
    # with every answer; split: one example per answer; last; full), the examples splitting made and the
    # tokens they repeat (each answer's prefix again: the cost of split)
    multi_turn: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    cache_hit: bool = False
    seconds: float = 0.0  # time to prepare (or to load from the cache)
    schema_version: int = SCHEMA_VERSION

    @property
    def rows_rejected(self) -> int:
        return sum(self.rejected.values())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rows_rejected"] = self.rows_rejected
        return d

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataReport:
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["tokens"] = TokenStats(**d.get("tokens", {}))
        kwargs["packing"] = PackingStats(**d.get("packing", {}))
        kwargs["sources"] = [SourceStats(**s) for s in d.get("sources", [])]
        return cls(**kwargs)

    def summary(self) -> str:
        """Rejections by reason, for errors and logs."""
        return ", ".join(f"{reason}: {n}" for reason, n in sorted(self.rejected.items()))


def percentile(sorted_values, q: float) -> int:
    """Nearest-rank percentile of an ascending sequence (0 for an empty one)."""
    n = len(sorted_values)
    if not n:
        return 0
    rank = max(1, min(n, int(-(-q * n // 100))))
    return int(sorted_values[rank - 1])


def write_histogram(lengths, report: DataReport, path: Path) -> Path:
    """A PNG histogram of example lengths in tokens, with p50/p95/p99 and max_seq_len marked."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    lengths = np.asarray(lengths)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    try:
        if len(lengths):
            bins = min(80, max(10, int(np.sqrt(len(lengths)))))
            ax.hist(lengths, bins=bins, color="#4C72B0", alpha=0.85)
        t = report.tokens
        for value, label, style in ((t.p50, "p50", ":"), (t.p95, "p95", "--"), (t.p99, "p99", "-."),
                                    (report.max_seq_len, "max_seq_len", "-")):
            ax.axvline(value, color="#C44E52" if label == "max_seq_len" else "#333333", linestyle=style,
                       linewidth=1.2, label=f"{label} {value}")
        ax.set_xlabel("tokens per example")
        ax.set_ylabel("examples")
        packed = f", packed {report.packing.efficiency:.0%} full" if report.packing.enabled else ""
        ax.set_title(f"{report.rows_kept} rows kept ({report.train_rows} train / {report.eval_rows} eval), "
                     f"{t.total} tokens{packed}", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
