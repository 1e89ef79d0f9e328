"""Peak GPU memory of one training step, from the architecture and the plan's choices.

Pure arithmetic (no torch): the estimate for one candidate plan takes microseconds,
so the planner can try hundreds. It models what our stack does:

* frozen weights: bitsandbytes NF4 (0.5 B/param) or LLM.int8 (1 B/param) for the
  decoder blocks' linear layers; embeddings, norms and lm_head stay in the compute
  dtype (transformers skips lm_head when quantizing);
* LoRA parameters, gradients and optimizer state in bf16: TRL 1.16 casts the
  trainable parameters of a quantized model to bf16, and torch's AdamW keeps its
  two moments in the parameter's dtype;
* activations in the compute dtype: we do NOT call peft's
  ``prepare_model_for_kbit_training`` (it upcasts the non-quantized parameters to
  fp32, which makes every hidden state fp32: +4 GiB at 4 x 4096 tokens on
  Mistral-7B, the E3/E5 gap of the calibration data); TRL does not call it either;
* TRL's fused LM head: during training the logits are computed in chunks over the
  positions that carry a label, never as a full vocabulary x tokens tensor.

The constants are first estimates from the structure of the computation; the
calibration against measured peaks lives in tests/test_preflight.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune.preflight.arch import ArchSpec

GiB = 1 << 30
MiB = 1 << 20

BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}

# bitsandbytes NF4: 4 bits per weight plus one fp32 absmax per block of 64 weights;
# double quantization stores the absmax as 8-bit with one fp32 constant per 256 blocks.
NF4_BYTES = 0.5
NF4_CONST = 4 / 64
NF4_CONST_DQ = 1 / 64 + 4 / (64 * 256)
# LLM.int8: 1 byte per weight plus an fp32 scale per output row (counted per layer below).
INT8_BYTES = 1.0

# Optimizer state bytes per trainable (bf16) parameter.
OPTIMIZER_BYTES = {
    "adamw": 2 * 2,  # exp_avg + exp_avg_sq in the parameter's dtype (bf16)
    "adamw_8bit": 2 * 1,  # bitsandbytes 8-bit states (block constants are negligible)
    "paged_adamw_8bit": 2 * 1,
    "paged_adamw_32bit": 2 * 4,  # bitsandbytes keeps 32-bit states
}

# Elements saved per token per decoder layer for the backward pass, in units of the hidden
# size and of the MLP width: the normed inputs of attention and MLP, q/k/v after RoPE, the
# attention output and its log-sum-exp (SDPA/flash keep no seq x seq matrix), the residual
# inputs; gate, up, act(gate) and their product in the MLP.
ACT_PER_HIDDEN = 8
ACT_PER_INTERMEDIATE = 4
# TRL's fused LM head projects at most this many labelled positions at a time (fp32 logits
# and their log-softmax for the chunk).
LM_HEAD_CHUNK = 1024
# cuBLAS / bitsandbytes workspace besides the dequantized weight buffer.
WORKSPACE_FIXED = 64 * MiB
# What the CUDA context takes on the device (driver, kernels loaded by torch), seen in nvidia-smi.
CUDA_CONTEXT = 512 * MiB
# The caching allocator keeps freed blocks: reserved exceeds allocated by a share of the
# transient (activation) memory plus a fixed slack.
RESERVED_SLACK_SHARE = 0.25
RESERVED_SLACK_FIXED = 128 * MiB


@dataclass
class Estimate:
    breakdown: dict[str, int]
    peak_allocated: int
    peak_reserved: int
    device_total: int

    def predicted(self) -> dict[str, int]:
        return {"peak_allocated_bytes": self.peak_allocated, "peak_reserved_bytes": self.peak_reserved,
                "device_total_bytes": self.device_total}


def estimate(spec: ArchSpec, choices: dict[str, Any], *, rank: int, targets: list[str],
             on_gpu: bool = True) -> Estimate:
    """Peak memory of a training step under `choices` (the plan.json `choices` dict)."""
    quant = choices["quantization"]
    compute_bytes = BYTES[choices["compute_dtype"]]
    tokens = choices["micro_batch_size"] * choices["max_seq_len"]
    h, inter, layers = spec.hidden, spec.intermediate, spec.layers

    linear = spec.linear_params
    if quant == "nf4":
        weights_q = int(linear * NF4_BYTES)
        consts = int(linear * (NF4_CONST_DQ if choices["double_quant"] else NF4_CONST))
    elif quant == "int8":
        weights_q = int(linear * INT8_BYTES)
        consts = 4 * layers * sum(lin.count * lin.out_features for lin in spec.linears)
    else:
        weights_q = linear * compute_bytes
        consts = 0
    unquantized = (spec.embedding_params + spec.lm_head_params + spec.norm_params) * compute_bytes

    lora = spec.lora_params(targets, rank)
    lora_params = lora * 2  # bf16
    lora_grads = lora * 2
    optimizer = int(lora * OPTIMIZER_BYTES[choices["optimizer"]])

    per_layer_token = (ACT_PER_HIDDEN * h + ACT_PER_INTERMEDIATE * inter) * compute_bytes
    if choices["gradient_checkpointing"]:
        # Each layer keeps only its input; one layer's activations are rebuilt at a time in backward.
        activations = tokens * (layers * h * compute_bytes + per_layer_token)
    else:
        activations = tokens * layers * per_layer_token
    if choices.get("attention") == "eager":
        # The seq x seq attention probabilities per head, kept for backward.
        n_layers_holding = 1 if choices["gradient_checkpointing"] else layers
        activations += (n_layers_holding * choices["micro_batch_size"] * spec.heads
                        * choices["max_seq_len"] ** 2 * compute_bytes * 2)

    lm_head = min(tokens, LM_HEAD_CHUNK) * spec.vocab * 4 * 2 + tokens * h * compute_bytes
    workspace = (spec.max_linear_elements * compute_bytes if quant != "none" else 0) + WORKSPACE_FIXED

    breakdown = {
        "weights_quantized": int(weights_q),
        "weights_unquantized": int(unquantized),
        "quant_constants": int(consts),
        "lora_params": int(lora_params),
        "lora_grads": int(lora_grads),
        "optimizer_state": int(optimizer),
        "activations": int(activations),
        "lm_head_and_loss": int(lm_head),
        "workspace": int(workspace),
        "cuda_context": CUDA_CONTEXT if on_gpu else 0,
    }
    allocated = sum(v for k, v in breakdown.items() if k != "cuda_context")
    reserved = int(allocated + RESERVED_SLACK_SHARE * (activations + lm_head) + RESERVED_SLACK_FIXED)
    return Estimate(breakdown=breakdown, peak_allocated=allocated, peak_reserved=reserved,
                    device_total=reserved + breakdown["cuda_context"])
