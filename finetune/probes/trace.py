"""Architectures without hand-written rules: their inventory measured on a scaled-down copy.

finetune/architectures/spec.py describes some families by hand. For any other ``model_type`` transformers can build,
this module derives the same picture from the installed stack itself:

Structure and parameters (exact)
  The real config is built on the meta device (no memory, no weights): the decoder blocks
  (the ``nn.ModuleList`` of ``num_hidden_layers`` blocks), each block's ``nn.Linear`` /
  ``Conv1D`` modules with their shapes and biases (what bitsandbytes quantizes and LoRA
  targets), MoE experts stored as 3-D parameters, embeddings, a tied or separate lm_head,
  and everything else (norms, convolutions, state-space parameters) counted as it is. peft
  is asked which layers it refuses (Mamba's out_proj), and a tiny 4-bit copy trains once: a
  family whose code reads a layer's ``.weight`` directly (Mamba's dt_proj) gets that layer
  kept unquantized in the plan (``choices.keep_unquantized``), or no quantized plans at all.

Activations (measured, then fitted)
  What autograd keeps depends on the family's code (extra norms, q/k norms, soft-capping,
  gated or plain MLP, state-space scans), on our settings (4-bit or bf16 base, LoRA targets
  and rank, dropout, padded or unpadded batches, eager or SDPA attention) and on the
  installed releases. So it is measured: a random-weight copy of the same config class with
  2 blocks, the same head counts and every width divided by a factor (head_dim 8 and 16
  instead of 128) is loaded as training loads it (bitsandbytes 4-bit, peft LoRA, TRL's cast
  of the adapters, the trainer's bf16 autocast emulated on the CPU), runs forward and
  backward on a few batches, and autograd's saved-tensor hooks record what the second block
  keeps (the first block on its own: it reads the embeddings, whose dtype the later blocks'
  input may not have). Per block, the kept bytes are exactly
  ``tokens * (a * w + b * seq + c) + d * w^2 + e * w`` for width scale ``w`` (widths, MoE
  experts hit), sequence length (eager scores, the SDPA mask), constants (per-head
  log-sum-exp, rank-wide LoRA outputs) and per-block terms (a folded expert stack; autocast's
  copies of norm weights). Six measurements (two widths, three lengths), padded and unpadded,
  fit the terms by least squares; the fit's residual is kept as a check; ``w = 1`` gives the
  real model. What backward allocates above that is memory.py's rule on the real widths.

  The trace runs on the CPU but computes as a GPU would: CUDA's autocast lists are applied by
  a torch-function mode (the CPU's own autocast keeps LayerNorm and softmax in bf16), dropout
  keeps a bool mask as CUDA's fused kernel does, and SDPA keeps what CUDA's flash /
  memory-efficient kernels keep, in their (batch, seq, heads, dim) layout.

Results are cached per (configuration structure, settings, transformers / torch / peft /
bitsandbytes versions) under the user cache (``traces.json``): the first plan of a new
architecture takes a few seconds, the next one about a second without importing torch (the
structure is cached too). A family spec.py knows never comes here, so its dry run imports no torch.
An architecture that cannot be built or trained here raises :class:`Untraceable`: the recipe may
still run it with every choice pinned and no prediction (planner.unpredicted_plan).

The CPU cannot run CUDA's attention kernels: flash attention 2 is measured as SDPA without a
mask (both keep q, k, v, the output and a log-sum-exp), and 8-bit as 4-bit (the activation
paths are the same). tests/test_preflight_trace.py holds the traced inventory of every
hand-written family against the hand-written one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field, replace
from dataclasses import fields as fields_of
from pathlib import Path
from typing import Any

from finetune import versions
from finetune.architectures import spec as arch
from finetune.architectures.spec import Untraceable
from finetune.errors import ConfigError
from finetune.paths import cached_entry, store_entry
from finetune.probes.packing import fit_token_ids

log = logging.getLogger(__name__)


TRACE_VERSION = 1
VOCAB = 256
LAYERS = 2
KINDS = ("unmasked", "masked", "unmasked_first", "masked_first")  # padded or not; the first block or the others
MICRO_BATCH = 2
SEQS = (32, 64, 96)  # lengths measured at both widths
# the residual of the fit, relative to the largest measurement, above which the fit is reported as poor
FIT_TOLERANCE = 0.02

_HIDDEN = ("hidden_size", "n_embd", "n_embed", "d_model")
_HEADS = ("num_attention_heads", "n_head")
_KV_HEADS = ("num_key_value_heads", "num_kv_heads")
_LAYERS = ("num_hidden_layers", "n_layer")
# widths divided by the scale factor (each family's own names); head counts, expert counts, state sizes,
# kernel sizes and flags are kept, so the copy takes the real model's code paths
_WIDTHS = ("hidden_size", "n_embd", "n_embed", "d_model", "intermediate_size", "n_inner", "ffn_hidden_size",
           "moe_intermediate_size", "shared_expert_intermediate_size", "head_dim", "kv_channels", "rotary_dim",
           "attention_hidden_size", "time_step_rank", "expert_intermediate_size")
_DROP = ("architectures", "auto_map", "quantization_config", "torch_dtype", "dtype", "transformers_version",
         "_name_or_path", "layer_types", "rope_scaling", "use_cache")
_ROTARY_FRACTION = ("partial_rotary_factor", "rotary_pct")
_ATTENTION_WORDS = ("attn", "attention", "self_attention")
_MLP_WORDS = ("mlp", "feed_forward", "ffn", "moe", "block_sparse_moe")
_ATTN_OUT_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "wo", "output", "proj")




def _first(config: dict[str, Any], keys: tuple[str, ...]) -> Any:
    return next((config[k] for k in keys if config.get(k) is not None), None)


def head_dim(config: dict[str, Any]) -> int | None:
    heads = _first(config, _HEADS)
    hidden = _first(config, _HIDDEN)
    if config.get("head_dim"):
        return int(config["head_dim"])
    if heads and hidden:
        return int(hidden) // int(heads)
    return None


# -- the scaled-down copy ---------------------------------------------------------------------

def _rotary_ok(config: dict[str, Any], hd: int) -> bool:
    frac = _first(config, _ROTARY_FRACTION)
    if frac is None or frac >= 1:
        return True
    rot = int(hd * float(frac))
    return rot > 0 and rot % 2 == 0


def _exact(config: dict[str, Any], scale: float) -> bool:
    """Every width stays an integer at `scale`, and the hidden size a multiple of the heads where head_dim is
    its own field (the config classes check it)."""
    for k in _WIDTHS:
        v = config.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0 and abs(v * scale - round(v * scale)) > 1e-9:
            return False
    heads, hidden = _first(config, _HEADS), _first(config, _HIDDEN)
    return not (config.get("head_dim") and heads and hidden and round(hidden * scale) % int(heads))


def scales(config: dict[str, Any]) -> tuple[float, float]:
    """The two width scales (fractions of the real widths) the copy is measured at: head_dim 8 and 16 where
    that keeps every width whole (else 16 and 32, ...), rotary fractions whole and even."""
    hd = head_dim(config)
    if hd:
        usable = [small for small in (8, 16, 32, 64) if small * 2 <= hd and _rotary_ok(config, small)
                  and _rotary_ok(config, 2 * small)]
        exact = [small for small in usable if _exact(config, small / hd) and _exact(config, 2 * small / hd)]
        if exact or usable:
            small = (exact or usable)[0]
            return small / hd, 2 * small / hd
        return 0.5, 1.0
    hidden = int(_first(config, _HIDDEN) or 0)
    if hidden < 4:
        raise ConfigError("model config: no hidden size in config.json")
    return 64 / hidden, 128 / hidden


def scaled(config: dict[str, Any], scale: float, windowed: bool = False) -> dict[str, Any]:
    """`config` with 2 blocks, every width times `scale`, a 256-token vocabulary; all else kept. A sliding
    window becomes shorter than the measured sequences when `windowed`, else longer than them."""
    small = {k: v for k, v in config.items() if k not in _DROP and not k.startswith("_")}
    hd = head_dim(config)
    heads = _first(config, _HEADS)
    for k in _WIDTHS:
        v = small.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            small[k] = max(1, int(round(v * scale)))
    if hd and heads and "head_dim" not in config:
        # hidden = heads x head_dim exactly, as the config class derives head_dim
        for k in _HIDDEN:
            if k in small:
                small[k] = int(heads) * max(1, int(round(hd * scale)))
    for k in _LAYERS:
        if k in small:
            small[k] = LAYERS
    if "num_hidden_layers" not in small and not any(k in small for k in _LAYERS):
        small["num_hidden_layers"] = LAYERS
    for k in ("max_position_embeddings", "n_positions", "n_ctx", "context_length", "seq_length"):
        if isinstance(small.get(k), int):
            small[k] = max(256, 2 * max(SEQS))
    if isinstance(small.get("sliding_window"), int) and small["sliding_window"]:
        small["sliding_window"] = 16 if windowed else 4 * max(SEQS)
    for k in ("mlp_only_layers",):
        if isinstance(small.get(k), list):
            small[k] = [i for i in small[k] if i < LAYERS]
    small["vocab_size"] = VOCAB
    # absent ids take the config class's defaults, which may lie outside the small vocabulary (Phi-3's pad 32000)
    for k, v in (("bos_token_id", 1), ("eos_token_id", 2), ("pad_token_id", 0)):
        small.setdefault(k, v)
    fit_token_ids(small, VOCAB)
    return small


def _hf_config(d: dict[str, Any]):
    from transformers import AutoConfig

    fields = {k: v for k, v in d.items() if not k.startswith("_")}  # the catalog's own notes (_text_tower_of)
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, **fields)


def _blocks(model, n_layers: int):
    """The decoder blocks: the ModuleList of n_layers modules holding the most parameters."""
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers]
    if not lists:
        raise Untraceable(f"model.name_or_path: found no list of {n_layers} decoder blocks in "
                          f"{type(model).__name__} to trace")
    return max(lists, key=lambda ml: sum(p.numel() for p in ml.parameters()))


# -- structure from the meta device -----------------------------------------------------------

def _group(path: str, name: str, in_f: int, out_f: int, hidden: int, first_in_attention: bool) -> str:

    parts = path.split(".")[:-1]
    if any(any(w in p for w in _ATTENTION_WORDS) for p in parts):
        if name in _ATTN_OUT_NAMES or (out_f == hidden and in_f != hidden and not first_in_attention):
            return arch.ATTN_OUT
        return arch.ATTN_IN
    if any(any(w in p for w in _MLP_WORDS) for p in parts):
        return arch.MLP_IN if in_f == hidden else arch.MLP_MID
    return arch.OTHER


def derive(config: dict[str, Any]):
    """An ArchSpec for `config` (a config.json dict) derived from transformers' own model of it, with a
    traced activation profile. ConfigError (one line) when transformers cannot build it as a causal LM.

    The structure is cached with the traces: a second plan of the same model imports no torch."""

    key = _structure_key(config)
    hit = _cached(key)
    if hit is not None:
        try:
            fields = dict(hit)
            fields["linears"] = tuple(arch.Linear(**lin) for lin in fields["linears"])
            fields["expert_shapes"] = tuple(tuple(x) for x in fields["expert_shapes"])
            fields["vision_linears"] = tuple(tuple(x) for x in fields.get("vision_linears", ()))
            spec = arch.ArchSpec(**fields, traced=Profile(config, 0.0, structure_cached=True))
            return arch.with_vision_tower(spec, config)
        except (KeyError, TypeError):
            pass  # an entry from another layout of the cache: derive it again
    spec = _derive(config)  # the text tower only (_hf_config drops the catalog's _vision_config)
    record = {f.name: getattr(spec, f.name) for f in fields_of(spec) if f.name != "traced"}
    record["linears"] = [lin.__dict__ for lin in spec.linears]
    record["expert_shapes"] = [list(x) for x in spec.expert_shapes]
    _store(key, record)
    # a multimodal checkpoint's vision tower, which AutoModelForCausalLM loads with it (arch.vision_tower)
    return arch.with_vision_tower(spec, config)


def _derive(config: dict[str, Any]):

    model_type = config.get("model_type")
    try:
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.pytorch_utils import Conv1D
    except ImportError as e:  # pragma: no cover - torch and transformers are dependencies
        raise ConfigError(f"model.name_or_path: '{model_type}' has no hand-written rules and tracing it needs "
                          f"torch and transformers ({e})") from e
    started = time.perf_counter()
    try:
        hf = _hf_config(config)
    except (KeyError, ValueError) as e:
        raise Untraceable(
            f"model.name_or_path: the preflight does not know the architecture '{model_type}' and transformers "
            f"{versions.installed('transformers')} cannot build it (custom code is never run)") from e
    n_layers = int(_first(config, _LAYERS) or getattr(hf, "num_hidden_layers", 0) or 0)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf)
    except (ValueError, KeyError) as e:
        raise Untraceable(
            f"model.name_or_path: transformers {versions.installed('transformers')} has no causal-LM model for "
            f"'{model_type}' ({str(e).splitlines()[0][:120]})") from e
    blocks = _blocks(model, n_layers)
    hidden = int(_first(config, _HIDDEN) or getattr(hf, "hidden_size", 0))
    subclasses = versions.quantizes_linear_subclasses()
    linears: list[arch.Linear] = []
    seen_attention_in = False
    for path, m in blocks[0].named_modules():
        if isinstance(m, Conv1D):
            in_f, out_f = m.weight.shape
        elif isinstance(m, torch.nn.Linear):
            in_f, out_f = m.in_features, m.out_features
        else:
            continue
        if any(x.startswith("lora_") for x in path.split(".")):
            continue
        name = path.rsplit(".", 1)[-1]
        group = _group(path, name, in_f, out_f, hidden, not seen_attention_in)
        seen_attention_in = seen_attention_in or group == arch.ATTN_IN
        quantizable = type(m) in (torch.nn.Linear, Conv1D) or (subclasses and isinstance(m, torch.nn.Linear))
        linears.append(arch.Linear(name, int(in_f), int(out_f), group, m.bias is not None, quantizable))
    if not linears:
        raise ConfigError(f"model.name_or_path: {type(model).__name__} has no linear layers in its blocks for "
                          "LoRA to adapt (peft adapts nn.Linear and Conv1D modules)")
    refused = _peft_refuses(config, sorted({lin.name for lin in linears}))
    if refused:
        linears = [replace(lin, adaptable=lin.name not in refused) for lin in linears]
        if not any(lin.adaptable for lin in linears):
            raise ConfigError(f"model.name_or_path: peft {versions.installed('peft')} cannot put LoRA on any layer "
                              f"of {type(model).__name__} ({'; '.join(refused.values())})")
    output_name = next((n for n, m in model.named_modules() if m is model.get_output_embeddings()), "lm_head")
    keep, quant_error = _quantization_probe(config, linears, output_name)
    if keep or quant_error:
        linears = [replace(lin, quantizable=False) if (lin.name in keep or quant_error) else lin for lin in linears]
    # fused MoE experts: 3-D parameters under an experts module (a convolution's 3-D weight is not one)
    experts = [(p_name, p) for p_name, p in blocks[0].named_parameters() if p.dim() == 3 and "expert" in p_name]
    expert_shapes = tuple((n, int(p.shape[1]), int(p.shape[2])) for n, p in experts)
    n_experts = int(experts[0][1].shape[0]) if experts else 0
    expert_count = n_layers * sum(p.numel() for _, p in experts)
    in_emb = model.get_input_embeddings()
    out_emb = model.get_output_embeddings()
    tied = out_emb is None or out_emb.weight is in_emb.weight
    total = sum(p.numel() for p in model.parameters())  # shared (tied) parameters once
    linear_count = n_layers * sum(lin.params for lin in linears)
    emb = in_emb.weight.numel()
    head = 0 if tied else out_emb.weight.numel() + (out_emb.bias.numel() if getattr(out_emb, "bias", None)
                                                     is not None else 0)
    vocab = int(in_emb.weight.shape[0])
    heads = int(_first(config, _HEADS) or getattr(hf, "num_attention_heads", 0) or 1)
    kv = int(_first(config, _KV_HEADS) or heads)
    hd = head_dim(config) or max(1, hidden // heads)
    inter = int(config.get("moe_intermediate_size") or _first(config, ("intermediate_size", "n_inner",
                                                                         "ffn_hidden_size")) or 4 * hidden)
    mlp_in = [lin for lin in linears if lin.reads == arch.MLP_IN]
    gated = len(mlp_in) >= 2 or any(lin.out_features == 2 * inter for lin in mlp_in) or bool(experts)
    norm_rms = any("rms" in type(mod).__name__.lower() for mod in blocks[0].modules())
    attention = _default_attention(config)
    spec = arch.ArchSpec(
        architecture=(config.get("architectures") or [type(model).__name__])[0], model_type=str(model_type),
        layers=n_layers, hidden=hidden, heads=heads, kv_heads=kv if heads % kv == 0 else heads, head_dim=hd,
        intermediate=inter, vocab=vocab, tied_embeddings=tied, linears=tuple(linears),
        norm="rms" if norm_rms else "layer", norms_per_layer=0, attention=attention, gated_mlp=gated,
        experts=n_experts, experts_per_token=int(config.get("num_experts_per_tok") or (2 if n_experts else 0)),
        lm_head_bias=head > vocab * hidden,
        extra_params=total - linear_count - expert_count - emb - head,
        expert_param_count=expert_count, expert_shapes=expert_shapes,
        extra={k: v for k, v in (("not_adaptable", refused), ("keep_unquantized", sorted(keep)),
                                 ("quantization_error", quant_error), ("output_module", output_name)) if v},
        traced=Profile(config, time.perf_counter() - started),
    )
    # the final norm arch.ArchSpec counts itself (norm_params) is among the parameters counted above
    return replace(spec, extra_params=spec.extra_params - spec.norm_params)


def _peft_refuses(config: dict[str, Any], names: list[str]) -> dict[str, str]:
    """The linear layers peft will not put LoRA on, with its reason, asked of peft itself on a meta-device
    copy: all of them at once, and one by one only when that fails."""
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    small = _hf_config(scaled(config, scales(config)[0]))

    def refusal(targets: list[str]) -> str:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(small)
        try:
            get_peft_model(model, LoraConfig(r=4, target_modules=targets))
            return ""
        except ValueError as e:
            return f"peft: {str(e).splitlines()[0][:200]}"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not refusal(names):
            return {}
        return {name: reason for name in names if (reason := refusal([name]))}


@contextlib.contextmanager
def _quiet():
    """The copies load in milliseconds: no progress bars, no library warnings about their toy shapes."""
    import warnings

    from transformers.utils import logging as hf_logging

    loggers = [logging.getLogger(n) for n in ("transformers", "bitsandbytes", "peft")]
    levels = [q.level for q in loggers]
    bars = hf_logging.is_progress_bar_enabled()
    for q in loggers:
        q.setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for q, level in zip(loggers, levels, strict=True):
            q.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


def _quantization_probe(config: dict[str, Any], linears, output_name: str) -> tuple[set[str], str]:
    """Whether the family trains with bitsandbytes' 4-bit layers: a tiny copy is loaded in 4-bit and runs
    forward and backward with LoRA. Some model code reads a layer's .weight directly (transformers 5.24's
    Mamba mixer: ``self.dt_proj.weight @ ...``), which a packed 4-bit weight cannot serve; then each layer is
    kept unquantized in turn until one is enough. Returns (layers to keep in the compute dtype, the error
    when no single one is)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    small = scaled(config, scales(config)[0])
    names = sorted({lin.name for lin in linears if lin.quantizable})
    adaptable = sorted({lin.name for lin in linears if lin.adaptable})
    if not names:
        return set(), ""

    def trains(skip: list[str], path: Path) -> str:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=(
                BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                   llm_int8_skip_modules=[*skip, output_name] if skip else None)))
            model = get_peft_model(model, LoraConfig(r=4, target_modules=adaptable))
            model.train()  # as training runs it (bitsandbytes repacks 4-bit weights for CPU inference only)
            tokens = torch.randint(3, VOCAB, (1, 16))
            model(input_ids=tokens, labels=tokens, use_cache=False).loss.backward()
            return ""
        except Exception as e:  # noqa: BLE001 - any failure of the 4-bit path is the answer
            return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"

    with _quiet(), tempfile.TemporaryDirectory(prefix="finetune-probe-") as tmp:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(_hf_config(small), dtype=torch.float32).save_pretrained(tmp)
        error = trains([], Path(tmp))
        if not error:
            return set(), ""
        for name in names:
            if not trains([name], Path(tmp)):
                log.info("%s: 4-bit %s fails (%s); kept in the compute dtype", config.get("model_type"), name, error)
                return {name}, ""
        return set(), error


def _default_attention(config: dict[str, Any]) -> str:
    """The attention transformers picks for this family when none is asked for (sdpa where the family
    supports it, else eager; none for a model without attention)."""
    import torch
    from transformers import AutoModelForCausalLM

    small = _hf_config(scaled(config, scales(config)[0]))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(small)
    if not _first(config, _HEADS):
        return "none"  # no attention at all (Mamba's state-space mixer, RWKV's time mixing)
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    return "sdpa" if impl == "sdpa" else "eager"


def keep_unquantized(spec) -> list[str]:
    """Modules a 4-bit or 8-bit load must leave in the compute dtype (bitsandbytes' llm_int8_skip_modules,
    which then replaces transformers' default list, so the output embedding is named too); [] when none."""
    keep = list(spec.extra.get("keep_unquantized", ()))
    return [*keep, spec.extra.get("output_module", "lm_head")] if keep else []


# -- the activation profile -------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """What decides the tensors a block keeps."""

    quantized: bool
    autocast: bool
    dtype_bytes: int  # the compute dtype (2: bf16/fp16, 4: fp32)
    dropout: bool
    upcast: bool
    targets: tuple[str, ...]  # peft target_modules
    parameters: tuple[str, ...]  # peft target_parameters (MoE experts)
    rank: int
    attention: str  # sdpa | eager | none (no attention)
    # the sequence is longer than the model's sliding window: transformers then always builds a mask (and
    # SDPA keeps it); shorter, a causal batch without padding runs unmasked
    windowed: bool = False
    # layers the 4-bit load keeps in the compute dtype (with the output embedding), see _quantization_probe
    keep_unquantized: tuple[str, ...] = ()
    # the adapters' dtype: bf16 where TRL casts them (a quantized base), else fp32 (peft's default); a
    # calibration row's stack may differ (memory.Settings.lora_dtype)
    lora_bytes: int = 2
    # the fused MoE experts 4-bit too (finetune/models/experts.py), as the plan's choices.quantized_experts say
    quantized_experts: bool = False

    def key(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)


@dataclass
class Fit:
    per_token_scale: float  # bytes per token per unit width scale
    per_token_seq: float  # bytes per token per sequence position
    per_token_const: float
    per_layer: float  # bytes per block, at the real widths
    residual_out_bytes: int
    fit_error: float  # largest relative residual of the least-squares fit

    def kept(self, seq: int) -> float:
        return self.per_token_scale + self.per_token_seq * seq + self.per_token_const


@dataclass
class Profile:
    """Traced activations of one architecture, per setting, measured on first use and cached."""

    config: dict[str, Any]
    structure_seconds: float = 0.0
    structure_cached: bool = False
    seconds: float = 0.0  # time spent measuring in this process
    cached: int = 0  # settings read from the disk cache
    measured: int = 0  # settings measured in this process
    worst_fit: float = 0.0
    _fits: dict[tuple[str, str], Fit] = field(default_factory=dict)  # (setting key, kind) -> fit

    def describe(self) -> str:
        bits = []
        if self.measured:
            bits.append(f"{self.measured} setting(s) measured in {self.seconds + self.structure_seconds:.1f} s")
        if self.cached or self.structure_cached:
            what = f"{self.cached} setting(s)" + (" and the structure" if self.structure_cached else "")
            bits.append(f"{what} from the trace cache")
        if self.measured or self.cached:
            bits.append(f"fit within {self.worst_fit:.1%}")
        return "; ".join(bits) or f"structure read in {self.structure_seconds:.1f} s"

    def summary(self) -> dict[str, Any]:
        """For plan.json: how the inventory was obtained and what it cost."""
        return {"model_type": self.config.get("model_type"), "seconds": round(self.seconds + self.structure_seconds,
                                                                               2),
                "settings_measured": self.measured, "settings_cached": self.cached,
                "fit_error": round(self.worst_fit, 6), "trace_version": TRACE_VERSION}

    def layer(self, spec, ctx, seq_len: int, r_in: int) -> tuple[int, int, int, int]:
        """(kept bytes per token, transient bytes per token, output element bytes, bytes per block), as
        memory.layer_bytes_per_token returns them, for the real widths."""
        setting = self.setting_for(spec, ctx, seq_len)
        masked = bool(ctx.masked) and ctx.attention not in ("flash2",)
        fit = self.fit(setting, masked)
        if r_in != fit.residual_out_bytes:
            # the first block reads the embeddings, whose dtype the later blocks' input may not have (a
            # LayerNorm family's residual stream turns fp32 in the first block): measured on its own
            fit = self.fit(setting, masked, first=True)
        kept = fit.kept(seq_len)
        # backward of one block, above what it kept (not traced: saved-tensor hooks see what is kept, not
        # what backward allocates): memory.py's rule on the real widths -- the residual stream's gradient and
        # the MLP's (gate, up and their product, or the inner activation and its input; per routed expert for
        # MoE), or eager attention's scores
        m = fit.residual_out_bytes
        if spec.experts:
            mlp = spec.experts_per_token * 2 * spec.intermediate * m
        else:
            mlp = (3 if spec.gated_mlp else 2) * spec.intermediate * m
        attn = {"eager": spec.heads * seq_len * (ctx.b + 4), "math": spec.heads * seq_len * 2 * ctx.b}.get(
            ctx.attention, 0)
        transient = m * spec.hidden + max(mlp, attn)
        return int(math.ceil(kept)), int(math.ceil(transient)), fit.residual_out_bytes, int(max(0.0, fit.per_layer))

    def setting_for(self, spec, ctx, seq_len: int) -> Setting:
        names = tuple(sorted({spec.linears[i].name for i in ctx.targets}))
        params = tuple(n for n, *_ in spec.expert_shapes) if ctx.expert_lora else ()
        attention = ctx.attention if ctx.attention in ("eager", "none") else "sdpa"
        window = self.config.get("sliding_window")
        windowed = (isinstance(window, int) and not isinstance(window, bool) and 0 < window < seq_len
                    and self.config.get("use_sliding_window", True) is not False)
        return Setting(quantized=bool(ctx.quantized), autocast=bool(ctx.autocast),
                       dtype_bytes=int(ctx.b), dropout=bool(ctx.dropout), upcast=bool(ctx.upcast),
                       targets=names, parameters=params, rank=int(ctx.rank), attention=attention,
                       windowed=windowed, keep_unquantized=tuple(keep_unquantized(spec)),
                       lora_bytes=int(ctx.lora_bytes), quantized_experts=bool(ctx.quantized_experts))

    def fit(self, setting: Setting, masked: bool, first: bool = False) -> Fit:
        memo = (setting.key(), ("masked" if masked else "unmasked") + ("_first" if first else ""))
        if memo in self._fits:
            return self._fits[memo]
        key = _cache_key(self.config, setting)
        hit = _cached(key)
        if hit is not None and all(k in hit for k in KINDS):
            fits = {m: Fit(**hit[m]) for m in KINDS}
            self.cached += 1
        else:
            started = time.perf_counter()
            fits = measure(self.config, setting)
            self.seconds += time.perf_counter() - started
            self.measured += 1
            _store(key, {m: dict(f.__dict__) for m, f in fits.items()})
        for m, f in fits.items():
            self._fits[(setting.key(), m)] = f
            self.worst_fit = max(self.worst_fit, f.fit_error)
        return self._fits[memo]


# -- CUDA's autocast, on the CPU --------------------------------------------------------------

# torch's CUDA autocast policy (aten/src/ATen/autocast_mode.cpp, torch 2.x), by function name. The CPU's own
# autocast has a shorter fp32 list (no layer_norm, softmax, exp, pow, ...), so a LayerNorm model traced under
# it keeps half of what it keeps on a GPU (measured: GPT-J 0.44x, Phi-2 0.58x of the verified rules). This
# mode applies the CUDA lists above autograd, where autocast itself runs, so the casts' copies are kept (or
# not) by autograd exactly as on a GPU.
_LOWER = frozenset("""linear matmul __matmul__ __rmatmul__ mm bmm baddbmm addmm addbmm addmv addr mv einsum conv1d
conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d convolution prelu scaled_dot_product_attention
chain_matmul linalg_multi_dot linalg_vecdot conv_tbc lstm_cell gru_cell rnn_tanh_cell rnn_relu_cell""".split())
_FP32 = frozenset("""acos asin cosh erfinv exp expm1 log log10 log2 log1p reciprocal rsqrt sinh tan pow __pow__
__rpow__ softplus layer_norm group_norm frobenius_norm nuclear_norm cosine_similarity poisson_nll_loss
cosine_embedding_loss nll_loss hinge_embedding_loss kl_div l1_loss smooth_l1_loss huber_loss mse_loss
margin_ranking_loss multilabel_margin_loss soft_margin_loss triplet_margin_loss multi_margin_loss
binary_cross_entropy_with_logits dist pdist cdist renorm logsumexp""".split())
_FP32_UNLESS_DTYPE = frozenset("prod softmax log_softmax cumprod cumsum linalg_vector_norm linalg_matrix_norm sum "
                               "norm".split())
_PROMOTE = frozenset("addcdiv addcmul atan2 bilinear cross dot grid_sampler index_put scatter_add tensordot".split())


def cuda_autocast(dtype):
    """A torch-function mode that casts as ``torch.autocast("cuda", dtype)`` would (CPU tensors, no CUDA)."""
    import torch
    from torch.overrides import TorchFunctionMode

    def cast(x, to, when):
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype in when:
            return x.to(to)
        if isinstance(x, (list, tuple)):
            return type(x)(cast(v, to, when) for v in x)
        return x

    lower_from = (torch.float32,)
    fp32_from = (torch.float16, torch.bfloat16)

    class CudaAutocast(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            name = getattr(func, "__name__", "")
            if name in _LOWER:
                args, kwargs = cast(args, dtype, lower_from), {k: cast(v, dtype, lower_from) for k, v in
                                                               kwargs.items()}
                if name == "scaled_dot_product_attention":
                    if _math_path(args, kwargs):
                        return _sdpa_math(*args, **kwargs)
                    return _sdpa_fused(*args, **kwargs)
            elif name in _FP32 or (name in _FP32_UNLESS_DTYPE and kwargs.get("dtype") is None):
                args, kwargs = cast(args, torch.float32, fp32_from), {k: cast(v, torch.float32, fp32_from) for k, v
                                                                      in kwargs.items()}
            elif name == "dropout" and args and isinstance(args[0], torch.Tensor):
                # CUDA's fused dropout keeps a bool mask; the CPU's keeps one in the input's dtype (2-4x)
                p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
                training = kwargs.get("training", args[2] if len(args) > 2 else True)
                if training and p > 0:
                    x = args[0]
                    keep = torch.rand(x.shape, device=x.device) >= p
                    return x * keep * (1.0 / (1.0 - p))
            elif name in _PROMOTE:
                dtypes = [a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
                if torch.float32 in dtypes:
                    args = cast(args, torch.float32, fp32_from)
            return func(*args, **kwargs)

    return CudaAutocast()


def _math_path(args, kwargs) -> bool:
    """SDPA's fused kernels refuse different query and key/value head counts without enable_gqa (Falcon-7B's
    multi-query layout): torch falls back to its math kernel, which on the CPU upcasts bf16 to fp32 and on a
    GPU does not."""
    q, k = args[0], args[1] if len(args) > 1 else kwargs["key"]
    import torch

    return (q.dtype in (torch.bfloat16, torch.float16)
            and q.dim() == 4 and q.shape[-3] != k.shape[-3] and not kwargs.get("enable_gqa"))


def _sdpa_math(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """torch's math SDPA in the inputs' dtype, as it runs on a GPU (the tensors it keeps: q, k, v and the
    probabilities)."""
    import torch

    scale = scale if scale is not None else query.shape[-1] ** -0.5
    scores = (query @ key.transpose(-2, -1)) * scale
    seq_q, seq_k = query.shape[-2], key.shape[-2]
    if is_causal:
        causal = torch.ones(seq_q, seq_k, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        probs = torch.nn.functional.dropout(probs, dropout_p)
    return probs @ value


def _sdpa_fused(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA that keeps for backward what CUDA's flash / memory-efficient kernels keep: q, k, v, the output in
    (batch, seq, heads, dim) layout (so transformers' transpose back is a view, not a copy, as on a GPU; the
    CPU kernel returns (batch, heads, seq, dim) and the transpose copies it), an fp32 log-sum-exp per head
    and, with a mask, the mask in the query's dtype. Backward recomputes the attention (a trace pays twice the
    attention FLOPs of a 2-block copy; the gradients are exact)."""
    import torch

    sdpa = torch.nn.functional.scaled_dot_product_attention
    extra = {"scale": scale, "enable_gqa": enable_gqa}

    class FusedSDPA(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, mask):
            with torch.no_grad():
                out = sdpa(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, **extra)
            out_bshd = out.transpose(1, 2).contiguous()
            lse = torch.empty(q.shape[:-1], dtype=torch.float32)
            saved = [q, k, v, out_bshd, lse]
            if mask is not None:
                saved.append(mask.to(q.dtype) if mask.dtype == torch.bool else mask)
            ctx.save_for_backward(*saved)
            ctx.has_mask = mask is not None
            return out_bshd.transpose(1, 2)

        @staticmethod
        def backward(ctx, grad):
            q, k, v, *_rest = ctx.saved_tensors
            mask = _rest[-1] if ctx.has_mask else None
            with torch.enable_grad():
                q_, k_, v_ = (t.detach().requires_grad_(t.requires_grad) for t in (q, k, v))
                if mask is not None and mask.dtype != torch.bool:
                    mask = mask if mask.dtype == q.dtype else mask.to(q.dtype)
                out = sdpa(q_, k_, v_, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, **extra)
                wanted = [t for t in (q_, k_, v_) if t.requires_grad]
                grads = iter(torch.autograd.grad(out, wanted, grad) if wanted else [])
            return tuple(next(grads) if t.requires_grad else None for t in (q_, k_, v_)) + (None,)

    return FusedSDPA.apply(query, key, value, attn_mask)


# -- measuring --------------------------------------------------------------------------------

def _block_kept(model, blocks, tokens, mask) -> tuple[int, int, int]:
    """(bytes the first block keeps for backward, bytes the second block keeps, the second block's output
    element size), parameters and what both blocks keep (rotary tables, masks) left out; then one backward
    pass."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: list[dict[int, int]] = [{}, {}]
    out_bytes = [0]
    handles = []
    for i, block in enumerate(blocks):
        state: dict[str, Any] = {}

        def pack(t, i=i):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params and storage.device.type != "meta":
                seen[i][storage.data_ptr()] = storage.nbytes()
            return t

        def enter(mod, args, kwargs, state=state, pack=pack):
            state["hooks"] = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
            state["hooks"].__enter__()

        def leave(mod, args, kwargs, out, state=state, i=i):
            state["hooks"].__exit__(None, None, None)
            if i == 1:
                t = out[0] if isinstance(out, (tuple, list)) else out
                t = getattr(t, "last_hidden_state", t)
                out_bytes[0] = t.element_size() if isinstance(t, torch.Tensor) else 0

        handles += [block.register_forward_pre_hook(enter, with_kwargs=True),
                    block.register_forward_hook(leave, with_kwargs=True)]
    try:
        kwargs = {"input_ids": tokens, "labels": tokens, "use_cache": False}
        if mask is not None:
            kwargs["attention_mask"] = mask
        loss = model(**kwargs).loss
    finally:
        for h in handles:
            h.remove()
    own = [{k: v for k, v in seen[i].items() if k not in seen[1 - i]} for i in (0, 1)]
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(own[0].values()), sum(own[1].values()), out_bytes[0]


def _load(small: dict[str, Any], setting: Setting, workdir: Path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from finetune.models import experts

    dtype = torch.bfloat16 if setting.dtype_bytes == 2 and setting.autocast else torch.float32
    hf = _hf_config(small)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(hf, dtype=torch.float32)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if setting.attention != "none":
        kwargs["attn_implementation"] = setting.attention
    if setting.quantized:
        model.save_pretrained(workdir)
        del model
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True, llm_int8_skip_modules=list(setting.keep_unquantized) or None)
        with experts.loading() if setting.quantized_experts else contextlib.nullcontext():
            model = AutoModelForCausalLM.from_pretrained(workdir, **kwargs)
    else:
        model = model.to(dtype)
        if setting.attention != "none":
            model.set_attn_implementation(setting.attention)
    if setting.upcast:  # peft's prepare_model_for_kbit_training: every unquantized parameter in fp32
        for p in model.parameters():
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
    lora = LoraConfig(r=setting.rank, lora_alpha=2 * setting.rank, lora_dropout=0.1 if setting.dropout else 0.0,
                      target_modules=list(setting.targets) or None,
                      target_parameters=list(setting.parameters) or None)
    experts.register_lora(lora, model)
    model = get_peft_model(model, lora)
    lora_dtype = {2: torch.bfloat16, 4: torch.float32}.get(setting.lora_bytes, torch.float32)
    for p in model.parameters():  # TRL casts the trainable parameters of a quantized model to bf16
        if p.requires_grad and p.dtype != lora_dtype:
            p.data = p.data.to(lora_dtype)
    model.train()
    return model


def measure(config: dict[str, Any], setting: Setting) -> dict[str, Fit]:
    """Run the scaled-down copies under `setting` and fit the per-block terms (unpadded and padded)."""
    import torch

    rows: dict[str, list[tuple[float, int, int, int]]] = {k: [] for k in KINDS}
    out_bytes = 0
    small_scale, large_scale = scales(config)
    try:
        with _quiet(), tempfile.TemporaryDirectory(prefix="finetune-trace-") as tmp:
            for scale, seqs in ((small_scale, SEQS), (large_scale, SEQS)):
                small = scaled(config, scale, setting.windowed)
                workdir = Path(tmp) / f"w{scale:.6f}"
                model = _load(small, setting, workdir)
                blocks = _blocks(model, LAYERS)
                autocast = (cuda_autocast(torch.bfloat16) if setting.autocast and setting.dtype_bytes == 2
                            else contextlib.nullcontext())
                gen = torch.Generator().manual_seed(0)
                for seq in seqs:
                    tokens = torch.randint(3, VOCAB, (MICRO_BATCH, seq), generator=gen)
                    mask = torch.ones_like(tokens)
                    mask[0, seq // 2:] = 0
                    for kind, m in (("unmasked", None), ("masked", mask)):
                        with autocast:
                            first, steady, out_b = _block_kept(model, blocks, tokens, m)
                        out_bytes = max(out_bytes, out_b)
                        rows[kind].append((scale, seq, MICRO_BATCH * seq, steady))
                        rows[f"{kind}_first"].append((scale, seq, MICRO_BATCH * seq, first))
                del model
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever stops the copy from training, said in one line
        first = str(e).splitlines()[0][:160] if str(e) else ""
        raise Untraceable(
            f"model.name_or_path: '{config.get('model_type')}' could not be traced on transformers "
            f"{versions.installed('transformers')} / peft {versions.installed('peft')} ({type(e).__name__}: "
            f"{first})") from e
    return {kind: _fit(points, out_bytes or setting.dtype_bytes) for kind, points in rows.items()}


def _lstsq(rows: list[list[float]], ys: list[float]) -> list[float]:
    import torch

    a = torch.tensor(rows, dtype=torch.float64)
    y = torch.tensor(ys, dtype=torch.float64).unsqueeze(1)
    return torch.linalg.lstsq(a, y, driver="gelsd").solution.squeeze(1).tolist()


def _fit(points: list[tuple[float, int, int, int]], out_bytes: int) -> Fit:
    # kept = tokens * (a*w + b*seq + c) + d*w^2 + e*w: per block, a folded expert stack (w^2) and the
    # autocast copies of norm weights and biases (w)
    rows = [[t * w, t * s, t, w * w, w] for w, s, t, _ in points]
    ys = [float(k) for *_, k in points]
    coef = _lstsq(rows, ys)
    a, b, c, d, e = coef
    worst = max(abs(sum(x * y for x, y in zip(r, coef, strict=True)) - k) / max(ys)
                for r, k in zip(rows, ys, strict=True))
    return Fit(per_token_scale=a, per_token_seq=b, per_token_const=c, per_layer=d + e,
               residual_out_bytes=int(out_bytes), fit_error=float(worst))


# -- the cache ----------------------------------------------------------------------------------

CACHE_FILE = "traces.json"


def _stack() -> str:
    return ",".join(f"{n}={versions.installed(n)}" for n in ("transformers", "torch", "peft", "bitsandbytes"))


def _structure_key(config: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return "|".join(["structure", str(TRACE_VERSION), str(config.get("model_type")), digest, _stack()])


def _cache_key(config: dict[str, Any], setting: Setting) -> str:
    small, large = scales(config)
    structure = json.dumps([scaled(config, small), scaled(config, large)], sort_keys=True, default=str)
    return "|".join([str(TRACE_VERSION), str(config.get("model_type")),
                     hashlib.sha256(structure.encode()).hexdigest()[:16], _stack(), setting.key()])


def _cached(key: str) -> dict | None:
    return cached_entry(CACHE_FILE, key)


def _store(key: str, value: dict) -> None:
    store_entry(CACHE_FILE, key, value)
