"""The tiny models' configs, as data: what ``model.name_or_path: tiny:NAME`` is, without torch.

The preflight plans a tiny model from these dicts (config.json contents); finetune/models/tiny.py builds and
pretrains the model they describe, once, into the cache.
"""

from __future__ import annotations

from typing import Any

PREFIX = "tiny:"

# Embedding rows; the trained tokenizer may use fewer (the rest stay unused, as in many real models).
TINY_VOCAB = 2048
_COMMON: dict[str, Any] = {
    "vocab_size": TINY_VOCAB,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 3,
    "dtype": "float32",
}

# config.json contents of each tiny model (model_type selects the transformers class), one per
# family the project supports, with each family's own config field names and quirks (fused QKV,
# multi-query, parallel attention, ALiBi, partial rotary, MoE experts, tied embeddings).
# Every quantized linear layer's output width is a multiple of 32: bitsandbytes' CPU 4-bit
# inference kernel repacks weights in blocks of 32 output rows (and asserts it).
SPECS: dict[str, dict[str, Any]] = {
    "llama": {
        **_COMMON, "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
    "mistral": {
        **_COMMON, "model_type": "mistral", "architectures": ["MistralForCausalLM"],
        "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 1024, "sliding_window": 512,
        "tie_word_embeddings": False,
    },
    # Llama 3.1-3.3's rotary scaling (rope_type llama3: long wavelengths stretched by `factor`)
    "llama3": {
        **_COMMON, "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
    },
    # Mistral-Nemo's layout: head_dim set apart from hidden / heads (here 32, not 16)
    "mistral_nemo": {
        **_COMMON, "model_type": "mistral", "architectures": ["MistralForCausalLM"],
        "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 1024, "sliding_window": None,
        "tie_word_embeddings": False,
    },
    "mixtral": {
        **_COMMON, "model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
        "max_position_embeddings": 1024, "tie_word_embeddings": False,
    },
    "falcon": {  # Falcon-7B's layout: multi-query attention, parallel attention and MLP, no biases
        **_COMMON, "model_type": "falcon", "architectures": ["FalconForCausalLM"],
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "multi_query": True,
        "new_decoder_architecture": False, "parallel_attn": True, "bias": False, "alibi": False,
        "tie_word_embeddings": True,
    },
    "bloom": {  # ALiBi positions, fused QKV with biases
        **_COMMON, "model_type": "bloom", "architectures": ["BloomForCausalLM"],
        "hidden_size": 64, "n_layer": 2, "n_head": 4, "tie_word_embeddings": True,
    },
    "gptj": {  # partial rotary, parallel attention and MLP
        **_COMMON, "model_type": "gptj", "architectures": ["GPTJForCausalLM"],
        "n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8, "n_positions": 1024,
        "tie_word_embeddings": False,
    },
    "gpt_neox": {  # Pythia's layout: fused QKV, parallel residual, 25% rotary
        **_COMMON, "model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"],
        "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "rotary_pct": 0.25, "use_parallel_residual": True, "max_position_embeddings": 1024,
        "tie_word_embeddings": False,
    },
    "phi": {  # Phi-2's layout: parallel attention and MLP, partial rotary, biases
        **_COMMON, "model_type": "phi", "architectures": ["PhiForCausalLM"],
        "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "partial_rotary_factor": 0.5, "max_position_embeddings": 1024, "tie_word_embeddings": False,
    },
    "gemma": {
        **_COMMON, "model_type": "gemma", "architectures": ["GemmaForCausalLM"],
        "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 1024,
        "tie_word_embeddings": True,
    },
    "qwen2": {  # biases on q, k, v
        **_COMMON, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 1024, "tie_word_embeddings": False,
    },
    # Families without hand-written preflight rules (finetune/probes/trace.py plans them).
    "gemma2": {  # four norms per block, soft-capped attention and logits, sliding and global layers
        **_COMMON, "model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"],
        "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 512,
        "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
        "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 1024, "tie_word_embeddings": True,
    },
    "gemma3_text": {  # q/k norms, local and global rotary bases
        **_COMMON, "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"],
        "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 512,
        "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 1024, "tie_word_embeddings": True,
    },
    "qwen3": {  # q/k RMSNorm per head, no q/k/v biases
        **_COMMON, "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"],
        "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 1024, "tie_word_embeddings": False,
    },
    "qwen3_moe": {  # fused 3-D experts under a top-k router
        **_COMMON, "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"],
        "hidden_size": 64, "intermediate_size": 192, "moe_intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_experts": 4,
        "num_experts_per_tok": 2, "decoder_sparse_step": 1, "norm_topk_prob": True,
        "max_position_embeddings": 1024, "tie_word_embeddings": False,
    },
    "olmo2": {  # norms after attention and MLP, q/k norms over the full width
        **_COMMON, "model_type": "olmo2", "architectures": ["Olmo2ForCausalLM"],
        "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "max_position_embeddings": 1024, "tie_word_embeddings": False,
    },
    "gpt2": {  # Conv1D layers, fused c_attn, learned positions (nanoGPT / llm.c checkpoints)
        **_COMMON, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 1024, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
    },
    "mamba": {  # state-space mixer, no attention (x_proj's output, time_step_rank + 2 x state_size, is 64)
        **_COMMON, "model_type": "mamba", "architectures": ["MambaForCausalLM"],
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "state_size": 16,
        "time_step_rank": 32, "conv_kernel": 4, "expand": 2, "tie_word_embeddings": True,
    },
    "rwkv": {  # time mixing and channel mixing, no attention
        **_COMMON, "model_type": "rwkv", "architectures": ["RwkvForCausalLM"],
        "hidden_size": 64, "attention_hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
        "context_length": 1024, "tie_word_embeddings": False,
    },
}

def is_tiny(name_or_path: str) -> bool:
    return name_or_path.startswith(PREFIX)


def spec(name_or_path: str) -> dict[str, Any]:
    from finetune.errors import ConfigError

    name = name_or_path[len(PREFIX):]
    if name not in SPECS:
        raise ConfigError(f"model.name_or_path: no tiny model '{name}' (tiny models: "
                          f"{', '.join(PREFIX + n for n in sorted(SPECS))})")
    return dict(SPECS[name])
