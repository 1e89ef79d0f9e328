"""Preflight speed: the 70B dry run end to end (Python start included), and one plan estimate.

    python tests/benchmarks/bench_preflight.py          (or: make bench)

Prints a table and writes tests/benchmarks/results/preflight.json. Targets (issue 4):
`finetune +recipe=llama2-70b-plan stages=[preflight]` under 3 s of wall time on 2 cores, Python
start included; one plan estimate under 50 ms. Machines are noisy, so the dry run is also given
as a ratio to a bare `python -c pass` measured in the same run.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results" / "preflight.json"
RUNS = 5


def _wall(cmd: list[str], cwd: str) -> float:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1")
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if proc.returncode not in (0, 4):
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    return elapsed


def _median_of(fn, n: int) -> float:
    return statistics.median(fn() for _ in range(n))


def main() -> int:
    sys.path.insert(0, str(REPO))
    from finetune.architectures import catalog
    from finetune.config import compose
    from finetune.preflight import memory, run_preflight
    from finetune.preflight.planner import candidates
    from finetune.probes import spec_of

    with tempfile.TemporaryDirectory() as cwd:
        python_start = _median_of(lambda: _wall([sys.executable, "-c", "pass"], cwd), RUNS)
        dry_run = _median_of(lambda: _wall([sys.executable, "-m", "finetune", "+recipe=llama2-70b-plan",
                                            "stages=[preflight]"], cwd), RUNS)
        does_not_fit = _median_of(lambda: _wall([sys.executable, "-m", "finetune", "+recipe=llama2-70b-plan",
                                                 "stages=[preflight]", "hardware=rtx4070"], cwd), RUNS)

    cfg = compose(["+recipe=llama2-70b-plan"])
    spec = spec_of(catalog.model_config(cfg.model.name_or_path)[0])
    cands = candidates(cfg, spec, cfg.dataset.max_seq_len, "recipe")

    def one_estimate() -> float:
        started = time.perf_counter()
        for _ in range(200):
            memory.estimate(spec, cands[0], rank=cfg.adapter.rank, targets=list(cfg.adapter.targets))
        return (time.perf_counter() - started) / 200

    def whole_plan() -> float:
        started = time.perf_counter()
        run_preflight(cfg)
        return time.perf_counter() - started

    estimate_s = _median_of(one_estimate, 5)
    plan_s = _median_of(whole_plan, 5)
    result = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "python_start_s": round(python_start, 3),
        "dry_run_70b_s": round(dry_run, 3),
        "dry_run_70b_vs_python_start": round(dry_run / python_start, 2),
        "does_not_fit_70b_on_rtx4070_s": round(does_not_fit, 3),
        "one_estimate_ms": round(estimate_s * 1e3, 4),
        "whole_plan_in_process_ms": round(plan_s * 1e3, 2),
        "candidates_per_plan": len(cands),
        "targets": {"dry_run_70b_s": 3.0, "one_estimate_ms": 50.0},
    }
    rows = [("python -c pass", f"{python_start:.2f} s"),
            ("finetune +recipe=llama2-70b-plan stages=[preflight]", f"{dry_run:.2f} s (target < 3 s; "
                                                                    f"{dry_run / python_start:.1f}x python start)"),
            ("... hardware=rtx4070 (does not fit, exit 4)", f"{does_not_fit:.2f} s"),
            ("one memory estimate (70B)", f"{estimate_s * 1e3:.3f} ms (target < 50 ms)"),
            (f"whole plan in-process ({len(cands)} candidates, 70B)", f"{plan_s * 1e3:.1f} ms")]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {RESULTS.relative_to(REPO)}")
    ok = dry_run < 3.0 and estimate_s < 0.05
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
