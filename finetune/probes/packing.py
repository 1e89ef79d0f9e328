"""What the installed transformers really does for an architecture, measured on a tiny copy of it.

A rule such as "padding-free packing is exact for Falcon" is a property of one
transformers release, not of the architecture: transformers 5.23's Falcon built its
attention mask without the position ids (packed examples attended to each other),
5.24's builds it from them. Instead of a frozen list, the answer is measured on the
installed release: a scaled-down, random-weight model of the same config class (same
model_type and structural flags, a few layers, tiny widths) runs several sequences
packed into one row exactly as TRL's padding-free collator hands them to the model,
and the same sequences alone; the logits must agree to float rounding.

Results are cached per (probe, config structure, transformers and torch versions) in
the user cache, so each architecture is measured once per installed release (~1 s).

The probe runs on the CPU in fp32 with transformers' default attention: the mask is
built by the same masking code on every device, so what it finds holds on a GPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

from finetune import versions
from finetune.paths import cached_entry, store_entry

log = logging.getLogger(__name__)

PROBE_VERSION = 1
VOCAB = 256
# Above float reassociation (~1e-7 in fp32), far below a leak (a packed example attending to the ones
# before it moves logits by ~1e-2 and more).
EXACT_TOLERANCE = 1e-4

# Dimension fields (each family's own names) set to tiny values; every other field (ALiBi, multi-query,
# parallel attention, sliding windows, rotary fractions, ...) is kept, so the probe takes the code paths
# the real model takes.
_HIDDEN = ("hidden_size", "n_embd", "n_embed", "d_model")
_HEADS = ("num_attention_heads", "n_head")
_KV_HEADS = ("num_key_value_heads", "num_kv_heads")
_INTERMEDIATE = ("intermediate_size", "n_inner", "ffn_hidden_size", "moe_intermediate_size",
                 "shared_expert_intermediate_size")
_LAYERS = ("num_hidden_layers", "n_layer")
_POSITIONS = ("max_position_embeddings", "n_positions")
_DROP = ("architectures", "auto_map", "quantization_config", "torch_dtype", "dtype", "transformers_version",
         "_name_or_path", "layer_types", "rope_scaling")


def shrink(config: dict[str, Any]) -> dict[str, Any]:
    """A tiny config of the same class and structure as `config` (a config.json dict): 2 layers, hidden 64,
    4 heads of 16, at most 4 experts, 256 tokens; structural flags kept."""
    small = {k: v for k, v in config.items() if k not in _DROP}
    heads = 4
    kv_real = next((config[k] for k in _KV_HEADS if config.get(k)), None)
    heads_real = next((config[k] for k in _HEADS if config.get(k)), heads)
    for k in _HIDDEN:
        if k in small or k == "hidden_size":
            small[k] = 64
    for k in _HEADS:
        if k in small or k == "num_attention_heads":
            small[k] = heads
    for k in _KV_HEADS:
        if k in small:
            # keep the layout: multi-query stays one head, grouped stays grouped, full stays full
            small[k] = 1 if kv_real == 1 else (2 if kv_real and kv_real < heads_real else heads)
    for k in _INTERMEDIATE:
        if k in small and small[k]:
            small[k] = 128
    for k in _LAYERS:
        if k in small or k == "num_hidden_layers":
            small[k] = 2
    for k in _POSITIONS:
        if k in small:
            small[k] = 256
    if "head_dim" in small:
        small["head_dim"] = 16
    if small.get("rotary_dim"):
        small["rotary_dim"] = 8
    if small.get("sliding_window"):
        small["sliding_window"] = 16
    if small.get("num_local_experts") or small.get("num_experts"):
        for k in ("num_local_experts", "num_experts"):
            if small.get(k):
                small[k] = 4
        small["num_experts_per_tok"] = min(int(small.get("num_experts_per_tok") or 2), 2)
    small["vocab_size"] = VOCAB
    fit_token_ids(small, VOCAB)
    return small


def fit_token_ids(small: dict[str, Any], vocab: int) -> None:
    """Special-token ids of a scaled-down config (a dict, changed in place) that fall outside its `vocab`
    entries: BOS 1, EOS 2, the others 0; in a list of ids, EOS."""
    for k in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
        if isinstance(small.get(k), int) and small[k] >= vocab:
            small[k] = {"bos_token_id": 1, "eos_token_id": 2}.get(k, 0)
        elif isinstance(small.get(k), list):
            small[k] = [t if t < vocab else 2 for t in small[k]]


@dataclass(frozen=True)
class PackingProbe:
    exact: bool
    max_diff: float
    detail: str  # what was measured, for the data report


CACHE_FILE = "capabilities.json"


def _key(name: str, small: dict[str, Any]) -> str:
    structure = json.dumps(small, sort_keys=True, default=str)
    return "|".join([name, str(PROBE_VERSION), small.get("model_type", "?"),
                     hashlib.sha256(structure.encode()).hexdigest()[:16],
                     f"transformers={versions.installed('transformers')}", f"torch={versions.installed('torch')}"])


def _cached(key: str) -> dict | None:
    return cached_entry(CACHE_FILE, key)


def _store(key: str, value: dict) -> None:
    store_entry(CACHE_FILE, key, value)


def packed_vs_separate(small: dict[str, Any]) -> float:
    """Largest logit difference between a padding-free packed row and the same sequences run alone, for a
    tiny random-weight model of config dict `small` (as :func:`shrink` makes)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    fields = dict(small)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    lengths = [7, 12, 5, 9]
    seqs = [torch.randint(4, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in lengths]
    ids = [t for s in seqs for t in s]
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(
        [{"input_ids": ids, "labels": ids, "seq_lengths": lengths}])
    batch.pop("labels")
    with torch.no_grad():
        packed = model(**batch, use_cache=False).logits[0]  # as TRL's compute_loss calls it
        separate = torch.cat([model(input_ids=torch.tensor([s]), use_cache=False).logits[0] for s in seqs])
    return float((packed - separate).abs().max())


def padding_free_packing(config: dict[str, Any]) -> PackingProbe:
    """Whether TRL's padding-free packing is exact for the architecture of `config` on the installed
    transformers (measured once per release and cached). An architecture that cannot be built here
    (remote code, no causal-LM class) is reported as not exact, with the reason."""
    small = shrink(config)
    key = _key("padding_free", small)
    hit = _cached(key)
    if hit is not None:
        return PackingProbe(**hit)
    release = f"transformers {versions.installed('transformers')}"
    try:
        diff = packed_vs_separate(small)
    except Exception as e:  # noqa: BLE001 - any failure to build or run means "not verified"
        probe = PackingProbe(False, float("nan"), f"could not be measured on {release} ({type(e).__name__}: "
                                                  f"{str(e).splitlines()[0] if str(e) else ''})")
        return probe  # not cached: the cause (a missing library, say) may go away
    exact = diff < EXACT_TOLERANCE
    detail = (f"measured on {release}: packed and separate logits agree to {diff:.1e}" if exact else
              f"measured on {release}: a packed example attends to the ones before it "
              f"(logits differ by {diff:.2g})")
    probe = PackingProbe(exact, diff, detail)
    _store(key, {"exact": probe.exact, "max_diff": probe.max_diff, "detail": probe.detail})
    return probe
