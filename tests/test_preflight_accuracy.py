"""The memory model against published measurements (tests/data/memory-measurements.csv).

Each row is estimated with its own configuration pinned — quantization, double quant, rank,
targets, sequence length, micro-batch, checkpointing, optimizer, attention — and the
*settings of the stack that measured it* (below, per source). The settings describe real
behaviours of those implementations, each one documented in finetune/preflight/memory.py;
nothing is fitted per row. Then the matching metric is compared: max_memory_allocated with
the predicted peak allocated, "unstated" (read as reserved, as the calibration README says)
with the predicted peak reserved, in the row's unit (GB = 1e9 bytes, GiB = 2^30).

Targets (issue 4): median absolute error <= 10% and worst <= 25% on our stack's rows
(stack=hf: D*, E*). The LitGPT rows measure another implementation (its own model code,
nf4 lm_head, paged AdamW); they are printed, and held to a looser bound that catches a
broken model without pretending they are our stack.
"""

from __future__ import annotations

import csv
import re
import statistics
from pathlib import Path

import pytest

from finetune.architectures import catalog
from finetune.preflight import memory
from finetune.preflight.memory import GiB, MiB, Settings
from finetune.probes import spec_of

DATA = Path(__file__).parent / "data"

HUB_IDS = {
    "phi-1.5": "microsoft/phi-1_5",
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "llama3.2-1b": "meta-llama/Llama-3.2-1B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "phi-3-mini": "microsoft/Phi-3-mini-4k-instruct",
    "gemma-2b": "google/gemma-2b",
    "tinyllama-1.1b": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    "qwen1-1.8b": "Qwen/Qwen-1_8B",
    "qwen1-7b": "Qwen/Qwen-7B",
}


def settings_for(row: dict[str, str]) -> Settings:
    """The stack each source measured, as estimator settings (see memory.Settings for each field)."""
    if row["stack"] == "litgpt":
        # LitGPT (bf16-true precision: no autocast, LoRA in bf16; nf4 quantizes every Linear, lm_head
        # included; lora_dropout 0.05, its default; chunked bf16 cross-entropy; bitsandbytes of 2023-24,
        # whose 4-bit matmul kept its input)
        return Settings(implementation="litgpt", lm_head_loss="litgpt", quantize_lm_head=True, lora_dtype="bf16",
                        autocast=False, lora_dropout=0.05, bnb_keeps_input=True,
                        lora_on_lm_head="lm_head" in row["targets"].split("+"))
    if row["id"].startswith("D"):
        # QwenLM/Qwen finetune.py (transformers 4.32, remote code): the model's own forward computes the
        # full logits and a cross-entropy under bf16 autocast; lora_dropout 0.05 (its default)
        return Settings(lm_head_loss="materialized", lora_dropout=0.05)
    # fms-acceleration (transformers 4.4x + TRL's SFTTrainer): full logits upcast to fp32 in the model's
    # forward; lora_dropout 0.1 (its scenarios.yaml); E3 ran peft's prepare_model_for_kbit_training, which
    # casts the non-quantized weights to fp32. (Whether its bitsandbytes still kept the 4-bit matmul's
    # input is not known; it would only move E3, whose peak is one layer's recompute: +6%.)
    return Settings(lm_head_loss="materialized", lora_dropout=0.1,
                    upcast_fp32="prepare_model_for_kbit_training" in row["notes"])


def choices_for(row: dict[str, str]) -> dict:
    return {
        "quantization": row["quant"],
        "double_quant": row["double_quant"] == "true",
        "compute_dtype": "bf16",
        "gradient_checkpointing": row["grad_ckpt"] == "true",
        "micro_batch_size": int(row["micro_batch"]),
        "gradient_accumulation_steps": 1,
        "max_seq_len": int(row["seq_len"]),
        "seq_len_source": "recipe",
        "packing": "packed" in row["notes"],  # packed rows carry no padding mask
        "optimizer": row["optimizer"],
        "attention": row["attention"],
        "distributed": "none",
        "num_gpus": 1,
    }


def estimate_row(row: dict[str, str]) -> tuple[float, float, memory.Estimate]:
    """(predicted, measured) in bytes for the row's metric, and the estimate."""
    spec = spec_of(catalog.model_config(HUB_IDS[row["model"]])[0])
    targets = [t for t in row["targets"].split("+") if t != "lm_head"]
    est = memory.estimate(spec, choices_for(row), rank=int(row["rank"]), targets=targets,
                          settings=settings_for(row))
    predicted = est.peak_allocated if row["metric"] == "max_memory_allocated" else est.peak_reserved
    unit = GiB if row["unit"] == "GiB" else 1e9
    return predicted, float(row["peak"]) * unit, est


def _rows() -> list[dict[str, str]]:
    with open(DATA / "memory-measurements.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_every_calibration_model_is_in_the_catalog():
    for row in _rows():
        assert catalog.resolve_catalog_name(HUB_IDS[row["model"]]), row["model"]


def test_estimates_match_published_measurements(capsys):
    rows = _rows()
    table = [f"{'id':5} {'stack':6} {'model':15} {'quant':5} {'ckpt':4} {'mb':>3} {'seq':>5} {'metric':10} "
             f"{'measured':>9} {'predicted':>9} {'error':>7}  peak at"]
    errors: dict[str, list[float]] = {"hf": [], "litgpt": []}
    smi: list[str] = []
    for row in rows:
        predicted, measured, est = estimate_row(row)
        err = predicted / measured - 1
        errors[row["stack"]].append(abs(err))
        unit = GiB if row["unit"] == "GiB" else 1e9
        metric = {"max_memory_allocated": "allocated"}.get(row["metric"], row["metric"] + "~res")
        table.append(f"{row['id']:5} {row['stack']:6} {row['model']:15} {row['quant']:5} {row['grad_ckpt'][0]:4} "
                     f"{row['micro_batch']:>3} {row['seq_len']:>5} {metric:10} {measured / unit:>6.2f} {row['unit']:3}"
                     f"{predicted / unit:>6.2f} {row['unit']:3} {err:>+7.1%}  {est.phase}")
        m = re.search(r"nvidia-smi (\d+) MiB", row["notes"])
        if m:  # not graded: the device total against the nvidia-smi figure the source quotes
            seen = int(m.group(1)) * MiB
            smi.append(f"{row['id']}: nvidia-smi {seen / GiB:.2f} GiB, predicted device total "
                       f"{est.device_total / GiB:.2f} GiB ({est.device_total / seen - 1:+.1%})")
    summary = {k: (statistics.median(v), max(v)) for k, v in errors.items()}
    table.append("")
    for stack, (med, worst) in summary.items():
        table.append(f"{stack}: median |error| {med:.1%}, worst {worst:.1%} over {len(errors[stack])} rows")
    table += smi
    text = "\n".join(table)
    with capsys.disabled():
        print("\n" + text)
    med, worst = summary["hf"]
    assert med <= 0.10, text
    assert worst <= 0.25, text
    # LitGPT: another implementation, matched by settings only; a loose bound that still catches a broken model
    lit_med, lit_worst = summary["litgpt"]
    assert lit_med <= 0.20 and lit_worst <= 0.35, text


def test_the_fp32_upcast_is_a_setting_not_a_factor():
    """E3 and E5 differ only in peft's prepare_model_for_kbit_training; the estimator's upcast_fp32 setting
    reproduces the gap from its mechanism (fp32 embeddings/lm_head and fp32 checkpointed hidden states)."""
    rows = {r["id"]: r for r in _rows()}
    e3, e5 = estimate_row(rows["E3"])[2], estimate_row(rows["E5"])[2]
    measured_gap = (float(rows["E3"]["peak"]) - float(rows["E5"]["peak"])) * GiB
    predicted_gap = e3.peak_allocated - e5.peak_allocated
    assert predicted_gap == pytest.approx(measured_gap, rel=0.5)
    # the checkpointed hidden states double (bf16 -> fp32): 32 layers x 16384 tokens x 4096 x 2 bytes = 4 GiB
    assert e3.breakdown["weights_unquantized"] > e5.breakdown["weights_unquantized"]


# This project's own GPU measurements (make bench-gpu) are compared with the prediction by the benchmark
# itself (tests/benchmarks/bench_gpu_memory.py: committed_accuracy), which says "not measured" while none is
# committed: a test that could only skip here proved nothing.
