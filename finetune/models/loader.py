"""Load the tokenizer and the base model the way a Plan says (4-bit NF4, 8-bit, or unquantized)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from finetune.errors import ConfigError, EnvError
from finetune.models import tiny

log = logging.getLogger(__name__)

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def resolve_path(model_cfg) -> str:
    """A loadable name: the tiny model's built directory, or the hub id / local directory as given."""
    if tiny.is_tiny(model_cfg.name_or_path):
        return str(tiny.ensure_built(model_cfg.name_or_path))
    return model_cfg.name_or_path


def base_model_dir(model_cfg) -> str:
    """The base model as a local directory: the tiny model's, a local path, or the hub snapshot that
    training downloaded (looked up in the cache only: never a network call)."""
    name = model_cfg.name_or_path
    if tiny.is_tiny(name):
        return str(tiny.ensure_built(name))
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    from huggingface_hub import snapshot_download

    return snapshot_download(name, revision=model_cfg.revision, local_files_only=True)


def ensure_pad_token(tokenizer, model_vocab_size: int | None = None) -> None:
    """Give the tokenizer a pad token distinct from EOS, so that EOS is never masked as padding.

    Keeps a distinct existing pad token; else uses UNK (what Llama recipes do); else adds
    ``<pad>`` when the embedding matrix has a spare row for it. Never resizes embeddings
    (that would put the embedding matrix into the adapter).
    """
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
        return
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id != eos:
        tokenizer.pad_token = tokenizer.unk_token
        return
    if model_vocab_size is not None and len(tokenizer) < model_vocab_size:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
        return
    raise ConfigError("model.name_or_path: the tokenizer has no pad or unk token distinct from EOS and no spare "
                      "embedding row to add one; use a tokenizer with a pad token")


def _hub_kwargs(model_cfg) -> dict[str, Any]:
    # The hub token comes from HF_TOKEN or `huggingface-cli login` through huggingface_hub itself;
    # it is never passed through (or logged by) us.
    return {"revision": model_cfg.revision, "trust_remote_code": model_cfg.trust_remote_code}


def load_tokenizer(model_cfg, model_vocab_size: int | None = None):
    from transformers import AutoTokenizer

    path = resolve_path(model_cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **_hub_kwargs(model_cfg))
    except OSError as e:
        raise _load_error(model_cfg, e) from e
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"model.name_or_path: {model_cfg.name_or_path} has no fast tokenizer "
                          "(the loss mask needs character offsets)")
    ensure_pad_token(tokenizer, model_vocab_size)
    tokenizer.padding_side = "right"
    return tokenizer


def _load_error(model_cfg, e: Exception) -> Exception:
    name = model_cfg.name_or_path
    if Path(name).expanduser().exists():
        return ConfigError(f"model.name_or_path: cannot load {name}: {str(e).splitlines()[0]}")
    return EnvError(
        f"model.name_or_path: cannot load '{name}' ({str(e).splitlines()[0]}); check the id, the network, "
        "and for gated models your access (HF_TOKEN or `huggingface-cli login`)"
    )


def quantization_config(choices: dict[str, Any]):
    """The BitsAndBytesConfig for a plan's choices, or None for an unquantized base."""
    import torch
    from transformers import BitsAndBytesConfig

    compute = getattr(torch, DTYPES[choices["compute_dtype"]])
    if choices["quantization"] == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=bool(choices["double_quant"]),
            bnb_4bit_compute_dtype=compute,
            # FSDP flattens all parameters of a wrapped layer into one tensor of one dtype: store
            # the packed 4-bit weights as that dtype (same bytes) so they can be sharded with the rest.
            bnb_4bit_quant_storage=compute if choices.get("distributed") == "fsdp" else torch.uint8,
        )
    if choices["quantization"] == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def download_size(model_cfg) -> int | None:
    """Bytes of the checkpoint a hub id would download (its parameters in its stored dtype), when the
    catalog knows the model; None otherwise."""
    from finetune.preflight import arch, catalog

    try:
        config, _ = catalog.model_config(model_cfg.name_or_path)
        params = arch.from_config(config).params_total
    except ConfigError:
        return None
    stored = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    return params * (4 if stored == "float32" else 2)


def check_disk_space(model_cfg, cache_dir: Path | None = None) -> None:
    """Before a download: is there room for the checkpoint in the Hugging Face cache?

    Checked only for hub ids that are not cached yet and whose size the catalog knows; a
    download that fills the disk halfway wastes an hour and can break other programs.
    """
    import shutil as _shutil

    from huggingface_hub import constants, try_to_load_from_cache

    name = model_cfg.name_or_path
    if tiny.is_tiny(name) or Path(name).expanduser().exists():
        return
    size = download_size(model_cfg)
    if size is None:
        return
    for index in ("model.safetensors.index.json", "model.safetensors"):
        if isinstance(try_to_load_from_cache(name, index, revision=model_cfg.revision), str):
            return  # already downloaded
    root = Path(cache_dir or constants.HF_HUB_CACHE)
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = _shutil.disk_usage(probe).free
    needed = int(size * 1.05) + (1 << 30)  # the checkpoint, 5% for the tokenizer and shard slack, 1 GiB spare
    if free < needed:
        raise EnvError(
            f"model.name_or_path: downloading {name} needs about {needed / 1e9:.0f} GB in {root}, and only "
            f"{free / 1e9:.0f} GB are free; free some space or point HF_HOME at a bigger disk"
        )


def load_model(model_cfg, choices: dict[str, Any], device: str, attention: str | None = None):
    """The frozen base model, quantized as the plan chose, on `device` ("cuda" or "cpu")."""
    import torch
    from transformers import AutoModelForCausalLM

    check_disk_space(model_cfg)
    path = resolve_path(model_cfg)
    kwargs: dict[str, Any] = dict(_hub_kwargs(model_cfg))
    kwargs["dtype"] = getattr(torch, DTYPES[choices["compute_dtype"]])
    kwargs["quantization_config"] = quantization_config(choices)
    kwargs["use_safetensors"] = True  # never unpickle weights
    if attention:
        kwargs["attn_implementation"] = attention
    if device == "cuda":
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise _load_error(model_cfg, e) from e
    model.config.use_cache = False  # no KV cache during training (it only costs memory)
    if device == "cpu":
        _keep_cpu_4bit_layout(model)
    return model


def _keep_cpu_4bit_layout(model) -> None:
    """Work around a bitsandbytes 0.50 CPU bug that silently changes a 4-bit model.

    On a CPU with AVX512-BF16, a Linear4bit repacks its weight for a fast inference kernel at its first
    no-grad forward in eval mode (block scales rounded to bf16), and state_dict() converts it back in
    place, re-quantizing the scales. After that round trip (evaluation, then saving a checkpoint or an
    adapter: peft's state dict walks the whole model) the layer computes differently: logits moved by
    ~1.3 without double quantization and ~0.05 with it on the tiny model, and training mode already
    differed from eval mode before. Keeping the plain layout costs CPU inference speed only (the tiny
    models are what runs on the CPU). tests/test_models.py fails if this is removed.
    """
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_with_adapter(model_cfg, choices: dict[str, Any], adapter_dir: Path | str, device: str):
    """Base model + a saved adapter, computing exactly as during training.

    TRL trains the LoRA weights of a quantized model in bf16; peft creates a loaded adapter's
    weights in the base layer's dtype (fp32 on the CPU) whatever ``autocast_adapter_dtype``
    says, which shifts logits by ~1e-2. Casting them back to bf16 reproduces the trained model.
    """
    import torch
    from peft import PeftModel

    base = load_model(model_cfg, choices, device)
    model = PeftModel.from_pretrained(base, str(adapter_dir), autocast_adapter_dtype=False)
    if choices["quantization"] != "none":
        for name, param in model.named_parameters():
            if "lora_" in name and "magnitude" not in name:
                param.data = param.data.to(torch.bfloat16)
    model.eval()
    return model
