"""Measure peak GPU memory and throughput of our train stage, against the preflight's prediction.

    python tests/benchmarks/bench_gpu_memory.py                      # the default grid, on CUDA
    python tests/benchmarks/bench_gpu_memory.py --models meta-llama/Llama-2-7b-hf --seq 512 2048
    python tests/benchmarks/bench_gpu_memory.py --device cpu --models tiny:llama --seq 64   # a smoke run

For each point of a grid (models built from catalog configs with random weights, so nothing is
downloaded; nf4 / none; gradient checkpointing on / off; sequence lengths), in a fresh process:
write the model directory (config.json from the catalog, random bf16 weights, the tiny tokenizer,
whose ids are valid in any vocabulary), prepare a text dataset whose rows are exactly the sequence
length, plan it with the point's choices pinned, train a few steps with the real train stage, and
record torch.cuda.max_memory_allocated / max_memory_reserved, the most nvidia-smi showed, and tokens
per second, beside the prediction. Writes tests/benchmarks/results/gpu_memory_<device>.json; these
rows join the accuracy test (tests/test_preflight_accuracy.py reads measurements the project takes).

Without CUDA (and without --device cpu) it says so and does nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# a hand-written family of each size, and one the preflight traces (finetune/probes/trace.py)
DEFAULT_MODELS = ["Qwen/Qwen2.5-1.5B", "meta-llama/Llama-2-7b-hf", "google/gemma-3-1b-pt"]


def _model_dir(name: str, root: Path) -> str:
    """A loadable directory: the tiny model, or a catalog config with random bf16 weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from finetune.architectures import catalog
    from finetune.architectures.tiny import is_tiny
    from finetune.models import tiny

    tok_src = tiny.ensure_built("tiny:llama")
    if is_tiny(name):
        return str(tiny.ensure_built(name))
    target = root / name.replace("/", "--")
    if (target / "config.json").is_file():
        return str(target)
    config_dict, _ = catalog.model_config(name)
    config_dict = {k: v for k, v in config_dict.items() if not k.startswith("_")}  # the catalog's own notes
    model_type = config_dict.pop("model_type")
    config_dict.pop("architectures", None)
    config = AutoConfig.for_model(model_type, **config_dict)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(target, safe_serialization=True)
    for f in tok_src.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, target / f.name)
    return str(target)


def _corpus(dir_: Path, docs: int = 400) -> Path:
    """Plain-text documents long enough to fill every block of the longest sequence length."""
    from data_prep.samples.medical import encyclopedia

    dir_.mkdir(parents=True, exist_ok=True)
    text = " ".join(encyclopedia())
    for i in range(docs):
        (dir_ / f"doc{i:04d}.txt").write_text((text + " ") * 8)
    return dir_


class _SmiPeak(threading.Thread):
    """The most memory nvidia-smi reports for GPU 0 while training runs (what users see)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_mib = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=10).stdout
                self.peak_mib = max(self.peak_mib, int(out.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass
            self.stop.wait(0.2)


def run_point(args) -> dict:
    import torch

    from finetune.config import compose
    from finetune.pipeline import run_data_stage
    from finetune.preflight import run_preflight
    from finetune.train import train

    work = Path(args.work)
    os.chdir(work)
    model_dir = _model_dir(args.model, work / "models")
    corpus = _corpus(work / "corpus")
    hardware = "hardware=cpu" if args.device == "cpu" else f"hardware={args.hardware}"
    overrides = [
        "+recipe=tiny-demo", f"model.name_or_path={model_dir}", "model.chat_template=null", hardware,
        "dataset.format=text", f"dataset.path={corpus}", f"dataset.max_seq_len={args.seq}", "dataset.packing=false",
        "dataset.eval_fraction=0.0", "dataset.cache=false", f"train.max_steps={args.steps}",
        f"train.save_steps={args.steps * 10}", f"train.effective_batch_size={args.mb}",
        f"preflight.pin.quantization={args.quant}", f"preflight.pin.gradient_checkpointing={args.ckpt}",
        f"preflight.pin.micro_batch_size={args.mb}", "preflight.pin.optimizer=adamw", "preflight.margin=0",
        "adapter.dropout=0.05", "stages=[data,preflight,train]",
    ]
    cfg = compose(overrides)
    run_dir = work / "run"
    run_dir.mkdir(exist_ok=True)
    data, tokenizer = run_data_stage(cfg, run_dir)
    plan = run_preflight(cfg, data.report)
    smi = _SmiPeak() if args.device == "cuda" else None
    if smi:
        smi.start()
    started = time.perf_counter()
    result, _ = train(cfg, plan, data, tokenizer, run_dir, None)
    elapsed = time.perf_counter() - started
    if smi:
        smi.stop.set()
        smi.join()
    measured = dict(result.peak_memory)
    if smi:
        measured["nvidia_smi_peak_bytes"] = smi.peak_mib * 2**20
    return {"model": args.model, "rank": cfg.adapter.rank, "dropout": cfg.adapter.dropout,
            "quantization": args.quant, "gradient_checkpointing": args.ckpt == "true",
            "micro_batch_size": args.mb, "seq_len": args.seq, "steps": args.steps,
            "choices": plan.choices, "predicted": plan.predicted, "measured": measured,
            "ratio_allocated": (plan.predicted["peak_allocated_bytes"] / measured["peak_allocated_bytes"]
                                if "peak_allocated_bytes" in measured else None),
            "tokens_per_s": result.tokens_per_s, "seconds": elapsed,
            "torch": torch.__version__}


def committed_accuracy(results: Path) -> str:
    """The preflight's prediction against this project's own GPU measurements (the gpu_memory_<device>.json
    files `make bench-gpu` commits), recomputed with the current memory model from each row's recorded choices;
    "not measured" while none from a CUDA machine is committed (a CPU smoke run measures resident memory, not
    GPU allocator peaks). Published measurements are held by tests/test_preflight_accuracy.py."""
    import statistics

    from finetune.architectures import catalog
    from finetune.preflight import memory
    from finetune.probes import spec_of

    rows = []
    for path in sorted(results.glob("gpu_memory_*.json")):
        data = json.loads(path.read_text())
        if data.get("device", "cpu") != "cpu":
            rows += [dict(r, device=data["device"]) for r in data["rows"]
                     if "peak_allocated_bytes" in r.get("measured", {})]
    if not rows:
        return "own GPU measurements: not measured (no gpu_memory_<device>.json from a CUDA machine committed)"
    errors, lines = [], []
    for row in rows:
        spec = spec_of(catalog.model_config(row["model"])[0])
        est = memory.estimate(spec, row["choices"], rank=row.get("rank", 16), targets=["all-linear"],
                              settings=memory.Settings(lora_dropout=row.get("dropout", 0.05)))
        measured = row["measured"]["peak_allocated_bytes"]
        err = est.peak_allocated / measured - 1
        errors.append(abs(err))
        lines.append(f"{row['device']:28} {row['model']:28} {row['quantization']:5} "
                     f"ckpt={row['gradient_checkpointing']!s:5} seq={row['seq_len']:5} measured "
                     f"{measured / memory.GiB:6.2f} GiB predicted {est.peak_allocated / memory.GiB:6.2f} GiB {err:+.1%}")
    return "\n".join(lines + [f"own GPU measurements: median |error| {statistics.median(errors):.1%}, "
                               f"worst {max(errors):.1%} over {len(rows)} plans"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--quant", nargs="+", default=["nf4", "none"])
    parser.add_argument("--ckpt", nargs="+", default=["true", "false"])
    parser.add_argument("--seq", nargs="+", type=int, default=[512, 1024, 2048])
    parser.add_argument("--mb", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--hardware", default="h100-80gb", help="the recipes/hardware card the plan is for")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--point", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args()

    if args.point:  # a child: one grid point, JSON on the last line
        args.quant, args.ckpt, args.seq = args.quant[0], args.ckpt[0], args.seq[0]
        print(json.dumps(run_point(args)))
        return

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else None)
    if device is None:
        print("bench_gpu_memory: no CUDA device here; nothing measured (--device cpu runs a smoke test)")
        print(committed_accuracy(Path(__file__).parent / "results"))
        return
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    rows = []
    for model in args.models:
        for quant in args.quant:
            for ckpt in args.ckpt:
                for seq in args.seq:
                    cmd = [sys.executable, __file__, "--point", "--model", model, "--quant", quant, "--ckpt", ckpt,
                           "--seq", str(seq), "--mb", str(args.mb), "--steps", str(args.steps), "--work", str(work),
                           "--hardware", args.hardware, "--device", device]
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    if proc.returncode != 0:
                        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
                        rows.append({"model": model, "quantization": quant, "gradient_checkpointing": ckpt == "true",
                                     "seq_len": seq, "error": tail[0][:300]})
                        print(f"{model} {quant} ckpt={ckpt} seq={seq}: {tail[0][:160]}", flush=True)
                        continue
                    row = json.loads(proc.stdout.strip().splitlines()[-1])
                    rows.append(row)
                    m, p = row["measured"], row["predicted"]
                    got = m.get("peak_allocated_bytes", m.get("peak_rss_bytes", 0)) / 2**30
                    print(f"{model} {quant} ckpt={ckpt} seq={seq}: measured {got:.2f} GiB, predicted allocated "
                          f"{p['peak_allocated_bytes'] / 2**30:.2f} GiB, {row['tokens_per_s']:.0f} tokens/s", flush=True)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    out = args.out or HERE / "results" / f"gpu_memory_{name.replace(' ', '_').lower()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": name, "script": "tests/benchmarks/bench_gpu_memory.py", "rows": rows},
                              indent=2) + "\n")
    print(f"wrote {out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
