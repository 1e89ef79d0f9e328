"""Run llama.cpp's own converter (convert_hf_to_gguf.py of the pinned llama.cpp) on a merged model directory.

    python -m finetune.export.convert_main <llama.cpp tree> <convert_hf_to_gguf.py arguments ...>

This is a separate process (finetune/export/llama_cpp.py starts it): the converter puts its own gguf-py first on
sys.path and configures logging for the whole interpreter. It runs the converter's own ``main`` unchanged, with
two fall-backs for tokenizers it was not written for, each logged, neither changing a file it already converts:

* a byte-level BPE tokenizer whose pre-tokenizer llama.cpp does not know *by hash* (the converter hashes the
  token ids of a test string, so any tokenizer trained from scratch — the project's tiny models, a domain
  tokenizer — is refused) gets the name of the split it is built from when that split is one llama.cpp
  implements: ByteLevel's own regex is llama.cpp's "gpt-2", a Split regex equal to a known model's is that
  model's name. Anything else is still refused;
* Gemma and Gemma 2, whose converter reads only a SentencePiece ``tokenizer.model``, read a tokenizer that exists
  only as a byte-level BPE tokenizer.json with the converter's own BPE reader (as its Gemma 3 class does).
"""

from __future__ import annotations

import json
import logging
import runpy
import sys
from pathlib import Path

log = logging.getLogger("finetune.export")

# tokenizer.ggml.pre names for pre-tokenizer Split regexes llama.cpp implements (llama-vocab.cpp), as the
# tokenizer.json files of those models spell them.
_SPLITS = {
    # Llama 3
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+"
    "|\\s+(?!\\S)|\\s+": "llama-bpe",
    # Qwen2 / Qwen3
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+"
    "|\\s+(?!\\S)|\\s+": "qwen2",
}


def known_split(model_dir: Path) -> str | None:
    """The llama.cpp pre-tokenizer a tokenizer.json is built from, judged by its structure, or None."""
    try:
        pre = json.loads((model_dir / "tokenizer.json").read_text()).get("pre_tokenizer") or {}
    except (OSError, ValueError):
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # ByteLevel's own regex is GPT-2's split
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers") or []
        splits = [p for p in parts if p.get("type") == "Split"]
        rest = [p for p in parts if p.get("type") not in ("Split", "ByteLevel")]
        if len(splits) == 1 and not rest:
            return _SPLITS.get((splits[0].get("pattern") or {}).get("Regex"))
    return None


def _is_byte_level_bpe(model_dir: Path) -> bool:
    try:
        tok = json.loads((model_dir / "tokenizer.json").read_text())
    except (OSError, ValueError):
        return False
    return (tok.get("model") or {}).get("type") == "BPE" and known_split(model_dir) is not None


def _patch(base) -> None:
    text_model = base.TextModel
    by_hash = text_model.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return by_hash(self, tokenizer)
        except NotImplementedError:
            name = known_split(Path(self.dir_model))
            if name is None:
                raise
            log.warning("llama.cpp does not know this tokenizer by its hash; its pre-tokenizer is %s's split, "
                        "written as tokenizer.ggml.pre=%s", name, name)
            return name

    text_model.get_vocab_base_pre = get_vocab_base_pre
    sentencepiece = text_model._set_vocab_sentencepiece

    def _set_vocab_sentencepiece(self, *args, **kwargs):
        model_dir = Path(self.dir_model)
        if not (model_dir / "tokenizer.model").is_file() and _is_byte_level_bpe(model_dir):
            log.warning("no tokenizer.model: the byte-level BPE tokenizer.json is converted instead")
            return self._set_vocab_gpt2()
        return sentencepiece(self, *args, **kwargs)

    text_model._set_vocab_sentencepiece = _set_vocab_sentencepiece


def main(argv: list[str]) -> None:
    tree = Path(argv[0])
    sys.path[:0] = [str(tree), str(tree / "gguf-py")]
    from conversion import base

    _patch(base)
    script = tree / "convert_hf_to_gguf.py"
    sys.argv = [str(script), *argv[1:]]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
