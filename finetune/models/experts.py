"""4-bit / 8-bit fused MoE experts: quantized while loading, computed per routed expert, LoRA on them.

transformers 5 stores an MoE layer's experts as 3-D ``nn.Parameter``s (Mixtral's
``mlp.experts.gate_up_proj`` (experts, 2 x inter, hidden) and ``down_proj``; Qwen2/3-MoE and
OLMoE the same). bitsandbytes' ``load_in_4bit`` only swaps ``nn.Linear`` modules, so the experts --
97% of Mixtral 8x7B's weights -- stay in bf16 (87 GiB). This module quantizes them with
bitsandbytes' own storage, one quantized block per expert matrix, in three pieces:

* **Loading** (:func:`loading`): transformers' bitsandbytes quantizer, extended so that the
  experts' 3-D parameters are quantized as they are loaded (``param_needs_quantization`` /
  ``get_quantize_ops``, the quantizer interface transformers' loader calls per tensor): each layer's
  expert stack exists in bf16 only while it is converted, so a Mixtral loads on a 48 GB card. Each
  expert matrix is quantized on its own (``bitsandbytes.functional.quantize_4bit`` in the
  (out, in) orientation ``Linear4bit`` uses, or ``int8_vectorwise_quant``); the packed bytes replace
  the parameter, the quantization states sit beside it (:class:`Storage`).
* **Forward** (:func:`experts_forward`): registered in transformers' experts-implementation hook
  (``ExpertsInterface``, the one its fp8 and kernel integrations use) as ``finetune_bnb``. It runs
  transformers' own routing loop, and for each expert the router picked it calls bitsandbytes' matmul
  (``matmul_4bit``: dequantizes inside the kernel and again in backward, saving nothing of the
  weight; ``matmul`` with a per-expert int8 state), so at most one expert matrix is ever dequantized.
* **LoRA** (:class:`QuantizedExpertsLora`): peft's ``target_parameters`` wrapper (``ParamWrapper``)
  folds B A into the whole bf16 expert stack, which a quantized stack cannot take. This subclass keeps
  ParamWrapper's adapter layout (``lora_A`` (experts x r, in), ``lora_B`` (out, r x experts)), so the
  adapter it saves is plain peft's and reloads on the unquantized base (merge, chat), and hands the
  per-expert factors to the forward, which adds ``scale * (x A_e^T) B_e^T`` to each routed expert's
  output. Registered through peft's custom-module dispatch (``LoraConfig._register_custom_module``).

Measured on the tiny Mixtral (tests/test_experts.py): expert storage 0.26x its bf16 bytes with nf4 +
double quantization; loss curve as close to the bf16-experts run as 4-bit attention layers are.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any

import torch

IMPLEMENTATION = "finetune_bnb"
_STORAGE = "_finetune_experts"  # module attribute: {param name: Storage}
_LORA = "_finetune_expert_lora"  # module attribute during a LoRA forward: {param name: (A, B, scale)}


@dataclass
class Storage:
    """One quantized expert parameter: the packed bytes are the module's parameter, this is the rest."""
    kind: str  # "nf4" | "fp4" | "int8"
    shape: tuple[int, int, int]  # the bf16 parameter's (experts, a, b)
    dtype: torch.dtype  # what it was (and what the forward computes in)
    transposed: bool  # stored (experts, in, out): quantized as its transpose, (out, in)
    states: list[Any] = field(default_factory=list)  # 4-bit: QuantState per expert; int8: SCB per expert
    threshold: float = 0.0  # int8: LLM.int8() outlier threshold, as Linear8bitLt

    @property
    def bf16_bytes(self) -> int:
        e, a, b = self.shape
        return e * a * b * 2


def experts_modules(model) -> list[tuple[str, torch.nn.Module]]:
    """The fused-expert modules of a model: transformers' experts classes (``@use_experts_implementation``)."""
    return [(name, m) for name, m in model.named_modules() if _is_experts(m)]


def _is_experts(module) -> bool:
    return hasattr(module, "is_transposed") and hasattr(module, "has_gate") and (
        is_quantized(module) or any(p.dim() == 3 for p in module.parameters(recurse=False)))


def _expert_param_names(module) -> list[str]:
    return [n for n, p in module.named_parameters(recurse=False) if p.dim() == 3 and not n.endswith("_bias")]


def is_quantized(module) -> bool:
    return bool(getattr(module, _STORAGE, None))


def quantized_bytes(model) -> tuple[int, int]:
    """(bytes the quantized experts take, bytes they took in bf16), from the tensors' storage sizes."""
    stored = bf16 = 0
    for _, module in experts_modules(model):
        for name, st in getattr(module, _STORAGE, {}).items():
            stored += _nbytes(getattr(module, name))
            for s in st.states:
                stored += _state_bytes(s)
            bf16 += st.bf16_bytes
    return stored, bf16


def _nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def _state_bytes(state) -> int:
    if isinstance(state, torch.Tensor):
        return _nbytes(state)
    total = _nbytes(state.absmax)
    if state.nested:
        total += _nbytes(state.state2.absmax) + _nbytes(state.offset)
    return total  # the 16-entry code tables are shared constants


# ---- quantizing ---------------------------------------------------------------------------------------

def quantize(module, name: str, value: torch.Tensor, bnb_config) -> torch.nn.Parameter:
    """Quantize a 3-D expert parameter, one expert matrix at a time; record its Storage on the module."""
    import bitsandbytes.functional as F

    experts, a, b = value.shape
    transposed = bool(getattr(module, "is_transposed", False))
    if bnb_config.load_in_4bit:
        kind = bnb_config.bnb_4bit_quant_type
        packed, states = [], []
        for e in range(experts):
            w = value[e].t() if transposed else value[e]  # (out, in), as Linear4bit stores it
            q, state = F.quantize_4bit(w.contiguous(), blocksize=64, quant_type=kind,
                                       compress_statistics=bool(bnb_config.bnb_4bit_use_double_quant),
                                       quant_storage=bnb_config.bnb_4bit_quant_storage)
            packed.append(q.view(-1))
            states.append(state)
        data = torch.stack(packed)
        storage = Storage(kind, (experts, a, b), value.dtype, transposed, states)
    else:
        rows, scales = [], []
        for e in range(experts):
            w = value[e].t() if transposed else value[e]
            cb, scb, _ = F.int8_vectorwise_quant(w.contiguous().to(torch.float16))
            rows.append(cb)
            scales.append(scb)
        data = torch.stack(rows)
        storage = Storage("int8", (experts, a, b), value.dtype, transposed, scales,
                          threshold=float(bnb_config.llm_int8_threshold or 0.0))
    stores = module.__dict__.setdefault(_STORAGE, {})
    stores[name] = storage
    param = torch.nn.Parameter(data, requires_grad=False)
    param._is_hf_initialized = True
    return param


def dequantized(module, name: str) -> torch.Tensor:
    """The parameter in its original dtype and layout (for checks and merges: never on the training path)."""
    import bitsandbytes.functional as F

    st = getattr(module, _STORAGE)[name]
    data = getattr(module, name)
    mats = []
    for e in range(st.shape[0]):
        if st.kind == "int8":
            w = F.int8_vectorwise_dequant(data[e], st.states[e])
        else:
            w = F.dequantize_4bit(data[e].view(-1, 1), st.states[e])
        mats.append(w.t() if st.transposed else w)
    return torch.stack(mats).to(st.dtype)


def dequantize(model) -> None:
    """Quantized experts back to 3-D parameters in their dtype (a merge from the dequantized base)."""
    changed = False
    for _, module in experts_modules(model):
        for name in list(getattr(module, _STORAGE, {})):
            setattr(module, name, torch.nn.Parameter(dequantized(module, name), requires_grad=False))
            changed = True
        module.__dict__.pop(_STORAGE, None)
    if changed:
        model.set_experts_implementation(model.get_correct_experts_implementation(None))


def _expert_linear(module, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
    import bitsandbytes as bnb

    st = getattr(module, _STORAGE)[name]
    data = getattr(module, name)[e]
    if st.kind == "int8":
        state = bnb.MatmulLtState()
        state.has_fp16_weights = False
        state.CB, state.SCB = data, st.states[e]
        state.threshold = st.threshold
        state.is_training = module.training
        out = bnb.matmul(x, data, state=state)
    else:
        out = bnb.matmul_4bit(x, data.view(-1, 1), quant_state=st.states[e])
    lora = getattr(module, _LORA, {}).get(name)
    if lora is not None:
        a, b, scale = lora
        xa = x.to(a.dtype)
        out = out + (torch.nn.functional.linear(torch.nn.functional.linear(xa, a[e]), b[e]) * scale).to(out.dtype)
    bias = getattr(module, f"{name}_bias", None)
    if bias is not None:
        out = out + bias[e].to(out.dtype)
    return out


def experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' eager experts loop (modeling_mixtral.MixtralExperts.forward), over quantized experts.

    Only the experts the router picked run; each of their matrices goes through bitsandbytes' matmul."""
    if not is_quantized(self):  # an experts module the plan kept unquantized
        return type(self).forward.__wrapped__(self, hidden_states, top_k_index, top_k_weights)
    if getattr(self, "_is_expert_parallel", False):
        raise NotImplementedError("quantized experts do not support expert parallelism")
    first = "gate_up_proj" if self.has_gate else "up_proj"
    experts = getattr(self, _STORAGE)[first].shape[0]
    tokens, k = top_k_index.shape
    with torch.no_grad():
        mask = torch.nn.functional.one_hot(top_k_index, num_classes=experts).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    # each (token, slot) output written in place, then weighted and summed over the slots, as transformers'
    # batched / grouped paths do: index_add_ (the eager loop's) would keep every routed output for backward
    routed = hidden_states.new_zeros(tokens, k, hidden_states.shape[-1])
    for e in hit[:, 0].tolist():
        top_k_pos, token_idx = torch.where(mask[e])
        x = hidden_states[token_idx]
        h = _expert_linear(self, first, e, x)
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        y = _expert_linear(self, "down_proj", e, h)
        if getattr(self, "has_post_expert_norm", False):
            y = self.post_expert_norm(y)
        routed[token_idx, top_k_pos] = y.to(routed.dtype)
    return (routed * top_k_weights.unsqueeze(-1)).sum(dim=1).to(hidden_states.dtype)


def _register_forward() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, experts_forward)


# ---- loading -------------------------------------------------------------------------------------------

def _quantizer_for(base):
    """transformers' bitsandbytes quantizer `base`, extended to the fused experts' 3-D parameters."""
    from transformers.core_model_loading import ConversionOps
    from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module

    class ExpertsQuantize(ConversionOps):
        def __init__(self, quantizer, linear_op):
            self.quantizer, self.linear_op = quantizer, linear_op

        def convert(self, input_dict, model=None, full_layer_name=None, **kwargs):
            out, rest = {}, {}
            for key, value in input_dict.items():
                if self.quantizer.is_expert_param(model, key):
                    module, name = get_module_from_name(model, key)
                    out[key] = quantize(module, name, value[0] if isinstance(value, list) else value,
                                        self.quantizer.quantization_config)
                else:
                    rest[key] = value
            if rest:
                out.update(self.linear_op.convert(rest, model=model, full_layer_name=full_layer_name, **kwargs))
            return out

    class ExpertsQuantizer(base):
        def is_expert_param(self, model, param_name: str) -> bool:
            module, name = get_module_from_name(model, param_name)
            if not _is_experts(module) or name not in _expert_param_names(module):
                return False
            module_name = param_name.rpartition(".")[0]
            return should_convert_module(module_name, getattr(self, "modules_to_not_convert", None))

        def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
            return (super().param_needs_quantization(model, param_name, **kwargs)
                    or self.is_expert_param(model, param_name))

        def get_quantize_ops(self):
            return ExpertsQuantize(self, super().get_quantize_ops())

        def _process_model_after_weight_loading(self, model, **kwargs):
            model = super()._process_model_after_weight_loading(model, **kwargs)
            if any(is_quantized(m) for _, m in experts_modules(model)):
                _register_forward()
                model.set_experts_implementation(IMPLEMENTATION)
            return model

    ExpertsQuantizer.__name__ = ExpertsQuantizer.__qualname__ = f"Experts{base.__name__}"
    return ExpertsQuantizer


@contextlib.contextmanager
def loading():
    """Within it, a bitsandbytes ``from_pretrained`` quantizes the fused experts too.

    transformers picks the quantizer class from AUTO_QUANTIZER_MAPPING by the config's method; its
    ``register_quantizer`` refuses to replace a built-in entry, so the two bitsandbytes entries are
    swapped for the extended classes for the duration of the load and restored after."""
    from transformers.quantizers import auto

    saved = {k: auto.AUTO_QUANTIZER_MAPPING[k] for k in ("bitsandbytes_4bit", "bitsandbytes_8bit")}
    try:
        for key, base in saved.items():
            auto.AUTO_QUANTIZER_MAPPING[key] = _quantizer_for(base)
        yield
    finally:
        auto.AUTO_QUANTIZER_MAPPING.update(saved)


# ---- LoRA ----------------------------------------------------------------------------------------------

@functools.cache
def _lora_class():
    from peft.tuners.lora.layer import ParamWrapper

    class QuantizedExpertsLora(ParamWrapper):
        """peft's ParamWrapper for a quantized expert parameter (see the module docstring)."""

        def get_param(self):
            # the shape and dtype the parameter had: ParamWrapper sizes lora_A / lora_B from it
            base = self.get_base_layer()
            st = getattr(base, _STORAGE)[self.parameter_name]
            return torch.empty(st.shape, dtype=st.dtype, device="meta")

        def _move_adapter_to_device_of_base_layer(self, adapter_name, device=None):
            base = self.get_base_layer()
            st = getattr(base, _STORAGE)[self.parameter_name]
            device = getattr(base, self.parameter_name).device
            for layer_name in self.adapter_layer_names:
                layer = getattr(self, layer_name, None)
                if isinstance(layer, torch.nn.ModuleDict) and adapter_name in layer:
                    layer[adapter_name] = layer[adapter_name].to(device, dtype=st.dtype)

        def factors(self, adapter_name: str):
            """(A (experts, r, in), B (experts, out, r), scale): ParamWrapper's layout, per expert."""
            a = self.lora_A[adapter_name].weight
            b = self.lora_B[adapter_name].weight
            a = a.reshape(self.num_experts, -1, a.shape[-1])
            b = b.reshape(b.shape[0], -1, self.num_experts).permute(2, 0, 1)
            return a, b, self.scaling[adapter_name]

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            raise NotImplementedError("an adapter on 4-bit experts is merged into the unquantized base "
                                      "(finetune-merge), not into the quantized one")

        def forward(self, x, *args, **kwargs):
            self._check_forward_args(x, *args, **kwargs)
            active = [a for a in self.active_adapters if a in self.lora_A]
            if self.disable_adapters or not active:
                return self.base_layer(x, *args, **kwargs)
            if len(active) > 1:
                raise NotImplementedError("one active adapter at a time on quantized experts")
            base = self.get_base_layer()
            lora = base.__dict__.setdefault(_LORA, {})
            lora[self.parameter_name] = self.factors(active[0])
            try:
                return self.base_layer(x, *args, **kwargs)
            finally:
                lora.pop(self.parameter_name, None)

    # peft recognises its parameter wrappers by class name when it nests a second target_parameter on the same
    # module (tuners_utils._inject_parameters: `__class__.__name__ == "ParamWrapper"`); the qualified name stays ours
    QuantizedExpertsLora.__name__ = "ParamWrapper"
    return QuantizedExpertsLora


def register_lora(lora_config, model) -> None:
    """Let peft put `lora_config`'s target_parameters on the model's quantized experts (no-op without them)."""
    classes = {type(m) for _, m in experts_modules(model) if is_quantized(m)}
    if classes and getattr(lora_config, "target_parameters", None):
        lora_config._register_custom_module({cls: _lora_class() for cls in classes})
