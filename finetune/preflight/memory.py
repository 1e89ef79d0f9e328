"""Peak GPU memory of one training step, from the architecture and the plan's choices.

Pure arithmetic (no torch): one estimate takes tens of microseconds, so the planner
can try hundreds. It predicts the three numbers of the plan.json contract —
``torch.cuda.max_memory_allocated()``, ``max_memory_reserved()`` and what nvidia-smi
shows — for what *our* stack does. Each rule below was read off the installed
sources (transformers 5.23, peft 0.21, bitsandbytes 0.50, TRL 1.16):

Frozen weights (transformers/integrations/bitsandbytes.py ``replace_with_bnb_linear``)
  Only modules whose type *is* ``nn.Linear`` (or Conv1D) become bnb Linear4bit /
  Linear8bitLt, and lm_head (the output embedding and the last module) is skipped.
  Everything else stays in the load dtype (bf16): embeddings, norms, biases, lm_head,
  MoE routers, and Falcon's whole blocks (``FalconLinear`` subclasses nn.Linear, so
  ``type(m) is nn.Linear`` is false). The fused experts' 3-D ``nn.Parameter``s (Mixtral,
  Qwen-MoE, OLMoE), which bitsandbytes would leave in bf16, are quantized by
  finetune/models/experts.py, one expert matrix at a time (``choices.quantized_experts``).
  NF4 packs two weights per byte; its absmax is one fp32 per block of 64 weights, or,
  with double quantization, one uint8 per block plus one fp32 per 256 blocks
  (bitsandbytes/functional.py ``quantize_4bit``). LLM.int8 keeps an int8 weight and one
  fp32 scale per output row (``Int8Params``: CB, SCB).

LoRA (peft/tuners/tuners_utils.py ``cast_adapter_dtype``, trl/trainer/sft_trainer.py)
  peft creates adapters in fp32 on a bf16/fp16 base (``autocast_adapter_dtype=True``);
  TRL then casts every trainable parameter of a *quantized* model to bf16. So LoRA is
  bf16 under nf4/int8 and fp32 on an unquantized base; its gradients share its dtype,
  and torch's AdamW keeps two moments in that dtype. bitsandbytes' 8-bit AdamW keeps
  uint8 moments plus an fp32 absmax per 256 values (32-bit for tensors under 4096
  values); its 32-bit optimizers keep fp32 moments. Paged optimizers allocate their
  state with cudaMallocManaged, outside torch's caching allocator: it is not in
  max_memory_allocated/reserved, but nvidia-smi sees it while it is resident.

Activations (what autograd keeps for backward, per token and layer; see ``_layer``)
  Training runs under the Trainer's bf16/fp16 autocast. RMSNorm upcasts its input to
  fp32 and keeps that copy; LayerNorm autocasts to fp32 and returns fp32. A frozen
  linear keeps nothing of its input (its weight gradient is never needed); a LoRA
  adapter's lora_A keeps its input — shared by the layers reading one tensor when no
  cast or dropout intervenes, else one copy per adapter (dropout also keeps a uint8
  mask; peft's fp32 adapters on an unquantized base make each adapter keep its own
  bf16 cast). bnb's Linear4bit returns its *input's* dtype, so on LayerNorm families
  (GPT-J, GPT-NeoX, Phi, BLOOM) the fp32 LayerNorm output makes the quantized MLP and
  the residual stream fp32. SDPA/flash keep q, k, v, the output and an fp32
  log-sum-exp per head; transformers repeats k/v heads (a copy) when SDPA gets a
  mask (padded batches). Eager attention (BLOOM; GPT-J before transformers 5.24) keeps the
  fp32 softmax and its bf16 cast: 6 bytes per head and (query, key) pair.
  Gradient checkpointing (transformers' default: non-reentrant torch.utils.checkpoint
  around each decoder layer) keeps each layer's input and rebuilds one layer at a
  time in backward.

peft's ``prepare_model_for_kbit_training`` casts every non-quantized parameter to
fp32, which makes the embeddings, the residual stream and the checkpointed hidden
states fp32 (the 4 GiB gap between rows E3 and E5 of the calibration data). Our
training does not call it (finetune/train); ``Settings.upcast_fp32`` models it.

LM head and loss (trl/trainer/utils.py ``add_fused_lm_head``, trl/kernels/chunked_logprob.py)
  In training TRL 1.16 projects only the labelled positions, in tiles of
  ``TOKEN_CHUNK_SIZE`` = 4096 tokens x ``_CHUNKED_LOGPROB_CHUNK_SIZE`` = 32768 vocabulary
  entries in the compute dtype, and accumulates the hidden-state gradient in fp32.
  A plain forward (our evaluation, transformers 4.x training) materializes the
  logits instead: see ``MATERIALIZED_LOGIT_BYTES``.

Reserved and device total
  The caching allocator keeps freed blocks: ``reserved = allocated + slack``, where
  the slack grows with the transient working set (see ``FRAGMENTATION``). nvidia-smi
  adds the CUDA context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from finetune.architectures.spec import ATTN_IN, ATTN_OUT, MLP_IN, MLP_MID, ArchSpec, Linear

GiB = 1 << 30
MiB = 1 << 20

BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}

# -- frozen weights ------------------------------------------------------------------------
NF4_BLOCK = 64  # bitsandbytes' default 4-bit blocksize (Params4bit, quantize_4bit)
NF4_NESTED_BLOCK = 256  # double quantization re-quantizes the absmax in blocks of 256
NF4_CODE_BYTES = 16 * 4  # the NF4 code table (16 fp32) per quantized module
NF4_NESTED_CODE_BYTES = 256 * 4 + 4  # the 8-bit dynamic map (256 fp32) and the fp32 offset, with double quant

# -- optimizers ----------------------------------------------------------------------------
BNB_8BIT_BLOCK = 256  # blockwise 8-bit optimizer state: one fp32 absmax per 256 values
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps 32-bit state for tensors with fewer elements
PAGED = {"paged_adamw_8bit", "paged_adamw_32bit"}

# -- LM head and loss ----------------------------------------------------------------------
LM_TOKEN_CHUNK = 4096  # trl/kernels/chunked_logprob.py TOKEN_CHUNK_SIZE
LM_VOCAB_CHUNK = 32768  # trl/trainer/utils.py _CHUNKED_LOGPROB_CHUNK_SIZE
# A materialized vocabulary x tokens loss peaks at 12 bytes per logit: under autocast the
# fp32 logits (4: transformers 4.x's ``logits.float()``, or accelerate's fp32 output
# conversion), the shifted contiguous copy fed to cross_entropy (4) and log_softmax's fp32
# output, kept for backward (4). Backward holds the same three sizes (saved output, its
# gradient, the input gradient). The bf16 projection (2) is freed by then.
MATERIALIZED_LOGIT_BYTES = 12
# LitGPT (bf16-true, no autocast) keeps its bf16 logit chunks and cross_entropy's bf16
# log_softmax outputs alive until backward: 2 + 2 bytes per logit.
LITGPT_LOGIT_BYTES = 4

# -- workspace, allocator, context --------------------------------------------------------
# cuBLAS(Lt) workspaces, allocated through torch's caching allocator since torch 2.x
# (CUBLAS_WORKSPACE_CONFIG default :4096:8 = 8 x 4 MiB per handle/stream).
CUBLAS_WORKSPACE = 32 * MiB
# What nvidia-smi shows for a process before its first tensor: the CUDA context with torch's
# kernels (lazily loaded modules, CUDA 12, torch 2.x) and cuBLAS/cuDNN handles; ~0.5 GiB on
# A100/H100 and on Ada/Ampere consumer cards under Linux.
CUDA_CONTEXT = 512 * MiB
# The caching allocator keeps freed blocks: reserved = allocated + slack. The slack has a fixed
# part (the small-block pool, segments rounded up to 2/20 MiB, blocks cached while the model was
# loaded and quantized) and a part proportional to the transient working set (the memory above the
# stored activations at the peak: logits, one layer's recompute, a dequantized weight), whose freed
# blocks cannot all be reused by the next requests of other sizes. Both constants come from one
# global fit to the nine reserved-side readings of the calibration set (rows D1-D10, metric
# "unstated", read as reserved; and the nvidia-smi figures quoted for E1, E3 and E5, read as
# reserved + context): over a grid of FRAGMENTATION 0-0.55 and RESERVED_FIXED 0.25-1.5 GiB this
# pair has the smallest worst error (13%). Nothing is fitted per row. The allocator releases its
# cache and retries before it reports an out-of-memory error, so on a card with little headroom
# the slack is smaller than what an 80 GB card shows.
FRAGMENTATION = 0.2
RESERVED_FIXED = 1 * GiB
# On the CPU the process itself (Python, torch, transformers, TRL) is resident before any
# tensor: ~1 GiB of RSS.
CPU_PROCESS_BASELINE = 1 * GiB


@dataclass(frozen=True)
class Settings:
    """How the run computes: our stack by default; other stacks (the calibration rows) by settings.

    Every field describes a behaviour of a real implementation; none is a correction factor.
    """

    device: str = "cuda"  # cuda | cpu | mps
    lora_dropout: float = 0.0
    # peft's prepare_model_for_kbit_training: non-quantized parameters (and so hidden states) in fp32
    upcast_fp32: bool = False
    # fused: TRL 1.16's chunked LM head over labelled positions; materialized: vocab x tokens
    # logits with an fp32 loss (transformers 4.x, remote-code models, our evaluation);
    # litgpt: LitGPT's bf16 logit chunks
    lm_head_loss: str = "fused"
    quantize_lm_head: bool = False  # LitGPT's nf4 quantizes lm_head too
    lora_dtype: str | None = None  # None: our stack's rule (bf16 when quantized, else fp32)
    autocast: bool | None = None  # None: on for GPU training (Trainer bf16/fp16), off on the CPU
    labelled_fraction: float = 1.0  # share of positions with a label (the fused head projects only those)
    cuda_context: int = CUDA_CONTEXT
    # LitGPT's LoRA on its fused qkv: one dropout for q, k and v together
    fused_qkv_lora: bool = False
    # norm kernels that keep only the bf16 input (flash-attn's fused RMSNorm, as Qwen1's code uses)
    fused_norm: bool = False
    # bitsandbytes before the change to ``ctx.tensors = (None, B)`` (as quoted in its issue #643,
    # 2023) kept each 4-bit matmul's input for backward; 0.50 keeps only the packed weight
    bnb_keeps_input: bool = False
    # "transformers" (our stack) or "litgpt": LitGPT's own model code — fused qkv whose v view keeps
    # the fused output, one LoRA dropout for q/k/v, torch's fused GELU, lm_head stored untied
    implementation: str = "transformers"
    lora_on_lm_head: bool = False  # LitGPT can put LoRA on lm_head (TRL 1.16 refuses)
    # DPO / KTO from an existing adapter (train.init_adapter): TRL keeps a frozen copy of it as the reference
    # ("ref"), created by peft in fp32 beside the trained one
    reference_adapter: bool = False


@dataclass
class Estimate:
    breakdown: dict[str, int]
    peak_allocated: int
    peak_reserved: int
    device_total: int
    phase: str = ""  # where the peak falls: forward end / LM head backward / layer backward
    persistent: int = 0  # weights + LoRA + grads + optimizer state (what stays across steps)
    paged: int = 0  # paged optimizer state (outside torch's allocator)
    notes: list[str] = field(default_factory=list)
    generation: Any = None  # GRPO: the generation phase (GenerationPeak), counted by with_generation

    def predicted(self) -> dict[str, int]:
        return {"peak_allocated_bytes": self.peak_allocated, "peak_reserved_bytes": self.peak_reserved,
                "device_total_bytes": self.device_total}


@dataclass(frozen=True)
class _Ctx:
    """Per-estimate facts the activation inventory needs."""

    b: int  # compute dtype bytes (activations under autocast)
    autocast: bool
    quantized: bool  # base linears are bnb modules
    lora_bytes: int
    dropout: bool
    upcast: bool
    targets: frozenset[int]  # indices into spec.linears
    attention: str
    masked: bool
    fused_norm: bool
    fused_qkv_lora: bool
    rank: int
    bnb_keeps_input: bool
    cpu: bool
    expert_lora: bool = False  # peft's ParamWrapper LoRA on the MoE experts (all-linear on Mixtral)
    quantized_experts: bool = False  # the experts are 4-bit / 8-bit (finetune/models/experts.py)
    weight_b: int = 2  # bytes per element of the unquantized frozen weights


# -- weights ----------------------------------------------------------------------------------

def _nf4_bytes(numel: int, modules: int, double_quant: bool) -> tuple[int, int]:
    """(packed weights, quantization constants) for `numel` weights in `modules` Linear4bit modules."""
    blocks = math.ceil(numel / NF4_BLOCK)
    weights = math.ceil(numel / 2)
    if double_quant:
        consts = blocks * 1 + math.ceil(blocks / NF4_NESTED_BLOCK) * 4 + modules * (NF4_CODE_BYTES
                                                                                     + NF4_NESTED_CODE_BYTES)
    else:
        consts = blocks * 4 + modules * NF4_CODE_BYTES
    return weights, consts


def weight_bytes(spec: ArchSpec, quant: str, double_quant: bool, weight_dtype_bytes: int,
                 settings: Settings, quantized_experts: bool = False) -> tuple[int, int, int]:
    """(quantized weights, unquantized weights, quantization constants) of the frozen base."""
    wq = consts = 0
    unq = 0
    experts_left = spec.expert_params
    if quantized_experts and quant != "none" and spec.experts:
        # finetune/models/experts.py: every expert matrix quantized on its own (its own blocks and, with double
        # quantization, its own nested constants), the router and any expert bias in the compute dtype
        for out_f, in_f in spec.expert_matrices():
            if quant == "nf4":
                w, c = _nf4_bytes(spec.layers * out_f * in_f, spec.layers, double_quant)
                wq, consts = wq + w, consts + c
            else:  # int8 + one fp32 scale per output row
                wq += spec.layers * out_f * in_f
                consts += spec.layers * out_f * 4
        experts_left -= spec.expert_matrix_params
    for lin in spec.linears:
        numel = spec.layers * lin.weight_params
        if lin.bias:
            unq += spec.layers * lin.out_features * weight_dtype_bytes
        if quant == "none" or not lin.quantizable:
            unq += numel * weight_dtype_bytes
        elif quant == "nf4":
            w, c = _nf4_bytes(numel, spec.layers, double_quant)
            wq += w
            consts += c
        else:  # int8: int8 weight + one fp32 scale per output row
            wq += numel
            consts += spec.layers * lin.out_features * 4
    others = spec.embedding_params + spec.norm_params + spec.extra_params + experts_left
    lm_head = spec.lm_head_params
    if settings.quantize_lm_head and quant == "nf4" and not spec.tied_embeddings:
        w, c = _nf4_bytes(spec.vocab * spec.hidden, 1, double_quant)
        wq += w
        consts += c
        lm_head -= spec.vocab * spec.hidden
    unq += (others + lm_head) * weight_dtype_bytes
    vq, vu, vc = _vision_tower_bytes(spec, quant, double_quant, weight_dtype_bytes)
    return wq + vq, unq + vu, consts + vc


def _vision_tower_bytes(spec: ArchSpec, quant: str, double_quant: bool, weight_dtype_bytes: int) -> tuple[int, int, int]:
    """(quantized, unquantized, constants) of a multimodal checkpoint's vision tower and projector (Gemma 3
    4B/12B/27B; see arch.vision_tower): loaded by AutoModelForCausalLM, frozen, never run on text. Its encoder's
    nn.Linear weights are quantized like the decoder's; biases, norms, the patch convolution, the position
    embeddings and the projector stay in the compute dtype."""
    if not spec.vision_params:
        return 0, 0, 0
    weights = spec.vision_weight_params
    unq = (spec.vision_params - weights) * weight_dtype_bytes
    if quant == "none":
        return 0, unq + weights * weight_dtype_bytes, 0
    if quant == "nf4":
        w, c = _nf4_bytes(weights, sum(n for *_, n in spec.vision_linears), double_quant)
        return w, unq, c
    return weights, unq, sum(out_f * n for out_f, _, n in spec.vision_linears) * 4  # int8 + fp32 row scales


def optimizer_bytes(optimizer: str, tensor_sizes: list[int], param_bytes: int) -> int:
    """Optimizer state for trainable tensors of the given element counts."""
    total = 0
    for n in tensor_sizes:
        if optimizer == "adamw":
            total += 2 * n * param_bytes  # torch AdamW: exp_avg, exp_avg_sq like the parameter
        elif optimizer in ("adamw_8bit", "paged_adamw_8bit"):
            if n < BNB_MIN_8BIT_SIZE:
                total += 2 * n * 4
            else:
                total += 2 * (n + math.ceil(n / BNB_8BIT_BLOCK) * 4)
        else:  # paged_adamw_32bit
            total += 2 * n * 4
    return total


# -- activations ----------------------------------------------------------------------------

def _norm_saved(spec: ArchSpec, r: int, ctx: _Ctx) -> tuple[int, int]:
    """(bytes kept per token by one norm, bytes of its output element) for a residual of r bytes."""
    h = spec.hidden
    if ctx.fused_norm:
        return r * h, r
    if spec.norm == "rms":
        # hidden.to(float32) is kept by pow/mul; the output is weight * x.to(input dtype),
        # promoted to fp32 when the weight or the input is fp32.
        return 4 * h, (4 if (r == 4 or ctx.upcast) else r)
    if ctx.autocast:
        # F.layer_norm autocasts to fp32: it keeps the fp32 input copy and returns fp32
        return 4 * h, 4
    return r * h, r


def _input_saved(width: int, x_bytes: int, lora: list[Linear], readers: list[Linear], ctx: _Ctx,
                 x_already_kept: bool = False) -> int:
    """Bytes per token kept of one input tensor that the linear layers `readers` read, of which `lora`
    carry adapters.

    A frozen nn.Linear or bnb 0.50 layer keeps nothing of its input. lora_A keeps its input: the
    tensor itself when nothing casts it (one tensor shared by every adapter reading it), else one
    cast copy per adapter (peft casts x to the adapter's dtype without autocast; autocast casts it
    to the compute dtype). Dropout adds, per adapter, its output and its mask (bool on CUDA; on the
    CPU torch multiplies by a noise tensor of the input's dtype). Older bitsandbytes
    (``Settings.bnb_keeps_input``) kept every 4-bit matmul's (compute-dtype) input.
    `x_already_kept`: another op keeps x anyway (SDPA keeps its output, which o_proj reads).
    """
    keeps_x = False
    extra = 0
    if lora:
        n = len(lora)
        if ctx.dropout:
            copies = 1 if ctx.fused_qkv_lora else n
            if ctx.autocast:
                saved, mask = 2, (x_bytes if ctx.cpu else 1)
            else:
                saved = ctx.lora_bytes  # x is cast to the adapter dtype before the dropout
                mask = saved if ctx.cpu else 1
            extra += copies * width * (saved + mask)
        elif ctx.autocast:
            if not ctx.quantized and ctx.lora_bytes == 4:
                # peft's lora.Linear casts x to its fp32 weights, autocast casts back: a bf16 copy each
                extra += n * width * 2
            elif x_bytes == 4:
                extra += n * width * 2  # each lora_A autocasts the fp32 input to its own bf16 copy
            else:
                keeps_x = True
        elif ctx.lora_bytes != x_bytes:
            extra += n * width * ctx.lora_bytes  # peft casts x to the adapter dtype: a copy per adapter
        else:
            keeps_x = True
    if ctx.bnb_keeps_input and ctx.quantized:
        base = [lin for lin in readers if lin.quantizable]
        if base:
            if x_bytes == ctx.b:
                keeps_x = True
            else:
                extra += len(base) * width * ctx.b  # Linear4bit casts x to its compute dtype first
    return (width * x_bytes if keeps_x and not x_already_kept else 0) + extra


def _linear_out_bytes(lin: Linear, x_bytes: int, ctx: _Ctx) -> int:
    """dtype bytes of a linear layer's output: bnb returns its input's dtype, nn.Linear autocasts."""
    if ctx.quantized and lin.quantizable:
        return x_bytes
    return ctx.b if ctx.autocast else x_bytes


def layer_bytes_per_token(spec: ArchSpec, ctx: _Ctx, seq_len: int, r_in: int) -> tuple[int, int, int, int]:
    """(kept for backward, transient peak above it in backward, residual bytes out) per token, one layer,
    and bytes per layer that do not scale with tokens (kept, and again transient in backward).

    `r_in` is the residual stream's dtype bytes at the layer input. A traced architecture answers from its
    measured profile (finetune/probes/trace.py) instead of these rules.
    """
    if spec.traced is not None:
        return spec.traced.layer(spec, ctx, seq_len, r_in)
    per_layer = 0
    h, b = spec.hidden, ctx.b
    hq = spec.heads * spec.head_dim
    kv = spec.kv_heads_for(ctx.attention, ctx.masked)
    hkv = kv * spec.head_dim
    by_group: dict[str, list[Linear]] = {}
    for i, lin in enumerate(spec.linears):
        if i in ctx.targets:
            by_group.setdefault(lin.reads, []).append(lin)
    attn_lin = [lin for lin in spec.linears if lin.reads == ATTN_IN]
    mlp_lin = [lin for lin in spec.linears if lin.reads == MLP_IN]
    kept = 0

    # attention block: norm, q/k/v, attention, output projection
    n1, n1_out = _norm_saved(spec, r_in, ctx)
    kept += n1
    lora_readers = by_group.get(ATTN_IN, [])
    readers = list(attn_lin)
    if spec.shared_norm:  # one norm output feeds attention and MLP
        lora_readers = lora_readers + by_group.get(MLP_IN, [])
        readers += mlp_lin
    kept += _input_saved(h, n1_out, lora_readers, readers, ctx)
    qkv_bytes = _linear_out_bytes(attn_lin[0], n1_out, ctx)
    sdpa_b = b if ctx.autocast else qkv_bytes  # attention kernels autocast q/k/v to the compute dtype
    # eager matmuls and CUDA's flash/mem-efficient kernels keep strided views of the fused projection;
    # the CPU SDPA kernel works on contiguous copies
    views_kept = ctx.attention in ("eager", "math") or not ctx.cpu
    if spec.qkv_view_kept and kv == spec.kv_heads and qkv_bytes == sdpa_b and views_kept:
        # v is a view of the fused projection: its storage (q, k and v) stays alive
        kept += sum(lin.out_features for lin in attn_lin) * qkv_bytes + (hq + hkv) * sdpa_b
    else:
        kept += (hq + 2 * hkv) * sdpa_b
    soft = 4 + (sdpa_b if sdpa_b != 4 else 0)  # the fp32 softmax and its cast to the compute dtype
    attn_transient = 0
    if ctx.attention == "eager":
        # the probabilities per head and key; the output is probs @ v, which only o_proj's adapter keeps
        kept += spec.heads * seq_len * soft
        attn_transient = spec.heads * seq_len * (sdpa_b + 4)  # the scores and their masked fp32 copy
    elif ctx.attention == "math":
        # SDPA's math kernel: the probabilities (compute dtype) per head and key, no log-sum-exp
        kept += spec.heads * seq_len * sdpa_b
        attn_transient = spec.heads * seq_len * 2 * sdpa_b
    else:
        kept += hq * sdpa_b + 4 * spec.heads  # output + fp32 log-sum-exp per head
        if ctx.masked:
            # SDPA converts the boolean mask to an additive one in the query's dtype on every call, and the
            # memory-efficient kernel keeps it for backward: batch x seq x seq per layer
            kept += seq_len * sdpa_b
    o_lin = [lin for lin in spec.linears if lin.reads == ATTN_OUT][0]
    # SDPA and flash return their output laid out as (batch, seq, heads, dim): the transpose for
    # o_proj is a view of the tensor they keep; eager's probs @ v is transposed into a new copy
    kept += _input_saved(hq, sdpa_b, by_group.get(ATTN_OUT, []), [o_lin], ctx,
                         x_already_kept=ctx.attention not in ("eager", "math"))
    attn_res = _linear_out_bytes(o_lin, sdpa_b, ctx)

    # MLP block
    if spec.shared_norm:
        n2_out = n1_out
    else:
        mid_r = max(r_in, attn_res) if not spec.parallel else r_in
        n2, n2_out = _norm_saved(spec, mid_r, ctx)
        if spec.parallel and spec.norm == "layer" and (mid_r == 4 or not ctx.autocast):
            n2 = 0  # both LayerNorms read (and keep) the same layer input; no cast makes a second copy
        kept += n2
        kept += _input_saved(h, n2_out, by_group.get(MLP_IN, []), mlp_lin, ctx)
    inter = spec.intermediate
    if spec.experts:
        # Mixtral: per routed token, the expert's gate_up output (kept through the gate view),
        # act(gate), and the down output kept by the routing-weight product
        m = b if ctx.autocast else n2_out
        kept += spec.experts_per_token * (3 * inter + h) * m + spec.experts * 4  # + fp32 router probs
        mlp_res = m
        mlp_transient = spec.experts_per_token * 2 * inter * m
        if ctx.expert_lora and ctx.quantized_experts:
            # finetune/models/experts.py adds (x A_e^T) B_e^T per routed expert: lora_A keeps the matmul's input
            # (the token's hidden state for gate_up, the gated product for down), lora_B the rank-wide output
            kept += spec.experts_per_token * (h + inter + 2 * ctx.rank) * m
        elif ctx.expert_lora:
            # peft's ParamWrapper folds W + B A into one baddbmm per forward (the whole expert stack, in
            # the weight's dtype); with a trainable weight every expert matmul keeps its input
            kept += spec.experts_per_token * (h + inter) * m
            # per layer, not per token: the folded bf16 stack, kept by the expert matmuls until backward,
            # and its gradient, as large, in backward
            per_layer = spec.experts * 3 * h * inter * ctx.weight_b
    else:
        m = _linear_out_bytes(mlp_lin[0], n2_out, ctx)
        if spec.gated_mlp:
            kept += 3 * inter * m  # act keeps gate, the product keeps act(gate) and up
        else:
            kept += spec.act_saved * inter * m
        down = [lin for lin in spec.linears if lin.reads == MLP_MID][0]
        kept += _input_saved(inter, m, by_group.get(MLP_MID, []), [down], ctx)
        mlp_res = _linear_out_bytes(down, m, ctx)
        # backward: the gradients of the product's two factors and of the inner activation
        mlp_transient = 3 * inter * m if spec.gated_mlp else 2 * inter * m
    # every adapter's rank-wide lora_A output, kept by lora_B
    kept += len(ctx.targets) * ctx.rank * (2 if ctx.autocast else ctx.lora_bytes)
    # residual dropout (Phi-2's resid_pdrop) on the attention and the MLP output: a bool mask each (CUDA's
    # fused dropout; found by tracing the family, finetune/probes/trace.py)
    kept += spec.resid_dropouts * h
    r_out = max(r_in, attn_res, mlp_res)
    transient = r_out * h + max(mlp_transient, attn_transient)
    return kept, transient, r_out, per_layer


# -- the estimate ---------------------------------------------------------------------------

def lora_tensor_sizes(spec: ArchSpec, targets: list[str], rank: int, settings: Settings) -> list[int]:
    """Element counts of every LoRA tensor (lora_A and lora_B of each adapted module and expert parameter)."""
    sizes = []
    for lin in spec.lora_targets(targets):
        sizes += [rank * lin.in_features] * spec.layers + [rank * lin.out_features] * spec.layers
    for _, r, fan_in, fan_out in spec.lora_param_targets(targets, rank):
        sizes += [r * fan_in] * spec.layers + [r * fan_out] * spec.layers
    if settings.lora_on_lm_head:
        sizes += [rank * spec.hidden, rank * spec.vocab]
    return sizes


def estimate(spec: ArchSpec, choices: dict[str, Any], *, rank: int, targets: list[str],
             settings: Settings | None = None, on_gpu: bool | None = None) -> Estimate:
    """Peak memory of a training step under `choices` (the plan.json `choices` dict), per GPU."""
    s = settings or Settings()
    if on_gpu is not None and not on_gpu and s.device != "cpu":
        s = replace(s, device="cpu")
    gpu = s.device != "cpu"
    litgpt = s.implementation == "litgpt"
    if litgpt:
        # LitGPT's model code: fused qkv (its v view keeps the fused output), torch's fused GELU
        # (keeps only its input), lm_head stored as its own weight, SDPA with is_causal (no mask)
        spec = replace(spec, qkv_view_kept=True, act_saved=1, tied_embeddings=False, attention="sdpa")
    quant = choices["quantization"]
    quantized = quant != "none"
    compute = choices["compute_dtype"]
    b = BYTES[compute]
    autocast = s.autocast if s.autocast is not None else gpu
    weight_b = 4 if compute == "fp32" else 2
    if s.upcast_fp32 and quantized:
        weight_b = 4  # prepare_model_for_kbit_training: every non-quantized parameter to fp32
    mb, seq = choices["micro_batch_size"], choices["max_seq_len"]
    tokens = mb * seq
    n_gpus = max(1, int(choices.get("num_gpus", 1)))
    fsdp = choices.get("distributed") == "fsdp" and n_gpus > 1
    ddp = choices.get("distributed") == "ddp" and n_gpus > 1
    notes: list[str] = []

    # frozen weights
    quantized_experts = quantized and bool(choices.get("quantized_experts")) and spec.experts > 0
    wq, unq, consts = weight_bytes(spec, quant, bool(choices.get("double_quant")), weight_b, s, quantized_experts)

    # LoRA parameters, gradients, optimizer state
    lora_targets = spec.lora_targets(targets)
    if s.lora_dtype is not None:
        lora_b = BYTES[s.lora_dtype]
    elif quantized:
        lora_b = 2  # TRL casts trainable parameters of a quantized model to bf16
    else:
        lora_b = 4 if weight_b == 2 else weight_b  # peft's autocast_adapter_dtype: fp32 adapters
    sizes = lora_tensor_sizes(spec, targets, rank, s)
    param_targets = spec.lora_param_targets(targets, rank)
    lora_n = sum(sizes)
    lora_params = lora_n * lora_b + (lora_n * 4 if s.reference_adapter else 0)
    lora_grads = lora_n * lora_b
    opt = choices["optimizer"]
    opt_state = optimizer_bytes(opt, sizes, lora_b)
    paged = opt_state if (opt in PAGED and gpu) else 0

    # activations
    index = {id(lin): i for i, lin in enumerate(spec.linears)}
    # a family without an SDPA path in transformers runs eager attention whatever the plan says
    attention = spec.attention if spec.attention in ("eager", "math") else choices.get("attention", spec.attention)
    ctx = _Ctx(b=b, autocast=autocast, quantized=quantized, lora_bytes=lora_b, dropout=s.lora_dropout > 0,
               upcast=s.upcast_fp32 and quantized, targets=frozenset(index[id(lin)] for lin in lora_targets),
               attention=attention,
               masked=spec.always_masked or (mb > 1 and not choices.get("packing", False) and not litgpt),
               fused_norm=s.fused_norm, fused_qkv_lora=s.fused_qkv_lora or litgpt, rank=rank,
               bnb_keeps_input=s.bnb_keeps_input, cpu=not gpu, expert_lora=bool(param_targets),
               quantized_experts=quantized_experts,
               weight_b=weight_b)
    r0 = 4 if ctx.upcast else b  # the embedding output's dtype
    kept0, transient0, r1, fixed = layer_bytes_per_token(spec, ctx, seq, r0)
    kept, transient, r_steady, _ = layer_bytes_per_token(spec, ctx, seq, r1)
    mask_bytes = mb * seq * seq if ctx.masked else 0  # the 4-D boolean mask transformers builds once
    if choices["gradient_checkpointing"]:
        stored = tokens * spec.hidden * (r0 + (spec.layers - 1) * r1)  # each layer's input
        layer_peak = tokens * (kept + transient) + 2 * fixed
    else:
        stored = tokens * (kept0 + (spec.layers - 1) * kept) + spec.layers * fixed
        layer_peak = tokens * transient + fixed
    stored += mask_bytes
    if not choices["gradient_checkpointing"] and r_steady == 4 and r1 == 2:
        notes.append("the fp32 LayerNorm output makes the quantized layers' outputs fp32")

    # LM head and loss
    h, vocab = spec.hidden, spec.vocab
    final_norm, n_out = _norm_saved(spec, r_steady, ctx)
    labelled = max(1, int(tokens * s.labelled_fraction))
    if s.lm_head_loss == "fused":
        tile = min(labelled, LM_TOKEN_CHUNK) * min(vocab, LM_VOCAB_CHUNK) * b
        gathered = labelled * h * n_out  # hidden_states[mask], kept by the kernel
        lm_fwd = tokens * final_norm + tokens * h * n_out + gathered + tile + labelled * 4 * 8
        w_cast = LM_VOCAB_CHUNK * h * b if weight_b != b else 0  # an fp32 lm_head is cast per tile
        lm_bwd = tokens * final_norm + gathered + labelled * h * (4 + n_out) + tile + w_cast
    else:
        per_logit = LITGPT_LOGIT_BYTES if s.lm_head_loss == "litgpt" else MATERIALIZED_LOGIT_BYTES
        logits = tokens * vocab * per_logit
        lm_fwd = tokens * final_norm + tokens * h * n_out + logits
        lm_bwd = tokens * final_norm + logits + tokens * h * 4

    # workspace: a dequantized weight (bnb dequantizes one layer at a time for large batches)
    big_out = max(lin.out_features for lin in spec.linears)
    big_in = max(lin.in_features for lin in spec.linears)
    # quantized experts are dequantized one expert matrix at a time (in backward; forward too without a fused
    # 4-bit GEMM), which for an MoE is the largest matrix bitsandbytes dequantizes
    largest = max(spec.max_linear_elements, spec.max_expert_elements if quantized_experts else 0)
    if quant == "nf4":
        # dequantize_4bit's output (compute dtype) and, with double quant, the fp32 absmax it rebuilds
        workspace = largest * b + math.ceil(largest / NF4_BLOCK) * 4
        if s.quantize_lm_head:
            workspace = max(workspace, vocab * h * b)
    elif quant == "int8":
        # LLM.int8: fp16 copy + int8 quantization of the input and an int32 product in forward;
        # the dequantized weight in backward
        workspace = max(tokens * (3 * big_in + 4 * big_out), largest * b)
    else:
        workspace = 0
    workspace += CUBLAS_WORKSPACE if gpu else 0

    # distributed: FSDP shards the frozen weights, LoRA, grads and optimizer; DDP adds a bucket copy
    if fsdp:
        per_layer_weights = (wq + consts + unq - (spec.embedding_params + spec.lm_head_params)
                             * weight_b) / spec.layers
        root = (spec.embedding_params + spec.lm_head_params) * weight_b
        gathered_units = 2 * per_layer_weights + root  # the current and the prefetched layer, the root unit
        wq, consts, unq = wq // n_gpus, consts // n_gpus, unq // n_gpus
        lora_params, lora_grads, opt_state = lora_params // n_gpus, lora_grads // n_gpus, opt_state // n_gpus
        paged //= n_gpus
        workspace += int(gathered_units)
    elif ddp:
        workspace += lora_grads  # DDP's flat gradient buckets

    grads = lora_grads
    candidates = {
        "forward end (LM head)": stored + lm_fwd,
        "LM head backward": stored + lm_bwd,
        "decoder layer backward": stored + layer_peak,
    }
    phase, act_peak = max(candidates.items(), key=lambda kv: kv[1])
    # the breakdown splits the activation peak into decoder activations and the LM head's share
    if phase == "decoder layer backward":
        activations, lm_part = act_peak, 0
    else:
        activations, lm_part = stored, act_peak - stored
    in_allocator = wq + unq + consts + lora_params + (opt_state - paged) + grads
    allocated = in_allocator + act_peak + workspace
    slack = 0
    if gpu:
        # what is not re-used step after step: the working set above the stored activations
        slack = int(FRAGMENTATION * (act_peak - stored + workspace)) + RESERVED_FIXED
    reserved = allocated + slack
    context = s.cuda_context if s.device == "cuda" else 0
    baseline = 0 if gpu else CPU_PROCESS_BASELINE
    if not gpu:
        notes.append("on the CPU the total is resident memory, the process itself (~1 GiB) included")
    breakdown = {
        "weights_quantized": int(wq),
        "weights_unquantized": int(unq),
        "quant_constants": int(consts),
        "lora_params": int(lora_params),
        "lora_grads": int(lora_grads),
        "optimizer_state": int(opt_state),
        "activations": int(activations),
        "lm_head_and_loss": int(lm_part),
        "workspace": int(workspace + baseline),
        "allocator_cache": int(slack),  # reserved - allocated: blocks the caching allocator keeps
        "cuda_context": int(context),
    }  # the parts sum to device_total (optimizer_state includes a paged optimizer's state)
    return Estimate(breakdown=breakdown, peak_allocated=int(allocated), peak_reserved=int(reserved),
                    device_total=int(reserved + paged + context + baseline), phase=phase,
                    persistent=int(wq + unq + consts + lora_params + opt_state + grads), paged=int(paged),
                    notes=notes)


def eval_peak(spec: ArchSpec, choices: dict[str, Any], *, batch_size: int, seq_len: int, rank: int,
              targets: list[str], settings: Settings | None = None) -> int:
    """Device total of our evaluation (finetune/evaluate): a no-grad plain forward that materializes
    batch x seq x vocab logits and their fp32 cross-entropy, after training (the allocator keeps what
    training reserved, so only the allocated figure is compared with the card)."""
    s = settings or Settings()
    train = estimate(spec, dict(choices, micro_batch_size=1, max_seq_len=8, gradient_checkpointing=True),
                     rank=rank, targets=targets, settings=s)
    weights = sum(train.breakdown[k] for k in ("weights_quantized", "weights_unquantized", "quant_constants",
                                                "lora_params"))
    tokens = batch_size * seq_len
    b = BYTES[choices["compute_dtype"]]
    # one layer's forward working set (no graph is kept) and the logits
    layer = tokens * (4 * spec.hidden + 3 * spec.intermediate) * b
    logits = tokens * spec.vocab * MATERIALIZED_LOGIT_BYTES
    return int(weights + train.breakdown["workspace"] + layer + logits + train.breakdown["cuda_context"])


# -- loading --------------------------------------------------------------------------------

# config.json's torch_dtype (or dtype) -> our dtype names: what the checkpoint stores
CHECKPOINT_DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "fp16": "fp16", "bf16": "bf16",
                     "fp32": "fp32", "half": "fp16", "float": "fp32"}


@dataclass(frozen=True)
class LoadPeak:
    """What loading the base takes before training starts (plan.json ``load_peak``): per GPU (what nvidia-smi
    would show at its peak) and in CPU RAM per machine; `why` says how the stack loads this plan."""

    gpu_bytes: int
    cpu_ram_bytes: int
    why: str
    gpu_why: str = ""  # the GPU half of `why`, for one-line messages (not in plan.json)

    def to_dict(self) -> dict[str, Any]:
        return {"gpu_bytes": self.gpu_bytes, "cpu_ram_bytes": self.cpu_ram_bytes, "why": self.why}


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def _size(n: float) -> str:
    """GiB, or MiB below 1 GiB (the generation phase's parts are often small)."""
    return _gib(n) if n >= GiB or n == 0 else f"{n / MiB:.0f} MiB"


def load_peak(spec: ArchSpec, choices: dict[str, Any], *, rank: int, targets: list[str],
              settings: Settings | None = None, checkpoint_dtype: str | None = None) -> LoadPeak | None:
    """The memory peak of loading the base for a CUDA plan (None elsewhere), read off transformers 5.24 /
    accelerate 1.16 / safetensors 0.8 (see finetune.train._fsdp_args):

    * transformers' loader (modeling_utils ``_load_pretrained_model``, core_model_loading) has no rank-0-only
      path outside DeepSpeed: every rank reads the whole checkpoint. safetensors maps the files: a tensor is a
      view of the mapped pages until something casts or moves it.
    * A quantized base (on-the-fly bitsandbytes) loads one tensor at a time (no thread pool then): each goes
      to the rank's GPU in 16-bit and is quantized there. Under FSDP every rank therefore holds the *whole*
      quantized base on its own GPU before FSDP shards it (accelerate's fsdp2_prepare_model skips
      cpu_ram_efficient_loading for Params4bit). Counted per GPU: the whole quantized base (packed weights,
      constants, the 16-bit embeddings / norms / lm_head), the CUDA context, and the larger of two transients
      that follow each other: twice the largest quantized matrix in 16-bit (the one being quantized, and the
      freed block of the previous one that the caching allocator keeps), and LoRA as peft then creates it on
      the whole model (fp32, before TRL casts it to bf16), whose tensors reuse those cached blocks.
    * An unquantized FSDP base loads on the CPU (no device_map); accelerate moves the other ranks to meta and
      broadcasts rank 0's tensors one at a time, each rank keeping its shard: per GPU, the shards of the base
      and LoRA, twice the largest tensor (the broadcast copy and its shard), the CUDA context.
    * DDP and one GPU: each rank loads the whole base straight onto its own GPU (device_map), which the
      steady state already holds.

    CPU RAM per machine (hardware.num_gpus ranks on it): each process itself (~1 GiB of RSS), and what a rank
    keeps of the checkpoint. Reading through the map puts the checkpoint's pages in the page cache, shared by
    every rank reading the same files and evictable (clean file pages): for a quantized base, which streams
    through the map to the GPU, they are not counted, only one tensor per rank in flight (a copy when the
    checkpoint's dtype is cast). For an unquantized FSDP base the CPU model *is* the mapped checkpoint until
    FSDP takes over: counted once per machine when the checkpoint's dtype is the plan's compute dtype (the
    ranks share the pages), once per rank when it is not (transformers casts every tensor into a private copy:
    an fp16 checkpoint loaded in bf16); plus each rank's fp32 LoRA on the CPU model.
    `checkpoint_dtype`: config.json's torch_dtype; None: assumed to be the compute dtype.
    """
    s = settings or Settings()
    if s.device != "cuda":
        return None
    quant = choices["quantization"]
    quantized = quant != "none"
    compute = choices["compute_dtype"]
    weight_b = 4 if compute == "fp32" else 2
    n = max(1, int(choices.get("num_gpus", 1)))
    per_machine = max(1, n // max(1, int(choices.get("num_nodes", 1))))
    fsdp = choices.get("distributed") == "fsdp" and n > 1
    quantized_experts = quantized and bool(choices.get("quantized_experts")) and spec.experts > 0
    wq, unq, consts = weight_bytes(spec, quant, bool(choices.get("double_quant")), weight_b, s, quantized_experts)
    whole = wq + unq + consts
    lora_fp32 = sum(lora_tensor_sizes(spec, targets, rank, s)) * 4
    largest = max(spec.max_linear_elements, spec.max_expert_elements if quantized_experts else 0)
    stored = CHECKPOINT_DTYPES.get(str(checkpoint_dtype or "").removeprefix("torch."), compute)
    cast = stored != compute
    context = s.cuda_context
    processes = per_machine * CPU_PROCESS_BASELINE
    ranks = f"{per_machine} rank{'s' if per_machine > 1 else ''}"
    if quantized:
        gpu = whole + max(2 * largest * weight_b, lora_fp32) + context
        cpu = processes + per_machine * largest * BYTES[stored]
        ram = (f"CPU RAM {_gib(cpu)} per machine ({ranks} reading the checkpoint one tensor at a time through "
               "mmap; its pages sit in the page cache, shared and evictable, and are not counted)")
        bits = "4-bit" if quant == "nf4" else "8-bit"
        if fsdp:
            short = (f"every rank loads and quantizes the whole {bits} base before FSDP shards it: {_gib(gpu)} per "
                     "GPU while loading")
            why = (f"{short} (the {bits} base {_gib(whole)}, the largest weight in 16-bit while it is quantized or "
                   f"LoRA in fp32 as peft creates it, the CUDA context); {ram}")
        else:
            short = f"each rank loads and quantizes the whole {bits} base on its own GPU: {_gib(gpu)} while loading"
            why = f"{short}; {ram}"
    elif fsdp:
        biggest = max(spec.max_linear_elements, spec.vocab * spec.hidden)
        gpu = whole // n + lora_fp32 // n + 2 * biggest * weight_b + context
        copies = per_machine if cast else 1
        cpu = processes + copies * whole + per_machine * lora_fp32
        held = (f"a private {compute} copy of the whole base in each of the {ranks} (the checkpoint is {stored}: "
                f"transformers casts every tensor)" if cast and per_machine > 1 else
                f"the {compute} base mapped from the checkpoint once, shared by the {ranks}")
        short = (f"every rank loads the {compute} base on the CPU and FSDP moves only its shard to the GPU: "
                 f"{_gib(gpu)} per GPU while loading")
        why = (f"{short} (cpu_ram_efficient_loading: rank 0's tensors are broadcast one at a time); CPU RAM "
               f"{_gib(cpu)} per machine: {held}, LoRA in fp32 and the process of each rank")
    else:
        gpu = whole + lora_fp32 + context
        cpu = processes + per_machine * largest * BYTES[stored]
        short = f"each rank loads the whole {compute} base onto its own GPU: {_gib(gpu)} while loading"
        why = f"{short}; CPU RAM {_gib(cpu)} per machine ({ranks} reading the checkpoint through mmap)"
    return LoadPeak(gpu_bytes=int(gpu), cpu_ram_bytes=int(cpu), why=why, gpu_why=short)


# -- GRPO's generation phase ------------------------------------------------------------------

# Sampling one token per sequence and step (transformers' generate with logits_to_keep=1): the bf16 last-token
# logits (2), their fp32 copy (4), the temperature-scaled / softmax probabilities (4), and top-k / top-p's sort
# (values 4, int64 indices 8) -> ~22 bytes per vocabulary entry and sequence, at once.
GENERATION_LOGIT_BYTES = 22
# vLLM's share beyond its weights and KV cache: its activation profile for max_num_batched_tokens, the
# sampler's logits, CUDA graphs for the batch sizes it captures. Rounded, not measured here.
VLLM_OVERHEAD = 2 * GiB
VLLM_FRACTION_STEP = 0.05  # the fraction recorded is rounded up to this


@dataclass(frozen=True)
class GenerationPeak:
    """GRPO's generation phase (plan.json ``generation``): what one generate() call over the local generation
    batch holds on top of the persistent state, its device total (what nvidia-smi would show then), and `why`."""

    engine: str  # transformers | vllm
    sequences: int  # completions generated at once on this GPU
    tokens: int  # per sequence: the longest prompt + max_completion_length
    kv_cache_bytes: int
    logits_bytes: int
    prefill_bytes: int
    reference_bytes: int  # beta > 0: the reference forward's working set (adapter off, no graph); else 0
    total_bytes: int  # the phase's device total (transformers) or the vLLM engine's share of the card (vllm)
    allocated_bytes: int = 0
    reserved_bytes: int = 0
    weights_bytes: int = 0  # vllm: its 16-bit copy of the weights
    fraction: float | None = None  # vllm: vllm_gpu_memory_utilization
    why: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = {"engine": self.engine, "sequences": self.sequences, "tokens": self.tokens,
             "kv_cache_bytes": self.kv_cache_bytes, "logits_bytes": self.logits_bytes,
             "prefill_bytes": self.prefill_bytes, "reference_bytes": self.reference_bytes,
             "total_bytes": self.total_bytes}
        if self.engine == "vllm":
            d.update(weights_bytes=self.weights_bytes, vllm_gpu_memory_utilization=self.fraction)
        d["why"] = self.why
        return d


def kv_cache_bytes(spec: ArchSpec, sequences: int, tokens: int, dtype_bytes: int) -> int:
    """transformers' DynamicCache (and vLLM's paged cache) for `sequences` x `tokens`: per layer a key and a
    value of kv_heads x head_dim per token in the compute dtype. A model without attention keeps none."""
    if spec.attention == "none":
        return 0
    return 2 * spec.layers * sequences * tokens * spec.kv_heads * spec.head_dim * dtype_bytes


def vllm_fraction(spec: ArchSpec, sequences: int, tokens: int, vram_bytes: int) -> tuple[float, int, int]:
    """(vllm_gpu_memory_utilization, 16-bit weights, KV cache) for a colocated vLLM engine that holds the whole
    generation batch's KV cache at once."""
    weights = spec.params_total * 2
    kv = kv_cache_bytes(spec, sequences, tokens, 2)
    need = (weights + kv + VLLM_OVERHEAD) / max(1, vram_bytes)
    fraction = math.ceil(need / VLLM_FRACTION_STEP - 1e-9) * VLLM_FRACTION_STEP
    return round(min(fraction, 1.0), 2), int(weights), int(kv)


def generation_peak(spec: ArchSpec, choices: dict[str, Any], train: Estimate, *, settings: Settings | None = None,
                    beta: float = 0.0, vram_bytes: int = 0) -> GenerationPeak:
    """GRPO's generation phase for `choices` (a GRPO plan's: generation_batch_size, num_gpus, max_prompt_length,
    max_completion_length, micro_batch_size), read off TRL 1.16 / transformers 5.24:

    * transformers engine: GRPOTrainer._generate_single_turn calls the policy's generate() once on the local
      generation batch (generation_batch_size / GPUs sequences), left-padded prompts plus up to
      max_completion_length new tokens, without a graph and with gradient checkpointing off. On top of the
      persistent state of the training step (weights, LoRA, optimizer state; LoRA gradients are freed between
      steps) and its workspace (bitsandbytes dequantizes one weight per matmul for batches > 1): the KV cache
      (DynamicCache grows by concatenation: a transient second copy of one layer's cache); at the prefill one
      layer's working set for sequences x prompt tokens (and SDPA's additive mask of the padded prompts); at each
      decoding step the last-token logits and the sampler's fp32 temporaries (GENERATION_LOGIT_BYTES). With
      beta > 0, after generating, the reference forward (the adapter disabled: no second copy of the weights) on
      micro-batch x (prompt + completion) tokens without a graph: one layer's working set and the chunked LM head.
    * vllm engine (TRL's colocate mode): a vLLM engine on the same GPU, its share of the card bounded by
      vllm_gpu_memory_utilization: a 16-bit copy of the weights, the whole generation batch's KV cache, and
      VLLM_OVERHEAD (activations, sampler, CUDA graphs); the share is the fraction x the card.
    """
    s = settings or Settings()
    gpu = s.device != "cpu"
    b = BYTES[choices["compute_dtype"]]
    n = max(1, int(choices.get("num_gpus", 1)))
    seqs = max(1, int(choices["generation_batch_size"]) // n)
    prompt, completion = int(choices["max_prompt_length"]), int(choices["max_completion_length"])
    tokens = prompt + completion
    kv = kv_cache_bytes(spec, seqs, tokens, b)
    if choices.get("generation") == "vllm":
        fraction, weights, kv16 = vllm_fraction(spec, seqs, tokens, vram_bytes)
        share = int(fraction * vram_bytes)
        why = (f"a colocated vLLM engine (vllm_gpu_memory_utilization={fraction:g}: {_gib(share)} of the card) holds "
               f"a 16-bit copy of the weights ({_size(weights)}) and the KV cache of {seqs} sequences x {tokens} "
               f"tokens ({_size(kv16)}), beside the training step's own memory")
        return GenerationPeak(engine="vllm", sequences=seqs, tokens=tokens, kv_cache_bytes=kv16, logits_bytes=0,
                              prefill_bytes=0, reference_bytes=0, total_bytes=share, allocated_bytes=share,
                              reserved_bytes=share, weights_bytes=weights, fraction=fraction, why=why)
    bd = train.breakdown
    persistent = train.persistent - bd["lora_grads"]  # gradients are freed (set_to_none) before generating
    in_allocator = persistent - train.paged
    workspace = bd["workspace"] - (CPU_PROCESS_BASELINE if not gpu else 0)
    layer_kv = kv // max(1, spec.layers)
    kv_prompt = kv_cache_bytes(spec, seqs, prompt, b)
    attention = choices.get("attention", spec.attention)
    mask = seqs * prompt * prompt * (1 + b) if attention not in ("flash2", "none") else 0
    prefill = seqs * prompt * (4 * spec.hidden + 3 * spec.intermediate) * b + mask
    logits = seqs * spec.vocab * GENERATION_LOGIT_BYTES
    working_prefill = kv_prompt + kv_prompt // max(1, spec.layers) + prefill
    working_decode = kv + layer_kv + logits
    reference = 0
    if beta > 0:
        ref_tokens = int(choices["micro_batch_size"]) * tokens
        labelled = int(choices["micro_batch_size"]) * completion
        tile = min(labelled, LM_TOKEN_CHUNK) * min(spec.vocab, LM_VOCAB_CHUNK) * 4
        reference = ref_tokens * (4 * spec.hidden + 3 * spec.intermediate) * b + labelled * spec.hidden * b + tile
    working = max(working_prefill, working_decode, reference)
    allocated = in_allocator + workspace + working
    # the cache grows token by token (a new, slightly larger block per layer and step): its blocks count as
    # transient working set for the allocator's slack, like the training step's
    slack = int(FRAGMENTATION * (working + workspace)) + RESERVED_FIXED if gpu else 0
    reserved = allocated + slack
    context = s.cuda_context if s.device == "cuda" else 0
    total = reserved + train.paged + context + (0 if gpu else CPU_PROCESS_BASELINE)
    ref_text = f"; the reference forward (beta={beta:g}, adapter off) {_size(reference)}" if beta > 0 else ""
    why = (f"generate() on {seqs} sequences x {tokens} tokens ({prompt} prompt + {completion} completion) at once: "
           f"KV cache {_size(kv)}, last-token logits and sampling {_size(logits)}, prefill {_size(prefill)}{ref_text}, "
           f"beside the weights, LoRA and optimizer state (no gradients, no graph): {_gib(total)} on the device")
    return GenerationPeak(engine="transformers", sequences=seqs, tokens=tokens, kv_cache_bytes=int(kv),
                          logits_bytes=int(logits), prefill_bytes=int(prefill), reference_bytes=int(reference),
                          total_bytes=int(total), allocated_bytes=int(allocated), reserved_bytes=int(reserved), why=why)


def with_generation(train: Estimate, gen: GenerationPeak) -> Estimate:
    """The GRPO step's estimate: the training step's, with breakdown ``generation`` = how much more the generation
    phase needs than the training step (0 when training is the peak; with vLLM its whole share, which sits beside
    the training step), so the parts still sum to the device total."""
    bd = dict(train.breakdown)
    if gen.engine == "vllm":
        extra = gen.total_bytes
        allocated, reserved = train.peak_allocated + extra, train.peak_reserved + extra
        total, phase = train.device_total + extra, train.phase
    else:
        extra = max(0, gen.total_bytes - train.device_total)
        allocated = max(train.peak_allocated, gen.allocated_bytes)
        reserved = max(train.peak_reserved, gen.reserved_bytes)
        total = train.device_total + extra
        phase = "generation" if extra > 0 else train.phase
    bd["generation"] = int(extra)
    return replace(train, breakdown=bd, peak_allocated=int(allocated), peak_reserved=int(reserved),
                   device_total=int(total), phase=phase, generation=gen)
