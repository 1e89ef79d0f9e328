"""QLoRA on a tiny model of every family users name, through the whole pipeline, on the CPU.

Each family's own layout (fused QKV, multi-query, parallel attention, ALiBi, partial
rotary, MoE experts, tied embeddings) is built from its real config fields
(finetune/models/tiny.py). For each: the targets resolve to that family's modules, the
base is 4-bit where our stack makes it so, the loss goes down, and the saved adapter
reloads and reproduces the trained model's logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finetune import versions
from finetune.architectures.targets import resolve
from finetune.config import compose
from finetune.models import experts, tiny
from finetune.models.loader import load_with_adapter
from finetune.pipeline import run_pipeline
from finetune.probes import spec_of

pytestmark = pytest.mark.slow

FAMILIES = ["llama", "llama3", "mistral", "mistral_nemo", "mixtral", "falcon", "bloom", "gptj", "gpt_neox", "phi", "gemma", "qwen2",
            # no hand-written preflight rules: planned by finetune/probes/trace.py
            "gemma2", "gemma3_text", "qwen3", "qwen3_moe", "olmo2", "gpt2", "mamba", "rwkv"]
# training steps for the loss to fall by 10%: 20, but some tiny models learn the chat format slower (Mamba; and
# since the tiny tokenizer also learned ChatML and JSON tool calls, builder v3: Mixtral, Gemma, GPT-2)
STEPS = {"mamba": 30, "mixtral": 30, "gemma": 30, "gpt2": 30}
# the families llama.cpp runs whose GGUF export is checked here, from each trained adapter (GPT-J and RWKV v4
# have no converter class in llama.cpp; Falcon, BLOOM, GPT-NeoX and Mamba have one and export too, unchecked here)
GGUF = {"llama", "llama3", "mistral", "mistral_nemo", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma", "gemma2",
        "gemma3_text", "phi", "olmo2", "gpt2"}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_and_its_adapter_reloads(family, tmp_path, monkeypatch):
    from bitsandbytes.nn import Linear4bit

    monkeypatch.chdir(tmp_path)
    steps = STEPS.get(family, 20)
    cfg = compose(["+recipe=tiny-demo", f"model.name_or_path=tiny:{family}", f"train.max_steps={steps}",
                   f"train.save_steps={steps}", "stages=[data,preflight,train]", "tracking.register_model=false",
                   "tracking.system_metrics=false"])
    result = run_pipeline(cfg, tmp_path / "outputs" / "tiny-demo" / "run")
    model = result["model"]

    # The adapter sits on the family's own modules (and, for MoE, on the experts' parameters).
    expected = resolve(spec_of(dict(tiny.SPECS[family])), ["all-linear"])
    config = json.loads((Path(result["train"].adapter_dir) / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == set(expected.modules)
    assert set(config.get("target_parameters") or []) == set(expected.parameters)
    adapted = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert set(expected.modules) <= adapted

    # 4-bit where transformers quantizes; Falcon's FalconLinear is an nn.Linear subclass, which the releases
    # finetune.versions knows do not replace, so its base stays in the compute dtype, and the plan says so.
    quantized = [m for m in model.modules() if isinstance(m, Linear4bit)]
    if family == "falcon" and not versions.quantizes_linear_subclasses():
        assert not quantized
        assert any("FalconLinear" in line for line in result["plan"].explanation)
    else:
        spec = spec_of(dict(tiny.SPECS[family]))
        # every linear layer of the blocks, not lm_head (Mamba keeps dt_proj, whose weight its mixer reads)
        assert len(quantized) == spec.layers * sum(lin.quantizable for lin in spec.linears)
        assert sum(lin.quantizable for lin in spec.linears) >= len(spec.linears) - 1
        assert all(m.weight.quant_state.quant_type == "nf4" for m in quantized)
    # MoE: the fused experts are 4-bit too (finetune/models/experts.py), as the plan says
    moe = experts.experts_modules(model)
    assert bool(moe) == (family in ("mixtral", "qwen3_moe"))
    assert all(experts.is_quantized(m) for _, m in moe)
    assert bool(result["plan"].choices.get("quantized_experts")) == bool(moe)

    losses = [loss for _, loss in result["train"].loss_history]
    assert len(losses) == steps
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses

    ids = torch.tensor([result["data"].eval[0].input_ids])
    model.eval()
    with torch.no_grad():
        expected_logits = model(input_ids=ids).logits
        reloaded = load_with_adapter(cfg.model, result["plan"].choices, result["train"].adapter_dir, "cpu")
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected_logits, atol=1e-4, rtol=1e-4)

    if family in GGUF:
        _exports_to_gguf(family, Path(result["train"].adapter_dir).parent)

    if moe:
        # the adapter on 4-bit experts is plain peft's: merged into the dequantized base (peft's own ParamWrapper
        # on bf16 experts) it is the trained model, and plain transformers loads the result
        from transformers import AutoModelForCausalLM

        from finetune.models.merge import merge

        record = merge(result["train"].adapter_dir, tmp_path / "merged", from_quantized=True)
        assert "dequantized nf4" in record["base"]
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        assert all(p.dim() == 3 for _, m in experts.experts_modules(merged) for p in m.parameters(recurse=False)
                   if p.dim() > 1)
        with torch.no_grad():
            torch.testing.assert_close(merged(input_ids=ids).logits, expected_logits, atol=5e-2, rtol=1e-2)


def _exports_to_gguf(family: str, run_dir: Path) -> None:
    """llama.cpp's converter and quantizer make f16 and Q4_K_M from the trained adapter; llama.cpp loads both and
    (finetune/export/check.py, on the run's held-out prompts) the f16 gives the merged model's tokenization, logits
    and greedy tokens, Q4_K_M most of its top-1 tokens."""
    pytest.importorskip("llama_cpp", reason="the gguf extra (make test installs it)")
    from finetune.export import export
    from finetune.export.check import load

    record = export(str(run_dir), quants=["f16", "q4_k_m"], log_to_mlflow=False, progress=False)
    assert record["check"]["prompts_from"] == "heldout.jsonl"
    f16, q4 = record["check"]["files"]["f16"], record["check"]["files"]["q4_k_m"]
    n = f16["prompts"]
    assert n >= 2
    assert f16["prompt_ids_equal"] == n and f16["text_ids_equal"], f16
    assert not f16["control_tokens_wrong"] and not f16["user_defined_wrong"] and not f16["special_ids_differ"], f16
    assert f16["max_logit_diff"] < 0.05 and f16["top1_agreement"] == 1.0, f16
    assert f16["greedy_equal"] == n and f16["stops_at_end_of_turn"] == f16["ends_turn"], f16
    assert f16["end_of_turn_is_eog"] and not f16["warnings"], f16
    assert q4["top1_agreement"] > 0.8 and q4["prompt_ids_equal"] == n, q4
    # the head size llama.cpp runs with is the model's (Mistral-Nemo's head_dim 32 is not hidden / heads = 16)
    config = dict(tiny.SPECS[family])
    head_dim = config.get("head_dim") or config.get("hidden_size", config.get("n_embd")) // config.get(
        "num_attention_heads", config.get("n_head"))
    llm = load(run_dir / "export" / record["files"]["f16"], 64)
    arch = llm.metadata["general.architecture"]
    key_length = llm.metadata.get(f"{arch}.attention.key_length")
    if family == "mistral_nemo" or key_length is not None:
        assert int(key_length) == head_dim, (arch, key_length, head_dim)
    llm.close()
