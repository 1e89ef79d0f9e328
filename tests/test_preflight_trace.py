"""The tracer (finetune/probes/trace.py): any architecture transformers builds gets a plan.

What proves it: for every family arch.py describes by hand, the inventory the tracer derives on
its own -- parameters from the meta device, activations measured on scaled-down 4-bit/LoRA copies
and fitted to the real widths -- agrees with the hand-written one (which the calibration set and
tests/test_preflight_arch.py hold to measurements). Then every current model of the catalog that
has no hand-written rules plans offline, with a breakdown that sums to its prediction.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time

import pytest

from finetune.architectures import catalog
from finetune.architectures import spec as arch
from finetune.config import compose
from finetune.errors import ConfigError
from finetune.preflight import memory, run_preflight
from finetune.probes import spec_of, trace

pytestmark = pytest.mark.slow

HAND_WRITTEN = ["meta-llama/Llama-2-7b-hf", "mistralai/Mistral-7B-v0.1", "mistralai/Mixtral-8x7B-v0.1",
                "tiiuae/falcon-7b", "tiiuae/falcon-40b", "bigscience/bloom-7b1", "EleutherAI/gpt-j-6b",
                "EleutherAI/pythia-6.9b", "microsoft/phi-2", "microsoft/Phi-3-mini-4k-instruct", "google/gemma-7b",
                "Qwen/Qwen2.5-7B"]

# The models users tune in late 2026 (issue 11): every one plans offline.
CURRENT = ["meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-70B", "meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-3B",
           "Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-14B", "Qwen/Qwen2.5-32B", "Qwen/Qwen3-8B", "Qwen/Qwen3-14B",
           "Qwen/Qwen3-32B", "Qwen/Qwen3-30B-A3B", "allenai/OLMoE-1B-7B-0924", "google/gemma-2-2b", "google/gemma-2-9b", "google/gemma-2-27b",
           "google/gemma-3-1b-pt", "google/gemma-3-4b-pt", "google/gemma-3-12b-pt", "google/gemma-3-27b-pt",
           "microsoft/phi-4", "mistralai/Mistral-Nemo-Base-2407", "allenai/OLMo-2-1124-7B",
           "HuggingFaceTB/SmolLM2-1.7B", "openai-community/gpt2", "openai-community/gpt2-xl",
           "state-spaces/mamba-130m-hf", "RWKV/rwkv-4-169m-pile"]

# Published parameter totals (model cards, or transformers' count of the checkpoint).
PUBLISHED = {"Qwen/Qwen3-8B": 8_190_735_360, "Qwen/Qwen3-14B": 14_768_307_200, "Qwen/Qwen3-32B": 32_762_123_264,
             "Qwen/Qwen3-30B-A3B": 30_532_122_624, "google/gemma-2-2b": 2_614_341_888,
             "google/gemma-2-9b": 9_241_705_984, "google/gemma-2-27b": 27_227_128_320,
             "google/gemma-3-1b-pt": 999_885_952, "microsoft/phi-4": 14_659_507_200,
             "mistralai/Mistral-Nemo-Base-2407": 12_247_782_400, "allenai/OLMo-2-1124-7B": 7_298_617_344,
             "HuggingFaceTB/SmolLM2-1.7B": 1_711_376_384, "openai-community/gpt2": 124_439_808,
             "openai-community/gpt2-xl": 1_557_611_200, "state-spaces/mamba-130m-hf": 129_135_360,
             "state-spaces/mamba-1.4b-hf": 1_372_178_432, "Qwen/Qwen2.5-14B": 14_770_033_664,
             "Qwen/Qwen2.5-32B": 32_763_876_352, "allenai/OLMoE-1B-7B-0924": 6_919_161_856}

QLORA = dict(quantization="nf4", double_quant=True, quantized_experts=True, compute_dtype="bf16", optimizer="paged_adamw_8bit",
             attention="sdpa", packing=False, num_gpus=1, distributed="none")


def _config(hub_id: str) -> dict:
    return catalog.model_config(hub_id)[0]


@pytest.mark.parametrize("hub_id", HAND_WRITTEN)
def test_traced_inventory_agrees_with_the_hand_written_rules(hub_id):
    config = _config(hub_id)
    hand = arch.from_config(config)  # hand-written rules only
    # the same attention as the hand-written rules (the tracer reads what transformers picks, the rules what we plan)
    traced = dataclasses.replace(trace.derive(config), attention=hand.attention)
    assert traced.traced is not None and hand.traced is None

    # parameters, what bitsandbytes quantizes and what LoRA trains: exactly
    assert traced.params_total == hand.params_total
    assert traced.quantizable_weight_params == hand.quantizable_weight_params
    assert set(traced.linear_names()) == set(hand.linear_names())
    for targets in (["all-linear"], ["attention"]):
        assert traced.lora_params(targets, 16) == hand.lora_params(targets, 16)

    # the peak of training steps with and without checkpointing, unpadded and padded batches: within 2%
    for checkpointing, seq in ((True, 2048), (False, 1024)):
        for mb in (1, 4):
            c = dict(QLORA, gradient_checkpointing=checkpointing, micro_batch_size=mb, max_seq_len=seq)
            got, want = (memory.estimate(s, c, rank=16, targets=["all-linear"]) for s in (traced, hand))
            assert got.peak_allocated == pytest.approx(want.peak_allocated, rel=0.02), (checkpointing, mb)
            assert got.breakdown["activations"] + got.breakdown["lm_head_and_loss"] == pytest.approx(
                want.breakdown["activations"] + want.breakdown["lm_head_and_loss"], rel=0.05), (checkpointing, mb)
    assert traced.traced.worst_fit < trace.FIT_TOLERANCE


@pytest.mark.parametrize("hub_id", CURRENT)
def test_every_current_model_plans_offline(hub_id):
    moe = ["adapter.dropout=0"] if ("A3B" in hub_id or "OLMoE" in hub_id) else []  # peft's LoRA on 3-D experts
    # refuses dropout
    cfg = compose(["+recipe=llama2-7b-medical", f"model.name_or_path={hub_id}", "hardware=h100-80gb",
                   "preflight.pin.quantization=nf4", "stages=[preflight]", *moe])
    plan = run_preflight(cfg).to_dict()
    breakdown = plan["breakdown_bytes"]
    assert sum(v for k, v in breakdown.items() if k not in ("cuda_context", "allocator_cache")) == \
        plan["predicted"]["peak_allocated_bytes"]
    if hub_id in PUBLISHED:
        assert plan["model"]["params_total"] == PUBLISHED[hub_id]
    spec = spec_of(_config(hub_id))
    if spec.traced is not None:
        assert any("traced on scaled-down copies" in line for line in plan["explanation"])
        assert plan["model"]["architecture_source"] == "traced" and plan["model"]["trace"]["seconds"] >= 0
    else:
        assert plan["model"]["architecture_source"] == "hand-written"


def test_gemma2_plans_the_eager_attention_transformers_trains_it_with():
    spec = spec_of(_config("google/gemma-2-9b"))
    assert spec.attention == "eager"  # soft-capped attention: transformers' default for Gemma 2
    c = dict(QLORA, gradient_checkpointing=False, micro_batch_size=1)
    short, long = (memory.estimate(spec, dict(c, max_seq_len=n), rank=16, targets=["all-linear"])
                   for n in (1024, 2048))
    # eager attention keeps heads x seq x seq per layer: per token it grows with the sequence
    assert long.breakdown["activations"] / 2048 > 1.3 * short.breakdown["activations"] / 1024


def test_moe_experts_are_counted_and_targeted_as_parameters():
    spec = spec_of(_config("Qwen/Qwen3-30B-A3B"))
    assert spec.experts == 128 and spec.experts_per_token == 8
    assert set(spec.expert_parameter_names()) == {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}
    assert spec.lora_params(["all-linear"], 8) > spec.lora_params(["attention"], 8)


def test_presets_resolve_to_each_familys_own_modules_and_attention_free_models_refuse_attention():
    from finetune.architectures.targets import resolve

    gpt2 = resolve(spec_of(_config("openai-community/gpt2")), ["attention"])
    assert set(gpt2.modules) == {"c_attn", "c_proj"}
    # peft 0.21 refuses LoRA on a Mamba mixer's out_proj (and conv1d): all-linear leaves it out, naming it says why
    mamba = resolve(spec_of(_config("state-spaces/mamba-130m-hf")), ["all-linear"])
    assert set(mamba.modules) == {"in_proj", "x_proj", "dt_proj"}
    with pytest.raises(ConfigError, match="adapter.targets: out_proj cannot carry LoRA.*peft"):
        resolve(spec_of(_config("state-spaces/mamba-130m-hf")), ["out_proj"])
    with pytest.raises(ConfigError, match="adapter.targets.*selects no layer"):
        resolve(spec_of(_config("state-spaces/mamba-130m-hf")), ["attention"])
    # Mamba's mixer reads dt_proj.weight directly: the 4-bit plan keeps that layer in the compute dtype
    spec = spec_of(_config("state-spaces/mamba-130m-hf"))
    assert [lin.name for lin in spec.linears if not lin.quantizable] == ["dt_proj"]
    cfg = compose(["+recipe=llama2-7b-medical", "model.name_or_path=state-spaces/mamba-130m-hf",
                   "preflight.pin.quantization=nf4", "stages=[preflight]"])
    assert run_preflight(cfg).choices["keep_unquantized"] == ["dt_proj", "lm_head"]


def test_a_second_plan_reads_the_trace_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path))
    config = _config("openai-community/gpt2")
    c = dict(QLORA, gradient_checkpointing=True, micro_batch_size=2, max_seq_len=512)
    first = trace.derive(config)
    before = memory.estimate(first, c, rank=8, targets=["all-linear"])
    assert first.traced.measured == 1 and first.traced.cached == 0
    assert (tmp_path / "traces.json").is_file()
    second = trace.derive(config)  # a new process would start here: nothing in memory
    started = time.perf_counter()
    after = memory.estimate(second, c, rank=8, targets=["all-linear"])
    assert time.perf_counter() - started < 0.5
    assert second.traced.measured == 0 and second.traced.cached == 1
    assert after.peak_allocated == before.peak_allocated


def test_remote_code_architecture_is_one_line():
    # Qwen (v1) ships its own modeling code: transformers has no class for it, and custom code is never run
    config = {k: v for k, v in _config("Qwen/Qwen-7B").items()}
    config["model_type"] = "qwen_custom"
    with pytest.raises(ConfigError) as info:
        spec_of(config)
    assert "\n" not in str(info.value) and "qwen_custom" in str(info.value)


def test_a_hand_written_familys_dry_run_imports_no_torch(tmp_path):
    code = ("import sys\n"
            "from finetune.config import compose\n"
            "from finetune.preflight import run_preflight\n"
            "run_preflight(compose(['+recipe=llama2-7b-medical', 'stages=[preflight]']))\n"
            "print(json.dumps('torch' in sys.modules))\n").replace("print(json", "import json\nprint(json")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) is False


def test_an_architecture_it_cannot_model_runs_only_fully_pinned_and_unpredicted(tmp_path, run_cli):
    model = tmp_path / "custom-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "mystery_lm", "architectures": ["MysteryForCausalLM"], "hidden_size": 64,
        "auto_map": {"AutoModelForCausalLM": "modeling_mystery.MysteryForCausalLM"}}))
    base = ["+recipe=tiny-demo", f"model.name_or_path={model}", "stages=[preflight]"]
    unpinned = run_cli(*base)
    assert unpinned.returncode == 2
    line = unpinned.stderr.strip().splitlines()[-1]
    assert "mystery_lm" in line and "preflight.pin.gradient_checkpointing" in line and "Traceback" not in unpinned.stderr

    pinned = run_cli(*base, "preflight.pin.gradient_checkpointing=true", "preflight.pin.micro_batch_size=1")
    assert pinned.returncode == 0, pinned.stderr
    assert "not predicted" in pinned.stdout
    plan = json.loads(next((tmp_path / "outputs").rglob("plan.json")).read_text())
    assert plan["predicted"] == {} and plan["model"]["architecture_source"] == "unknown"
    assert plan["choices"]["quantization"] == "nf4" and plan["choices"]["micro_batch_size"] == 1
    assert plan["explanation"][0].startswith("NOT PREDICTED")


def test_a_remote_code_model_trains_unpredicted_when_fully_pinned(tmp_path, tiny_model_dir, monkeypatch):
    """Custom modeling code (model.trust_remote_code=true): transformers cannot build it from the config alone,
    so the preflight has no picture of it; pinned, the run trains with exactly the pinned choices."""
    import shutil

    from finetune.pipeline import run_pipeline

    model = tmp_path / "remote-model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="mystery_lm", architectures=["MysteryForCausalLM"],
                  auto_map={"AutoConfig": "configuration_mystery.MysteryConfig",
                            "AutoModelForCausalLM": "modeling_mystery.MysteryForCausalLM"})
    (model / "config.json").write_text(json.dumps(config))
    (model / "configuration_mystery.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass MysteryConfig(LlamaConfig):\n    model_type = 'mystery_lm'\n")
    (model / "modeling_mystery.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_mystery import MysteryConfig\n\n\n"
        "class MysteryForCausalLM(LlamaForCausalLM):\n    config_class = MysteryConfig\n")
    monkeypatch.chdir(tmp_path)
    cfg = compose(["+recipe=tiny-demo", f"model.name_or_path={model}", "model.trust_remote_code=true",
                   "preflight.pin.gradient_checkpointing=false", "preflight.pin.micro_batch_size=2",
                   "train.max_steps=4", "train.save_steps=4", "stages=[data,preflight,train]",
                   "tracking.register_model=false", "tracking.system_metrics=false"])
    result = run_pipeline(cfg, tmp_path / "outputs" / "run")
    assert result["plan"].predicted == {}
    assert (tmp_path / "outputs" / "run" / "adapter" / "adapter_config.json").is_file()
    assert len(result["train"].loss_history) == 4
