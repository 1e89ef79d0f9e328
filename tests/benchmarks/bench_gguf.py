"""The export's GGUF files in llama.cpp against the merged model, for every common quant type, with and without
an importance matrix.

    python tests/benchmarks/bench_gguf.py [ADAPTER]          (or: make bench)

Without ADAPTER, trains the tiny demo for 60 steps in a temporary directory first. Exports through llama.cpp's
converter and quantizer (finetune-export, the gguf extra) and reports, per type, what finetune/export/check.py
measured in llama.cpp on the run's held-out prompts: file size, largest |logit difference| to the merged model,
top-1 agreement, greedy agreement, chat prompts tokenized alike; and the export's own time. On the tiny model
(width 64) the K-quants' 256-wide blocks do not fit a row, so llama.cpp falls back to q5_0 / q8_0 for most
tensors: the figures say the files are right, not how a 7B model's Q4_K_M compares with its f16.
Writes tests/benchmarks/results/gguf_cpu.json. Exits non-zero when f16's logits differ by more than 0.05.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
RESULTS = Path(__file__).resolve().parent / "results"
QUANTS = ["f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "q3_k_m", "q2_k"]


def _train(root: Path) -> Path:
    from finetune.config import compose
    from finetune.pipeline import run_pipeline

    cfg = compose(["+recipe=tiny-demo", "train.max_steps=60", "stages=[data,preflight,train]",
                   f"tracking.uri=sqlite:///{root}/mlflow.db", "tracking.register_model=false",
                   "tracking.system_metrics=false"])
    return run_pipeline(cfg, root / "run")["work_dir"]


def main() -> int:
    from finetune.export import export

    rows: dict[str, dict] = {}
    with contextlib.ExitStack() as stack:
        if len(sys.argv) > 1:
            run_dir = Path(sys.argv[1])
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            os.environ.setdefault("FINETUNE_CACHE", str(root / "cache"))
            run_dir = _train(root)
        records = {}
        for imatrix in (False, True):
            out = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            start = time.perf_counter()
            records[imatrix] = export(str(run_dir), out=out, quants=QUANTS, imatrix=imatrix, log_to_mlflow=False,
                                      progress=False)
            records[imatrix]["seconds"] = round(time.perf_counter() - start, 2)
        for imatrix, record in records.items():
            for quant in QUANTS:
                f = record["check"]["files"][quant]
                key = quant + ("+imatrix" if imatrix and quant not in ("f16", "bf16", "q8_0") else "")
                if key in rows:
                    continue
                rows[key] = {"bytes": record["sizes"][quant], "max_abs_logit_diff": f["max_logit_diff"],
                             "top1_agreement": f["top1_agreement"], "greedy_equal": f"{f['greedy_equal']}/{f['prompts']}",
                             "chat_prompts_tokenized_alike": f"{f['prompt_ids_equal']}/{f['prompts']}"}
                r = rows[key]
                print(f"{key:16s} {r['bytes'] / 1024:8.1f} KiB  max|dlogit| {r['max_abs_logit_diff']:.4f}  "
                      f"top-1 {r['top1_agreement']:.3f}  greedy {r['greedy_equal']}  prompts {r['chat_prompts_tokenized_alike']}")
    result = {"machine": platform.machine(), "cpus": os.cpu_count(), "llama_cpp": records[False]["llama_cpp"],
              "merged_from": records[False]["base"], "export_seconds": {"plain": records[False]["seconds"],
                                                                        "imatrix": records[True]["seconds"]},
              "prompts_from": records[False]["check"]["prompts_from"], "quants": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gguf_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0 if rows["f16"]["max_abs_logit_diff"] < 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
