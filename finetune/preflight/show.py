"""The plan as rich tables: the choice, where the memory goes, and what else was considered."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from finetune.preflight.memory import GiB
from finetune.preflight.planner import Plan

PARTS = {
    "weights_quantized": "frozen weights, quantized",
    "weights_unquantized": "frozen weights, bf16/fp16 (embeddings, norms, lm_head, ...)",
    "quant_constants": "quantization constants",
    "lora_params": "LoRA parameters",
    "lora_grads": "LoRA gradients",
    "optimizer_state": "optimizer state",
    "activations": "activations kept for backward",
    "lm_head_and_loss": "LM head and loss",
    "workspace": "workspace (dequantized weight, cuBLAS)",
    "allocator_cache": "allocator cache (reserved - allocated)",
    "cuda_context": "CUDA context",
    "generation": "generation (GRPO)",
}


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def count(n: int) -> str:
    """6738415616 -> 6.74B; 39976960 -> 40.0M; 354624 -> 355K; None (not known) -> ?."""
    if n is None:
        return "?"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}" if unit != "B" else f"{n / size:.2f}B"
    return str(n)


def generation_text(gen: dict, c: dict) -> str:
    """The plan's generation line: how many completions at once, and what the phase holds."""
    at_once = f"{gen['sequences']} completions x {gen['tokens']} tokens at once (generation_batch_size " \
              f"{c.get('generation_batch_size')})"
    if gen["engine"] == "vllm":
        return (f"vLLM colocated, vllm_gpu_memory_utilization={gen['vllm_gpu_memory_utilization']:g}: "
                f"{_gib(gen['total_bytes'])} GiB beside training (16-bit weights {_gib(gen['weights_bytes'])}, KV "
                f"cache {_gib(gen['kv_cache_bytes'])}); {at_once}")
    ref = f", reference forward {_gib(gen['reference_bytes'])}" if gen.get("reference_bytes") else ""
    return (f"{_gib(gen['total_bytes'])} GiB on the device: KV cache {_gib(gen['kv_cache_bytes'])}, logits "
            f"{_gib(gen['logits_bytes'])}, prefill {_gib(gen['prefill_bytes'])}{ref} GiB; {at_once}")


def generation_part(gen: dict) -> str:
    """The breakdown's generation row: what the phase holds, and how it relates to the training step."""
    if gen["engine"] == "vllm":
        return (f"generation: vLLM engine (16-bit weights {_gib(gen['weights_bytes'])}, KV cache "
                f"{_gib(gen['kv_cache_bytes'])})")
    ref = f", reference {_gib(gen['reference_bytes'])}" if gen.get("reference_bytes") else ""
    return (f"generation above the training step (KV cache {_gib(gen['kv_cache_bytes'])}, logits "
            f"{_gib(gen['logits_bytes'])}, prefill {_gib(gen['prefill_bytes'])}{ref}; phase total "
            f"{_gib(gen['total_bytes'])})")


def show_plan(plan: Plan, console: Console | None = None) -> None:
    console = console or Console()
    c = plan.choices
    m = plan.model
    head = Table(title=f"Plan for {m['name']}", show_header=False, title_justify="left")
    head.add_column(style="bold")
    head.add_column()
    head.add_row("model", f"{m['architecture']}, {count(m['params_total'])} params, "
                          f"{count(m['params_trainable'])} trainable (LoRA on {', '.join(m['lora_targets'])})")
    q = c["quantization"] + (" + double quant" if c["quantization"] == "nf4" and c["double_quant"] else "")
    if c.get("quantized_experts"):
        q += f", experts {'4-bit' if c['quantization'] == 'nf4' else '8-bit'}"
    head.add_row("quantization", q)
    head.add_row("compute dtype", f"{c['compute_dtype']}, attention {c['attention']}")
    head.add_row("gradient checkpointing", "on" if c["gradient_checkpointing"] else "off")
    gpus = f" x {c['num_gpus']} GPUs ({c['distributed']})" if c["num_gpus"] > 1 else ""
    head.add_row("batch", f"micro-batch {c['micro_batch_size']} x {c['gradient_accumulation_steps']} accumulation"
                          f"{gpus}")
    head.add_row("sequence length", f"{c['max_seq_len']} (from the {c['seq_len_source']})")
    head.add_row("optimizer", c["optimizer"])
    p = plan.predicted
    if not p:  # an architecture the preflight cannot model, run as pinned
        head.add_row("predicted", "[yellow]not predicted[/yellow] (the run uses the pinned choices as they are)")
        console.print(head)
        for line in plan.explanation:
            console.print(f"  - {line}")
        return
    verdict = "[green]fits[/green]" if plan.fits else "[red]does not fit[/red]"
    head.add_row("predicted", f"{_gib(p['device_total_bytes'])} GiB on the device of a {_gib(plan.budget_bytes)} "
                              f"GiB budget: {verdict} (peak allocated {_gib(p['peak_allocated_bytes'])}, "
                              f"reserved {_gib(p['peak_reserved_bytes'])})")
    load = plan.load_peak
    if load and c.get("distributed") == "fsdp":
        head.add_row("loading", f"{_gib(load['gpu_bytes'])} GiB per GPU, {_gib(load['cpu_ram_bytes'])} GiB CPU RAM "
                                "per machine, before FSDP shards the base (how: the loading line below)")
    gen = plan.generation
    if gen:
        head.add_row("generation", generation_text(gen, c))
    d = plan.details
    if d:
        head.add_row("speed (estimate)", f"~{d['tokens_per_s']:,.0f} tokens/s; {d['wall']}")
    console.print(head)

    parts = Table(title="Where the memory goes at the peak (GiB)", title_justify="left")
    parts.add_column("part")
    parts.add_column("GiB", justify="right")
    for name, value in sorted(plan.breakdown_bytes.items(), key=lambda kv: -kv[1]):
        if name == "generation" and gen:
            parts.add_row(generation_part(gen), _gib(value))
        elif value:
            parts.add_row(PARTS.get(name, name), _gib(value))
    parts.add_row("[bold]total (what nvidia-smi would show)[/bold]", f"[bold]{_gib(p['device_total_bytes'])}[/bold]")
    console.print(parts)

    if plan.alternatives:
        alts = Table(title="Next best plans", title_justify="left")
        for col in ("quant", "ckpt", "micro-batch", "optimizer", "GiB", "speed", "why not"):
            alts.add_column(col)
        for a in plan.alternatives:
            ac = a["choices"]
            q = ac["quantization"] + ("+dq" if ac["quantization"] == "nf4" and ac["double_quant"] else "")
            dist = f" {ac['distributed']}" if ac.get("distributed") not in (None, "none") else ""
            alts.add_row(q, "on" if ac["gradient_checkpointing"] else "off",
                         f"{ac['micro_batch_size']} x{ac['gradient_accumulation_steps']}{dist}", ac["optimizer"],
                         _gib(a["device_total_bytes"]), f"{a['relative_speed']:.2f}", a["why_not"])
        console.print(alts)
    for line in plan.explanation:
        console.print(f"  - {line}")
