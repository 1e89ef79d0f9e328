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

No torch here: the layer tables are the architecture's (spec.py, or traced by finetune.probes).
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune.architectures.spec import PRESETS, ArchSpec
from finetune.errors import ConfigError


@dataclass(frozen=True)
class Targets:
    modules: tuple[str, ...]
    parameters: tuple[str, ...] = ()


def resolve(spec: ArchSpec | None, targets: list[str], model_type: str = "") -> Targets:
    """The peft targets for `adapter.targets` on the architecture `spec` (finetune.probes.spec_of of the
    config the preflight planned with): one table, so the adapter that trains is the one the plan counted.
    `spec` None: no picture of its layers (Untraceable: custom code, run unpredicted), so peft's own
    all-linear or the module names given. ConfigError names what is unknown.
    """
    if spec is None:
        if list(targets) == ["all-linear"]:
            return Targets(modules=("all-linear",))
        presets = [t for t in targets if t in PRESETS]
        if presets:
            raise ConfigError(f"adapter.targets: {presets[0]} needs the architecture's layers, which the preflight "
                              f"cannot read for '{model_type}'; use all-linear or name the modules")
        return Targets(modules=tuple(targets))
    modules = tuple(dict.fromkeys(lin.name for lin in spec.lora_targets(list(targets))))
    parameters = tuple(name for name, *_ in spec.lora_param_targets(list(targets), 1))
    if not modules and not parameters:
        raise ConfigError(f"adapter.targets: {list(targets)} selects no layer of {spec.architecture}")
    return Targets(modules=modules, parameters=parameters)
