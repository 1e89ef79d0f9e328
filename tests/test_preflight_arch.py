"""The preflight's picture of each architecture, held to the installed stack itself.

The preflight never imports torch; these tests do, to check its arithmetic against what
transformers 5.23, peft 0.21 and bitsandbytes 0.50 really build and keep:

* every catalog config built by transformers on the meta device has exactly our parameter count;
* peft's LoRA (all-linear and named targets) has exactly our trainable count, on tiny models of
  every family (Mixtral included, whose experts peft targets as parameters);
* bitsandbytes replaces exactly the layers we call quantizable (not Falcon's FalconLinear, not
  Mixtral's 3-D experts);
* autograd keeps, per decoder layer and token, what ``memory.layer_bytes_per_token`` says, measured
  with saved-tensor hooks on a real 4-bit/LoRA model on the CPU (fp32 compute, no autocast: the
  CPU path of the estimator).
"""

from __future__ import annotations

import csv
import json
import logging
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
import transformers

from finetune.architectures import catalog
from finetune.architectures import spec as arch
from finetune.preflight.memory import _Ctx, layer_bytes_per_token
from finetune.probes import spec_of

TINY = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256),
    "gemma": dict(model_type="gemma", hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=16, vocab_size=256),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256),
    "phi3": dict(model_type="phi3", hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, vocab_size=256, pad_token_id=0),
    "mixtral": dict(model_type="mixtral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=256, num_local_experts=4,
                    num_experts_per_tok=2),
    "falcon-7b-like": dict(model_type="falcon", hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                           vocab_size=256, multi_query=True, parallel_attn=True, new_decoder_architecture=False,
                           bias=False),
    "falcon-40b-like": dict(model_type="falcon", hidden_size=64, num_attention_heads=4, num_kv_heads=2,
                            num_hidden_layers=2, vocab_size=256, new_decoder_architecture=True, parallel_attn=True,
                            bias=False),
    "bloom": dict(model_type="bloom", hidden_size=64, n_head=4, n_layer=2, vocab_size=256),
    "gptj": dict(model_type="gptj", n_embd=64, n_head=4, n_layer=2, vocab_size=256, rotary_dim=8, n_positions=128,
                 bos_token_id=0, eos_token_id=0),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                     vocab_size=256, intermediate_size=256),
    "phi": dict(model_type="phi", hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=256,
                intermediate_size=256, resid_pdrop=0.0),
}


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _config(d: dict):
    c = dict(d)
    model_type = c.pop("model_type")
    c.pop("architectures", None)
    vision = c.pop("_vision_config", None)
    if vision is not None:  # the multimodal checkpoint whose text tower the catalog lists (Gemma 3 4B/12B/27B)
        c.pop("_text_tower_of", None)
        return transformers.Gemma3Config(text_config={"model_type": model_type, **c}, vision_config=vision)
    return transformers.AutoConfig.for_model(model_type, **c)


def _saved_dir(d: dict) -> str:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(d))
    path = tempfile.mkdtemp(prefix="preflight-arch-")
    model.save_pretrained(path)
    return path


def _load(path: str, quant: str):
    kwargs = {"dtype": torch.float32}
    if quant == "nf4":
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_use_double_quant=True)
    return transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)


@pytest.mark.parametrize("hub_id", [k for k, v in catalog.models().items() if v["model_type"] != "qwen"])
def test_catalog_counts_equal_transformers_on_the_meta_device(hub_id):
    config = catalog.model_config(hub_id)[0]
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(_config(config))
    assert spec_of(config).params_total == sum(p.numel() for p in model.parameters())


def _lora_config(spec: arch.ArchSpec, targets: list[str], dropout: float = 0.0):
    """peft's config for `targets` as the training stage builds it: the modules the preset selects, and
    Mixtral's 3-D experts as target_parameters."""
    from peft import LoraConfig

    modules = list(dict.fromkeys(lin.name for lin in spec.lora_targets(targets)))
    params = [name for name, *_ in spec.lora_param_targets(targets, 8)]
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=modules,
                      target_parameters=params or None)


@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("targets", [["all-linear"], ["attention"], ["mlp"], "first-two"])
def test_lora_counts_equal_peft(family, targets):
    from peft import LoraConfig, get_peft_model

    spec = spec_of(TINY[family])
    model = transformers.AutoModelForCausalLM.from_config(_config(TINY[family]))
    if targets == "first-two":
        targets = spec.linear_names()[:2]
        config = LoraConfig(r=8, lora_alpha=16, target_modules=targets)  # peft matching the names itself
    elif targets == ["all-linear"] and not spec.experts:
        config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")  # peft's own preset
    else:
        config = _lora_config(spec, targets)
    peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert spec.lora_params(targets, 8) == trainable


@pytest.mark.parametrize("family", sorted(TINY))
def test_bitsandbytes_replaces_exactly_the_quantizable_layers(family):
    import bitsandbytes as bnb

    spec = spec_of(TINY[family])
    model = _load(_saved_dir(TINY[family]), "nf4")
    quantized = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantized == {lin.name for lin in spec.linears if lin.quantizable}
    packed = sum(p.numel() for p in model.parameters() if p.dtype == torch.uint8)
    assert packed * 2 == spec.quantizable_weight_params


def _kept_per_token(model, tokens: torch.Tensor, mask: torch.Tensor) -> float:
    """Bytes autograd keeps for the second decoder layer, per token (parameters and the tensors every layer
    shares, such as rotary tables and masks, left out)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    layers = next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == 2)
    seen: list[dict[int, int]] = [{}, {}]
    handles = []
    for i, layer in enumerate(layers):
        state = {}

        def pack(t, i=i):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                seen[i][storage.data_ptr()] = storage.nbytes()
            return t

        def enter(mod, args, kwargs, state=state, pack=pack):
            state["hooks"] = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
            state["hooks"].__enter__()

        def leave(mod, args, kwargs, out, state=state):
            state["hooks"].__exit__(None, None, None)

        handles += [layer.register_forward_pre_hook(enter, with_kwargs=True),
                    layer.register_forward_hook(leave, with_kwargs=True)]
    model(input_ids=tokens, attention_mask=mask, labels=tokens)
    for h in handles:
        h.remove()
    own = {k: v for k, v in seen[1].items() if k not in seen[0]}
    return sum(own.values()) / tokens.numel()


CASES = [(f, q, d) for f in sorted(TINY) if f != "mixtral" for q in ("none", "nf4") for d in (0.0, 0.1)]
CASES += [("mixtral", "none", 0.0), ("mixtral", "nf4", 0.0)]  # peft refuses dropout on the experts


@pytest.mark.parametrize("family, quant, dropout", CASES)
def test_autograd_keeps_what_the_estimator_says(family, quant, dropout):
    from peft import get_peft_model

    config = TINY[family]
    spec = spec_of(config)
    model = _load(_saved_dir(config), quant)
    model = get_peft_model(model, _lora_config(spec, ["all-linear"], dropout))
    if quant != "none":  # what TRL 1.16 does to the trainable parameters of a quantized model
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    model.train()
    mb, seq = 2, 64
    tokens = torch.randint(3, 256, (mb, seq))
    mask = torch.ones_like(tokens)
    mask[0, seq // 2:] = 0  # a padded batch: transformers passes SDPA a mask
    measured = _kept_per_token(model, tokens, mask)
    index = {id(lin): i for i, lin in enumerate(spec.linears)}
    ctx = _Ctx(b=4, autocast=False, quantized=quant != "none", lora_bytes=2 if quant != "none" else 4,
               dropout=dropout > 0, upcast=False, targets=frozenset(index[id(lin)] for lin in spec.linears),
               attention=spec.attention, masked=True, fused_norm=False, fused_qkv_lora=False, rank=8,
               bnb_keeps_input=False, cpu=True, expert_lora=bool(spec.lora_param_targets(["all-linear"], 8)),
               weight_b=4)
    kept, _, _, per_layer = layer_bytes_per_token(spec, ctx, seq, 4)
    predicted = kept + per_layer / (mb * seq)
    # Exact (to the byte) for the Llama family; families whose partial rotary embedding or MoE routing
    # makes the CPU kernels copy tensors the CUDA kernels would keep as views are within 12%.
    assert predicted == pytest.approx(measured, rel=0.12)


def test_architectures_csv_agrees_with_the_catalog():
    hub = {"llama2-7b": "meta-llama/Llama-2-7b-hf", "llama2-13b": "meta-llama/Llama-2-13b-hf",
           "llama2-70b": "meta-llama/Llama-2-70b-hf", "llama3-8b": "meta-llama/Meta-Llama-3-8B",
           "llama3.2-1b": "meta-llama/Llama-3.2-1B", "llama3.2-3b": "meta-llama/Llama-3.2-3B",
           "mistral-7b": "mistralai/Mistral-7B-v0.1", "mixtral-8x7b": "mistralai/Mixtral-8x7B-v0.1",
           "phi-1.5": "microsoft/phi-1_5", "phi-2": "microsoft/phi-2", "phi-3-mini": "microsoft/Phi-3-mini-4k-instruct",
           "tinyllama-1.1b": "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "gemma-2b": "google/gemma-2b",
           "gemma-7b": "google/gemma-7b", "falcon-7b": "tiiuae/falcon-7b", "qwen1-1.8b": "Qwen/Qwen-1_8B",
           "qwen1-7b": "Qwen/Qwen-7B", "qwen1-14b": "Qwen/Qwen-14B"}
    with open(Path(__file__).parent / "data" / "architectures.csv", newline="") as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    for name, hub_id in hub.items():
        r, spec = rows[name], spec_of(catalog.model_config(hub_id)[0])
        assert (spec.layers, spec.hidden, spec.heads, spec.kv_heads, spec.vocab, spec.intermediate) == (
            int(r["layers"]), int(r["hidden"]), int(r["heads"]), int(r["kv_heads"]), int(r["vocab"]),
            int(r["intermediate"])), name
        if name == "falcon-7b":
            # the CSV lists it untied; tiiuae/falcon-7b's config.json has no tie_word_embeddings, so
            # FalconConfig's default (True) ties lm_head to the embeddings in transformers 5.23
            assert "tie_word_embeddings" not in catalog.model_config(hub_id)[0] and spec.tied_embeddings
            continue
        assert spec.tied_embeddings == (r["tied_embeddings"] == "true"), name


def test_the_loader_runs_gptj_with_the_attention_the_plan_counts():
    """transformers 5.24's GPT-J has an SDPA path (GPTJPreTrainedModel._supports_sdpa): the plan counts SDPA
    and the project's loader passes it, so what trains is what was planned."""
    from finetune.config import compose
    from finetune.models.loader import load_model
    from finetune.preflight import run_preflight

    spec = spec_of(TINY["gptj"])
    assert transformers.GPTJPreTrainedModel._supports_sdpa and spec.attention == "sdpa"
    cfg = compose(["+recipe=tiny-demo", f"model.name_or_path={_saved_dir(TINY['gptj'])}"])
    plan = run_preflight(cfg)
    assert plan.choices["attention"] == "sdpa"
    model = load_model(cfg.model, plan.choices, "cpu")
    assert type(model).__name__ == "GPTJForCausalLM"
    assert model.config._attn_implementation == "sdpa"


TINY_GEMMA3_TEXT = dict(model_type="gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=300, sliding_window=16,
                        max_position_embeddings=256)
TINY_SIGLIP = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, patch_size=14, image_size=56, vision_use_head=False)


def test_a_gemma3_multimodal_checkpoint_loads_its_vision_tower_quantized(tmp_path):
    """AutoModelForCausalLM on a gemma3 checkpoint builds Gemma3ForConditionalGeneration (transformers 5.24's
    MODEL_FOR_CAUSAL_LM_MAPPING): the vision tower and projector load too, and bitsandbytes quantizes the tower's
    nn.Linear layers. arch.vision_tower counts exactly that, from the catalog's flattened config."""
    import bitsandbytes as bnb

    from finetune.config import ModelConfig
    from finetune.models.loader import load_model

    text = {k: v for k, v in TINY_GEMMA3_TEXT.items() if k != "model_type"}
    hf = transformers.Gemma3Config(text_config=text, vision_config=TINY_SIGLIP, mm_tokens_per_image=4,
                                   image_token_index=299, boi_token_index=297, eoi_token_index=298)
    transformers.Gemma3ForConditionalGeneration(hf).save_pretrained(tmp_path)
    choices = {"quantization": "nf4", "double_quant": True, "compute_dtype": "fp32"}
    model = load_model(ModelConfig(name_or_path=str(tmp_path)), choices, "cpu")
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"

    flattened = {"_text_tower_of": "Gemma3ForConditionalGeneration", "_vision_config": TINY_SIGLIP, **TINY_GEMMA3_TEXT}
    params, linears = arch.vision_tower(flattened)
    tower = [(n, p) for n, p in model.named_parameters() if "vision_tower" in n or "multi_modal_projector" in n]
    assert params == sum(p.numel() for _, p in tower) - sum(p.numel() for _, p in tower if p.dtype == torch.uint8) \
        + sum(p.numel() * 2 for _, p in tower if p.dtype == torch.uint8)  # packed 4-bit: two weights a byte
    quantized = [m for n, m in model.named_modules() if "vision_tower" in n and isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == sum(k for *_, k in linears)
    assert sum(m.out_features * m.in_features for m in quantized) == sum(o * i * k for o, i, k in linears)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for n, m in model.named_modules() if "multi_modal_projector" in n)

    # LoRA goes on the language model only: text batches never reach the tower
    from peft import get_peft_model

    from finetune.config import compose
    from finetune.train import lora_config

    cfg = compose(["+recipe=tiny-demo", f"model.name_or_path={tmp_path}"])
    peft_model = get_peft_model(model, lora_config(cfg, json.loads((tmp_path / "config.json").read_text())))
    adapted = [n for n, _ in peft_model.named_parameters() if "lora_A" in n]
    assert adapted and all("language_model" in n for n in adapted), adapted

