"""The planner: enumerate candidate plans, estimate each, choose the fastest that fits.

A candidate is (quantization, double quant, gradient checkpointing, micro-batch, optimizer,
and with several GPUs DDP or FSDP). Each gets a memory estimate (memory.py) and a
throughput from the cost model (speed.py); the fastest one whose device total fits
``hardware.vram_gib x (1 - preflight.margin)`` wins. Speed is weighed against what a
choice costs in fidelity (``PREFERENCE``): a quantized base must be more than 4% faster
(8% for LLM.int8) to beat an unquantized one that fits, an 8-bit or paged optimizer 1-2%
faster than exact AdamW; among equals the plan that leaves the most memory free wins.
``preflight.pin.*`` fixes a choice. ``train.effective_batch_size`` is kept by
gradient accumulation: the micro-batch divides the per-GPU share of it.

When nothing fits, DoesNotFitError (exit 4) says what would: the longest
dataset.max_seq_len, the smallest card of the catalog (recipes/hardware/), how many GPUs
with FSDP, and what the pins cost.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

from finetune import versions
from finetune.architectures.spec import ArchSpec
from finetune.errors import ConfigError, DoesNotFitError
from finetune.preflight import memory, speed
from finetune.preflight.memory import GiB, Settings
from finetune.probes.trace import FIT_TOLERANCE, keep_unquantized

SCHEMA_VERSION = 1
N_ALTERNATIVES = 8
TIE = 0.99  # plans within 1% of the fastest are "as fast" (the alternatives' wording)
EXACT_TIE = 0.999  # plans whose merit differs by less than this are equal: the smaller one wins

OPT_RANK = {"adamw": 0, "adamw_8bit": 1, "paged_adamw_8bit": 2, "paged_adamw_32bit": 3}
QUANT_RANK = {"none": 0, "nf4": 1, "int8": 2}
DIST_RANK = {"none": 0, "ddp": 0, "fsdp": 1}
# Speed a choice must buy before the planner gives up fidelity for it. A 4-bit base costs a little
# accuracy (QLoRA's NF4 + double quant matched 16-bit LoRA on its benchmarks, but bf16 is the
# reference); LLM.int8 likewise and it is slower; 8-bit optimizer state changes AdamW's numerics;
# paged state can stall on host transfers.
PREFERENCE = {
    "quantization": {"none": 1.0, "nf4": 0.96, "int8": 0.92},
    "optimizer": {"adamw": 1.0, "adamw_8bit": 0.99, "paged_adamw_8bit": 0.98, "paged_adamw_32bit": 0.98},
}
FSDP_GPU_COUNTS = (2, 4, 8, 16, 32, 64)


@dataclass
class Plan:
    """plan.json (contract: docs/DESIGN.md). `details` is for the display only, not written."""

    model: dict[str, Any]
    choices: dict[str, Any]
    predicted: dict[str, int]
    breakdown_bytes: dict[str, int]
    budget_bytes: int
    fits: bool
    alternatives: list[dict[str, Any]] = field(default_factory=list)
    explanation: list[str] = field(default_factory=list)
    measured: dict[str, Any] | None = None
    # FSDP plans: what loading takes before FSDP shards the base (memory.LoadPeak.to_dict(); not in the breakdown,
    # which is the training step's peak); written to plan.json only when set
    load_peak: dict[str, Any] | None = None
    # GRPO plans: the generation phase (memory.GenerationPeak.to_dict(); its excess over the training step is the
    # breakdown's "generation"); written to plan.json only when set
    generation: dict[str, Any] | None = None
    # the library versions the memory model was verified on, the installed ones, and which differ
    versions: dict[str, Any] = field(default_factory=versions.record)
    schema_version: int = SCHEMA_VERSION
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        order = ["schema_version", "model", "choices", "predicted", "breakdown_bytes", "budget_bytes", "load_peak",
                 "generation", "fits", "alternatives", "explanation", "measured", "versions"]
        return {k: d[k] for k in order if k not in ("load_peak", "generation") or d[k] is not None}


def _need(device_total: int, load: memory.LoadPeak | None) -> int:
    """What the card must hold: the training step's device total, or loading's peak where that is higher."""
    return max(device_total, load.gpu_bytes if load is not None else 0)


@dataclass
class Candidate:
    choices: dict[str, Any]
    est: memory.Estimate
    thr: speed.Throughput
    load: memory.LoadPeak | None = None

    @property
    def total(self) -> int:
        return self.est.device_total

    @property
    def need(self) -> int:
        """What the card must hold: the training step's device total, or loading's peak where it is higher (an
        FSDP plan on a quantized base: every rank holds the whole quantized base before FSDP shards it)."""
        return _need(self.total, self.load)

    @property
    def load_bound(self) -> bool:
        return self.load is not None and self.load.gpu_bytes > self.total


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def describe(c: dict[str, Any]) -> str:
    """nf4+dq, checkpointing, micro-batch 4 x4, adamw (one line for messages and tables)."""
    q = c["quantization"] + ("+dq" if c["quantization"] == "nf4" and c["double_quant"] else "")
    ckpt = "checkpointing" if c["gradient_checkpointing"] else "no checkpointing"
    dist = f", {c['distributed']} x{c['num_gpus']}" if c.get("distributed") not in (None, "none") else ""
    gen = ""
    if c.get("generation_batch_size"):
        gen = f", generating {c['generation_batch_size']} at once"
        if c.get("generation") == "vllm":
            gen += f" (vLLM, {c['vllm_gpu_memory_utilization']:g} of the card)"
    return (f"{q}, {ckpt}, micro-batch {c['micro_batch_size']} x{c['gradient_accumulation_steps']}, "
            f"{c['optimizer']}{dist}{gen}")


@cache
def hardware_catalog() -> dict[str, dict[str, Any]]:
    """recipes/hardware/*.yaml: the cards `hardware=NAME` selects (read directly, without Hydra)."""
    import yaml

    from finetune.paths import recipes_dir

    out = {}
    for path in sorted(Path(recipes_dir(), "hardware").glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        out[path.stem] = data
    return out


def settings_for(cfg) -> Settings:
    device = cfg.hardware.device.value
    # TRL's chunked LM head over labelled positions where the installed TRL has it (finetune/versions.py)
    return Settings(device=device, lora_dropout=float(cfg.adapter.dropout),
                    lm_head_loss="fused" if versions.trl_fused_lm_head() else "materialized",
                    reference_adapter=bool(cfg.train.init_adapter) and cfg.train.method.value in ("dpo", "kto"))


def compute_dtype(cfg) -> str:
    if cfg.hardware.device.value == "cpu":
        return "fp32"  # the Trainer computes in fp32 on the CPU (no autocast)
    return "bf16" if cfg.hardware.bf16 else "fp16"


def _per_gpu_batch(cfg) -> int:
    return max(1, math.ceil(cfg.train.effective_batch_size / cfg.hardware.world_size))


def _check_pins(cfg) -> None:
    pin = cfg.preflight.pin
    device = cfg.hardware.device.value
    if device != "cuda":
        if pin.optimizer is not None and pin.optimizer.value != "adamw":
            raise ConfigError(f"preflight.pin.optimizer={pin.optimizer.value} needs a CUDA GPU (bitsandbytes' "
                              f"8-bit and paged optimizers); hardware.device is {device}: use adamw or null")
        if pin.quantization is not None and pin.quantization.value == "int8":
            raise ConfigError(f"preflight.pin.quantization=int8 needs a CUDA GPU (LLM.int8 kernels); "
                              f"hardware.device is {device}: use nf4, none or null")
    if cfg.train.method.value == "grpo" and cfg.train.generation.value == "vllm" and device != "cuda":
        raise ConfigError(f"train.generation=vllm needs a CUDA GPU (vLLM's colocated engine); hardware.device is "
                          f"{device}: use train.generation=transformers")
    if pin.distributed is not None and pin.distributed.value != "none" and cfg.hardware.world_size == 1:
        raise ConfigError(f"preflight.pin.distributed={pin.distributed.value} needs hardware.num_gpus > 1 (or "
                          "hardware.num_nodes > 1)")
    if cfg.hardware.num_gpus > 1 and device == "mps":
        raise ConfigError(f"hardware.num_gpus={cfg.hardware.num_gpus}: Apple GPUs train one process at a time")
    # On the CPU, num_gpus counts processes: torchrun runs DDP over gloo there (the tests do).
    if pin.double_quant and pin.quantization is not None and pin.quantization.value != "nf4":
        raise ConfigError("preflight.pin.double_quant=true applies to nf4 only; "
                          f"preflight.pin.quantization is {pin.quantization.value}")


def candidates(cfg, spec: ArchSpec, seq_len: int, seq_len_source: str, *, pins: bool = True) -> list[dict[str, Any]]:
    """Every plan the recipe allows (respecting preflight.pin.* unless pins=False)."""
    pin = cfg.preflight.pin if pins else None
    device = cfg.hardware.device.value
    n = cfg.hardware.world_size
    per_gpu = _per_gpu_batch(cfg)
    cuda = device == "cuda"

    def pinned(name: str, default: list[Any]) -> list[Any]:
        value = getattr(pin, name) if pin is not None else None
        if value is None:
            return default
        return [value.value if hasattr(value, "value") else value]

    quants = pinned("quantization", ["none", "nf4", "int8"] if cuda else ["none", "nf4"])
    if spec.extra.get("quantization_error"):
        if pin is not None and pin.quantization is not None and pin.quantization.value != "none":
            raise ConfigError(f"preflight.pin.quantization={pin.quantization.value}: {spec.architecture} does not "
                              f"train with bitsandbytes' quantized layers on this stack "
                              f"({spec.extra['quantization_error']}); pin quantization=none")
        quants = ["none"]
    keep = keep_unquantized(spec)
    ckpts = pinned("gradient_checkpointing", [False, True])
    limit = cfg.preflight.max_micro_batch_size
    mbs = pinned("micro_batch_size", [d for d in range(1, min(per_gpu, limit) + 1) if per_gpu % d == 0])
    if cfg.train.method.value == "kto":
        # TRL's KTO estimates its KL term from the other completions of the micro-batch: it refuses a batch of one
        if mbs == [1] and pin is not None and pin.micro_batch_size == 1:
            raise ConfigError("preflight.pin.micro_batch_size=1: train.method=kto needs at least 2 completions per "
                              "micro-batch (TRL's KTO estimates its KL term from the others in the batch)")
        mbs = [m for m in mbs if m >= 2] or [2]
    opts = pinned("optimizer", ["adamw", "adamw_8bit", "paged_adamw_8bit"] if cuda else ["adamw"])
    dists = pinned("distributed", ["ddp", "fsdp"] if n > 1 else ["none"])
    out = []
    for quant, ckpt, mb, opt, dist in itertools.product(quants, ckpts, mbs, opts, dists):
        if dist == "fsdp" and quant == "int8":
            continue  # bitsandbytes' Int8Params cannot be sharded by FSDP
        dqs = pinned("double_quant", [True, False]) if quant == "nf4" else [False]
        for dq in dqs:
            # transformers' attn_implementation (Falcon's multi-query layout runs SDPA's math kernel underneath;
            # the memory model knows, the name stays the one transformers uses)
            out.append(_choice(cfg, quant, dq, ckpt, mb, opt, dist, seq_len, seq_len_source, attention_for(spec, cfg)))
            if spec.experts and quant != "none":
                # finetune/models/experts.py quantizes the fused experts' 3-D parameters with the rest
                out[-1]["quantized_experts"] = True
            if keep and quant != "none":
                # bitsandbytes' llm_int8_skip_modules for the load (finetune/probes/trace.py found the family
                # reads these layers' weights directly)
                out[-1]["keep_unquantized"] = keep
    if cfg.train.method.value == "grpo":
        # every generation batch TRL accepts that keeps whole optimizer steps (GRPOConfig.__post_init__)
        vram = int(cfg.hardware.vram_gib * GiB)
        out = [grpo_choice(c, spec, vram, generation_batch_size=g) for c in out
               for g in generation_batch_sizes(c)]
    return out


def generation_batch_sizes(c: dict[str, Any]) -> list[int]:
    """The generation batches (completions generated at once, all GPUs) a GRPO plan may use: TRL 1.16 requires a
    multiple of num_generations and of micro-batch x GPUs (GRPOConfig.__post_init__); we also keep it a divisor of
    the effective batch (micro-batch x accumulation x GPUs), so steps_per_generation divides the accumulation steps:
    generation stays aligned with the optimizer step (TRL then needs no old-policy forward). Smallest first."""
    g, n = int(c["num_generations"]), int(c["num_gpus"])
    unit = math.lcm(g, int(c["micro_batch_size"]) * n)
    eff = int(c["micro_batch_size"]) * int(c["gradient_accumulation_steps"]) * n
    sizes = [k * unit for k in range(1, eff // unit + 1) if eff % (k * unit) == 0]
    return sizes or [unit]


def grpo_choice(c: dict[str, Any], spec: ArchSpec, vram_bytes: int, *, generation_batch_size: int | None = None,
                num_generations: int | None = None, completion: int | None = None, prompt: int | None = None,
                effective_batch_size: int | None = None) -> dict[str, Any]:
    """A GRPO plan's choices with its generation fields set (or changed: what-would-fit searches): max_seq_len is
    prompt + completion, the generation batch the given one (else the smallest valid), and with vLLM the fraction of
    the card its engine gets."""
    c = dict(c)
    if num_generations is not None:
        c["num_generations"] = int(num_generations)
    if completion is not None:
        c["max_completion_length"] = int(completion)
    if prompt is not None:
        c["max_prompt_length"] = int(prompt)
    if effective_batch_size is not None:
        n = int(c["num_gpus"])
        c["gradient_accumulation_steps"] = max(1, math.ceil(math.ceil(effective_batch_size / n)
                                                            / c["micro_batch_size"]))
    c["max_seq_len"] = int(c["max_prompt_length"]) + int(c["max_completion_length"])
    c["generation_batch_size"] = int(generation_batch_size or generation_batch_sizes(c)[0])
    if c.get("generation") == "vllm":
        seqs = c["generation_batch_size"] // max(1, int(c["num_gpus"]))
        c["vllm_gpu_memory_utilization"] = memory.vllm_fraction(spec, seqs, c["max_seq_len"], vram_bytes)[0]
    return c


def _choice(cfg, quant: str, dq: bool, ckpt: bool, mb: int, opt: str, dist: str, seq_len: int, seq_len_source: str,
            attention: str) -> dict[str, Any]:
    """One plan's choices (the plan.json `choices` dict); num_gpus is every GPU of the run (all nodes')."""
    n = cfg.hardware.world_size
    nodes = {"num_nodes": cfg.hardware.num_nodes} if cfg.hardware.num_nodes > 1 else {}
    return {
        "quantization": quant,
        "double_quant": bool(dq) if quant == "nf4" else False,
        "compute_dtype": compute_dtype(cfg),
        "gradient_checkpointing": bool(ckpt),
        "micro_batch_size": int(mb),
        "gradient_accumulation_steps": max(1, math.ceil(_per_gpu_batch(cfg) / mb)),
        "max_seq_len": int(seq_len),
        "seq_len_source": seq_len_source,
        "packing": bool(getattr(cfg.dataset, "packing", False)) and cfg.train.method.value != "grpo",
        "optimizer": opt,
        "attention": attention,
        "distributed": dist if n > 1 else "none",
        "num_gpus": n,
        **nodes,
        **_grpo_keys(cfg, seq_len),
    }


def _grpo_keys(cfg, prompt_len: int) -> dict[str, Any]:
    """GRPO's own choices: the longest prompt (the data's, or dataset.max_seq_len), the completion, the group;
    max_seq_len becomes prompt + completion in grpo_choice, which also sets the generation batch."""
    if cfg.train.method.value != "grpo":
        return {}
    t = cfg.train
    keys = {"num_generations": int(t.num_generations), "max_prompt_length": int(prompt_len),
            "max_completion_length": int(t.max_completion_length), "generation": t.generation.value,
            "generation_batch_size": None}
    if t.generation.value == "vllm":
        keys["vllm_gpu_memory_utilization"] = None
    return keys


def flash_attention_installed() -> bool:
    """flash-attn importable here (looked up, not imported: the preflight imports no torch)."""
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def attention_for(spec: ArchSpec, cfg) -> str:
    """FlashAttention 2 where it runs (a CUDA plan, flash-attn installed, a family whose SDPA path it
    replaces, a card that supports bf16/fp16 flash kernels), else the family's own attention.
    FlashAttention keeps no mask and takes grouped k/v heads natively; the memory model counts it as
    flash2. Not yet verified on a GPU here (none was at hand)."""
    base = "sdpa" if spec.attention == "math" else spec.attention
    if (base == "sdpa" and spec.attention != "math" and cfg.hardware.device.value == "cuda"
            and flash_attention_installed()):
        return "flash2"
    return base


def kernels_note(attention: str) -> str:
    """Which fast kernels training will use on CUDA, as installed where the plan is made."""
    import importlib.util

    names = {"flash2": "FlashAttention 2", "sdpa": "PyTorch SDPA", "eager": "eager attention (the family needs it)",
             "none": "no attention (a state-space or recurrent model)", "": "the family's default attention"}
    liger = importlib.util.find_spec("liger_kernel") is not None
    return (f"kernels: {names.get(attention, attention)}"
            + ("" if attention != "sdpa" else " (pip install flash-attn for FlashAttention 2)")
            + ("; Liger kernels on" if liger else "; Liger kernels off (pip install liger-kernel)")
            + "; the speed estimate does not count either")


class _Scorer:
    """Memory and speed of candidates for one recipe (reused by the what-would-fit searches)."""

    def __init__(self, cfg, spec: ArchSpec, checkpoint_dtype: str | None = None):
        self.cfg, self.spec = cfg, spec
        self.checkpoint_dtype = checkpoint_dtype  # config.json's torch_dtype: what loading reads
        self.rank, self.targets = cfg.adapter.rank, list(cfg.adapter.targets)
        self.settings = settings_for(cfg)
        self.lora_features = sum(lin.in_features + lin.out_features for lin in spec.lora_targets(self.targets)) \
            * spec.layers
        hw = cfg.hardware
        self.speed_kwargs = dict(rank=self.rank, n_lora_features=self.lora_features, tflops=hw.tflops,
                                 bandwidth_gbs=hw.memory_bandwidth_gbs, interconnect_gbs=hw.interconnect_gbs,
                                 internode_gbs=hw.internode_gbps / 8)
        self._best: float | None = None
        self.grpo = cfg.train.method.value == "grpo"
        self.beta = float(cfg.train.beta or 0.0)
        self.vram = int(hw.vram_gib * GiB)

    def _forward(self, c: dict[str, Any]) -> dict[str, Any]:
        """The choices as the model sees them: a pair method's micro-batch runs chosen and rejected together."""
        n = sequences_per_example(self.cfg)
        return c if n == 1 else dict(c, micro_batch_size=c["micro_batch_size"] * n)

    def estimate(self, c: dict[str, Any]) -> memory.Estimate:
        if not self.grpo:
            return memory.estimate(self.spec, self._forward(c), rank=self.rank, targets=self.targets,
                                   settings=self.settings)
        train = self.training(c)
        gen = memory.generation_peak(self.spec, c, train, settings=self.settings, beta=self.beta,
                                     vram_bytes=self.vram)
        return memory.with_generation(train, gen)

    def training(self, c: dict[str, Any]) -> memory.Estimate:
        """The training step alone (for GRPO: micro-batch x (prompt + completion) tokens, labels on the completion
        only: TRL's fused LM head projects those)."""
        settings = self.settings
        if self.grpo:
            settings = replace(settings, labelled_fraction=c["max_completion_length"] / max(1, c["max_seq_len"]))
        return memory.estimate(self.spec, self._forward(c), rank=self.rank, targets=self.targets, settings=settings)

    def load(self, c: dict[str, Any]) -> memory.LoadPeak | None:
        return memory.load_peak(self.spec, c, rank=self.rank, targets=self.targets, settings=self.settings,
                                checkpoint_dtype=self.checkpoint_dtype)

    def need(self, c: dict[str, Any]) -> int:
        """Candidate.need without the speed model."""
        return _need(self.estimate(c).device_total, self.load(c))

    def score(self, c: dict[str, Any]) -> Candidate:
        if self._best is None:
            self._best = speed.ceiling(self.spec, self._forward(c), **self.speed_kwargs)
        thr = speed.throughput(self.spec, self._forward(c), best=self._best, **self.speed_kwargs)
        return Candidate(c, self.estimate(c), thr, self.load(c))


def sequences_per_example(cfg) -> int:
    """Sequences one training example puts through the model with gradients: 2 for the pair methods (TRL's DPO,
    ORPO and CPO/SimPO concatenate chosen and rejected into one forward), 1 for SFT and KTO (whose KL completions
    and every reference forward run without a graph)."""
    return 2 if cfg.train.method.value in ("dpo", "orpo", "simpo") else 1


def _budget(vram_gib: float, margin: float) -> int:
    return int(vram_gib * GiB * (1 - margin))


def merit(c: Candidate) -> float:
    """Speed weighed by what the plan gives up (PREFERENCE)."""
    return (c.thr.tokens_per_s * PREFERENCE["quantization"][c.choices["quantization"]]
            * PREFERENCE["optimizer"][c.choices["optimizer"]])


def _choose(fitting: list[Candidate]) -> Candidate:
    best = max(merit(c) for c in fitting)
    near = [c for c in fitting if merit(c) >= EXACT_TIE * best]
    return min(near, key=lambda c: (c.total, DIST_RANK[c.choices["distributed"]]))


def _why_not(alt: Candidate, chosen: Candidate, budget: int) -> str:
    a, c = alt.choices, chosen.choices
    if alt.need > budget and alt.load_bound:
        return f"does not fit while loading ({alt.load.gpu_why}) > budget {_gib(budget)}"
    if alt.total > budget:
        return f"does not fit: {_gib(alt.total)} > budget {_gib(budget)}"
    reasons = []
    if a["gradient_checkpointing"] and not c["gradient_checkpointing"]:
        reasons.append("recomputes every layer's forward (checkpointing)")
    if QUANT_RANK[a["quantization"]] > QUANT_RANK[c["quantization"]]:
        reasons.append(f"{a['quantization']} dequantizes every weight on each pass" if a["quantization"] == "nf4"
                       else "LLM.int8 matmuls are slower")
    if a["micro_batch_size"] < c["micro_batch_size"]:
        reasons.append(f"micro-batch {a['micro_batch_size']} keeps the GPU less busy")
    if a.get("distributed") == "fsdp" and c.get("distributed") != "fsdp":
        reasons.append("FSDP all-gathers the weights")
    slower = alt.thr.tokens_per_s < TIE * chosen.thr.tokens_per_s
    if slower and not reasons and alt.total < chosen.total:
        reasons.append("smaller micro-batch or state")
    if slower:
        text = f"slower ({alt.thr.relative:.2f} vs {chosen.thr.relative:.2f})"
        return text + (": " + "; ".join(reasons) if reasons else "")
    if OPT_RANK[a["optimizer"]] > OPT_RANK[c["optimizer"]]:
        return f"as fast, but {a['optimizer']} changes the optimizer's numerics for memory not needed here"
    if QUANT_RANK[a["quantization"]] > QUANT_RANK[c["quantization"]]:
        return (f"{alt.thr.relative / chosen.thr.relative - 1:+.0%} speed, not worth quantizing the base "
                "(it costs a little accuracy)")
    if QUANT_RANK[a["quantization"]] < QUANT_RANK[c["quantization"]] and alt.total > budget:
        return f"does not fit: {_gib(alt.total)} > budget {_gib(budget)}"
    if alt.total > chosen.total:
        return f"as fast, uses more memory ({_gib(alt.total)} vs {_gib(chosen.total)})"
    return f"as fast; less preferred ({'; '.join(reasons) or 'tie'})"


def _distinct(scored: list[Candidate]) -> list[Candidate]:
    """One candidate per (quantization, checkpointing, micro-batch, distribution): the one with the best
    merit (ties: less memory), so the alternatives differ in more than the optimizer or double quant."""
    best: dict[tuple, Candidate] = {}
    for c in scored:
        ch = c.choices
        key = (ch["quantization"], ch["gradient_checkpointing"], ch["micro_batch_size"], ch["distributed"])
        if key not in best or (merit(c), -c.total) > (merit(best[key]), -best[key].total):
            best[key] = c
    return list(best.values())


def _alternatives(scored: list[Candidate], chosen: Candidate, budget: int) -> list[Candidate]:
    """The next best plans: the best others that fit; then ever smaller ones on the same base (same
    quantization, double quant, dtype, distribution: what training may switch to after an out-of-memory
    error, finetune/train/oom.py, without changing the model under the adapter); then the fastest that do
    not fit (what more memory would buy)."""
    pool = [c for c in _distinct(scored) if c.choices != chosen.choices]
    fitting = sorted((c for c in pool if c.need <= budget), key=lambda c: (-merit(c), c.total))
    out: list[Candidate] = fitting[:2]
    base = ("quantization", "double_quant", "compute_dtype", "distributed", "num_gpus")
    same = [c for c in fitting if all(c.choices[k] == chosen.choices[k] for k in base)]
    limit = chosen.total
    for _ in range(4):
        smaller = [c for c in same if c.total < limit * 0.97 and c not in out]
        if not smaller:
            break
        pick = max(smaller, key=lambda c: (merit(c), -c.total))
        out.append(pick)
        limit = pick.total
    others = [c for c in fitting if c not in out and c.total < chosen.total]
    out += others[:1]
    too_big = sorted((c for c in pool if c.need > budget), key=lambda c: (-c.thr.tokens_per_s, c.total))
    faster = [c for c in too_big if c.thr.tokens_per_s > chosen.thr.tokens_per_s]
    out += faster[: max(0, N_ALTERNATIVES - len(out))][:2]
    return out[:N_ALTERNATIVES]


def _minimal(cfg, spec: ArchSpec, seq_len: int, source: str, *, pins: bool, checkpoint_dtype: str | None = None,
             **overrides: Any) -> dict[str, Any]:
    """The plan with the least memory the recipe allows (pins respected unless pins=False): the least the card
    must hold, training step or loading (Candidate.need)."""
    cands = candidates(cfg, spec, seq_len, source, pins=pins)
    scorer = _Scorer(cfg, spec, checkpoint_dtype)
    pool = [dict(c, **overrides) for c in cands]
    return min(pool, key=lambda c: (scorer.need(c), scorer.estimate(c).device_total))


def _longest_seq(cfg, spec: ArchSpec, c: dict[str, Any], budget: int) -> int:
    """The longest dataset.max_seq_len that fits with plan `c` (GRPO: the longest prompt, the completion kept)."""
    scorer = _Scorer(cfg, spec)
    grpo = c.get("max_prompt_length") is not None

    def with_len(n: int) -> dict[str, Any]:
        if grpo:
            return grpo_choice(c, spec, scorer.vram, prompt=n, generation_batch_size=c["generation_batch_size"])
        return dict(c, max_seq_len=n)

    lo, hi = 0, c["max_prompt_length"] if grpo else c["max_seq_len"]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if scorer.estimate(with_len(mid)).device_total <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def does_not_fit_message(cfg, spec: ArchSpec, seq_len: int, source: str, budget: int,
                         checkpoint_dtype: str | None = None) -> str:
    hw, margin = cfg.hardware, cfg.preflight.margin
    scorer = _Scorer(cfg, spec, checkpoint_dtype)
    smallest = _minimal(cfg, spec, seq_len, source, pins=True, checkpoint_dtype=checkpoint_dtype)
    need = scorer.need(smallest)
    load = scorer.load(smallest)
    parts = [f"{cfg.model.name_or_path} does not fit hardware.vram_gib={hw.vram_gib:g} ({hw.name}"
             f"{f' x{hw.world_size}' if hw.world_size > 1 else ''}): the smallest plan ({describe(smallest)}) needs "
             f"{_gib(need)} per GPU, the budget is {_gib(budget)} ({hw.vram_gib:g} GiB x (1 - margin {margin:g}))"]
    if scorer.grpo and need > budget and _need(scorer.training(smallest).device_total, load) <= budget:
        return generation_message(cfg, spec, scorer, smallest, budget)
    if scorer.grpo:
        fixed = scorer.training(grpo_choice(dict(smallest, micro_batch_size=1), spec, scorer.vram, prompt=1,
                                            completion=1))
    else:
        fixed = scorer.estimate(dict(smallest, max_seq_len=1, micro_batch_size=1))
    if load is not None and load.gpu_bytes > budget and load.gpu_bytes >= scorer.estimate(smallest).device_total:
        parts.append(f"{load.gpu_why}, so no dataset.max_seq_len helps")
    elif fixed.device_total > budget:
        parts.append(f"the frozen weights and fixed costs alone take {_gib(fixed.device_total)}, so no "
                     "dataset.max_seq_len helps")
    else:
        longest = _longest_seq(cfg, spec, smallest, budget)
        what = " (the longest prompt)" if scorer.grpo else ""
        parts.append(f"dataset.max_seq_len={longest}{what} would fit with that plan" if longest >= 8
                     else "not even 8 tokens per sequence fit")
    # the pins' cost
    pinned = [k for k, v in vars(cfg.preflight.pin).items() if v is not None]
    if pinned:
        free = _minimal(cfg, spec, seq_len, source, pins=False, checkpoint_dtype=checkpoint_dtype)
        free_total = scorer.need(free)
        if free_total <= budget:
            parts.append(f"without {', '.join('preflight.pin.' + k for k in pinned)} it fits "
                         f"({describe(free)}: {_gib(free_total)})")
    # the smallest card of the catalog
    unpinned_single = dict(smallest, distributed="none", num_gpus=1)
    single_total = scorer.estimate(unpinned_single).device_total
    fitting_cards = _fitting_cards(cfg, scorer, smallest)
    if fitting_cards:
        parts.append(f"the smallest card of the catalog that fits one copy is hardware={fitting_cards[0][0]} "
                     f"({fitting_cards[0][1]:g} GiB)")
    else:
        parts.append(f"no single card of the catalog holds it ({_gib(single_total)} needed)")
    # FSDP on this card: on the smallest plan's base, or, where every rank cannot hold the whole quantized base
    # while loading, on a 16-bit one (loaded on the CPU, only its shard on each GPU)
    if hw.device.value == "cuda":
        quant = smallest["quantization"] if smallest["quantization"] != "int8" else "nf4"
        bases = [quant] + (["none"] if quant != "none" else [])
        found = False
        for n in FSDP_GPU_COUNTS:
            if (n <= hw.world_size and hw.world_size > 1) or found:
                continue
            quantized_load = None
            for q in bases:
                trial = dict(unpinned_single, distributed="fsdp", num_gpus=n, quantization=q,
                             double_quant=q == "nf4" and smallest["double_quant"])
                trial.pop("num_nodes", None)
                if q == quant:
                    quantized_load = scorer.load(trial)
                if scorer.need(trial) > budget:
                    continue
                what = "the frozen weights" if q == quant else "a 16-bit base"
                why = "" if q == quant or quantized_load is None else (
                    f"; not the {quant} base: {quantized_load.gpu_why}")
                parts.append(f"or {n} x {hw.name} with FSDP sharding {what} (hardware.num_gpus={n} "
                             f"preflight.pin.distributed=fsdp: {_gib(scorer.need(trial))} per GPU{why})")
                found = True
                break
    return "; ".join(parts)


def _fitting_cards(cfg, scorer: _Scorer, c: dict[str, Any]) -> list[tuple[str, float]]:
    """(card, GiB) of the catalog's cards of this device whose budget holds plan `c` on one GPU, smallest first
    (a GRPO plan with vLLM gets the fraction of that card its engine needs)."""
    margin = scorer.cfg.preflight.margin
    single = dict(c, distributed="none", num_gpus=1)
    single.pop("num_nodes", None)
    cards = sorted(((k, v) for k, v in hardware_catalog().items()
                    if v.get("device") == cfg.hardware.device.value and v.get("vram_gib")),
                   key=lambda kv: kv[1]["vram_gib"])
    out = []
    vram = scorer.vram
    try:
        for name, card in cards:
            if scorer.grpo:
                scorer.vram = int(float(card["vram_gib"]) * GiB)
                trial = grpo_choice(single, scorer.spec, scorer.vram, generation_batch_size=c["generation_batch_size"])
            else:
                trial = single
            if scorer.estimate(trial).device_total <= _budget(float(card["vram_gib"]), margin):
                out.append((name, float(card["vram_gib"])))
    finally:
        scorer.vram = vram
    return out


def generation_message(cfg, spec: ArchSpec, scorer: _Scorer, smallest: dict[str, Any], budget: int) -> str:
    """GRPO: the training step fits but the generation phase does not, with the smallest plan: one line, with the
    largest train.num_generations and the longest train.max_completion_length that fit with that plan, and the
    smallest card of the catalog that holds it."""
    hw, t = cfg.hardware, cfg.train
    est = scorer.estimate(smallest)
    gen = est.generation
    train_total = scorer.training(smallest).device_total
    if gen.engine == "vllm":
        what = (f"the colocated vLLM engine's share (vllm_gpu_memory_utilization={gen.fraction:g}: a 16-bit copy of "
                f"the weights {_gib(gen.weights_bytes)}, the KV cache of {gen.sequences} completions x {gen.tokens} "
                f"tokens {_gib(gen.kv_cache_bytes)}) beside the training step ({_gib(train_total)}) needs "
                f"{_gib(est.device_total)}")
    else:
        what = (f"generating {gen.sequences} completions of {smallest['max_prompt_length']} + "
                f"{smallest['max_completion_length']} tokens at once needs {_gib(gen.total_bytes)} (KV cache "
                f"{_gib(gen.kv_cache_bytes)}, logits {_gib(gen.logits_bytes)}, prefill {_gib(gen.prefill_bytes)}"
                + (f", reference forward {_gib(gen.reference_bytes)}" if gen.reference_bytes else "")
                + f"; the training step {_gib(train_total)})")
    parts = [f"{cfg.model.name_or_path}: the GRPO generation phase does not fit hardware.vram_gib={hw.vram_gib:g} "
             f"({hw.name}): with the smallest plan ({describe(smallest)}) {what}, the budget is {_gib(budget)}"]
    eff, g = t.effective_batch_size, t.num_generations
    fixes = []
    # the largest group that fits (with the effective batch it needs: a multiple of it), and the largest that
    # divides the recipe's effective batch where that is another one
    for divisors_only in (False, True):
        for g2 in range(g - 1, 1, -1):
            if divisors_only and eff % g2:
                continue
            eff2 = eff if eff % g2 == 0 else max(g2, eff // g2 * g2)
            trial = grpo_choice(smallest, spec, scorer.vram, num_generations=g2, effective_batch_size=eff2)
            if scorer.need(trial) <= budget:
                fix = f"train.num_generations={g2}" + (f" train.effective_batch_size={eff2}" if eff2 != eff else "")
                if fix not in fixes:
                    fixes.append(fix)
                break
        if fixes and "effective_batch_size" not in fixes[-1]:
            break
    lo, hi = 0, t.max_completion_length - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if scorer.need(grpo_choice(smallest, spec, scorer.vram, completion=mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    if lo >= 1:
        fixes.append(f"train.max_completion_length={lo}")
    if gen.engine == "vllm":
        fixes.append("train.generation=transformers (generate through the 4-bit policy itself, no 16-bit copy)")
    if fixes:
        parts.append("fits with that plan: " + ", or ".join(fixes))
    else:
        parts.append("no smaller group or completion fits with that plan")
    cards = _fitting_cards(cfg, scorer, smallest)
    if cards:
        parts.append(f"or hardware={cards[0][0]} ({cards[0][1]:g} GiB) holds it as it is")
    else:
        parts.append("no single card of the catalog holds it as it is")
    return "; ".join(parts)


def _tokens_to_train(cfg, seq_len: int, mb: int, data_report: Any | None) -> tuple[float | None, str]:
    """Tokens the run processes (padding included), and where the figure comes from."""
    eff = cfg.train.effective_batch_size
    tokens = getattr(data_report, "tokens", None) if data_report is not None else None
    rows = getattr(data_report, "rows_kept", 0) if data_report is not None else 0
    if tokens is not None and rows:
        # Per training sequence: tokens.mean (for a text corpus, rows_kept counts documents, not blocks).
        mean = getattr(tokens, "mean", 0.0) or tokens.total / rows
        # a padded micro-batch is as long as its longest row: from the mean towards p95 as it grows
        padded = min(seq_len, mean + (max(tokens.p95, mean) - mean) * min(1.0, math.log2(max(mb, 1)) / 3))
        if cfg.train.max_steps > 0:
            return cfg.train.max_steps * eff * padded, f"{cfg.train.max_steps} steps x {eff} sequences"
        train_rows = getattr(data_report, "train_rows", rows) or rows
        return cfg.train.epochs * train_rows * padded, f"{cfg.train.epochs:g} epoch(s) of {train_rows} rows"
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps * eff * seq_len, f"{cfg.train.max_steps} steps x {eff} sequences of {seq_len}"
    return None, "unknown until the data stage has counted the dataset"


def _grpo_tokens_to_train(cfg, c: dict[str, Any], data_report: Any | None) -> tuple[float | None, str]:
    """GRPO: every completion trains on its padded prompt + completion (completions padded to the longest of the
    micro-batch; counted at max_completion_length: an upper bound)."""
    eff, completion = cfg.train.effective_batch_size, c["max_completion_length"]
    g = cfg.train.num_generations
    tokens = getattr(data_report, "tokens", None) if data_report is not None else None
    rows = getattr(data_report, "rows_kept", 0) if data_report is not None else 0
    if cfg.train.max_steps > 0:
        per = (getattr(tokens, "p95", 0) or c["max_prompt_length"]) if tokens is not None else c["max_prompt_length"]
        return (cfg.train.max_steps * eff * (per + completion),
                f"{cfg.train.max_steps} steps x {eff} completions of up to {per} + {completion} tokens")
    if tokens is not None and rows:
        train_rows = getattr(data_report, "train_rows", rows) or rows
        per = max(getattr(tokens, "p95", 0), getattr(tokens, "mean", 0.0) or tokens.total / rows)
        return (cfg.train.epochs * train_rows * g * (per + completion),
                f"{cfg.train.epochs:g} epoch(s) of {train_rows} prompts x {g} completions of up to "
                f"{per:.0f} + {completion} tokens")
    return None, "unknown until the data stage has counted the prompts"


def make_plan(cfg, spec: ArchSpec, seq_len: int, seq_len_source: str, data_report: Any | None = None,
              extra_notes: list[str] | None = None, checkpoint_dtype: str | None = None) -> Plan:
    """The plan for recipe `cfg`; raises DoesNotFitError (exit 4) when no candidate fits: the card, while loading
    or training, or hardware.ram_gib while loading. `checkpoint_dtype`: config.json's torch_dtype (what loading
    reads; None: the compute dtype)."""
    _check_pins(cfg)
    if spec.lora_param_targets(list(cfg.adapter.targets), cfg.adapter.rank) and cfg.adapter.dropout > 0:
        raise ConfigError(
            f"adapter.dropout={cfg.adapter.dropout:g}: {spec.architecture}'s experts are 3-D parameters, which "
            "LoRA reaches through peft's ParamWrapper (target_parameters), and ParamWrapper refuses dropout; "
            "set adapter.dropout=0, or adapter.targets=[attention]")
    hw = cfg.hardware
    budget = _budget(hw.vram_gib, cfg.preflight.margin)
    rank, targets = cfg.adapter.rank, list(cfg.adapter.targets)
    lora_targets = spec.lora_targets(targets)
    scorer = _Scorer(cfg, spec, checkpoint_dtype)
    scored = [scorer.score(c) for c in candidates(cfg, spec, seq_len, seq_len_source)]
    fitting = [c for c in scored if c.need <= budget]
    model = {
        "name": cfg.model.name_or_path,
        "architecture": spec.architecture,
        "params_total": spec.params_total,
        "params_trainable": spec.lora_params(targets, rank),
        # modules, then the MoE experts' parameters (peft target_parameters)
        "lora_targets": list(dict.fromkeys(lin.name for lin in lora_targets))
        + [name for name, *_ in spec.lora_param_targets(targets, rank)],
    }
    if not fitting:
        raise DoesNotFitError(does_not_fit_message(cfg, spec, seq_len, seq_len_source, budget, checkpoint_dtype))
    if hw.ram_gib is not None:
        ram = int(hw.ram_gib * GiB)
        in_ram = [c for c in fitting if c.load is None or c.load.cpu_ram_bytes <= ram]
        if not in_ram:
            raise DoesNotFitError(ram_message(cfg, min(fitting, key=lambda c: c.load.cpu_ram_bytes), ram))
        fitting = in_ram
    chosen = _choose(fitting)
    c = chosen.choices

    grpo = cfg.train.method.value == "grpo"
    prompt_len = seq_len
    if grpo:
        seq_len = c["max_seq_len"]  # prompt + completion: what the training step and the evaluation run
    # evaluation: a plain forward materializes batch x seq x vocab logits
    eval_total = memory.eval_peak(spec, c, batch_size=cfg.eval.batch_size, seq_len=seq_len, rank=rank,
                                  targets=targets, settings=scorer.settings)
    stages = {s.value for s in cfg.stages}
    eval_line = (f"evaluation (eval.batch_size={cfg.eval.batch_size}, full vocabulary x tokens logits): "
                 f"{_gib(eval_total)}")
    if eval_total > budget:
        fits_at = 0
        for bs in range(cfg.eval.batch_size - 1, 0, -1):
            if memory.eval_peak(spec, c, batch_size=bs, seq_len=seq_len, rank=rank, targets=targets,
                                settings=scorer.settings) <= budget:
                fits_at = bs
                break
        fix = f"set eval.batch_size={fits_at}" if fits_at else "shorten dataset.max_seq_len"
        if "eval" in stages:
            raise DoesNotFitError(f"training fits ({describe(c)}: {_gib(chosen.total)}) but the evaluation of "
                                  f"{cfg.model.name_or_path} at eval.batch_size={cfg.eval.batch_size} needs "
                                  f"{_gib(eval_total)} of a {_gib(budget)} budget (it materializes "
                                  f"{cfg.eval.batch_size} x {seq_len} x {spec.vocab} logits); {fix}")
        eval_line += f" — does NOT fit: {fix}"
    else:
        eval_line += " — fits"

    alternatives = [{"choices": a.choices, "device_total_bytes": a.total,
                     "relative_speed": round(a.thr.relative, 4), "why_not": _why_not(a, chosen, budget)}
                    for a in _alternatives(scored, chosen, budget)]

    if grpo:
        tokens, source = _grpo_tokens_to_train(cfg, c, data_report)
    else:
        tokens, source = _tokens_to_train(cfg, seq_len, c["micro_batch_size"], data_report)
    if tokens is not None and sequences_per_example(cfg) > 1:
        tokens, source = tokens * sequences_per_example(cfg), source + ", chosen and rejected each"
    tps = chosen.thr.tokens_per_s
    if tokens is not None:
        wall = f"~{speed.wall_time_text(tokens / tps)} for ~{tokens / 1e6:.1f}M tokens ({source})"
    else:
        wall = f"wall time {source}"
    card = hw.name if hw.tflops else f"{hw.name} (no hardware.tflops given: an A10G-class card assumed)"
    explanation = [
        f"{spec.architecture}: {spec.params_total:,} parameters, LoRA rank {rank} on "
        f"{', '.join(model['lora_targets'])}: {model['params_trainable']:,} trainable",
        f"budget {_gib(budget)} per GPU = {hw.vram_gib:g} GiB ({hw.name}) x (1 - margin {cfg.preflight.margin:g})",
        f"sequence length {seq_len} from the {seq_len_source}" if not grpo else
        f"sequence length {seq_len}: prompts up to {prompt_len} tokens (from the {seq_len_source}) + completions up "
        f"to train.max_completion_length={c['max_completion_length']}",
        f"chose {describe(c)}: {_gib(chosen.total)} on the device (peak at the {chosen.est.phase}), the fastest "
        f"of {len(fitting)} plans that fit ({len(scored)} tried)",
        f"throughput ~{tps:,.0f} tokens/s on {card}, {chosen.thr.relative:.0%} of this card's ceiling for this "
        f"model; {wall} — an estimate from the cost model in finetune/preflight/speed.py, not a measurement",
        eval_line,
    ]
    faster = [s for s in scored if s.need > budget and s.thr.tokens_per_s > TIE * tps]
    if faster:
        f = max(faster, key=lambda s: s.thr.tokens_per_s)
        explanation.append(f"a faster plan ({describe(f.choices)}, {f.thr.relative:.0%}) needs {_gib(f.need)}"
                           + (f" while loading: {f.load.gpu_why}" if f.load_bound else ""))
    explanation += _method_notes(cfg, chosen) + _architecture_notes(spec, c, seq_len, extra_notes)
    pinned = [k for k, v in vars(cfg.preflight.pin).items() if v is not None]
    if pinned:
        explanation.append(f"pinned by the recipe: {', '.join('preflight.pin.' + k for k in pinned)}")
    if c["micro_batch_size"] * c["gradient_accumulation_steps"] * hw.world_size != cfg.train.effective_batch_size:
        explanation.append(f"effective batch {c['micro_batch_size'] * c['gradient_accumulation_steps'] * hw.world_size}"
                           f" (train.effective_batch_size={cfg.train.effective_batch_size} is not a multiple of "
                           f"the micro-batch x GPUs)")
    if c["distributed"] == "ddp":
        explanation.append(f"ddp: each of the {hw.world_size} GPUs holds the whole model (per-GPU memory as on one)")
    elif c["distributed"] == "fsdp":
        explanation.append(f"fsdp: the frozen weights, LoRA and optimizer state are sharded over {hw.world_size} "
                           "GPUs; two layers are gathered at a time")
        if chosen.load is not None:
            explanation.append(f"loading: {chosen.load.why} — within the {_gib(budget)} budget per GPU")
            if hw.ram_gib is None:
                explanation.append(f"CPU RAM while loading (~{_gib(chosen.load.cpu_ram_bytes)} per machine) is not "
                                   "checked: set hardware.ram_gib to the machine's RAM to check it")
            else:
                explanation.append(f"CPU RAM while loading: {_gib(chosen.load.cpu_ram_bytes)} of "
                                   f"hardware.ram_gib={hw.ram_gib:g} per machine")
    if hw.world_size > 1:
        explanation.append(_network_note(hw, chosen.thr, c["distributed"]))
    if hw.device.value == "cpu":
        explanation.append("device cpu: the estimate is resident memory (the process included); nvidia-smi "
                           "figures do not apply")
    elif hw.device.value == "mps" or hw.unified_memory:
        explanation.append("unified memory: the budget is the GPU's share of system RAM; no CUDA context")
    if hw.device.value == "cuda":
        explanation.append(kernels_note(c["attention"]))
    explanation += chosen.est.notes
    drift = versions.drift_line()
    if drift:
        explanation.insert(0, drift)
    predicted = chosen.est.predicted()
    # where the architecture's inventory came from: arch.py's rules, or traced (finetune/probes/trace.py);
    # read after planning, since the trace runs on first use
    model["architecture_source"] = "hand-written" if spec.traced is None else "traced"
    if spec.traced is not None:
        model["trace"] = spec.traced.summary()
    details = {"tokens_per_s": tps, "relative_speed": chosen.thr.relative, "phase": chosen.est.phase,
               "paged": chosen.est.paged, "eval_total": eval_total, "wall": wall}
    load_peak = chosen.load.to_dict() if chosen.load is not None and c["distributed"] == "fsdp" else None
    generation = chosen.est.generation.to_dict() if chosen.est.generation is not None else None
    return Plan(model=model, choices=c, predicted=predicted, breakdown_bytes=chosen.est.breakdown,
                budget_bytes=budget, fits=True, alternatives=alternatives, explanation=explanation, details=details,
                load_peak=load_peak, generation=generation)


def ram_message(cfg, best: Candidate, ram: int) -> str:
    """hardware.ram_gib is too small for loading even the plan that needs the least CPU RAM: one line."""
    hw = cfg.hardware
    load = best.load
    c = best.choices
    per_machine = hw.num_gpus
    if c["quantization"] == "none" and c["distributed"] == "fsdp":
        fix = ("a 4-bit base needs far less (preflight.pin.quantization=nf4, where the card holds the whole 4-bit "
               "base), or a machine with more RAM")
    else:
        fix = (f"fewer processes per machine (hardware.num_gpus={max(1, per_machine // 2)}, hardware.num_nodes="
               f"{hw.num_nodes * 2})" if per_machine > 1 else "a machine with more RAM")
    return (f"{cfg.model.name_or_path}: loading needs {_gib(load.cpu_ram_bytes)} of CPU RAM per machine and "
            f"hardware.ram_gib={hw.ram_gib:g} ({_gib(ram)}) is less, with the plan that needs the least "
            f"({describe(c)}): {load.why}; use {fix}, or correct hardware.ram_gib")


def unpredicted_plan(cfg, model_type: str, seq_len: int, seq_len_source: str, reason: str) -> Plan:
    """The plan for an architecture the preflight cannot model (finetune/probes/trace.py could not build or
    train a copy): only when the recipe pins every choice, which then runs as pinned, with no prediction.
    Otherwise the reason, and what to pin, in one line (ConfigError, exit 2)."""
    pin = cfg.preflight.pin
    needed = ("quantization", "gradient_checkpointing", "micro_batch_size")
    missing = [f"preflight.pin.{k}" for k in needed if getattr(pin, k) is None]
    if missing:
        raise ConfigError(f"{reason}; to run it without a memory plan, pin {', '.join(missing)} (and check "
                          f"hardware.vram_gib={cfg.hardware.vram_gib:g}): the run then uses exactly those choices")
    _check_pins(cfg)
    quant = pin.quantization.value
    per_gpu = _per_gpu_batch(cfg)
    mb = int(pin.micro_batch_size)
    if per_gpu % mb:
        raise ConfigError(f"preflight.pin.micro_batch_size={mb} does not divide the per-GPU share ({per_gpu}) of "
                          f"train.effective_batch_size={cfg.train.effective_batch_size}")
    cuda = cfg.hardware.device.value == "cuda"
    c = _choice(cfg, quant, True if pin.double_quant is None else bool(pin.double_quant),
                bool(pin.gradient_checkpointing), mb,
                pin.optimizer.value if pin.optimizer is not None else ("paged_adamw_8bit" if cuda else "adamw"),
                pin.distributed.value if pin.distributed is not None else "ddp", seq_len, seq_len_source,
                "")  # attention: transformers' default for the family
    if cfg.train.method.value == "grpo":  # no memory model: the smallest valid generation batch, TRL's vLLM default
        c = dict(c, max_seq_len=seq_len + cfg.train.max_completion_length)
        c["generation_batch_size"] = generation_batch_sizes(c)[0]
        c.pop("vllm_gpu_memory_utilization", None)
    model = {"name": cfg.model.name_or_path, "architecture": model_type, "params_total": None,
             "params_trainable": None, "lora_targets": list(cfg.adapter.targets), "architecture_source": "unknown"}
    explanation = [
        f"NOT PREDICTED: {reason}",
        f"running as pinned: {describe(c)}, {cfg.hardware.vram_gib:g} GiB ({cfg.hardware.name}) assumed enough; "
        "an out-of-memory error has no smaller plan to fall back to",
    ]
    drift = versions.drift_line()
    if drift:
        explanation.insert(0, drift)
    return Plan(model=model, choices=c, predicted={}, breakdown_bytes={}, budget_bytes=_budget(
        cfg.hardware.vram_gib, cfg.preflight.margin), fits=True, alternatives=[], explanation=explanation)


def _network_note(hw, thr, distributed: str) -> str:
    """What the collectives cost in the plan: the link they run at, and their share of a step."""
    if hw.num_nodes > 1:
        link = (f"{hw.num_nodes} nodes x {hw.num_gpus} GPU{'s' if hw.num_gpus > 1 else ''}: across nodes the "
                f"network, hardware.internode_gbps={hw.internode_gbps:g} Gb/s per node"
                f"{f' shared by its {hw.num_gpus} GPUs' if hw.num_gpus > 1 else ''}")
    else:
        link = f"{hw.num_gpus} GPUs over hardware.interconnect_gbs={hw.interconnect_gbs:g} GB/s"
    share = thr.comm_s / thr.step_s if thr.step_s else 0.0
    return (f"communication ({link}): ~{thr.comm_s * 1e3:,.1f} ms of each {thr.step_s * 1e3:,.0f} ms micro-batch "
            f"step ({share:.0%}): " + ("FSDP's all-gathers of the frozen weights and the LoRA gradients' all-reduce"
                                       if distributed == "fsdp" else "the LoRA gradients' all-reduce"))


def _method_notes(cfg, chosen: Candidate | None = None) -> list[str]:
    method = cfg.train.method.value
    if method == "sft":
        return []
    if method == "grpo":
        return _grpo_notes(cfg, chosen)
    what = {"dpo": "chosen and rejected run through the model together (2 x micro-batch sequences with "
                   "gradients); the reference is the base with the adapter off, a forward without a graph and no "
                   "second copy of the weights",
            "orpo": "chosen and rejected run through the model together (2 x micro-batch sequences with gradients); "
                    "no reference model",
            "simpo": "chosen and rejected run through the model together (2 x micro-batch sequences with "
                     "gradients); no reference model",
            "kto": "one completion per example with gradients; the KL completions and the reference (the base "
                   "with the adapter off) run without a graph; at least 2 completions per micro-batch"}[method]
    if cfg.train.init_adapter and method in ("dpo", "kto"):
        what = what.replace("the base with the adapter off", "the adapter training starts from (train.init_adapter), "
                            "a frozen copy counted with the LoRA weights")
    return [f"train.method={method}: {what}"]


def _grpo_notes(cfg, chosen: Candidate | None) -> list[str]:
    t = cfg.train
    ref = (f"beta={t.beta:g}: the reference (the base with the adapter off, no second copy of the weights) runs a "
           "forward without a graph on each micro-batch" if t.beta else "beta 0 (TRL's default): no reference model")
    lines = [f"train.method=grpo: {t.num_generations} completions per prompt (train.num_generations), up to "
             f"{t.max_completion_length} tokens each, sampled by the policy itself "
             + ("(generate() through the LoRA on the base)" if t.generation.value == "transformers"
                else "(a colocated vLLM engine on the same GPU)")
             + f"; train.effective_batch_size={t.effective_batch_size} counts completions "
             f"({t.effective_batch_size // t.num_generations} prompts per optimizer step); each micro-batch trains "
             f"on its completions (labels on the completion only); {ref}"]
    gen = chosen.est.generation if chosen is not None else None
    if gen is None:
        return lines
    c = chosen.choices
    calls = c["micro_batch_size"] * c["gradient_accumulation_steps"] * c["num_gpus"] // c["generation_batch_size"]
    extra = chosen.est.breakdown.get("generation", 0)
    if gen.engine == "vllm":
        lines.append(f"generation: {gen.why}; the plan adds that share ({_gib(gen.total_bytes)}) to the training "
                     f"step; not modelled: vLLM's sleep mode, its profiling run, prefix caching, CUDA graphs beyond "
                     f"a fixed {_gib(memory.VLLM_OVERHEAD)}")
    else:
        peak = ("it is the peak, {_gib(extra)} above the training step" if extra > 0
                else "the training step is the peak").replace("{_gib(extra)}", _gib(extra))
        lines.append(f"generation: {gen.why} ({peak}); generation_batch_size={c['generation_batch_size']}: "
                     f"{calls} generate() call(s) per optimizer step")
    lines.append("the speed estimate counts generation simply (each decoding step reads every weight once, 4-bit "
                 "dequantized, and the KV cache at the card's bandwidth; the prefill as compute); not measured; the "
                 "relative speed compares with the training step's ceiling, generation excluded")
    return lines


def _architecture_notes(spec: ArchSpec, c: dict[str, Any], seq_len: int, extra: list[str] | None) -> list[str]:
    notes = list(extra or [])
    if c["quantization"] != "none" and not any(lin.quantizable for lin in spec.linears):
        notes.append(f"{spec.architecture}: transformers {versions.release('transformers')} replaces only "
                     "modules whose type is nn.Linear; FalconLinear is a subclass, so the base stays bf16 under "
                     "'quantization'")
    if spec.experts and c.get("quantized_experts"):
        bits = "4-bit" if c["quantization"] == "nf4" else "8-bit"
        notes.append(f"{spec.architecture}: experts {bits}: the {spec.experts} experts per layer (3-D parameters, "
                     f"which bitsandbytes' loader leaves in bf16) are quantized one expert matrix at a time and "
                     f"computed only for the experts the router picks; LoRA reaches them as peft target_parameters")
    elif spec.experts:
        notes.append(f"{spec.architecture}: the {spec.experts} experts per layer are 3-D parameters, kept in "
                     f"{c['compute_dtype']} on an unquantized base; LoRA reaches them as peft target_parameters")
    if spec.traced is not None:
        notes.append(f"{spec.architecture} ({spec.model_type}) has no hand-written rules here: its layers and "
                     f"parameters were read from transformers' own model and its activations traced on "
                     f"scaled-down copies ({spec.traced.describe()})")
        if spec.traced.worst_fit > FIT_TOLERANCE:
            notes.append(f"the trace's fit leaves {spec.traced.worst_fit:.1%} of a measurement unexplained (the "
                         f"tolerance is {FIT_TOLERANCE:.0%}): the activation estimate is less certain than usual; "
                         "consider a larger preflight.margin")
    if spec.attention == "eager":
        notes.append(f"{spec.architecture} trains with eager attention (transformers' only path for it, or the "
                     f"one the memory model was verified on): it keeps {spec.heads} x {seq_len} x {seq_len} "
                     "probabilities per layer and sequence")
    if c["quantization"] != "none" and spec.norm == "layer" and any(lin.quantizable for lin in spec.linears):
        notes.append("LayerNorm returns fp32 under autocast and bitsandbytes returns its input's dtype: the "
                     "quantized layers' outputs and the residual stream are fp32")
    return notes
