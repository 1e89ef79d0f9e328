"""Relative speed and throughput of a plan: a small cost model, not a benchmark.

Time of one micro-batch (forward + backward) on one GPU:

* matrix FLOPs: a forward pass costs 2 FLOPs per weight per token (every linear layer, the
  routed experts of an MoE layer, the LM head) plus attention's QK^T and PV products
  (4 x seq x heads x head_dim per token and layer; causal kernels — SDPA without a mask,
  flash — skip the masked half). Backward costs one more forward for the input gradients
  (frozen weights need no weight gradients; LoRA's rank-r products are counted apart) and
  twice the forward for attention (dQ, dK, dV). Gradient checkpointing recomputes the forward
  of every layer once more: for LoRA that is ~1.5x the FLOPs, not 1.33x as with full training;
* at ``MFU_MAX`` of the card's dense tensor throughput, scaled by the matrix size: a GEMM
  with M = micro-batch x sequence rows runs at M / (M + ``M_HALF``) of its large-M rate;
* 4-bit dequantization: bitsandbytes rebuilds each weight in the compute dtype before its
  matmul in forward, backward and recompute; that traffic (read 0.5 B, write and read back
  2 B per weight) runs at the card's memory bandwidth;
* LLM.int8: the input is quantized row-wise on every call and the outliers go through a
  separate fp16 product; modelled as ``INT8_EFFICIENCY`` of the bf16 rate plus the same
  weight dequantization as nf4 in backward;
* a fixed launch/Python overhead per decoder layer and pass (``LAYER_OVERHEAD_S``);
* FSDP all-gathers the frozen weights in forward, backward (and recompute), half of it hidden
  behind compute; DDP (and FSDP) all-reduce the LoRA gradients once per optimizer step. A ring
  collective moves (n-1)/n of the data over each link and runs at its slowest link: the
  interconnect between the GPUs of a node, and across nodes (hardware.num_nodes > 1) the
  network, hardware.internode_gbps per node shared by its GPUs.

``relative_speed`` divides a plan's tokens/s by the best this model could do on this card
(unquantized, no checkpointing, a saturating micro-batch), so 1.0 is the ceiling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune.architectures.spec import ArchSpec

# Fraction of peak dense tensor FLOP/s a transformers + peft training step reaches at a large
# micro-batch. From fms-acceleration's A100-80GB reference (Mistral-7B, LoRA r16 on q/k/v/o,
# 4 x 4096 tokens, checkpointing, flash-attention 2): 3597 tokens/s x 46.6 GFLOP/token by the
# count above = 168 TFLOP/s = 0.54 of 312.
MFU_MAX = 0.55
# Rows (micro-batch x sequence) at which a GEMM reaches half its large-M efficiency: ~70% at
# M=512 and ~98% at M=16k, the shape of cuBLAS bf16 GEMM efficiency on A100/Ada for K,N ~ 4096.
M_HALF = 256
# Bytes moved per weight per dequantization: read 0.5 (nf4), write 2 and read back 2 (bf16).
DEQUANT_BYTES = 4.5
# Share of the card's bandwidth an elementwise dequantization kernel reaches.
BANDWIDTH_EFFICIENCY = 0.8
# LLM.int8 (threshold 6.0) runs well below bf16 GEMM speed in training (activation quantization
# each call, outlier decomposition, int32 accumulation then dequantization).
INT8_EFFICIENCY = 0.5
# Kernel-launch and Python overhead per decoder layer per pass (a peft layer stack issues ~50
# kernels per layer and pass; ~10 us each on a busy CPU).
LAYER_OVERHEAD_S = 0.5e-3
# When hardware.tflops / memory_bandwidth_gbs are not given: an A10G-class card.
DEFAULT_TFLOPS = 70.0
DEFAULT_BANDWIDTH = 600.0


@dataclass
class Throughput:
    tokens_per_s: float  # all GPUs together
    step_s: float  # one micro-batch on one GPU
    relative: float  # vs the best plan this model could have on this card
    comm_s: float = 0.0  # of step_s: the collectives (all-gathers, the gradient all-reduce's share)


def _flops_per_token(spec: ArchSpec, seq: int, causal: bool, rank: int, n_lora: int) -> tuple[float, float]:
    """(forward FLOPs per token in matrices, attention share of it)."""
    weights = spec.layers * sum(lin.weight_params for lin in spec.linears)
    if spec.experts:
        weights += spec.layers * spec.experts_per_token * 3 * spec.hidden * spec.intermediate
    weights += spec.vocab * spec.hidden  # LM head
    attn = 4.0 * seq * spec.heads * spec.head_dim * spec.layers * (0.5 if causal else 1.0)
    lora = 2.0 * rank * n_lora
    return 2.0 * weights + attn + lora, attn


def link_gbs(choices: dict[str, Any], interconnect_gbs: float, internode_gbs: float) -> float:
    """GB/s of the slowest link a ring collective over the run's GPUs crosses: the interconnect within a node,
    the network across nodes (one node's bandwidth shared by the GPUs of the node that use it at once)."""
    n = max(1, int(choices.get("num_gpus", 1)))
    nodes = max(1, int(choices.get("num_nodes", 1)))
    if nodes == 1:
        return interconnect_gbs
    return min(interconnect_gbs, internode_gbs) if n == nodes else min(interconnect_gbs, internode_gbs / (n // nodes))


def throughput(spec: ArchSpec, choices: dict[str, Any], *, rank: int, n_lora_features: int,
               tflops: float | None, bandwidth_gbs: float | None, interconnect_gbs: float = 25.0,
               internode_gbs: float = 12.5, best: float | None = None) -> Throughput:
    """Predicted training throughput of `choices` (see the module docstring for the model)."""
    tf = (tflops or DEFAULT_TFLOPS) * 1e12
    bw = (bandwidth_gbs or DEFAULT_BANDWIDTH) * 1e9 * BANDWIDTH_EFFICIENCY
    mb, seq = choices["micro_batch_size"], choices["max_seq_len"]
    tokens = mb * seq
    attention = choices.get("attention", "sdpa")
    causal = attention == "flash2" or (attention == "sdpa" and (mb == 1 or choices.get("packing")))
    fwd, attn = _flops_per_token(spec, seq, causal, rank, n_lora_features)
    ckpt = choices["gradient_checkpointing"]
    flops = fwd + (fwd + attn) + (fwd if ckpt else 0.0)
    rate = tf * MFU_MAX * tokens / (tokens + M_HALF)
    quant = choices["quantization"]
    if quant == "int8":
        rate *= INT8_EFFICIENCY
    compute_s = tokens * flops / rate
    passes = 3 if ckpt else 2
    quantized_weights = spec.layers * sum(lin.weight_params for lin in spec.linears if lin.quantizable)
    dequant_s = 0.0
    if quant == "nf4":
        dequant_s = quantized_weights * DEQUANT_BYTES * passes / bw
    elif quant == "int8":
        dequant_s = quantized_weights * DEQUANT_BYTES * (passes - 1) / bw  # backward dequantizes CB
    overhead_s = spec.layers * passes * LAYER_OVERHEAD_S
    comm_s = 0.0
    n = int(choices.get("num_gpus", 1))
    if n > 1:
        link = link_gbs(choices, interconnect_gbs, internode_gbs) * 1e9
        if choices.get("distributed") == "fsdp":
            weight_bytes = quantized_weights * (0.5 if quant == "nf4" else 1 if quant == "int8" else 2)
            comm_s += weight_bytes * (n - 1) / n * passes / link * 0.5  # half hidden by overlap
        # the LoRA gradients' all-reduce (bf16 for a quantized base, else fp32), once per optimizer step
        grad_bytes = rank * n_lora_features * (2 if quant != "none" else 4)
        comm_s += 2 * grad_bytes * (n - 1) / n / link / max(1, int(choices.get("gradient_accumulation_steps", 1)))
    step_s = compute_s + dequant_s + overhead_s + comm_s
    if choices.get("generation_batch_size"):
        step_s += generation_s(spec, choices, tf=tf, bw=bw)
    tps = tokens / step_s * max(1, n)
    rel = tps / best if best else 1.0
    return Throughput(tokens_per_s=tps, step_s=step_s, relative=rel, comm_s=comm_s)


def generation_s(spec: ArchSpec, choices: dict[str, Any], *, tf: float, bw: float) -> float:
    """GRPO: the share of one micro-batch step spent generating, in a simple model: one generate() call per
    generation batch (generation_batch_size / GPUs sequences per GPU) decodes max_completion_length steps, each
    reading every weight once (4-bit: dequantized, DEQUANT_BYTES per weight; 16-bit: 2 bytes) and the KV cache,
    plus the layer overhead, or computing 2 FLOPs per weight per sequence where that is slower; the prefill is
    compute. An optimizer step makes effective batch / generation batch calls over gradient_accumulation_steps
    micro-batches. vLLM (train.generation=vllm) is modelled as the same decode on 16-bit weights without the
    Python overhead: an optimistic figure for neither."""
    n = max(1, int(choices.get("num_gpus", 1)))
    seqs = max(1, int(choices["generation_batch_size"]) // n)
    prompt, completion = int(choices["max_prompt_length"]), int(choices["max_completion_length"])
    weights = spec.params_total
    vllm = choices.get("generation") == "vllm"
    per_weight = DEQUANT_BYTES if choices["quantization"] == "nf4" and not vllm else (
        1.0 if choices["quantization"] == "int8" and not vllm else 2.0)
    kv_mean = 2 * spec.layers * seqs * (prompt + completion / 2) * spec.kv_heads * spec.head_dim * 2
    read_s = (weights * per_weight + kv_mean) / bw
    flop_s = 2.0 * weights * seqs / (tf * MFU_MAX * seqs / (seqs + M_HALF))
    overhead = 0.0 if vllm else spec.layers * LAYER_OVERHEAD_S
    decode_s = completion * (max(read_s, flop_s) + overhead)
    prefill_s = 2.0 * weights * seqs * prompt / (tf * MFU_MAX)
    call_s = decode_s + prefill_s
    mb, accum = int(choices["micro_batch_size"]), max(1, int(choices.get("gradient_accumulation_steps", 1)))
    calls = mb * accum * n / int(choices["generation_batch_size"])  # generate() calls per optimizer step
    return call_s * calls / accum


def ceiling(spec: ArchSpec, choices: dict[str, Any], **kwargs: Any) -> float:
    """Tokens/s of the best plan this model could have on this card: unquantized, no checkpointing,
    a micro-batch large enough to saturate the GPU."""
    ideal = {k: v for k, v in choices.items() if k != "generation_batch_size"}  # the training step alone
    ideal = dict(ideal, quantization="none", gradient_checkpointing=False,
                 micro_batch_size=max(1, 16384 // max(1, choices["max_seq_len"])), distributed="none", num_gpus=1,
                 num_nodes=1)
    per_gpu = throughput(spec, ideal, **kwargs).tokens_per_s
    return per_gpu * max(1, int(choices.get("num_gpus", 1)))


def wall_time_text(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
