"""Out of memory during training: continue with a smaller plan instead of losing the run.

The next plan comes from the preflight's ``alternatives`` (plan.json): the fastest one
that keeps the base model's quantization (and double quantization and compute dtype:
the adapter was trained on exactly that base, and must never have it switched under it)
and needs less memory than the plan that failed: a smaller micro-batch with more
accumulation (the effective batch stays), or gradient checkpointing on. When the
alternatives hold none, a smaller plan is derived the same way.

Better than transformers' ``auto_find_batch_size``, which halves the micro-batch
without raising accumulation (so the effective batch, and the run's hyperparameters,
change), never turns on checkpointing, and restarts the attempt from its beginning
instead of the last checkpoint.
"""

from __future__ import annotations

import math
from typing import Any

_KEEP = ("quantization", "double_quant", "compute_dtype", "max_seq_len", "num_gpus", "distributed")


def _memory_key(c: dict[str, Any]) -> tuple[int, int]:
    # What drives activation memory: tokens per micro-batch, then whether layers keep activations.
    return (c["micro_batch_size"], 0 if c["gradient_checkpointing"] else 1)


def _smaller(c: dict[str, Any], failed: dict[str, Any]) -> bool:
    return (c["micro_batch_size"] <= failed["micro_batch_size"]
            and (c["gradient_checkpointing"] or not failed["gradient_checkpointing"])
            and _memory_key(c) < _memory_key(failed))


def _derived(failed: dict[str, Any]) -> dict[str, Any] | None:
    per_gpu = failed["micro_batch_size"] * failed["gradient_accumulation_steps"]
    if not failed["gradient_checkpointing"]:
        return dict(failed, gradient_checkpointing=True)
    if failed["micro_batch_size"] > 1:
        mb = failed["micro_batch_size"] // 2
        while mb > 1 and per_gpu % mb:
            mb -= 1
        return dict(failed, micro_batch_size=mb, gradient_accumulation_steps=math.ceil(per_gpu / mb))
    return None


def next_plan(plan: dict[str, Any], failed: dict[str, Any], tried: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The choices to retry with after `failed` ran out of memory, or None when nothing smaller is left."""
    def key(c: dict[str, Any]) -> tuple:
        return (c["micro_batch_size"], c["gradient_accumulation_steps"], c["gradient_checkpointing"], c["optimizer"])

    seen = {key(c) for c in tried}
    options = [a for a in plan.get("alternatives", [])
               if all(a["choices"].get(k) == failed.get(k) for k in _KEEP)
               and _smaller(a["choices"], failed) and key(a["choices"]) not in seen]
    if options:
        best = max(options, key=lambda a: (a["relative_speed"], -a["device_total_bytes"]))
        return dict(best["choices"])
    derived = _derived(failed)
    if derived is not None and key(derived) not in seen:
        return derived
    return None
