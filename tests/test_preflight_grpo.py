"""GRPO's plan: the generation phase (the completions generated at once, their KV cache, logits and prefill, the
reference forward with beta > 0, a colocated vLLM engine's share) is counted, its generation batch is one TRL
accepts, and a group or completion length that cannot fit is refused in one line with what would."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest

from finetune.config import compose
from finetune.errors import ConfigError, DoesNotFitError
from finetune.preflight import memory, run_preflight
from finetune.preflight.memory import GiB
from finetune.preflight.planner import hardware_catalog

# Llama-3-8B has hand-written rules (pure arithmetic, no trace): the recipe's Qwen3-8B is traced on first use
FAST = ["+recipe=qwen3-8b-grpo", "model.name_or_path=meta-llama/Meta-Llama-3-8B", "stages=[preflight]"]
# only the generation can be the problem: the smallest training plan pinned, a group of 64 x 8k-token completions
TOO_LONG = ["train.effective_batch_size=64", "train.num_generations=64", "train.max_completion_length=8192",
            "preflight.pin.micro_batch_size=1", "preflight.pin.quantization=nf4",
            "preflight.pin.gradient_checkpointing=true"]


def plan(*overrides: str):
    return run_preflight(compose([*FAST, *overrides]))


def adds_up(p) -> None:
    d = p.to_dict()
    assert sum(d["breakdown_bytes"].values()) == d["predicted"]["device_total_bytes"]


def trl_valid(c: dict) -> None:
    """GRPOConfig.__post_init__'s rules for an explicit generation_batch_size, and ours: whole optimizer steps."""
    gbs, n = c["generation_batch_size"], c["num_gpus"]
    assert gbs % c["num_generations"] == 0
    assert gbs % (c["micro_batch_size"] * n) == 0
    steps_per_generation = gbs // (c["micro_batch_size"] * n)
    assert c["gradient_accumulation_steps"] % steps_per_generation == 0  # no old-policy forward needed


def test_the_8b_grpo_plan_on_a_24gb_card_counts_the_generation_phase():
    p = plan()
    d = p.to_dict()
    c = d["choices"]
    assert p.fits and "generation" in d["breakdown_bytes"] and d["generation"] is not None
    adds_up(p)
    assert list(d).index("generation") == list(d).index("budget_bytes") + 1
    gen = d["generation"]
    assert {"kv_cache_bytes", "logits_bytes", "prefill_bytes", "total_bytes", "sequences", "tokens", "why"} <= set(gen)
    assert gen["engine"] == "transformers" and gen["sequences"] == c["generation_batch_size"]
    assert gen["tokens"] == 512 + 512 == c["max_seq_len"]
    assert c["max_prompt_length"] == 512 and c["max_completion_length"] == 512 and c["num_generations"] == 8
    assert c["seq_len_source"] == "recipe" and not c["packing"]
    trl_valid(c)
    # the KV cache by hand: 32 layers x (k, v) x 8 kv heads x 128 x bf16, per token and sequence
    assert gen["kv_cache_bytes"] == 32 * 2 * 8 * 128 * 2 * gen["sequences"] * gen["tokens"]
    # the breakdown's generation is the phase's excess over the training step
    train_total = d["predicted"]["device_total_bytes"] - d["breakdown_bytes"]["generation"]
    assert d["breakdown_bytes"]["generation"] == max(0, gen["total_bytes"] - train_total)
    assert gen["total_bytes"] <= d["budget_bytes"] and d["predicted"]["device_total_bytes"] <= d["budget_bytes"]
    assert any(line.startswith("train.method=grpo: 8 completions per prompt") for line in p.explanation)
    assert any(line.startswith("generation: generate() on") for line in p.explanation)
    json.dumps(d)  # plan.json serializes


def test_with_the_data_report_the_prompt_is_the_datas_and_the_wall_time_counts_completions():
    from types import SimpleNamespace as NS

    report = NS(tokens=NS(max=300, mean=120.0, p95=250, total=120_000), rows_kept=1000, train_rows=980, packing=None)
    p = run_preflight(compose(FAST), report)
    c = p.choices
    assert c["max_prompt_length"] == 300 and c["max_seq_len"] == 300 + 512 and c["seq_len_source"] == "data"
    assert p.generation["tokens"] == 812
    # 980 prompts x 8 completions x (250 + 512) tokens
    assert "~6.0M tokens" in p.details["wall"] and "980 prompts x 8 completions" in p.details["wall"]


def test_every_candidate_generation_batch_is_valid_for_trl_and_the_largest_that_fits_is_preferred():
    from finetune.preflight import planner

    cfg = compose([*FAST, "train.effective_batch_size=32"])
    from finetune.architectures import catalog
    from finetune.probes import spec_of

    spec = spec_of(catalog.resolve_model(cfg.model.name_or_path).require())
    cands = planner.candidates(cfg, spec, 512, "recipe")
    assert cands and all(c["generation_batch_size"] for c in cands)
    for c in cands:
        trl_valid(c)
    assert {c["generation_batch_size"] for c in cands if c["micro_batch_size"] == 1} == {8, 16, 32}
    # with two GPUs the unit is lcm(num_generations, micro-batch x 2)
    two = compose([*FAST, "train.effective_batch_size=48", "hardware.num_gpus=2"])
    for c in planner.candidates(two, spec, 512, "recipe"):
        trl_valid(c)
        assert c["generation_batch_size"] % math.lcm(8, c["micro_batch_size"] * 2) == 0


def test_more_generations_or_longer_completions_grow_the_generation_share():
    def gen(*o):
        p = plan(*o, "preflight.pin.micro_batch_size=1", "preflight.pin.quantization=nf4",
                 "preflight.pin.gradient_checkpointing=true")
        adds_up(p)
        return p.generation, p.choices

    base, c0 = gen("train.effective_batch_size=32", "train.num_generations=8")
    more, c1 = gen("train.effective_batch_size=32", "train.num_generations=16")
    assert c1["generation_batch_size"] >= 16 and c1["generation_batch_size"] % 16 == 0
    longer, _ = gen("train.effective_batch_size=32", "train.num_generations=8", "train.max_completion_length=1024")
    # the KV cache is linear in sequences and tokens
    per = base["kv_cache_bytes"] / (base["sequences"] * base["tokens"])
    assert more["kv_cache_bytes"] == pytest.approx(per * more["sequences"] * more["tokens"])
    assert longer["kv_cache_bytes"] == pytest.approx(per * longer["sequences"] * longer["tokens"])
    assert longer["tokens"] == 512 + 1024 and longer["total_bytes"] > base["total_bytes"]
    # the same generation batch, more tokens: the share grows; a bigger batch at the same tokens: too
    spec_choices = dict(c0, generation_batch_size=8)
    from finetune.architectures import catalog
    from finetune.probes import spec_of

    spec = spec_of(catalog.resolve_model("meta-llama/Meta-Llama-3-8B").require())
    train = memory.estimate(spec, spec_choices, rank=16, targets=["all-linear"])
    a = memory.generation_peak(spec, spec_choices, train)
    b = memory.generation_peak(spec, dict(spec_choices, generation_batch_size=16), train)
    c = memory.generation_peak(spec, dict(spec_choices, max_completion_length=2048), train)
    assert a.total_bytes < b.total_bytes and a.total_bytes < c.total_bytes
    assert b.kv_cache_bytes == 2 * a.kv_cache_bytes


def test_a_group_that_cannot_be_generated_is_refused_in_one_line_with_alternatives_that_plan():
    with pytest.raises(DoesNotFitError) as e:
        plan(*TOO_LONG)
    line = str(e.value)
    assert "\n" not in line and "generation phase does not fit" in line
    assert "KV cache" in line and "the training step" in line
    groups = re.findall(r"train\.num_generations=(\d+)(?: train\.effective_batch_size=(\d+))?", line)
    completion = re.search(r"train\.max_completion_length=(\d+)", line)
    card = re.search(r"hardware=([\w-]+) \(", line)
    assert groups and completion and card, line
    # what the message names really plans
    for g, eff in groups:
        fixed = [o for o in TOO_LONG if not o.startswith("train.num_generations")] + [f"train.num_generations={g}"]
        if eff:
            fixed = [o for o in fixed if not o.startswith("train.effective_batch_size")] + \
                [f"train.effective_batch_size={eff}"]
        assert 64 % int(g) == 0 or int(eff) % int(g) == 0
        p = plan(*fixed)
        assert p.fits and p.choices["num_generations"] == int(g)
        trl_valid(p.choices)
    p = plan(*TOO_LONG[:2], *TOO_LONG[3:], f"train.max_completion_length={completion.group(1)}")
    assert p.fits and p.choices["max_completion_length"] == int(completion.group(1))
    with pytest.raises(DoesNotFitError):  # the longest is the longest: one more token does not fit
        plan(*TOO_LONG[:2], *TOO_LONG[3:], f"train.max_completion_length={int(completion.group(1)) + 1}")
    p = plan(*TOO_LONG, f"hardware={card.group(1)}")
    assert p.fits


def test_beta_counts_the_reference_forward():
    p0 = plan("preflight.pin.micro_batch_size=4")
    p1 = plan("preflight.pin.micro_batch_size=4", "train.beta=0.04")
    assert p0.generation["reference_bytes"] == 0 and p1.generation["reference_bytes"] > 0
    assert p1.generation["total_bytes"] >= p0.generation["total_bytes"]
    assert any("beta=0.04: the reference" in line for line in p1.explanation)
    adds_up(p1)


def test_vllm_generation_is_refused_on_the_cpu_and_on_mps():
    for hw in ("cpu", "apple-m-32gb"):
        with pytest.raises(ConfigError, match=r"^train\.generation=vllm needs a CUDA GPU"):
            plan("train.generation=vllm", f"hardware={hw}")


def test_vllm_on_a_cuda_card_plans_its_engine_as_its_own_share():
    p = plan("train.generation=vllm", "hardware=a100-80gb")
    d = p.to_dict()
    c, gen = d["choices"], d["generation"]
    frac = c["vllm_gpu_memory_utilization"]
    assert gen["engine"] == "vllm" and 0 < frac < 1 and gen["vllm_gpu_memory_utilization"] == frac
    assert round(frac / memory.VLLM_FRACTION_STEP, 6) == round(frac / memory.VLLM_FRACTION_STEP)
    # the share: the card's fraction, which holds the 16-bit weights and the whole generation batch's KV cache
    vram = hardware_catalog()["a100-80gb"]["vram_gib"] * GiB
    assert gen["total_bytes"] == int(frac * vram) == d["breakdown_bytes"]["generation"]
    assert gen["weights_bytes"] + gen["kv_cache_bytes"] <= gen["total_bytes"]
    assert gen["kv_cache_bytes"] == 32 * 2 * 8 * 128 * 2 * gen["sequences"] * gen["tokens"]
    adds_up(p)
    trl_valid(c)
    assert d["predicted"]["device_total_bytes"] <= d["budget_bytes"]
    # on a 24 GB card the 16-bit copy beside training does not fit: one line, naming the engine
    with pytest.raises(DoesNotFitError) as e:
        plan("train.generation=vllm")
    assert "\n" not in str(e.value) and "vLLM engine's share" in str(e.value)
    assert "train.generation=transformers" in str(e.value)


def test_the_grpo_plan_imports_no_torch():
    code = ("import sys; from finetune.config import compose; from finetune.preflight import run_preflight; "
            f"p = run_preflight(compose({FAST!r})); assert p.generation; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def _cli(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "finetune", "+recipe=qwen3-8b-grpo", "stages=[preflight]",
                           f"hydra.run.dir={tmp_path / 'run'}", *overrides], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_cli_plans_the_grpo_recipe_offline_with_a_generation_line(tmp_path):
    proc = _cli(tmp_path, "model.name_or_path=meta-llama/Meta-Llama-3-8B")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"│ generation\s+│", proc.stdout) and "KV cache" in proc.stdout
    d = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert d["generation"]["kv_cache_bytes"] > 0 and "generation_batch_size" in d["choices"]


@pytest.mark.slow  # Qwen3 is traced on first use in a fresh cache (~20 s)
def test_the_qwen3_grpo_recipe_plans_offline(tmp_path):
    proc = _cli(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "generation" in proc.stdout and "KV cache" in proc.stdout
    d = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert sum(d["breakdown_bytes"].values()) == d["predicted"]["device_total_bytes"]
    trl_valid(d["choices"])


@pytest.mark.slow  # plans models of each kind under GRPO (the traced ones trace once)
def test_the_grpo_breakdown_adds_up_for_models_of_each_kind():
    for hub_id in ("meta-llama/Llama-2-7b-hf", "mistralai/Mixtral-8x7B-v0.1", "google/gemma-2-9b",
                   "openai-community/gpt2"):
        for extra in ([], ["train.beta=0.04"], ["train.generation=vllm"]):
            p = run_preflight(compose(["+recipe=qwen3-8b-grpo", f"model.name_or_path={hub_id}", "hardware=h200",
                                       "adapter.dropout=0", "stages=[preflight]", *extra]))
            adds_up(p)
            assert p.breakdown_bytes["allocator_cache"] > 0 and p.breakdown_bytes["cuda_context"] > 0
            trl_valid(p.choices)
