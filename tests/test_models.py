"""Loading models: the tiny builder, 4-bit layers that stay what they are, LoRA target presets."""

from __future__ import annotations

import pytest
import torch

from finetune.architectures import tiny
from finetune.architectures.targets import resolve as resolve_spec
from finetune.config import compose
from finetune.errors import ConfigError
from finetune.models.loader import load_model
from finetune.probes import spec_of


def resolve(family: str, targets: list[str]):
    return resolve_spec(spec_of(dict(tiny.SPECS[family])), targets)


@pytest.mark.parametrize("double_quant", [True, False])
def test_a_4bit_model_computes_the_same_after_eval_and_save(tiny_model_dir, double_quant):
    """Evaluation then state_dict() (what saving a checkpoint or an adapter does) must not change the model.
    bitsandbytes 0.50's CPU inference repacking breaks this; models/loader.py keeps it from happening."""
    cfg = compose(["+recipe=tiny-demo"])
    model = load_model(cfg.model, {"quantization": "nf4", "double_quant": double_quant, "compute_dtype": "fp32"},
                       "cpu")
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 100]])
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        model.state_dict()
        after = model(input_ids=ids).logits
        model.train()
        training_mode = model(input_ids=ids).logits
    assert torch.equal(before, after)
    assert torch.equal(before, training_mode), "evaluation computes what training computed"


def test_presets_resolve_per_family():
    assert resolve("llama", ["all-linear"]).modules == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj")
    assert resolve("falcon", ["attention"]).modules == ("query_key_value", "dense")
    assert resolve("gptj", ["mlp"]).modules == ("fc_in", "fc_out")
    moe = resolve("mixtral", ["all-linear"])
    assert moe.modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert moe.parameters == ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
    assert resolve("mixtral", ["attention"]).parameters == ()
    assert resolve("phi", ["q_proj", "fc2"]).modules == ("q_proj", "fc2")


def test_unknown_target_names_the_modules():
    with pytest.raises(ConfigError) as info:
        resolve("llama", ["qkv"])
    assert "qkv" in str(info.value) and "q_proj" in str(info.value) and "attention" in str(info.value)
