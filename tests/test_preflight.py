"""Preflight: parameter counts from configs, plans that respect pins and budgets."""

from __future__ import annotations

import pytest

from finetune.config import compose
from finetune.errors import ConfigError, DoesNotFitError
from finetune.preflight import arch, catalog, run_preflight
from finetune.preflight.memory import GiB


@pytest.mark.parametrize("hub_id, params", [
    ("meta-llama/Llama-2-7b-hf", 6_738_415_616),
    ("meta-llama/Llama-2-13b-hf", 13_015_864_320),
    ("meta-llama/Llama-2-70b-hf", 68_976_648_192),
    ("mistralai/Mistral-7B-v0.1", 7_241_732_096),
])
def test_parameter_counts_match_the_published_models(hub_id, params):
    spec = arch.from_config(catalog.model_config(hub_id)[0])
    assert spec.params_total == params


def test_lora_parameter_count_matches_peft():
    spec = arch.from_config(catalog.model_config("meta-llama/Llama-2-7b-hf")[0])
    # peft's print_trainable_parameters for r=16 on all linear layers of Llama-2-7B
    assert spec.lora_params(["all-linear"], 16) == 39_976_960
    assert spec.lora_params(["q_proj", "v_proj"], 8) == 4_194_304


def test_tiny_model_count_matches_torch(tiny_model_dir):
    import torch  # noqa: F401  (this test may use torch; the preflight itself does not)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    spec = arch.from_config(catalog.model_config("tiny:llama")[0])
    assert spec.params_total == sum(p.numel() for p in model.parameters())


def test_unknown_lora_target_names_the_modules():
    spec = arch.from_config(catalog.model_config("meta-llama/Llama-2-7b-hf")[0])
    with pytest.raises(ConfigError) as info:
        spec.lora_targets(["qproj"])
    assert "qproj" in str(info.value) and "q_proj" in str(info.value)


def test_bigger_card_buys_a_faster_plan():
    small = run_preflight(compose(["+recipe=llama2-7b-medical", "hardware=rtx4070"]))
    big = run_preflight(compose(["+recipe=llama2-7b-medical", "hardware=a100-80gb"]))
    assert small.choices["quantization"] == "nf4"
    assert big.choices["quantization"] == "none"
    assert small.predicted["device_total_bytes"] <= small.budget_bytes
    assert big.predicted["device_total_bytes"] <= big.budget_bytes


def test_pins_are_respected():
    plan = run_preflight(compose(["+recipe=llama2-7b-medical", "hardware=a100-80gb",
                                  "preflight.pin.quantization=nf4", "preflight.pin.micro_batch_size=2",
                                  "preflight.pin.gradient_checkpointing=true"]))
    c = plan.choices
    assert (c["quantization"], c["micro_batch_size"], c["gradient_checkpointing"]) == ("nf4", 2, True)
    assert c["gradient_accumulation_steps"] == 8  # effective batch 16 kept


def test_effective_batch_is_kept_by_accumulation():
    for vram in (12, 24, 80):
        plan = run_preflight(compose(["+recipe=llama2-7b-medical", f"hardware.vram_gib={vram}"]))
        c = plan.choices
        assert c["micro_batch_size"] * c["gradient_accumulation_steps"] == 16


def test_alternatives_say_why_they_lost():
    plan = run_preflight(compose(["+recipe=llama2-7b-medical"]))
    assert plan.alternatives
    for alt in plan.alternatives:
        assert alt["why_not"]
        assert set(alt) == {"choices", "device_total_bytes", "relative_speed", "why_not"}


def test_seventy_b_on_a_12gb_card_does_not_fit():
    with pytest.raises(DoesNotFitError) as info:
        run_preflight(compose(["+recipe=llama2-7b-medical", "model.name_or_path=meta-llama/Llama-2-70b-hf"]))
    assert info.value.exit_code == 4
    assert "GiB" in str(info.value)


def test_longer_sequences_need_more_memory():
    a = run_preflight(compose(["+recipe=llama2-7b-medical", "dataset.max_seq_len=512",
                               "preflight.pin.micro_batch_size=4", "preflight.pin.gradient_checkpointing=true"]))
    b = run_preflight(compose(["+recipe=llama2-7b-medical", "dataset.max_seq_len=2048",
                               "preflight.pin.micro_batch_size=4", "preflight.pin.gradient_checkpointing=true"]))
    assert b.breakdown_bytes["activations"] > 3 * a.breakdown_bytes["activations"]
    assert b.breakdown_bytes["weights_quantized"] == a.breakdown_bytes["weights_quantized"]


def test_nf4_weights_are_about_a_quarter_of_bf16():
    base = ["+recipe=llama2-7b-medical", "hardware.vram_gib=200", "preflight.pin.micro_batch_size=1"]
    nf4 = run_preflight(compose(base + ["preflight.pin.quantization=nf4"]))
    bf16 = run_preflight(compose(base + ["preflight.pin.quantization=none"]))
    ratio = nf4.breakdown_bytes["weights_quantized"] / bf16.breakdown_bytes["weights_quantized"]
    assert ratio == pytest.approx(0.25)
    assert 12 * GiB < bf16.breakdown_bytes["weights_quantized"] < 13 * GiB


