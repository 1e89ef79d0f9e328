"""Measurements on scaled-down copies of real models (torch): the tracer (trace.py: an architecture's linear
layers, memory and settings, for families without hand-written rules) and the packing probe (packing.py: is
padding-free packing exact on the installed transformers), each with its cache.

:func:`spec_of` is the one answer to "the ArchSpec of this config": the hand-written rules of
finetune/architectures/spec.py where a family has them (no torch imported), traced otherwise. The preflight and
the train stage ask it; nothing below this layer does.
"""

from __future__ import annotations

import json
from typing import Any

from finetune.architectures import spec as arch
from finetune.architectures.spec import ArchSpec, Untraceable

__all__ = ["Untraceable", "spec_of"]

_TRACED: dict[str, ArchSpec] = {}


def spec_of(config: dict[str, Any]) -> ArchSpec:
    """The architecture of `config` (a config.json dict): hand-written rules for the families that have them,
    else derived from transformers' own model and traced (trace.py: torch on a model's first plan, the trace
    cache after). One traced spec per config in a process, so its traced settings are measured once.
    Untraceable when transformers cannot build it."""
    if arch.is_hand_written(config) or not config.get("model_type"):
        return arch.from_config(config)
    key = json.dumps(config, sort_keys=True, default=str)
    if key not in _TRACED:
        from finetune.probes import trace

        _TRACED[key] = arch.checked(trace.derive(config))
    return _TRACED[key]
