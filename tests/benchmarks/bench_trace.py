"""Traced plans: how long the first plan of an architecture without hand-written rules takes, and the next.

    python tests/benchmarks/bench_trace.py          (or: make bench)

For each model, `finetune +recipe=qwen3-8b model.name_or_path=MODEL stages=[preflight]` runs in a fresh
process twice against an empty trace cache: the first run derives the structure on the meta device and
traces the planned settings on scaled-down copies (finetune/probes/trace.py); the second reads both
from the cache and imports no torch. A hand-written family's dry run is measured beside them, in the same
run, as the baseline. Writes tests/benchmarks/results/trace_latency.json.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results" / "trace_latency.json"
MODELS = ["Qwen/Qwen3-8B", "google/gemma-2-9b", "google/gemma-3-12b-pt", "allenai/OLMo-2-1124-7B",
          "Qwen/Qwen3-30B-A3B", "openai-community/gpt2-xl", "state-spaces/mamba-1.4b-hf"]


def _plan(model: str, cache: str, cwd: str) -> tuple[float, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", FINETUNE_CACHE=cache)
    cmd = [sys.executable, "-m", "finetune", "+recipe=qwen3-8b", f"model.name_or_path={model}", "stages=[preflight]",
           "hardware=a100-80gb"]
    if "A3B" in model:
        cmd.append("adapter.dropout=0")  # peft's LoRA on 3-D experts refuses dropout
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    line = next((x.strip(" -") for x in proc.stdout.splitlines() if "traced on scaled-down" in x), "")
    return elapsed, line


def main() -> int:
    rows = []
    with tempfile.TemporaryDirectory() as cwd, tempfile.TemporaryDirectory() as cache:
        baseline, _ = _plan("meta-llama/Llama-3.1-8B", cache, cwd)
        for model in MODELS:
            first, note = _plan(model, cache, cwd)
            cached, _ = _plan(model, cache, cwd)
            rows.append({"model": model, "first_s": round(first, 2), "cached_s": round(cached, 2),
                         "cached_vs_hand_written": round(cached / baseline, 2), "plan_note": note})
            print(f"{model:34s} first {first:6.2f} s   cached {cached:5.2f} s   ({cached / baseline:.1f}x the "
                  "hand-written dry run)", flush=True)
    print(f"{'meta-llama/Llama-3.1-8B (hand-written)':34s} {baseline:.2f} s")
    result = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "processor": platform.processor()},
        "hand_written_dry_run_s": round(baseline, 2),
        "models": rows,
        "note": "first: structure on the meta device + each planned setting traced (the planner tries an "
                "unquantized and a quantized base: two settings); cached: both read from traces.json, no torch",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
