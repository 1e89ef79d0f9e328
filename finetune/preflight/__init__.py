"""Preflight: will this run fit, and how? Pure arithmetic on the model config; never imports torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune.preflight import arch, catalog
from finetune.preflight.planner import Plan, make_plan

__all__ = ["Plan", "run_preflight", "write_plan"]


def run_preflight(cfg, data_report: Any | None = None) -> Plan:
    """Plan recipe `cfg`. With the data stage's report, plan for the longest example actually kept."""
    config, _source = catalog.model_config(cfg.model.name_or_path)
    spec = arch.from_config(config)
    if data_report is not None and data_report.tokens.max > 0:
        seq_len, source = min(cfg.dataset.max_seq_len, data_report.tokens.max), "data"
    else:
        seq_len, source = cfg.dataset.max_seq_len, "recipe"
    return make_plan(cfg, spec, seq_len, source)


def write_plan(plan: Plan, run_dir: Path) -> Path:
    path = run_dir / "plan.json"
    path.write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
    return path
