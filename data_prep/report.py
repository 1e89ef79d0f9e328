"""DataReport: what the data stage read, kept, rejected and produced (data_report.json)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TokenStats:
    total: int = 0  # tokens in all kept examples (train + eval)
    trained: int = 0  # tokens with a label (the loss is computed on these)
    p50: int = 0
    p95: int = 0
    p99: int = 0
    max: int = 0


@dataclass
class DataReport:
    source: str
    format: str  # the format used (for auto: the detected one)
    format_detected: bool
    chat_template: str
    rows_read: int = 0
    rows_kept: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count
    rejected_examples: list[dict[str, str]] = field(default_factory=list)  # location, reason, detail
    duplicates: int = 0
    train_rows: int = 0
    eval_rows: int = 0
    max_seq_len: int = 0
    tokens: TokenStats = field(default_factory=TokenStats)
    fingerprint: str = ""

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


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of an ascending list (0 for an empty one)."""
    if not sorted_values:
        return 0
    rank = max(1, min(len(sorted_values), int(-(-q * len(sorted_values) // 100))))
    return sorted_values[rank - 1]
