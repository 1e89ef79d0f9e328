"""After training: the measured peak goes beside the prediction in plan.json and MLflow."""

from __future__ import annotations

import json

from finetune.config import compose
from finetune.preflight import run_preflight
from finetune.preflight.measured import record_measurement


def _plan() -> dict:
    return run_preflight(compose(["+recipe=llama2-7b-medical"])).to_dict()


def test_cuda_measurement_fills_measured_and_gives_ratios():
    plan = _plan()
    predicted = plan["predicted"]
    peak = {"device": "NVIDIA GeForce RTX 4070", "peak_allocated_bytes": predicted["peak_allocated_bytes"] // 2,
            "peak_reserved_bytes": predicted["peak_reserved_bytes"] * 2}
    updated, metrics = record_measurement(plan, peak)
    assert plan["measured"] is None, "the input plan is left as it was"
    assert updated["measured"] == peak
    assert set(updated) == set(plan)  # the contract's keys, nothing more
    assert metrics["memory/prediction_ratio_allocated"] == predicted["peak_allocated_bytes"] / peak[
        "peak_allocated_bytes"]
    assert abs(metrics["memory/prediction_ratio_reserved"] - 0.5) < 1e-6
    assert metrics["memory/measured_peak_allocated_bytes"] == peak["peak_allocated_bytes"]
    assert metrics["memory/predicted_peak_reserved_bytes"] == predicted["peak_reserved_bytes"]
    assert "NVIDIA GeForce RTX 4070" in updated["explanation"][-1]
    json.dumps(updated)  # still plain JSON


def test_cpu_rss_is_logged_but_not_compared():
    plan = _plan()
    updated, metrics = record_measurement(plan, {"device": "cpu", "peak_rss_bytes": 3 << 30})
    assert updated["measured"] is None  # its fields are GPU allocator peaks; an RSS is not one
    assert metrics == {"memory/measured_peak_rss_bytes": float(3 << 30)}
    assert "not comparable" in updated["explanation"][-1]


def test_no_measurement_changes_nothing():
    plan = _plan()
    assert record_measurement(plan, {}) == (plan, {})
    assert record_measurement(plan, None) == (plan, {})
