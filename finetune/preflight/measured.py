"""After training: put the measured peak beside the prediction.

    plan_dict, metrics = record_measurement(plan_dict, train_result.peak_memory)
    write plan_dict back to plan.json; tracker.log_metrics(metrics)

``peak_memory`` is the train stage's ``TrainResult.peak_memory``: on CUDA
``{"device", "peak_allocated_bytes", "peak_reserved_bytes"}`` (torch.cuda.max_memory_*
since the model was loaded), on the CPU ``{"device": "cpu", "peak_rss_bytes"}``.
A CPU run's resident set (Python, torch, the whole process) is not comparable with a
GPU plan: it is logged as a metric and the plan's explanation says so, ``measured``
stays null (its contract fields are GPU allocator peaks) and no ratio is computed.
"""

from __future__ import annotations

import copy
from typing import Any

METRIC_PREFIX = "memory/"


def record_measurement(plan: dict[str, Any], peak_memory: dict[str, Any] | None) -> tuple[dict[str, Any],
                                                                                         dict[str, float]]:
    """(plan.json dict with `measured` filled, MLflow metrics). `plan` is not modified."""
    out = copy.deepcopy(plan)
    metrics: dict[str, float] = {}
    if not peak_memory:
        return out, metrics
    predicted = out.get("predicted") or {}
    device = str(peak_memory.get("device", "unknown"))
    if "peak_allocated_bytes" in peak_memory:
        allocated = int(peak_memory["peak_allocated_bytes"])
        reserved = int(peak_memory.get("peak_reserved_bytes", allocated))
        out["measured"] = {"device": device, "peak_allocated_bytes": allocated, "peak_reserved_bytes": reserved}
        metrics[f"{METRIC_PREFIX}measured_peak_allocated_bytes"] = float(allocated)
        metrics[f"{METRIC_PREFIX}measured_peak_reserved_bytes"] = float(reserved)
        for key, measured in (("peak_allocated_bytes", allocated), ("peak_reserved_bytes", reserved)):
            pred = predicted.get(key)
            if pred:
                metrics[f"{METRIC_PREFIX}predicted_{key}"] = float(pred)
                if measured > 0:
                    name = key.removeprefix("peak_").removesuffix("_bytes")
                    # > 1: the plan over-predicted (safe side); < 1: it under-predicted
                    metrics[f"{METRIC_PREFIX}prediction_ratio_{name}"] = pred / measured
        explanation = list(out.get("explanation") or [])
        ratio = metrics.get(f"{METRIC_PREFIX}prediction_ratio_allocated")
        if ratio is not None:
            explanation.append(f"measured on {device}: peak allocated {allocated / 2**30:.2f} GiB, reserved "
                               f"{reserved / 2**30:.2f} GiB; predicted/measured allocated {ratio:.2f}")
        out["explanation"] = explanation
    elif "peak_rss_bytes" in peak_memory:
        rss = int(peak_memory["peak_rss_bytes"])
        metrics[f"{METRIC_PREFIX}measured_peak_rss_bytes"] = float(rss)
        explanation = list(out.get("explanation") or [])
        explanation.append(f"measured on the CPU: peak resident set {rss / 2**30:.2f} GiB (the whole process); "
                           "not comparable with the plan's GPU allocator figures, so no ratio is given")
        out["explanation"] = explanation
    return out, metrics
