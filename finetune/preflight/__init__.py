"""Preflight: will this run fit, and how? Pure arithmetic on the model config; imports no torch for the
families finetune/architectures/spec.py describes (others are traced once, finetune/probes/trace.py).

    plan = run_preflight(cfg, data_report)   # finetune.preflight.planner.Plan
    write_plan(plan, run_dir)                # run_dir/plan.json (contract: docs/DESIGN.md)

The pieces: finetune.architectures (config.json -> layer shapes, offline configs by hub id), memory.py
(the memory model), speed.py (the cost model), planner.py (candidates, choice, what would fit), show.py
(rich tables), measured.py (prediction vs measurement after training).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune.architectures import catalog
from finetune.architectures.spec import Untraceable
from finetune.preflight.planner import Plan, make_plan, unpredicted_plan

__all__ = ["Plan", "run_preflight", "write_plan"]


def run_preflight(cfg, data_report: Any | None = None, model: catalog.ResolvedModel | None = None) -> Plan:
    """Plan recipe `cfg`. With the data stage's report, plan for the longest example actually kept (GRPO: the
    longest prompt, rendered with the generation prompt; the plan adds train.max_completion_length). `model`: the
    run's model as the pipeline resolved it (resolved here when not given)."""
    config = (model or catalog.resolve_model(cfg.model.name_or_path)).require()
    tokens = getattr(data_report, "tokens", None) if data_report is not None else None
    packing = getattr(data_report, "packing", None) if data_report is not None else None
    if packing is not None and packing.enabled and packing.row_tokens_max > 0 and not cfg.grpo:
        # Packed rows: a training row holds several examples, up to max_seq_len tokens.
        seq_len, source = min(cfg.dataset.max_seq_len, packing.row_tokens_max), "data"
    elif tokens is not None and tokens.max > 0:
        seq_len, source = min(cfg.dataset.max_seq_len, tokens.max), "data"
    else:
        seq_len, source = cfg.dataset.max_seq_len, "recipe"
    notes = []
    max_pos = config.get("max_position_embeddings") or config.get("n_positions") or config.get("seq_length")
    longest = seq_len + (cfg.train.max_completion_length if cfg.grpo else 0)  # GRPO: prompt + completion
    if isinstance(max_pos, int) and longest > max_pos:
        notes.append(f"sequence length {longest} exceeds the model's max_position_embeddings ({max_pos}): "
                     "quality degrades past what it was trained on")
    try:
        # hand-written rules where the family has them (no torch), traced otherwise (finetune.probes)
        from finetune.probes import spec_of

        spec = spec_of(config)
        # what loading reads: the checkpoint's stored dtype (an fp16 checkpoint loaded in bf16 is cast)
        stored = config.get("torch_dtype") or config.get("dtype")
        return make_plan(cfg, spec, seq_len, source, data_report=data_report, extra_notes=notes,
                         checkpoint_dtype=stored if isinstance(stored, str) else None)
    except Untraceable as e:  # no memory model for it: runs only as fully pinned, unpredicted
        return unpredicted_plan(cfg, str(config.get("model_type")), seq_len, source, str(e))


def write_plan(plan: Plan, run_dir: Path) -> Path:
    path = run_dir / "plan.json"
    path.write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
    return path
