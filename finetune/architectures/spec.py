"""Model architecture from a config dict: dimensions, linear layers, parameter counts.

Pure arithmetic on config.json fields (no torch, no transformers config classes).
Each family maps onto one :class:`ArchSpec`: the linear layers of a decoder block
with their shapes (what bitsandbytes quantizes and LoRA can target), the tensors
each of them reads (which decides what backward must keep), and what stays
unquantized (embeddings, norms, lm_head, MoE experts).

Field names are the ones each family's config.json really uses (Falcon:
``new_decoder_architecture``, ``multi_query``, ``num_kv_heads``, ``parallel_attn``;
BLOOM: ``n_layer``/``n_head``; GPT-J: ``n_embd``/``n_layer``/``n_head``/``n_inner``;
GPT-NeoX: ``use_parallel_residual``, ``rotary_pct``; Qwen1: ``kv_channels``,
``no_bias``), with the defaults of transformers 5.23's config classes where a
field is absent. tests/test_preflight_arch.py builds every catalog config with
transformers on the meta device and holds these counts to the real model's.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from finetune import versions
from finetune.errors import ConfigError

# What a linear layer reads: which tensor backward keeps when LoRA targets the layer.
ATTN_IN = "attn_in"  # the normed input of attention (q/k/v, fused qkv)
ATTN_OUT = "attn_out"  # the attention output (o_proj, dense)
MLP_IN = "mlp_in"  # the normed input of the MLP (gate/up, fc_in)
MLP_MID = "mlp_mid"  # the MLP's inner activation (down_proj, fc_out)
OTHER = "other"  # neither attention nor MLP (a state-space mixer's projections): traced families only
# adapter.targets presets -> the groups of linear layers they select (as finetune/architectures/targets.py)
PRESETS = {"all-linear": (ATTN_IN, ATTN_OUT, MLP_IN, MLP_MID, OTHER), "attention": (ATTN_IN, ATTN_OUT),
           "mlp": (MLP_IN, MLP_MID)}


@dataclass(frozen=True)
class Linear:
    name: str  # the module name peft matches (q_proj, ...); several layers may share one (Qwen1's c_proj)
    in_features: int
    out_features: int
    reads: str = ATTN_IN
    bias: bool = False
    # False where transformers' load_in_4bit/8bit leaves the layer alone: through the verified release it
    # replaces only modules whose type *is* nn.Linear (or Conv1D), so a subclass such as FalconLinear stays
    # in bf16 (finetune/versions.py decides it from the installed release).
    quantizable: bool = True
    # False where peft refuses LoRA on the module (peft 0.21: out_proj and conv1d of Mamba-style models);
    # the presets skip it, naming it is a ConfigError with peft's reason (traced families only)
    adaptable: bool = True

    @property
    def weight_params(self) -> int:
        return self.in_features * self.out_features

    @property
    def params(self) -> int:
        return self.weight_params + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class ArchSpec:
    architecture: str
    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # width of one MLP branch (per expert for MoE)
    vocab: int
    tied_embeddings: bool
    linears: tuple[Linear, ...]  # per decoder layer
    norm: str = "rms"  # "rms" (RMSNorm: weight) or "layer" (LayerNorm: weight and bias)
    norms_per_layer: int = 2
    shared_norm: bool = False  # one norm feeds attention and MLP (GPT-J, Phi, Falcon-7B)
    parallel: bool = False  # attention and MLP both read the layer input (parallel residual)
    gated_mlp: bool = True  # act(gate) * up (Llama family) vs act(fc_in) (GPT family)
    # Tensors of the MLP width that backward keeps for the activation (1: F.silu/F.gelu keep their
    # input; 4: transformers' NewGELUActivation, written in Python, keeps four: x, tanh, 0.5x, 1+tanh).
    act_saved: int = 1
    # transformers' default implementation: sdpa where the family supports it, eager where it does not;
    # "math" where SDPA is called with shapes its fused kernels refuse (Falcon's multi-query heads)
    attention: str = "sdpa"
    always_masked: bool = False  # the model always builds a 4-D mask (Falcon: allow_is_causal_skip=False)
    kv_expanded: bool = False  # k/v are expanded to every head before attention (Falcon's new architecture)
    qkv_view_kept: bool = False  # fused qkv whose v is a view: SDPA keeps the whole fused output alive
    experts: int = 0  # MoE: experts per layer, stored as 3-D parameters (not nn.Linear)
    experts_per_token: int = 0
    lm_head_bias: bool = False
    extra_params: int = 0  # outside the blocks: BLOOM's embedding LayerNorm
    resid_dropouts: int = 0  # dropouts on the residual branches per block (Phi: resid_pdrop > 0 gives two)
    extra: dict[str, Any] = field(default_factory=dict)
    # traced families (finetune/probes/trace.py): the experts' 3-D parameters as counted on the meta device
    # (name under the block, the two dimensions LoRA's factors span), and the measured activation profile
    expert_param_count: int | None = None
    expert_shapes: tuple[tuple[str, int, int], ...] = ()
    # a multimodal checkpoint planned as its text tower (the catalog's _text_tower_of, Gemma 3 4B/12B/27B):
    # AutoModelForCausalLM still loads its vision tower and projector (frozen; text-only batches never run
    # them). All their parameters, and the encoder's nn.Linear layers (which bitsandbytes quantizes) as
    # (out_features, in_features, how many). See vision_tower().
    vision_params: int = 0
    vision_linears: tuple[tuple[int, int, int], ...] = ()
    traced: Any = field(default=None, compare=False, repr=False)

    # -- parameter counts -------------------------------------------------------------------
    @property
    def linear_params(self) -> int:
        """Parameters of the decoder blocks' linear layers (weights and biases)."""
        return self.layers * sum(lin.params for lin in self.linears)

    @property
    def quantizable_weight_params(self) -> int:
        """Weights bitsandbytes replaces (biases stay in the compute dtype)."""
        return self.layers * sum(lin.weight_params for lin in self.linears if lin.quantizable)

    @property
    def expert_params(self) -> int:
        """MoE expert weights and router: 3-D parameters that load_in_4bit leaves in bf16."""
        if self.expert_param_count is not None:
            return self.expert_param_count
        if not self.experts:
            return 0
        per_expert = 3 * self.hidden * self.intermediate  # gate_up_proj (2 x) and down_proj
        return self.layers * (self.experts * per_expert + self.experts * self.hidden)

    def expert_matrices(self) -> list[tuple[int, int]]:
        """The (out, in) shape of every expert weight matrix of one layer (experts x 3-D parameters): what
        finetune/models/experts.py quantizes one at a time."""
        if not self.experts:
            return []
        if self.expert_shapes:
            return [(a, b) for _, a, b in self.expert_shapes for _ in range(self.experts)]
        e, h, i = self.experts, self.hidden, self.intermediate
        return [(2 * i, h)] * e + [(h, i)] * e  # gate_up_proj, down_proj

    @property
    def expert_matrix_params(self) -> int:
        """The experts' 3-D weights over all layers (the router and any bias excluded)."""
        return self.layers * sum(a * b for a, b in self.expert_matrices())

    @property
    def vision_weight_params(self) -> int:
        """The vision tower's nn.Linear weights (a multimodal checkpoint's; 0 for a text model)."""
        return sum(out_f * in_f * n for out_f, in_f, n in self.vision_linears)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def lm_head_params(self) -> int:
        if self.tied_embeddings:
            return 0
        return self.vocab * self.hidden + (self.vocab if self.lm_head_bias else 0)

    @property
    def norm_width(self) -> int:
        return self.hidden * (2 if self.norm == "layer" else 1)

    @property
    def norm_params(self) -> int:
        return self.layers * self.norms_per_layer * self.norm_width + self.norm_width

    @property
    def params_total(self) -> int:
        return (self.linear_params + self.expert_params + self.embedding_params + self.lm_head_params
                + self.norm_params + self.extra_params + self.vision_params)

    @property
    def max_linear_elements(self) -> int:
        return max(lin.weight_params for lin in self.linears)

    @property
    def max_expert_elements(self) -> int:
        return max((a * b for a, b in self.expert_matrices()), default=0)

    # -- LoRA ---------------------------------------------------------------------------------
    def linear_names(self) -> list[str]:
        return list(dict.fromkeys(lin.name for lin in self.linears))

    def adaptable_names(self) -> list[str]:
        return list(dict.fromkeys(lin.name for lin in self.linears if lin.adaptable))

    def lora_targets(self, targets: list[str]) -> list[Linear]:
        """The linear layers `adapter.targets` selects, as peft matches them: by module name (every
        layer of that name), or the presets all-linear (every linear of the blocks, never lm_head),
        attention (q/k/v/o or the fused qkv and its output) and mlp (the feed-forward layers)."""
        names = set(self.linear_names())
        picked: set[int] = set()
        for target in targets:
            if target in PRESETS:
                groups = PRESETS[target]
                picked |= {i for i, lin in enumerate(self.linears) if lin.reads in groups and lin.adaptable}
            elif target in names:
                refused = [lin for lin in self.linears if lin.name == target and not lin.adaptable]
                if refused:
                    reason = self.extra.get("not_adaptable", {}).get(target, "peft refuses LoRA on it")
                    raise ConfigError(f"adapter.targets: {target} cannot carry LoRA on {self.architecture} "
                                      f"({reason}); adaptable: {', '.join(self.adaptable_names())}")
                picked |= {i for i, lin in enumerate(self.linears) if lin.name == target}
            elif target in self.expert_parameter_names():
                continue  # LoRA on a parameter: see lora_param_targets
            else:
                raise ConfigError(
                    f"adapter.targets: {target} is not among the linear layers of {self.architecture} "
                    f"({', '.join(self.linear_names())}; presets: {', '.join(PRESETS)})"
                )
        return [lin for i, lin in enumerate(self.linears) if i in picked]

    def expert_parameter_names(self) -> tuple[str, ...]:
        if self.expert_shapes:
            return tuple(name for name, *_ in self.expert_shapes)
        return ("mlp.experts.gate_up_proj", "mlp.experts.down_proj") if self.experts else ()

    def lora_param_targets(self, targets: list[str], rank: int) -> list[tuple[str, int, int, int]]:
        """LoRA on parameters rather than modules, per layer: (name, rank x experts, in, out).

        Mixtral's experts in transformers 5.23 are two 3-D parameters per layer, not nn.Linear: the
        training stage targets them with peft's target_parameters for all-linear and mlp (so those mean
        the same for an MoE model as for a dense one). peft's ParamWrapper gives each expert its own
        rank-r factors: lora_A (r x experts, in), lora_B (out, r x experts).
        """
        if not self.experts:
            return []
        wanted = set()
        for target in targets:
            if target in ("all-linear", "mlp"):
                wanted |= set(self.expert_parameter_names())
            elif target in self.expert_parameter_names():
                wanted.add(target)
        e, h, i = self.experts, self.hidden, self.intermediate
        shapes = {"mlp.experts.gate_up_proj": (h, 2 * i), "mlp.experts.down_proj": (i, h)}
        shapes.update({name: (a, b) for name, a, b in self.expert_shapes})
        return [(name, rank * e, *shapes[name]) for name in self.expert_parameter_names() if name in wanted]

    def lora_params(self, targets: list[str], rank: int) -> int:
        modules = sum(rank * (lin.in_features + lin.out_features) for lin in self.lora_targets(targets))
        params = sum(r * (i + o) for _, r, i, o in self.lora_param_targets(targets, rank))
        return self.layers * (modules + params)

    def kv_heads_for(self, attention: str, masked: bool) -> int:
        """Key/value heads that attention keeps for backward.

        transformers' SDPA path repeats the k/v heads (repeat_kv, a copy) whenever an attention
        mask is passed (padded batches): torch's enable_gqa is used only without a mask. Flash
        attention 2 takes grouped heads natively; eager repeats them always.
        """
        if self.kv_heads == self.heads or self.kv_expanded:
            return self.heads
        if attention == "flash2" or (attention == "sdpa" and not masked):
            return self.kv_heads  # flash and SDPA with enable_gqa take grouped heads
        # the math kernel broadcasts k and v in its matmuls, and torch.matmul materializes a broadcast batch
        # dimension (expand + reshape copies): the expanded k and v are what its bmm keeps (found by tracing
        # Falcon-7B, finetune/probes/trace.py)
        return self.heads


def _get(config: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    if default is not None:
        return default
    raise ConfigError(f"model config: missing '{keys[0]}' in config.json")


def _arch_name(config: dict[str, Any]) -> str:
    return (config.get("architectures") or [config.get("model_type", "?")])[0]


def _llama_like(config: dict[str, Any]) -> ArchSpec:
    """Llama, Mistral, Mixtral, Qwen2, Gemma, Phi-3: RMSNorm, rotary, gated MLP, separate or fused q/k/v."""
    mt = config["model_type"]
    h = _get(config, "hidden_size")
    heads = _get(config, "num_attention_heads")
    kv = _get(config, "num_key_value_heads", default=heads)
    hd = config.get("head_dim") or h // heads
    inter = _get(config, "intermediate_size")
    # Qwen2 hard-codes bias on q/k/v; Llama/Mistral read attention_bias (default false).
    qkv_bias = True if mt == "qwen2" else bool(config.get("attention_bias", False))
    o_bias = bool(config.get("attention_bias", False)) if mt != "qwen2" else False
    mlp_bias = bool(config.get("mlp_bias", False))
    experts = int(config.get("num_local_experts") or 0) if mt == "mixtral" else 0
    if mt == "phi3":
        linears: tuple[Linear, ...] = (
            Linear("qkv_proj", h, (heads + 2 * kv) * hd, ATTN_IN),
            Linear("o_proj", heads * hd, h, ATTN_OUT),
            Linear("gate_up_proj", h, 2 * inter, MLP_IN),
            Linear("down_proj", inter, h, MLP_MID),
        )
    else:
        linears = (
            Linear("q_proj", h, heads * hd, ATTN_IN, qkv_bias),
            Linear("k_proj", h, kv * hd, ATTN_IN, qkv_bias),
            Linear("v_proj", h, kv * hd, ATTN_IN, qkv_bias),
            Linear("o_proj", heads * hd, h, ATTN_OUT, o_bias),
        )
        if not experts:  # Mixtral's experts are 3-D parameters, not Linear modules
            linears += (
                Linear("gate_proj", h, inter, MLP_IN, mlp_bias),
                Linear("up_proj", h, inter, MLP_IN, mlp_bias),
                Linear("down_proj", inter, h, MLP_MID, mlp_bias),
            )
    # Gemma ties its embeddings by default (its config class says so); the others untie.
    tied_default = mt == "gemma"
    return ArchSpec(
        architecture=_arch_name(config), model_type=mt,
        layers=_get(config, "num_hidden_layers"),
        hidden=h, heads=heads, kv_heads=kv, head_dim=hd, intermediate=inter,
        vocab=_get(config, "vocab_size"),
        tied_embeddings=bool(config.get("tie_word_embeddings", tied_default)),
        linears=linears,
        qkv_view_kept=mt == "phi3",
        experts=experts,
        experts_per_token=int(config.get("num_experts_per_tok") or 2) if experts else 0,
    )


def _falcon(config: dict[str, Any]) -> ArchSpec:
    """Falcon: fused query_key_value (multi-query for 7B, grouped for 40B/180B), parallel attention+MLP,
    LayerNorm, plain GELU MLP. Its linear layers are FalconLinear, an nn.Linear subclass, which
    transformers' bitsandbytes integration does not replace through the verified release (5.24): the
    "4-bit" model stays bf16 (finetune.versions.quantizes_linear_subclasses)."""
    h = _get(config, "hidden_size", "n_embed")
    heads = _get(config, "num_attention_heads", "n_head")
    hd = h // heads
    new_arch = bool(config.get("new_decoder_architecture", False))
    multi_query = bool(config.get("multi_query", True))
    if new_arch:
        kv = _get(config, "num_kv_heads", default=heads)
        qkv_out = (2 * kv + heads) * hd
    elif multi_query:
        kv = 1
        qkv_out = h + 2 * hd
    else:
        kv = heads
        qkv_out = 3 * h
    ffn = config.get("ffn_hidden_size") or 4 * h
    bias = bool(config.get("bias", False))
    parallel = bool(config.get("parallel_attn", True))
    n_ln_parallel = config.get("num_ln_in_parallel_attn") or (2 if new_arch else 1)
    if not parallel:
        norms, shared = 2, False
    elif new_arch and n_ln_parallel == 2:
        norms, shared = 2, False
    else:
        norms, shared = 1, True
    quantizable = versions.quantizes_linear_subclasses()
    linears = (
        Linear("query_key_value", h, qkv_out, ATTN_IN, bias, quantizable=quantizable),
        Linear("dense", h, h, ATTN_OUT, bias, quantizable=quantizable),
        Linear("dense_h_to_4h", h, ffn, MLP_IN, bias, quantizable=quantizable),
        Linear("dense_4h_to_h", ffn, h, MLP_MID, bias, quantizable=quantizable),
    )
    return ArchSpec(
        architecture=_arch_name(config), model_type="falcon",
        layers=_get(config, "num_hidden_layers", "n_layer"),
        hidden=h, heads=heads, kv_heads=kv, head_dim=hd, intermediate=ffn,
        vocab=_get(config, "vocab_size"),
        tied_embeddings=bool(config.get("tie_word_embeddings", True)),
        linears=linears, norm="layer", norms_per_layer=norms, shared_norm=shared, parallel=parallel,
        gated_mlp=False,
        # transformers 5.23 runs Falcon with ALiBi (falcon-rw) on its eager path; it always passes SDPA a
        # 4-D mask, and the multi-query layout (one k/v head, not expanded) only SDPA's math kernel takes
        attention="eager" if config.get("alibi") else ("math" if (multi_query and not new_arch) else "sdpa"),
        always_masked=True, kv_expanded=new_arch,
    )


def _bloom(config: dict[str, Any]) -> ArchSpec:
    """BLOOM: ALiBi, fused query_key_value with bias, LayerNorm (one after the embeddings too).
    transformers 5.23's BLOOM has no SDPA or flash path: attention is eager (seq x seq scores)."""
    h = _get(config, "hidden_size", "n_embed")
    heads = _get(config, "n_head", "num_attention_heads")
    linears = (
        Linear("query_key_value", h, 3 * h, ATTN_IN, True),
        Linear("dense", h, h, ATTN_OUT, True),
        Linear("dense_h_to_4h", h, 4 * h, MLP_IN, True),
        Linear("dense_4h_to_h", 4 * h, h, MLP_MID, True),
    )
    return ArchSpec(
        architecture=_arch_name(config), model_type="bloom",
        layers=_get(config, "n_layer", "num_hidden_layers"),
        hidden=h, heads=heads, kv_heads=heads, head_dim=h // heads, intermediate=4 * h,
        vocab=_get(config, "vocab_size"),
        tied_embeddings=bool(config.get("tie_word_embeddings", True)),
        linears=linears, norm="layer", gated_mlp=False, attention="eager", qkv_view_kept=True,
        extra_params=2 * h,  # word_embeddings_layernorm
    )


# The first transformers release whose GPT-J runs SDPA: 5.24's models/gptj/modeling_gptj.py sets
# `_supports_sdpa = True` on GPTJPreTrainedModel (line 249) and GPTJAttention.forward dispatches through
# `ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)` (line 168);
# 5.23's had only GPTJAttention (eager) and GPTJFlashAttention2 (GPTJ_ATTENTION_CLASSES).
GPTJ_SDPA_SINCE = "5.24"


def gptj_has_sdpa() -> bool:
    """Whether the installed transformers (or, not installed, the verified release) runs GPT-J with SDPA."""
    return versions.parse(versions.release("transformers")) >= versions.parse(GPTJ_SDPA_SINCE)


def _gptj(config: dict[str, Any]) -> ArchSpec:
    """GPT-J: one LayerNorm feeding attention and MLP in parallel, partial rotary (rotary_dim),
    lm_head with bias. Trained with SDPA from transformers 5.24 (see GPTJ_SDPA_SINCE), counted as every other
    SDPA family (no seq x seq scores); eager on 5.23, whose GPT-J had eager and flash paths only. The loader
    passes the plan's attention (finetune/models/loader.py), so training and every reload run what was planned."""
    h = _get(config, "n_embd", "hidden_size")
    heads = _get(config, "n_head", "num_attention_heads")
    inner = config.get("n_inner") or 4 * h
    linears = (
        Linear("q_proj", h, h, ATTN_IN),
        Linear("k_proj", h, h, ATTN_IN),
        Linear("v_proj", h, h, ATTN_IN),
        Linear("out_proj", h, h, ATTN_OUT),
        Linear("fc_in", h, inner, MLP_IN, True),
        Linear("fc_out", inner, h, MLP_MID, True),
    )
    return ArchSpec(
        architecture=_arch_name(config), model_type="gptj",
        layers=_get(config, "n_layer", "num_hidden_layers"),
        hidden=h, heads=heads, kv_heads=heads, head_dim=h // heads, intermediate=inner,
        vocab=_get(config, "vocab_size"),
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        linears=linears, norm="layer", norms_per_layer=1, shared_norm=True, parallel=True,
        gated_mlp=False, act_saved=4, attention="sdpa" if gptj_has_sdpa() else "eager", lm_head_bias=True,
    )


def _gpt_neox(config: dict[str, Any]) -> ArchSpec:
    """GPT-NeoX / Pythia: fused query_key_value, two LayerNorms, parallel residual by default."""
    h = _get(config, "hidden_size")
    heads = _get(config, "num_attention_heads")
    inter = _get(config, "intermediate_size", default=4 * h)
    bias = bool(config.get("attention_bias", True))
    parallel = bool(config.get("use_parallel_residual", True))
    linears = (
        Linear("query_key_value", h, 3 * h, ATTN_IN, bias),
        Linear("dense", h, h, ATTN_OUT, bias),
        Linear("dense_h_to_4h", h, inter, MLP_IN, True),
        Linear("dense_4h_to_h", inter, h, MLP_MID, True),
    )
    return ArchSpec(
        architecture=_arch_name(config), model_type="gpt_neox",
        layers=_get(config, "num_hidden_layers"),
        hidden=h, heads=heads, kv_heads=heads, head_dim=h // heads, intermediate=inter,
        vocab=_get(config, "vocab_size"),
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        linears=linears, norm="layer", parallel=parallel, gated_mlp=False, qkv_view_kept=True,
    )


def _phi(config: dict[str, Any]) -> ArchSpec:
    """Phi-1.5 / Phi-2: one LayerNorm, parallel attention and MLP, biases everywhere, lm_head bias."""
    h = _get(config, "hidden_size")
    heads = _get(config, "num_attention_heads")
    kv = _get(config, "num_key_value_heads", default=heads)
    hd = h // heads
    inter = _get(config, "intermediate_size")
    linears = (
        Linear("q_proj", h, heads * hd, ATTN_IN, True),
        Linear("k_proj", h, kv * hd, ATTN_IN, True),
        Linear("v_proj", h, kv * hd, ATTN_IN, True),
        Linear("dense", heads * hd, h, ATTN_OUT, True),
        Linear("fc1", h, inter, MLP_IN, True),
        Linear("fc2", inter, h, MLP_MID, True),
    )
    qk_ln = bool(config.get("qk_layernorm", False))
    return ArchSpec(
        architecture=_arch_name(config), model_type="phi",
        layers=_get(config, "num_hidden_layers"),
        hidden=h, heads=heads, kv_heads=kv, head_dim=hd, intermediate=inter,
        vocab=_get(config, "vocab_size"),
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        linears=linears, norm="layer", norms_per_layer=1, shared_norm=True, parallel=True,
        gated_mlp=False, act_saved=4, lm_head_bias=True,
        resid_dropouts=2 if float(config.get("resid_pdrop") or 0.0) > 0 else 0,
        extra_params=(2 * 2 * hd * _get(config, "num_hidden_layers")) if qk_ln else 0,
    )


def _qwen1(config: dict[str, Any]) -> ArchSpec:
    """Qwen (v1, remote code): fused c_attn with bias, c_proj, gated MLP w1/w2 and a second c_proj.
    Its config's intermediate_size counts both MLP branches (w1 and w2 are half of it each)."""
    h = _get(config, "hidden_size")
    heads = _get(config, "num_attention_heads")
    hd = config.get("kv_channels") or h // heads
    inner = _get(config, "intermediate_size") // 2
    no_bias = bool(config.get("no_bias", True))
    linears = (
        Linear("c_attn", h, 3 * heads * hd, ATTN_IN, True),
        Linear("c_proj", heads * hd, h, ATTN_OUT, not no_bias),
        Linear("w1", h, inner, MLP_IN, not no_bias),
        Linear("w2", h, inner, MLP_IN, not no_bias),
        Linear("c_proj", inner, h, MLP_MID, not no_bias),
    )
    return ArchSpec(
        architecture=_arch_name(config), model_type="qwen",
        layers=_get(config, "num_hidden_layers"),
        hidden=h, heads=heads, kv_heads=heads, head_dim=hd, intermediate=inner,
        vocab=_get(config, "vocab_size"),
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        linears=linears, qkv_view_kept=True,
    )


FAMILIES = {
    "llama": _llama_like,
    "mistral": _llama_like,
    "mixtral": _llama_like,
    "qwen2": _llama_like,
    "gemma": _llama_like,
    "phi3": _llama_like,
    "falcon": _falcon,
    "RefinedWeb": _falcon,  # the remote-code name of the first Falcon checkpoints
    "RefinedWebModel": _falcon,
    "bloom": _bloom,
    "gptj": _gptj,
    "gpt_neox": _gpt_neox,
    "phi": _phi,
    "qwen": _qwen1,
}


class Untraceable(ConfigError):
    """transformers cannot build the architecture (custom code, no causal-LM class) or its copy does not train:
    the preflight cannot plan it, and a fully pinned recipe may still run it unplanned."""


class NotHandWritten(ConfigError):
    """The family has no hand-written rules here: finetune.probes.spec_of traces it (torch)."""


def is_hand_written(config: dict[str, Any]) -> bool:
    return config.get("model_type") in FAMILIES


def from_config(config: dict[str, Any]) -> ArchSpec:
    """The architecture of `config` (a config.json dict) by the hand-written rules of the families above: pure
    arithmetic, no torch. Another family raises NotHandWritten; finetune.probes.spec_of derives it from
    transformers' own model instead (traced)."""
    model_type = config.get("model_type")
    if not model_type:
        raise ConfigError("model config: config.json has no model_type")
    if model_type not in FAMILIES:
        raise NotHandWritten(f"model config: '{model_type}' has no hand-written rules (finetune.probes traces it)")
    return checked(with_vision_tower(FAMILIES[model_type](config), config))


def vision_tower(config: dict[str, Any]) -> tuple[int, tuple[tuple[int, int, int], ...]]:
    """(parameters, nn.Linear layers as (out, in, how many)) of the vision tower and projector that a multimodal
    checkpoint loads with its text tower; (0, ()) for a config without the catalog's ``_vision_config``.

    transformers 5.24 maps model_type gemma3 to Gemma3ForConditionalGeneration in MODEL_FOR_CAUSAL_LM_MAPPING
    (models/auto/modeling_auto.py line 840), so AutoModelForCausalLM (finetune/models/loader.py) builds the
    SigLIP vision tower and the multimodal projector too. SigLIP (vision_use_head false, as in every Gemma 3
    checkpoint): a patch Conv2d and learned position embeddings, per layer two LayerNorms, q/k/v/out_proj and
    fc1/fc2 with biases, a post LayerNorm. Its Linear layers are exact nn.Linear, which load_in_4bit/8bit
    replaces (transformers' default skips are only the tied/output embeddings and the last parameter);
    Gemma3MultiModalProjector's mm_input_projection_weight is a bare parameter and stays in the compute dtype,
    with its RMSNorm weight. tests/test_preflight_arch.py holds the count to the real model's."""
    vc = config.get("_vision_config")
    if not vc:
        return 0, ()
    h, inner, n = int(vc["hidden_size"]), int(vc["intermediate_size"]), int(vc["num_hidden_layers"])
    patch, image, channels = int(vc["patch_size"]), int(vc["image_size"]), int(vc.get("num_channels", 3))
    linears = ((h, h, 4 * n), (inner, h, n), (h, inner, n))  # q, k, v, out_proj; fc1; fc2
    weights = sum(out_f * in_f * k for out_f, in_f, k in linears)
    biases = sum(out_f * k for out_f, _, k in linears)
    norms = (2 * n + 1) * 2 * h  # two LayerNorms per layer and the post LayerNorm, weight and bias
    embeddings = channels * patch * patch * h + h + (image // patch) ** 2 * h
    projector = h * _get(config, "hidden_size") + h  # mm_input_projection_weight, mm_soft_emb_norm
    return weights + biases + norms + embeddings + projector, linears


def with_vision_tower(spec: ArchSpec, config: dict[str, Any]) -> ArchSpec:
    """`spec` with the vision tower its checkpoint loads (see :func:`vision_tower`), if any."""
    params, linears = vision_tower(config)
    if not params:
        return spec
    return replace(spec, vision_params=params, vision_linears=linears)


def checked(spec: ArchSpec) -> ArchSpec:
    """`spec` if its dimensions are plausible, else a ConfigError naming them."""
    if spec.layers < 1 or spec.hidden < 1 or spec.heads < 1 or spec.vocab < 1:
        raise ConfigError(f"model config: implausible dimensions in config.json ({spec.layers} layers, hidden "
                          f"{spec.hidden}, {spec.heads} heads, vocabulary {spec.vocab})")
    if spec.heads % spec.kv_heads:
        raise ConfigError(f"model config: {spec.heads} attention heads are not a multiple of {spec.kv_heads} "
                          "key/value heads")
    return spec
