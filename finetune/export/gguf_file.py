"""One GGUF file from a merged model, with llama.cpp's own Python library (the `gguf` package).

Laid out as llama.cpp's convert_hf_to_gguf.py lays it out, so llama.cpp, Ollama and LM Studio run it, and
transformers' GGUF loader (``from_pretrained(dir, gguf_file=...)``) reads it back (tests/test_export.py
compares the logits):

* the architecture's metadata (context length, widths, heads, norm epsilon, rope base);
* tensors under gguf's tensor-name map (``get_tensor_name_map``), in the quant asked for: 2-D weights as
  bf16 / f16 / q8_0 / q4_0 (``gguf.quants``), 1-D tensors (norms, biases) in f32 as llama.cpp keeps them; a row
  that is not a whole number of quant blocks stays f16; under q4_0 the embeddings and the output layer stay
  q8_0 (llama.cpp's llama-quantize keeps them finer too: they carry most of q4's error);
* Llama's Q and K rows permuted to GGML's rotary layout (llama.cpp's LlamaModel.permute; transformers' reader
  undoes it); Gemma's norm weights stored as 1 + w (llama.cpp multiplies by the stored weight);
* the tokenizer through gguf's vocab helpers (byte-level BPE: ``BpeVocab``; Llama-2-style byte-fallback BPE:
  ``LlamaHfVocab``), one token per embedding row (unused rows as [PAD<i>]), and ``SpecialVocab`` for the
  merges, the special token ids, add_bos and the chat template.

Only what llama.cpp defines and we map is written; anything else is refused by :func:`check_supported` before
any work, in one line naming what is supported.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import ConfigError

log = logging.getLogger(__name__)

QUANTS = ("bf16", "f16", "q8_0", "q4_0", "f32")


@dataclass(frozen=True)
class Arch:
    gguf_name: str  # gguf.MODEL_ARCH member name
    permute_qk: bool = False  # llama.cpp's rotary layout for Llama-style attention
    norm_plus_one: bool = False  # Gemma's RMSNorm multiplies by (1 + w)
    readable_by_transformers: bool = True  # transformers' GGUF loader reads the architecture back


# transformers model_type -> how llama.cpp stores it. Mistral is llama.cpp's "llama" (as its converter writes it;
# transformers then reads it back as a Llama, which has no sliding window: exact below the window).
ARCHS: dict[str, Arch] = {
    "llama": Arch("LLAMA", permute_qk=True),
    "mistral": Arch("LLAMA", permute_qk=True),
    "qwen2": Arch("QWEN2"),
    "gemma": Arch("GEMMA", norm_plus_one=True, readable_by_transformers=False),
}


def check_supported(config: dict[str, Any]) -> Arch:
    """The GGUF architecture for a config.json, or ConfigError naming the supported ones."""
    model_type = config.get("model_type")
    arch = ARCHS.get(model_type)
    if arch is None:
        raise ConfigError(f"GGUF export: {model_type!r} models are not supported (supported: "
                          f"{', '.join(sorted(ARCHS))}); finetune-merge writes a safetensors model of any architecture")
    if model_type in ("llama", "mistral") and (config.get("attention_bias") or config.get("mlp_bias")):
        raise ConfigError(f"GGUF export: this {model_type} has attention or MLP biases, which llama.cpp's llama "
                          "architecture has no place for")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", None):
        raise ConfigError(f"GGUF export: rope scaling {kind!r} is not written yet (only the default rotary "
                          "embedding); finetune-merge writes a safetensors model")
    return arch


def _gguf():
    try:
        import gguf
    except ImportError as e:
        from finetune.errors import EnvError

        raise EnvError("GGUF export needs the gguf package (llama.cpp's Python library): pip install gguf, or "
                       "make install") from e
    return gguf


def tensor_type(gguf, name: str, shape: tuple[int, ...], quant: str):
    """The GGML type a tensor is written in under `quant`."""
    qt = gguf.GGMLQuantizationType
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return qt.F32
    want = {"f32": qt.F32, "f16": qt.F16, "bf16": qt.BF16, "q8_0": qt.Q8_0, "q4_0": qt.Q4_0}[quant]
    if want == qt.Q4_0 and name in ("token_embd.weight", "output.weight"):
        want = qt.Q8_0
    if want in (qt.Q8_0, qt.Q4_0) and shape[-1] % gguf.GGML_QUANT_SIZES[want][0]:
        return qt.F16
    return want


def estimated_bytes(state: dict[str, Any], quant: str, tensor_names: dict[str, str]) -> int:
    """What the file will take on disk (tensor data; the metadata is small)."""
    gguf = _gguf()
    total = 0
    for hf_name, t in state.items():
        name = tensor_names.get(hf_name)
        if name is None:
            continue
        qtype = tensor_type(gguf, name, tuple(t.shape), quant)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        total += t.numel() // block * size
    return total


def tensor_names(config: dict[str, Any], state: dict[str, Any]) -> dict[str, str]:
    """HF parameter name -> GGUF tensor name, for every tensor written (tied and buffer entries left out)."""
    gguf = _gguf()
    arch = check_supported(config)
    tmap = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.gguf_name), config["num_hidden_layers"])
    names = {}
    for hf_name in state:
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        if hf_name == "lm_head.weight" and _tied(config, state):
            continue
        new = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ConfigError(f"GGUF export: no GGUF tensor for {hf_name} in llama.cpp's {arch.gguf_name.lower()} "
                              "layout")
        names[hf_name] = new
    return names


def _tied(config: dict[str, Any], state: dict[str, Any]) -> bool:
    if "lm_head.weight" not in state:
        return True
    embed = state.get("model.embed_tokens.weight")
    return bool(config.get("tie_word_embeddings")) or (
        embed is not None and embed.data_ptr() == state["lm_head.weight"].data_ptr())


def _permute(w, n_head: int):
    """llama.cpp's LlamaModel.permute: HF's rotate-half row order of Q / K -> GGML's interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _pre_tokenizer(tokenizer_json: dict[str, Any]) -> str:
    """tokenizer.ggml.pre for a byte-level BPE tokenizer: the split llama.cpp (and transformers' reader) names."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # ByteLevel's own regex is GPT-2's split
    if pre.get("type") == "Sequence":
        splits = [p for p in pre.get("pretokenizers", []) if p.get("type") == "Split"]
        if len(splits) == 1:
            regex = splits[0].get("pattern", {}).get("Regex")
            try:
                from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
            except ImportError:  # another transformers layout: llama.cpp's default split
                return "default"
            for name, known in GGUF_PRE_TOKENIZER_SPLITS.items():
                if known == regex:
                    return name
    return "default"


def _add_tokenizer(gguf, writer, tokenizer_dir: Path, vocab_size: int) -> None:
    try:
        vocab = gguf.vocab.BpeVocab(tokenizer_dir)
        model, pre = "gpt2", _pre_tokenizer(json.loads((tokenizer_dir / "tokenizer.json").read_text()))
    except (FileNotFoundError, KeyError, ValueError):
        try:
            vocab = gguf.vocab.LlamaHfVocab(tokenizer_dir)
            model, pre = "llama", "default"
        except (FileNotFoundError, TypeError, ValueError) as e:
            raise ConfigError("GGUF export: the tokenizer is neither a byte-level BPE (GPT-2 / Llama 3 / Qwen style) "
                              "nor a byte-fallback BPE (Llama 2 / Mistral style) tokenizer.json; gguf's vocab helpers "
                              "cover those") from e
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text.decode("utf-8") if isinstance(text, bytes) else text)
        scores.append(score)
        types.append(kind)
    if len(tokens) > vocab_size:
        raise ConfigError(f"GGUF export: the tokenizer has {len(tokens)} tokens, more than the model's "
                          f"{vocab_size} embedding rows")
    for i in range(len(tokens), vocab_size):  # llama.cpp wants one token per embedding row
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if model == "llama":
        writer.add_token_scores(scores)
    # merges, bos / eos / unk / pad ids, add_bos_token (from the post-processor), the chat template
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=model == "gpt2", n_vocab=vocab_size)
    special.add_to_gguf(writer, quiet=True)


def write(path: Path, config: dict[str, Any], state: dict[str, Any], tokenizer_dir: Path, quant: str,
          name: str, progress=None, eot_id: int | None = None) -> None:
    """Write the GGUF of `state` (the merged model's state dict) to `path`; `tokenizer_dir` holds the tokenizer's
    files with its chat template and the model's config.json. `progress(done, total)` after each tensor.
    `eot_id`: the chat template's end-of-turn token, written as tokenizer.ggml.eot_token_id (llama.cpp stops
    there as at EOS)."""
    import numpy as np
    import torch

    gguf = _gguf()
    logging.getLogger("gguf.vocab").setLevel(logging.ERROR)  # "Unknown separator token" for a BOS-only pair rule
    arch = check_supported(config)
    names = tensor_names(config, state)
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // n_head
    vocab_size = config["vocab_size"]

    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch.gguf_name)])
    try:
        # general.name becomes the reloaded config's name; transformers treats exactly "mistral" as the
        # architecture's name (and has no tensor map for it), so it is never that
        writer.add_name(name if name.lower() != "mistral" else f"{name}-finetuned")
        file_type = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
                     "q4_0": "MOSTLY_Q4_0"}[quant]
        writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_vocab_size(vocab_size)
        writer.add_context_length(config.get("max_position_embeddings", 2048))
        writer.add_embedding_length(hidden)
        writer.add_block_count(config["num_hidden_layers"])
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
        rope = config.get("rope_parameters") or {}
        writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
        writer.add_rope_dimension_count(head_dim)
        if arch.gguf_name == "GEMMA":
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        _add_tokenizer(gguf, writer, tokenizer_dir, vocab_size)
        if eot_id is not None and 0 <= eot_id < vocab_size:
            writer.add_eot_token_id(eot_id)

        for i, (hf_name, new) in enumerate(names.items()):
            t = state[hf_name].detach().to(device="cpu", dtype=torch.float32)
            if arch.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                t = _permute(t, n_head)
            elif arch.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                t = _permute(t, n_kv)
            if arch.norm_plus_one and new.endswith("_norm.weight"):
                t = t + 1
            data = t.numpy()
            qtype = tensor_type(gguf, new, data.shape, quant)
            encoded = gguf.quants.quantize(data.astype(np.float32), qtype)
            writer.add_tensor(new, encoded, raw_dtype=qtype if encoded.dtype == np.uint8 else None)
            if progress is not None:
                progress(i + 1, len(names))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
