"""Model architecture from a config dict: dimensions, linear layers, parameter counts.

Pure arithmetic on config.json fields (no torch). Each family maps onto one
:class:`ArchSpec`: the linear layers of a decoder block with their shapes (what
bitsandbytes quantizes and LoRA can target), and what stays unquantized
(embeddings, norms, lm_head).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from finetune.errors import ConfigError


@dataclass(frozen=True)
class Linear:
    name: str  # the module name peft matches (q_proj, ...)
    in_features: int
    out_features: int
    count: int = 1  # instances per decoder layer (experts)
    bias: bool = False

    @property
    def params(self) -> int:
        return self.count * (self.in_features * self.out_features + (self.out_features if self.bias else 0))


@dataclass(frozen=True)
class ArchSpec:
    architecture: str
    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    linears: tuple[Linear, ...]  # per decoder layer
    norm_params_per_layer: int
    final_norm_params: int
    gated_mlp: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def linear_params(self) -> int:
        """Parameters in the decoder blocks' linear layers (the quantizable ones)."""
        return self.layers * sum(lin.params for lin in self.linears)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    @property
    def norm_params(self) -> int:
        return self.layers * self.norm_params_per_layer + self.final_norm_params

    @property
    def params_total(self) -> int:
        return self.linear_params + self.embedding_params + self.lm_head_params + self.norm_params

    @property
    def max_linear_elements(self) -> int:
        return max(lin.in_features * lin.out_features for lin in self.linears)

    def linear_names(self) -> list[str]:
        return [lin.name for lin in self.linears]

    def lora_targets(self, targets: list[str]) -> list[Linear]:
        """The linear layers that `adapter.targets` selects (all-linear: every one of the blocks)."""
        if list(targets) == ["all-linear"]:
            return list(self.linears)
        by_name = {lin.name: lin for lin in self.linears}
        unknown = [t for t in targets if t not in by_name]
        if unknown:
            raise ConfigError(
                f"adapter.targets: {', '.join(unknown)} not among the linear layers of {self.architecture} "
                f"({', '.join(by_name)}; or all-linear)"
            )
        return [by_name[t] for t in targets]

    def lora_params(self, targets: list[str], rank: int) -> int:
        return self.layers * sum(lin.count * rank * (lin.in_features + lin.out_features)
                                 for lin in self.lora_targets(targets))


def _get(config: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    if default is not None:
        return default
    raise ConfigError(f"model config: missing '{keys[0]}' in config.json")


def _llama_like(config: dict[str, Any]) -> ArchSpec:
    """Llama, Mistral, Qwen2, Gemma and friends: separate q/k/v/o, gated MLP, RMSNorm."""
    h = _get(config, "hidden_size")
    heads = _get(config, "num_attention_heads")
    kv = _get(config, "num_key_value_heads", default=heads)
    hd = config.get("head_dim") or h // heads
    inter = _get(config, "intermediate_size")
    bias = bool(config.get("attention_bias", config.get("model_type") == "qwen2"))
    linears = (
        Linear("q_proj", h, heads * hd, bias=bias),
        Linear("k_proj", h, kv * hd, bias=bias),
        Linear("v_proj", h, kv * hd, bias=bias),
        Linear("o_proj", heads * hd, h),
        Linear("gate_proj", h, inter),
        Linear("up_proj", h, inter),
        Linear("down_proj", inter, h),
    )
    return ArchSpec(
        architecture=(config.get("architectures") or ["?"])[0],
        model_type=config["model_type"],
        layers=_get(config, "num_hidden_layers"),
        hidden=h, heads=heads, kv_heads=kv, head_dim=hd, intermediate=inter,
        vocab=_get(config, "vocab_size"),
        # Gemma ties its embeddings by default; the others untie unless config.json says so.
        tied_embeddings=bool(config.get("tie_word_embeddings", config["model_type"] == "gemma")),
        linears=linears,
        norm_params_per_layer=2 * h,
        final_norm_params=h,
    )


FAMILIES = {
    "llama": _llama_like,
    "mistral": _llama_like,
    "qwen2": _llama_like,
    "gemma": _llama_like,
}


def from_config(config: dict[str, Any]) -> ArchSpec:
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(
            f"model.name_or_path: the preflight does not know the architecture '{model_type}' yet "
            f"(known: {', '.join(sorted(FAMILIES))})"
        )
    return FAMILIES[model_type](config)
