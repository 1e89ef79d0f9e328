"""LoRA targets per architecture: `adapter.targets` names -> peft target_modules / target_parameters.

`adapter.targets` takes module names (q_proj, ...) and presets:

* ``attention``: the attention projections;
* ``mlp``: the feed-forward projections (for Mixtral-style MoE: the experts);
* ``all-linear``: both, i.e. every linear computation of the decoder blocks (never lm_head,
  which TRL's fused LM head would bypass, never the MoE router).

Mixtral in transformers 5.23 keeps each layer's experts as two 3-D parameters
(``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``), which are not nn.Linear modules:
neither bitsandbytes' ``load_in_4bit`` (they stay in the compute dtype) nor peft's
``all-linear`` reach them. We target them with peft's ``target_parameters`` (LoRA on a
parameter), so that ``all-linear`` and ``mlp`` mean the same thing for an MoE model as
for a dense one; ``attention`` gives attention-only adapters.

Pure data, no torch: the preflight uses it too.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune.errors import ConfigError

_LLAMA = {"attention": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
_FUSED = {"attention": ("query_key_value", "dense"), "mlp": ("dense_h_to_4h", "dense_4h_to_h")}

# model_type -> preset -> module names (nn.Linear) in every decoder block.
MODULES: dict[str, dict[str, tuple[str, ...]]] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gemma": _LLAMA,
    "mixtral": {"attention": _LLAMA["attention"], "mlp": ()},
    "falcon": _FUSED,
    "bloom": _FUSED,
    "gpt_neox": _FUSED,
    "gptj": {"attention": ("q_proj", "k_proj", "v_proj", "out_proj"), "mlp": ("fc_in", "fc_out")},
    "phi": {"attention": ("q_proj", "k_proj", "v_proj", "dense"), "mlp": ("fc1", "fc2")},
}

# model_type -> preset -> parameter paths (peft target_parameters) for what is not a module.
PARAMETERS: dict[str, dict[str, tuple[str, ...]]] = {
    "mixtral": {"attention": (), "mlp": ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")},
}

PRESETS = ("all-linear", "attention", "mlp")


@dataclass(frozen=True)
class Targets:
    modules: tuple[str, ...]
    parameters: tuple[str, ...] = ()


def resolve(model_type: str, targets: list[str]) -> Targets:
    """The peft targets for `adapter.targets` on an architecture; ConfigError names what is unknown."""
    if model_type not in MODULES:
        raise ConfigError(f"adapter.targets: no LoRA target table for architecture '{model_type}' "
                          f"(known: {', '.join(sorted(MODULES))}); name the modules explicitly is not enough "
                          "for an unknown family: add it to finetune/models/targets.py")
    table = MODULES[model_type]
    params = PARAMETERS.get(model_type, {})
    modules: list[str] = []
    parameters: list[str] = []
    known = [*table["attention"], *table["mlp"]]
    for target in targets:
        presets = ("attention", "mlp") if target == "all-linear" else (target,) if target in ("attention", "mlp") else ()
        if presets:
            for preset in presets:
                modules.extend(table[preset])
                parameters.extend(params.get(preset, ()))
        elif target in known:
            modules.append(target)
        elif any(target == p for group in params.values() for p in group):
            parameters.append(target)
        else:
            raise ConfigError(f"adapter.targets: '{target}' is not a linear layer of {model_type} "
                              f"(modules: {', '.join(known)}; presets: {', '.join(PRESETS)})")
    return Targets(modules=tuple(dict.fromkeys(modules)), parameters=tuple(dict.fromkeys(parameters)))
