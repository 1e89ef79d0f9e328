"""The planner: enumerate candidate plans, estimate each, choose the fastest that fits.

A candidate is (quantization, double quant, gradient checkpointing, micro-batch,
optimizer). Each gets a memory estimate (memory.py) and a relative speed from a
small cost model; the fastest one whose device total fits
``hardware.vram_gib x (1 - preflight.margin)`` wins. ``preflight.pin.*`` fixes a
choice. ``train.effective_batch_size`` is kept by gradient accumulation, so the
micro-batch is a divisor of the per-GPU share of it.

Relative speed (tokens per second, 1.0 = unquantized, no checkpointing, a saturating
micro-batch):
* gradient checkpointing recomputes the forward pass: x 1/1.33 (a forward is about a
  third of forward + backward);
* a quantized base dequantizes every weight in forward and backward: NF4 x 0.75,
  LLM.int8 x 0.55 (its outlier decomposition is slower still);
* small micro-batches leave the GPU underused: utilization (tokens / 4096) ** 0.3, capped at 1;
* 8-bit and paged optimizers: x 0.99 (LoRA's optimizer step is tiny either way).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from finetune.errors import DoesNotFitError
from finetune.preflight import memory
from finetune.preflight.arch import ArchSpec

SCHEMA_VERSION = 1
SATURATING_TOKENS = 4096
N_ALTERNATIVES = 6


@dataclass
class Plan:
    """plan.json (contract: ../shared/DESIGN.md)."""

    model: dict[str, Any]
    choices: dict[str, Any]
    predicted: dict[str, int]
    breakdown_bytes: dict[str, int]
    budget_bytes: int
    fits: bool
    alternatives: list[dict[str, Any]] = field(default_factory=list)
    explanation: list[str] = field(default_factory=list)
    measured: dict[str, Any] | None = None
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        order = ["schema_version", "model", "choices", "predicted", "breakdown_bytes", "budget_bytes", "fits",
                 "alternatives", "explanation", "measured"]
        return {k: d[k] for k in order}


def relative_speed(choices: dict[str, Any]) -> float:
    speed = 1.0
    if choices["gradient_checkpointing"]:
        speed /= 1.33
    speed *= {"nf4": 0.75, "int8": 0.55, "none": 1.0}[choices["quantization"]]
    tokens = choices["micro_batch_size"] * choices["max_seq_len"]
    speed *= min(1.0, tokens / SATURATING_TOKENS) ** 0.3
    if choices["optimizer"] != "adamw":
        speed *= 0.99
    return round(speed, 4)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _gib(n: float) -> str:
    return f"{n / memory.GiB:.1f} GiB"


def _describe(c: dict[str, Any]) -> str:
    q = c["quantization"] + ("+dq" if c["quantization"] == "nf4" and c["double_quant"] else "")
    ckpt = "ckpt" if c["gradient_checkpointing"] else "no-ckpt"
    return f"{q}, {ckpt}, micro-batch {c['micro_batch_size']} x{c['gradient_accumulation_steps']}, {c['optimizer']}"


def candidates(cfg, seq_len: int, seq_len_source: str) -> list[dict[str, Any]]:
    pin = cfg.preflight.pin
    on_gpu = cfg.hardware.device.value != "cpu"
    compute = ("bf16" if cfg.hardware.bf16 else "fp16") if on_gpu else "fp32"
    per_gpu = max(1, cfg.train.effective_batch_size // cfg.hardware.num_gpus)
    quants = [pin.quantization.value] if pin.quantization else ["none", "int8", "nf4"]
    ckpts = [pin.gradient_checkpointing] if pin.gradient_checkpointing is not None else [False, True]
    mbs = [pin.micro_batch_size] if pin.micro_batch_size else [d for d in _divisors(per_gpu) if d <= 64]
    # bitsandbytes' 8-bit and paged optimizers need CUDA; on the CPU only torch's AdamW is offered.
    opts = [pin.optimizer.value] if pin.optimizer else (["adamw", "paged_adamw_8bit"] if on_gpu else ["adamw"])
    out = []
    for quant, ckpt, mb, opt in itertools.product(quants, ckpts, mbs, opts):
        dqs = [pin.double_quant] if pin.double_quant is not None else ([True] if quant == "nf4" else [False])
        for dq in dqs:
            out.append({
                "quantization": quant,
                "double_quant": bool(dq) if quant == "nf4" else False,
                "compute_dtype": compute,
                "gradient_checkpointing": ckpt,
                "micro_batch_size": mb,
                "gradient_accumulation_steps": max(1, math.ceil(per_gpu / mb)),
                "max_seq_len": seq_len,
                "seq_len_source": seq_len_source,
                "packing": False,
                "optimizer": opt,
                "attention": "sdpa",
                "distributed": "ddp" if cfg.hardware.num_gpus > 1 else "none",
                "num_gpus": cfg.hardware.num_gpus,
            })
    return out


def make_plan(cfg, spec: ArchSpec, seq_len: int, seq_len_source: str) -> Plan:
    """The plan for recipe `cfg`; raises DoesNotFitError (exit 4) when no candidate fits."""
    on_gpu = cfg.hardware.device.value != "cpu"
    budget = int(cfg.hardware.vram_gib * memory.GiB * (1 - cfg.preflight.margin))
    rank, targets = cfg.adapter.rank, list(cfg.adapter.targets)
    scored = []
    for c in candidates(cfg, seq_len, seq_len_source):
        est = memory.estimate(spec, c, rank=rank, targets=targets, on_gpu=on_gpu)
        scored.append((c, est, relative_speed(c)))
    fitting = [s for s in scored if s[1].device_total <= budget]
    # Fastest first; among equals, the one that leaves more memory free.
    fitting.sort(key=lambda s: (-s[2], s[1].device_total))
    lora_targets = [lin.name for lin in spec.lora_targets(targets)]
    model = {
        "name": cfg.model.name_or_path,
        "architecture": spec.architecture,
        "params_total": spec.params_total,
        "params_trainable": spec.lora_params(targets, rank),
        "lora_targets": lora_targets,
    }
    if not fitting:
        smallest = min(scored, key=lambda s: s[1].device_total)
        raise DoesNotFitError(_does_not_fit(cfg, spec, smallest, budget))

    chosen, est, speed = fitting[0]
    alternatives = []
    for c, e, s in fitting[1:]:
        if len(alternatives) >= N_ALTERNATIVES:
            break
        alternatives.append({"choices": c, "device_total_bytes": e.device_total, "relative_speed": s,
                             "why_not": f"slower ({s:.3f} vs {speed:.3f})" if s < speed
                             else f"more memory ({_gib(e.device_total)} vs {_gib(est.device_total)})"})
    not_fitting = sorted((s for s in scored if s[1].device_total > budget), key=lambda s: -s[2])
    for c, e, s in not_fitting[:2]:
        alternatives.append({"choices": c, "device_total_bytes": e.device_total, "relative_speed": s,
                             "why_not": f"does not fit ({_gib(e.device_total)} > budget {_gib(budget)})"})

    explanation = [
        f"{spec.architecture}: {spec.params_total:,} parameters, LoRA rank {rank} on "
        f"{', '.join(lora_targets)}: {model['params_trainable']:,} trainable",
        f"budget {_gib(budget)} = {cfg.hardware.vram_gib:g} GiB ({cfg.hardware.name}) x (1 - margin "
        f"{cfg.preflight.margin:g})",
        f"sequence length {seq_len} from the {seq_len_source}",
        f"chose {_describe(chosen)}: predicted {_gib(est.device_total)} on the device, the fastest of "
        f"{len(fitting)} plans that fit ({len(scored)} tried)",
    ]
    pinned = [k for k, v in vars(cfg.preflight.pin).items() if v is not None]
    if pinned:
        explanation.append(f"pinned by the recipe: {', '.join('preflight.pin.' + k for k in pinned)}")
    if not on_gpu:
        explanation.append("device cpu: the estimate is for the memory the run may use on the CPU; "
                           "nvidia-smi figures do not apply")
    return Plan(model=model, choices=chosen, predicted=est.predicted(), breakdown_bytes=est.breakdown,
                budget_bytes=budget, fits=True, alternatives=alternatives, explanation=explanation)


def _does_not_fit(cfg, spec: ArchSpec, smallest, budget: int) -> str:
    c, est, _ = smallest
    on_gpu = cfg.hardware.device.value != "cpu"
    # The longest sequence the smallest plan fits, by bisection on the estimate.
    lo, hi = 0, c["max_seq_len"]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        trial = dict(c, max_seq_len=mid)
        e = memory.estimate(spec, trial, rank=cfg.adapter.rank, targets=list(cfg.adapter.targets), on_gpu=on_gpu)
        if e.device_total <= budget:
            lo = mid
        else:
            hi = mid - 1
    need_gib = est.device_total / (1 - cfg.preflight.margin) / memory.GiB
    hint = (f"dataset.max_seq_len={lo} would fit with that plan" if lo >= 64
            else "no sequence length fits: the frozen weights alone exceed the budget")
    return (f"{cfg.model.name_or_path} does not fit hardware.vram_gib={cfg.hardware.vram_gib:g} "
            f"({cfg.hardware.name}): the smallest plan ({_describe(c)}) needs {_gib(est.device_total)}, "
            f"the budget is {_gib(budget)}; {hint}; or use a card with at least {need_gib:.0f} GiB")
