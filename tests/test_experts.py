"""4-bit / 8-bit fused MoE experts (finetune/models/experts.py) and the plan that counts them (issue 12).

On the CPU, with the real stack (bitsandbytes 4-bit / 8-bit storage, peft, transformers' loader):
the experts' bytes, the forward against the bf16 forward of the same (dequantized) weights, LoRA on
the quantized experts against plain peft's ParamWrapper on the unquantized ones (the adapter layout
that merge and chat reload), and the loss curve against bf16 experts. The pipeline run of a tiny MoE
(train, reload, merge) is tests/test_architectures.py's mixtral / qwen3_moe case. Then the plan:
Mixtral 8x7B QLoRA on one 48 GB card, held to the published measurements of an older stack whose
experts were quantized nn.Linear modules.
"""

from __future__ import annotations

import contextlib

import pytest

from finetune.architectures import catalog
from finetune.config import compose
from finetune.preflight import memory, run_preflight
from finetune.probes import spec_of

GIB = 2**30
# fms-acceleration scripts/benchmarks/refs/a100_80gb.csv: Mixtral-8x7B QLoRA (nf4 + double quant, LoRA r16 on
# q,k,v,o), 4096-token packed Alpaca, gradient checkpointing, FlashAttention 2, 1x A100 80GB, peak allocated;
# held out of the calibration set (issue 12)
MIXTRAL_PUBLISHED_GIB = {4: 34.2, 8: 45.4}


def _tiny(family: str, quant: str, quantized_experts: bool):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from finetune.models import experts, tiny

    if quant == "nf4":
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
    else:
        bnb = BitsAndBytesConfig(load_in_8bit=True) if quant == "int8" else None
    with experts.loading() if quantized_experts else contextlib.nullcontext():
        return AutoModelForCausalLM.from_pretrained(tiny.ensure_built(f"tiny:{family}"), dtype=torch.bfloat16,
                                                    quantization_config=bnb)


def _lora(model, family: str, seed: int = 0):
    import torch
    from peft import LoraConfig, get_peft_model

    from finetune.architectures.targets import resolve
    from finetune.models import experts, tiny

    targets = resolve(spec_of(dict(tiny.SPECS[family])), ["all-linear"])
    config = LoraConfig(r=8, lora_alpha=16, target_modules=list(targets.modules),
                        target_parameters=list(targets.parameters) or None)
    experts.register_lora(config, model)
    torch.manual_seed(seed)
    model = get_peft_model(model, config)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)  # as TRL casts the adapters of a quantized model
    return model


@pytest.mark.slow
def test_4bit_experts_take_under_a_third_of_their_bf16_bytes():
    from finetune.models import experts

    bf16 = _tiny("mixtral", "none", False)
    bf16_bytes = sum(p.untyped_storage().nbytes() for _, m in experts.experts_modules(bf16)
                     for p in m.parameters(recurse=False) if p.dim() == 3)
    for quant, ratio in (("nf4", 0.3), ("int8", 0.55)):
        model = _tiny("mixtral", quant, True)
        modules = experts.experts_modules(model)
        assert modules and all(experts.is_quantized(m) for _, m in modules)
        stored, original = experts.quantized_bytes(model)  # packed bytes + every quantization state's tensors
        assert original == bf16_bytes
        assert stored <= ratio * bf16_bytes, (quant, stored / bf16_bytes)
        assert model.config._experts_implementation == experts.IMPLEMENTATION


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_quantized_experts_with_lora_compute_what_plain_peft_does_on_the_dequantized_weights(quant, tmp_path):
    import torch
    from peft import PeftModel

    from finetune.models import experts

    model = _lora(_tiny("mixtral", quant, True), "mixtral")
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)  # an adapter that does something (peft starts B at zero)
    ids = torch.randint(4, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        got = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert (got - base).abs().max() > 0.5  # the experts' LoRA is applied ...
    model.save_pretrained(tmp_path)

    # ... exactly as peft's own ParamWrapper applies the saved adapter to bf16 experts holding the same values
    reference = _tiny("mixtral", quant, False)
    quantized = [m for _, m in experts.experts_modules(model)]
    for (_, module), q in zip(experts.experts_modules(reference), quantized, strict=True):
        for name in ("gate_up_proj", "down_proj"):
            getattr(module, name).data = experts.dequantized(q, name)
    reference = PeftModel.from_pretrained(reference, tmp_path)
    for name, p in reference.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(torch.bfloat16)
    reference.eval()
    with torch.no_grad():
        want = reference(input_ids=ids).logits
    # bf16 sums in another order; where that turns a near-tie of the router, one token takes other experts (seen
    # for int8 with one thread: 1 of 48 positions), so each position is compared and at most 2 may differ
    diff = (got.float() - want.float()).abs() - 0.02 * want.float().abs()
    off = (diff > 0.1).flatten(0, 1).any(-1)
    assert off.sum() <= 2, f"{int(off.sum())} of {off.numel()} positions differ from peft's (max {diff.max():.3f})"

    # training reaches the experts' adapters and nothing else
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "experts" in n and p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def _curve(family: str, quant: str, quantized_experts: bool, steps: int = 20) -> list[float]:
    import torch

    model = _lora(_tiny(family, quant, quantized_experts), family)
    model.train()
    batch = torch.randint(4, 1000, (4, 64), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _deviation(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / y for x, y in zip(a, b, strict=True))


@pytest.mark.slow
def test_loss_curve_with_4bit_experts_matches_bf16_experts_within_the_4bit_tolerance():
    # the tolerance 4-bit layers show today: a dense model's QLoRA curve against its bf16 LoRA curve
    tolerance = _deviation(_curve("llama", "nf4", False), _curve("llama", "none", False))
    # the same LoRA (attention and experts) on the same 4-bit attention, the experts 4-bit or bf16
    quantized, bf16 = _curve("mixtral", "nf4", True), _curve("mixtral", "nf4", False)
    assert quantized[-1] < 0.8 * quantized[0]
    assert _deviation(quantized, bf16) <= tolerance, (quantized, bf16, tolerance)


# -- the plan ------------------------------------------------------------------------------------------

def _mixtral_plan(*overrides: str):
    return run_preflight(compose(["+recipe=mixtral-8x7b", "stages=[preflight]", *overrides])).to_dict()


def test_mixtral_recipe_fits_one_48gb_card_with_experts_4bit():
    plan = _mixtral_plan("hardware=l40s")
    assert plan["fits"] and plan["choices"]["quantization"] == "nf4" and plan["choices"]["quantized_experts"]
    assert any("experts 4-bit" in line for line in plan["explanation"])
    assert plan["model"]["lora_targets"][-2:] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    spec = spec_of(catalog.model_config("mistralai/Mixtral-8x7B-v0.1")[0])
    # the experts are in the quantized weights (nf4 + double quant: ~0.52 bytes a weight), not in the bf16 ones
    packed = plan["breakdown_bytes"]["weights_quantized"] + plan["breakdown_bytes"]["quant_constants"]
    assert packed > 0.5 * spec.expert_matrix_params
    assert plan["breakdown_bytes"]["weights_unquantized"] < 1 * GIB


@pytest.mark.parametrize("micro_batch, card", [(4, "l40s"), (8, "a100-80gb")])
def test_mixtral_qlora_plans_within_10_percent_of_the_published_quantized_experts_runs(micro_batch, card):
    plan = _mixtral_plan(f"hardware={card}", "adapter.targets=[attention]", "dataset.max_seq_len=4096",
                         f"preflight.pin.micro_batch_size={micro_batch}", "preflight.pin.gradient_checkpointing=true",
                         "preflight.pin.quantization=nf4", "preflight.pin.double_quant=true")
    assert plan["choices"]["quantized_experts"] and plan["choices"]["max_seq_len"] == 4096
    allocated = plan["predicted"]["peak_allocated_bytes"] / GIB
    assert allocated == pytest.approx(MIXTRAL_PUBLISHED_GIB[micro_batch], rel=0.10)
    if micro_batch == 4:
        assert allocated <= 40  # on one 48 GB card
    # bitsandbytes alone (bf16 experts) needed a datacenter card for the same run
    bf16_experts = memory.estimate(spec_of(catalog.model_config("mistralai/Mixtral-8x7B-v0.1")[0]),
                                   dict(plan["choices"], quantized_experts=False), rank=16, targets=["attention"])
    assert bf16_experts.peak_allocated > 90 * GIB


@pytest.mark.slow
def test_traced_moe_families_plan_their_experts_4bit():
    spec = spec_of(catalog.model_config("Qwen/Qwen3-30B-A3B")[0])  # traced: no hand-written rules
    assert spec.traced is not None and spec.experts == 128
    c = dict(quantization="nf4", double_quant=True, compute_dtype="bf16", optimizer="adamw", attention="sdpa",
             packing=False, num_gpus=1, distributed="none", gradient_checkpointing=True, micro_batch_size=1,
             max_seq_len=1024)
    quantized = memory.estimate(spec, dict(c, quantized_experts=True), rank=16, targets=["attention"])
    bf16 = memory.estimate(spec, c, rank=16, targets=["attention"])
    saved = bf16.peak_allocated - quantized.peak_allocated
    # each expert weight: 2 bytes -> ~0.52 (packed nibbles, uint8 block scales, fp32 per 256 blocks)
    assert saved == pytest.approx((2 - 0.516) * spec.expert_matrix_params, rel=0.02)
