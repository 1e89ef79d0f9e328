"""Load the tokenizer and the base model the way a Plan says (4-bit NF4, 8-bit, or unquantized)."""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from finetune.architectures.tiny import is_tiny
from finetune.errors import ConfigError, EnvError
from finetune.models import tiny

log = logging.getLogger(__name__)

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# plan.json's choices.attention -> transformers' attn_implementation
ATTENTION = {"sdpa": "sdpa", "eager": "eager", "flash2": "flash_attention_2", "flash_attention_2": "flash_attention_2"}

# Files a tokenizer is read from, by the tokenizer classes of transformers (tokenizer.json first).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tekken.json", "vocab.json", "vocab.txt", "merges.txt",
                   "spiece.model", "sentencepiece.bpe.model")
# The pip package behind a module that loading a model or tokenizer may import.
PIP_PACKAGES = {"sentencepiece": "sentencepiece", "google": "protobuf", "tiktoken": "tiktoken",
                "blobfile": "blobfile", "bitsandbytes": "bitsandbytes", "accelerate": "accelerate",
                "mistral_common": "mistral-common"}
# What transformers needs to read a SentencePiece tokenizer.model: (module, pip package).
SENTENCEPIECE_NEEDS = (("sentencepiece", "sentencepiece"), ("google.protobuf", "protobuf"))


def resolve_path(model_cfg) -> str:
    """A loadable name: the tiny model's built directory, or the hub id / local directory as given."""
    if is_tiny(model_cfg.name_or_path):
        return str(tiny.ensure_built(model_cfg.name_or_path))
    return model_cfg.name_or_path


def base_model_dir(model_cfg) -> str:
    """The base model as a local directory: the tiny model's, a local path, or the hub snapshot that
    training downloaded (looked up in the cache only: never a network call)."""
    name = model_cfg.name_or_path
    if is_tiny(name):
        return str(tiny.ensure_built(name))
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    from huggingface_hub import snapshot_download

    return snapshot_download(name, revision=model_cfg.revision, local_files_only=True)


# Names a tokenizer gives a token made for padding (normalized: lowercase, no <>|[]_▁ and fullwidth bars):
# <pad>, [PAD], <|pad|>, <|finetune_right_pad_id|> (Llama 3.1-3.3), <｜▁pad▁｜> (DeepSeek).
PAD_NAMES = frozenset({"pad", "padding", "finetunerightpadid", "padtoken"})
# Reserved tokens made to be repurposed: <|reserved_special_token_N|> (Llama 3), <｜place▁holder▁no▁N｜>
# (DeepSeek), <unusedN> (Gemma), [unusedN] (BERT).
RESERVED = re.compile(r"reserved|placeholder|^unused\d*$")


def _normalized(token: str) -> str:
    return re.sub(r"[<>|\[\]_\u2581\uff5c\s]", "", token).lower()


def _declared_pad(config: dict[str, Any] | None) -> int | None:
    """pad_token_id from config.json or generation_config.json (first of a list)."""
    for cfg in (config or {}), (config or {}).get("_generation_config") or {}:
        value = cfg.get("pad_token_id")
        if isinstance(value, list) and value:
            value = value[0]
        if _single_id(value) is not None:
            return value
    return None


def end_tokens(tokenizer) -> set[int]:
    """Ids pad must never be: EOS, BOS, and every added token the chat template writes (its end-of-turn
    token among them: <|eot_id|>, <|im_end|>, <end_of_turn> ...)."""
    out = {t for t in (tokenizer.eos_token_id, tokenizer.bos_token_id) if t is not None}
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = " ".join(v for v in template.values() if isinstance(v, str))
    if isinstance(template, str) and template:
        for token, index in tokenizer.added_tokens_encoder.items():
            if token.strip() and token in template:
                out.add(index)
    return out


def ensure_pad_token(tokenizer, model_vocab_size: int | None = None, config: dict[str, Any] | None = None,
                     chat_template: str | None = None) -> str | None:
    """Give the tokenizer a pad token that is not an end token, so that EOS (or the end of a turn) is never
    masked as padding; never by resizing the embeddings (that would put them into the adapter).

    In this order: a distinct existing pad; the model's own declared pad (``pad_token_id`` in config.json or
    generation_config.json, when it names a special token), or a token named for padding (``<|finetune_right_pad_id|>``, ``<pad>``, ...);
    UNK; an unused reserved special token (``<|reserved_special_token_0|>``, ...) that lies inside the
    embedding matrix; ``<pad>`` added when the matrix has a spare row. Never EOS, BOS, or a token the chat
    template writes (`chat_template`: the template training uses, when it is not the tokenizer's own).
    The data stage checks that the chosen pad occurs in no prepared example. Returns the line that says
    what was chosen (None when the tokenizer's own pad is kept).
    """
    avoid = end_tokens(tokenizer)
    if chat_template:
        avoid |= {i for t, i in tokenizer.added_tokens_encoder.items() if t.strip() and t in chat_template}
    rows = model_vocab_size or _single_id((config or {}).get("vocab_size")) or len(tokenizer)
    size = len(tokenizer)

    def usable(index: int | None) -> bool:
        return index is not None and 0 <= index < min(rows, size) and index not in avoid

    had = tokenizer.pad_token
    if tokenizer.pad_token_id is not None and usable(tokenizer.pad_token_id):
        return None
    was = f"the tokenizer's pad token {had!r} is one the model learns (BOS, EOS or the end of a turn)" if had is not None else "the tokenizer has no pad token"

    def use(index: int, why: str) -> str:
        token = tokenizer.convert_ids_to_tokens(index)
        tokenizer.pad_token = token
        return f"{was}; pad is {token!r} (id {index}), {why}"

    declared = _declared_pad(config)
    # only a special token: a config's pad_token_id that names an ordinary piece (a byte, a word) is a slip
    if usable(declared) and declared in tokenizer.added_tokens_decoder:
        return use(declared, "the model's own pad_token_id")
    added = sorted(tokenizer.added_tokens_encoder.items(), key=lambda kv: kv[1])
    for token, index in added:
        if _normalized(token) in PAD_NAMES and usable(index):
            return use(index, "a token the tokenizer has for padding")
    if usable(tokenizer.unk_token_id):
        return use(tokenizer.unk_token_id, "the unknown token")
    for token, index in added:
        if RESERVED.search(_normalized(token)) and usable(index):
            tokenizer.finetune_pad_unused = index  # the data stage checks that no prepared example holds it
            return use(index, "an unused reserved special token inside the embedding matrix (checked to occur "
                              "in no prepared example)")
    if model_vocab_size is not None and size < model_vocab_size:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
        return f"{was}; added <pad> (id {tokenizer.pad_token_id}) in a spare embedding row"
    raise ConfigError("model.name_or_path: the tokenizer has no pad token that is not an end token, no UNK, no unused "
                      "reserved token and no spare embedding row to add one; set pad_token in its "
                      "tokenizer_config.json to a token the model never produces")


def _hub_kwargs(model_cfg) -> dict[str, Any]:
    # The hub token comes from HF_TOKEN or `huggingface-cli login` through huggingface_hub itself;
    # it is never passed through (or logged by) us.
    return {"revision": model_cfg.revision, "trust_remote_code": model_cfg.trust_remote_code}


def local_model_dir(model_cfg) -> Path | None:
    """The model's local directory (the tiny model's build or a local path), or None for a hub id.

    A local path that does not exist is a ConfigError, the same one the preflight gives."""
    from finetune.architectures import catalog

    if is_tiny(model_cfg.name_or_path):
        return tiny.ensure_built(model_cfg.name_or_path)
    return catalog.local_dir(model_cfg.name_or_path)


def load_tokenizer(model_cfg, model_vocab_size: int | None = None, template: str | None = None):
    """The model's fast tokenizer, with a pad token that is no end token (:func:`ensure_pad_token`) and right
    padding. `template`: the Jinja of the chat template training will use, when it is not the tokenizer's own.

    A local directory is checked first, so that what transformers would report as a traceback
    (or, for some broken files, not at all) is one line naming the file: see :func:`check_tokenizer_files`.
    """
    local = local_model_dir(model_cfg)
    overrides: dict[str, str | None] = {}
    fixes: list[str] = []
    if local is not None:
        check_tokenizer_files(local)
        overrides, fixes = empty_special_tokens(local)
    from transformers import AutoTokenizer

    # an empty special token is replaced as it is read (the user's files are left as they are)
    given = {key: token for key, token in overrides.items() if token is not None}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(local or model_cfg.name_or_path), **_hub_kwargs(model_cfg),
                                                  **given)
    except Exception as e:
        error = _tokenizer_error(model_cfg, local, e)
        if error is None:
            raise
        raise error from e
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"model.name_or_path: {model_cfg.name_or_path} has no fast tokenizer "
                          "(the loss mask needs character offsets)")
    for key, token in overrides.items():
        if token is None and getattr(tokenizer, key, None) == "":
            setattr(tokenizer, key, None)  # an empty pad_token: none declared (ensure_pad_token chooses one)
    config = _model_config_or_none(model_cfg, local)
    fixes += fix_special_tokens(tokenizer, config, str(local or model_cfg.name_or_path))
    if local is not None and config is not None and (local / "generation_config.json").is_file():
        try:
            config = {**config, "_generation_config": json.loads((local / "generation_config.json").read_text())}
        except (OSError, ValueError):
            pass
    pad = ensure_pad_token(tokenizer, model_vocab_size, config, template)
    if pad is not None:
        fixes.append(pad)
    check_pad_token(tokenizer, str(local or model_cfg.name_or_path))
    for line in fixes:
        log.warning("tokenizer: %s", line)
    tokenizer.finetune_fixes = fixes  # the data report records them (data_prep.prepare)
    tokenizer.padding_side = "right"
    return tokenizer


def _model_config_or_none(model_cfg, local: Path | None) -> dict[str, Any] | None:
    """The model's config.json (local directory, tiny model or catalog), or None when only the hub has it."""
    from finetune.architectures import catalog

    try:
        return catalog.model_config(str(local) if local is not None and not is_tiny(model_cfg.name_or_path)
                                    else model_cfg.name_or_path)[0]
    except ConfigError:
        return None


def _single_id(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _special_files(where: str) -> str:
    return f"{where}/tokenizer_config.json (and special_tokens_map.json)"


def fix_special_tokens(tokenizer, config: dict[str, Any] | None, where: str) -> list[str]:
    """Check the special tokens the chat templates and the text format rely on; fix what is unambiguous.

    Returns one line per fix (logged, and recorded in the data report); raises ConfigError naming the file
    to fix where the right token cannot be told. The case this exists for: early conversions of Meta's
    Llama (tokenizer_class LLaMATokenizer) list ``</s>`` as BOS, EOS and UNK, and transformers' generic
    tokenizer for a bare tokenizer.model adds no BOS; every chat example would then start with ``</s>``
    and text documents would get no BOS at all, silently.

    * BOS equal to EOS although config.json gives them distinct ids: BOS becomes the token at config.json's
      ``bos_token_id`` (a model that uses no BOS, such as Qwen, has no bos_token and is left alone);
    * UNK equal to EOS or BOS while the tokenizer's own model has a distinct unknown piece: UNK becomes it;
    * a BOS distinct from EOS that config.json declares but the tokenizer does not add to a text: the
      tokenizer adds it (documents of ``dataset.format: text`` start with BOS, as the model was trained).
    """
    fixes: list[str] = []
    config = config or {}
    cfg_bos, cfg_eos = _single_id(config.get("bos_token_id")), _single_id(config.get("eos_token_id"))
    size = len(tokenizer)

    def token_at(i: int | None) -> str | None:
        return tokenizer.convert_ids_to_tokens(i) if i is not None and 0 <= i < size else None

    eos = tokenizer.eos_token_id
    if tokenizer.bos_token_id is not None and tokenizer.bos_token_id == eos and cfg_bos is not None \
            and cfg_eos is not None and cfg_bos != cfg_eos:
        right = token_at(cfg_bos)
        if right is None or right == tokenizer.eos_token:
            raise ConfigError(f"model.name_or_path: {_special_files(where)} names {tokenizer.bos_token!r} as both "
                              f"BOS and EOS, but config.json gives BOS id {cfg_bos}, which the tokenizer does not "
                              "have; set bos_token to the model's BOS token there")
        fixes.append(f"bos_token was {tokenizer.bos_token!r}, the same as eos_token, in {_special_files(where)}; "
                     f"using {right!r} (config.json bos_token_id {cfg_bos})")
        tokenizer.bos_token = right

    model_unk = getattr(getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None), "unk_token", None)
    if tokenizer.unk_token is not None and tokenizer.unk_token in (tokenizer.eos_token, tokenizer.bos_token) \
            and isinstance(model_unk, str) and model_unk not in (tokenizer.unk_token, "") \
            and tokenizer.convert_tokens_to_ids(model_unk) is not None:
        fixes.append(f"unk_token was {tokenizer.unk_token!r}, a token the model is trained on, in "
                     f"{_special_files(where)}; using the tokenizer model's own unknown piece {model_unk!r}")
        tokenizer.unk_token = model_unk

    bos = tokenizer.bos_token_id
    if bos is not None and bos != tokenizer.eos_token_id and bos == cfg_bos:
        ids = tokenizer("a").input_ids
        if not ids or ids[0] != bos:
            _add_bos(tokenizer)
            if tokenizer("a").input_ids[:1] != [bos]:
                raise ConfigError(f"model.name_or_path: the tokenizer of {where} does not add its BOS "
                                  f"{tokenizer.bos_token!r} to a text, and it could not be made to; set "
                                  "add_bos_token: true in its tokenizer_config.json")
            fixes.append(f"the tokenizer added no BOS to a text although config.json declares BOS "
                         f"{tokenizer.bos_token!r} (id {bos}); it now adds it, so text documents start with BOS")
    return fixes


def _add_bos(tokenizer) -> None:
    """Make a fast tokenizer put BOS before every text (what Llama's own tokenizer does)."""
    from tokenizers import processors

    bos = tokenizer.bos_token
    # Llama's own template: "<s> $A" for one text, "<s> $A <s> $B" for a pair
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_token_id)])
    if hasattr(tokenizer, "add_bos_token"):
        try:
            tokenizer.add_bos_token = True
        except (AttributeError, ValueError):
            pass


def check_pad_token(tokenizer, where: str) -> None:
    """The pad token is masked out of the loss: it must not be a token the model learns (EOS, BOS)."""
    pad = tokenizer.pad_token_id
    if pad is not None and pad in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        which = "EOS" if pad == tokenizer.eos_token_id else "BOS"
        raise ConfigError(f"model.name_or_path: the pad token of {where} is {tokenizer.pad_token!r}, the same as "
                          f"{which}, which training would then mask out of the loss; set pad_token in "
                          f"{_special_files(where)} to a token the model never learns (or remove it)")


def _load_error(model_cfg, e: Exception) -> Exception:
    name = model_cfg.name_or_path
    if Path(name).expanduser().exists():
        return ConfigError(f"model.name_or_path: cannot load {name}: {_first_line(e)}")
    return EnvError(
        f"model.name_or_path: cannot load '{name}' ({_first_line(e)}); check the id, the network, "
        "and for gated models your access (HF_TOKEN or `huggingface-cli login`)"
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _not_installed(needs: tuple[tuple[str, str], ...]) -> list[str]:
    return [package for module, package in needs if not _importable(module)]


def _missing_package(e: BaseException) -> str | None:
    """The pip package whose absence caused `e` (an ImportError in its chain), if we know it."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, ImportError):
            module = (x.name or "").split(".")[0]
            if module in PIP_PACKAGES:
                return PIP_PACKAGES[module]
            # transformers' requires_backends: "... requires the protobuf library but it was not found ..."
            m = re.search(r"requires the (\w+) library", str(x))
            if m and m.group(1).lower() in PIP_PACKAGES.values():
                return m.group(1).lower()
        todo += [x.__cause__, x.__context__]
    return None


def _pip_error(name: str, what: str, packages: str) -> EnvError:
    return EnvError(f"model.name_or_path: loading the {what} of {name} needs {' and '.join(packages.split())}, "
                    f"which {'is' if ' ' not in packages else 'are'} not installed: pip install {packages}")


def _library_error(name: str, what: str, e: ImportError) -> EnvError:
    return EnvError(f"model.name_or_path: loading the {what} of {name} needs a library that is missing or too old "
                    f"({_first_line(e)})")


def _is_tiktoken(file: Path) -> bool:
    """Whether a tokenizer.model is a tiktoken vocabulary (text lines "base64 rank", as Llama 3 ships) rather
    than a SentencePiece model (binary protobuf)."""
    with file.open("rb") as f:
        return re.fullmatch(rb"[A-Za-z0-9+/]+=* \d+\r?\n?", f.readline(256)) is not None


def check_tokenizer_files(local: Path) -> None:
    """What a local directory's tokenizer is read from, checked before transformers reads it.

    * config.json (transformers reads it to choose the tokenizer class): the preflight's own check;
    * tokenizer_config.json, special_tokens_map.json: JSON objects (a special token that is an empty
      string is replaced as the tokenizer is read: see :func:`empty_special_tokens`);
    * a SentencePiece tokenizer.model with no tokenizer.json beside it (how Meta's original Llama
      checkpoints ship): sentencepiece and protobuf are installed (without them transformers falls
      back to reading the file as tiktoken and fails with "tiktoken is required"), and sentencepiece
      reads the file (transformers' own parser accepts a truncated file and yields a tokenizer of
      a few tokens, which would turn every text into <unk>); a tiktoken tokenizer.model (Llama 3's
      original checkpoints): tiktoken is installed.
    """
    from finetune.architectures import catalog

    if (local / "config.json").is_file():
        catalog.read_local_config(local)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (local / name).is_file():
            _read_tokenizer_json(local, name)
    sp_model = local / "tokenizer.model"
    if not sp_model.is_file() or (local / "tokenizer.json").is_file():
        return
    if _is_tiktoken(sp_model):
        if not _importable("tiktoken"):
            raise EnvError(f"model.name_or_path: {sp_model} is a tiktoken vocabulary (with no tokenizer.json beside "
                           "it), and reading it needs tiktoken, which is not installed: pip install tiktoken")
        return
    missing = _not_installed(SENTENCEPIECE_NEEDS)
    if missing:
        raise EnvError(f"model.name_or_path: {sp_model} is a SentencePiece tokenizer (with no tokenizer.json "
                       f"beside it), and reading it needs {' and '.join(missing)}, which "
                       f"{'is' if len(missing) == 1 else 'are'} not installed: pip install {' '.join(missing)}")
    import sentencepiece

    try:
        sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
    except (RuntimeError, OSError) as e:
        raise ConfigError(f"model.name_or_path: {sp_model} is not a readable SentencePiece model "
                          f"({_first_line(e)}); it is truncated or corrupt: download it again "
                          f"(huggingface-cli download ID tokenizer.model --local-dir {local})") from e


def _read_tokenizer_json(local: Path, name: str) -> dict[str, Any]:
    from finetune.architectures import catalog

    return catalog.read_json_object(local / name, f"download it again (huggingface-cli download ID {name} "
                                                  f"--local-dir {local}) or fix it")


# The special tokens an empty string can stand for, and Llama's own (what the error asks to set).
EMPTY_FIXABLE = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None}


class _Vocabulary:
    """What a local tokenizer's vocabulary says about an id, read without transformers: tokenizer.json (what
    transformers reads first), else a SentencePiece tokenizer.model."""

    def __init__(self, source: Path, pieces: dict[int, str], special: set[int], unk_id: int | None,
                 declared: dict[str, int]):
        self.source, self.pieces, self.special, self.unk_id = source, pieces, special, unk_id
        self.declared = declared  # bos_token/eos_token -> id, where the tokenizer model itself names them

    @classmethod
    def read(cls, local: Path) -> _Vocabulary | None:
        if (local / "tokenizer.json").is_file():
            data = _read_tokenizer_json(local, "tokenizer.json")
            model = data.get("model") if isinstance(data.get("model"), dict) else {}
            vocab = model.get("vocab")
            pieces: dict[int, str] = {}
            if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel: piece -> id
                pieces = {i: str(p) for p, i in vocab.items() if _single_id(i) is not None}
            elif isinstance(vocab, list):  # Unigram: [piece, score], by id
                pieces = {i: str(e[0]) for i, e in enumerate(vocab) if isinstance(e, list) and e}
            special: set[int] = set()
            for added in data.get("added_tokens") or []:
                if isinstance(added, dict) and _single_id(added.get("id")) is not None:
                    pieces[added["id"]] = str(added.get("content"))
                    if added.get("special"):
                        special.add(added["id"])
            unk_id = _single_id(model.get("unk_id"))
            if unk_id is None and isinstance(model.get("unk_token"), str):
                unk_id = next((i for i, p in pieces.items() if p == model["unk_token"]), None)
            return cls(local / "tokenizer.json", pieces, special | ({unk_id} - {None}), unk_id, {})
        sp_model = local / "tokenizer.model"
        if not sp_model.is_file() or _is_tiktoken(sp_model):
            return None
        import sentencepiece  # check_tokenizer_files made sure it is installed and reads the file

        sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
        size = sp.get_piece_size()
        pieces = {i: sp.id_to_piece(i) for i in range(size)}
        special = {i for i in range(size) if sp.is_control(i) or sp.is_unknown(i)}
        unk = sp.unk_id()
        declared = {key: i for key, i in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()))
                    if 0 <= i < size and sp.is_control(i)}
        return cls(sp_model, pieces, special, unk if 0 <= unk < size and sp.is_unknown(unk) else None, declared)


def _empty(value: Any) -> bool:
    return (value.get("content") if isinstance(value, dict) else value) == ""


def empty_special_tokens(local: Path) -> tuple[dict[str, str | None], list[str]]:
    """Special tokens that a local directory's tokenizer_config.json or special_tokens_map.json sets to an empty
    string (``""`` or ``{"content": ""}``), as early LLaMATokenizer conversions of Meta's Llama did: what each
    one is, told unambiguously from the model's own files, and one line per fix (logged, and recorded in the
    data report's ``tokenizer_fixes``). Left as they are, ``"unk_token": ""`` makes transformers 5 recurse until
    RecursionError, and ``"eos_token": ""`` silently makes EOS the unknown token.

    Returns ({key: token}, lines): load_tokenizer passes the tokens to transformers, so the user's files are
    never changed. BOS and EOS are the tokens at config.json's ``bos_token_id`` / ``eos_token_id``, which must
    be special tokens of the vocabulary (and, for a SentencePiece tokenizer.model, its own BOS / EOS: the
    first conversions' config.json said bos_token_id 0, which is ``<unk>``); UNK is the unknown piece of the
    tokenizer model; PAD the special token at config.json's ``pad_token_id``, else none (the tokenizer then has
    no pad, and :func:`ensure_pad_token` chooses one: None in the dict). Where the token cannot be told, a
    ConfigError names the file, the key and what to set it to.
    """
    from finetune.architectures import catalog

    empties: list[tuple[Path, str]] = []
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (local / name).is_file():
            data = _read_tokenizer_json(local, name)
            empties += [(local / name, key) for key in EMPTY_FIXABLE if _empty(data.get(key))]
    if not empties:
        return {}, []
    config = catalog.read_local_config(local) if (local / "config.json").is_file() else {}
    vocab = _Vocabulary.read(local)
    resolved: dict[str, tuple[str | None, str]] = {}
    lines = []
    for file, key in empties:
        if key not in resolved:
            resolved[key] = _resolve_empty(key, file, local, config, vocab)
        token, why = resolved[key]
        shown = json.dumps(token, ensure_ascii=False) if token is not None else "none"
        lines.append(f'{file}: {key} "" -> {shown} ({why})')
    return {key: token for key, (token, _) in resolved.items()}, lines


def _resolve_empty(key: str, file: Path, local: Path, config: dict[str, Any],
                   vocab: _Vocabulary | None) -> tuple[str | None, str]:
    """(the token an empty `key` stands for, why); for pad_token, (None, why) when there is none to tell."""
    cfg = local / "config.json"
    id_key = f"{key}_id"
    value = config.get(id_key)
    index = _single_id(value[0] if key == "pad_token" and isinstance(value, list) and value else value)

    def unfixable(reason: str) -> ConfigError:
        own = vocab.pieces.get(vocab.declared[key]) if vocab is not None and key in vocab.declared else None
        hint = (f"{vocab.source.name}'s {key[:-6].upper()} is {json.dumps(own, ensure_ascii=False)}" if own
                else f"Llama's: {key} {json.dumps(EMPTY_FIXABLE[key])}")
        return ConfigError(f"model.name_or_path: {file} sets {key} to an empty string (old LLaMATokenizer "
                           f"conversions did), and {reason}; set it to the token itself ({hint}) or remove the key")

    if vocab is None:
        if key == "pad_token":
            return None, "no vocabulary to check a pad_token_id against; the pad is chosen as for a tokenizer without one"
        raise unfixable(f"{local} has no tokenizer.json or SentencePiece tokenizer.model to tell the token by")
    if key == "unk_token":
        if vocab.unk_id is None or vocab.unk_id not in vocab.pieces:
            raise unfixable(f"the tokenizer model ({vocab.source}) has no unknown piece")
        return vocab.pieces[vocab.unk_id], f"the unknown piece of {vocab.source.name}, id {vocab.unk_id}"
    piece = vocab.pieces.get(index) if index is not None else None
    if key == "pad_token":
        if piece is None or index not in vocab.special or index in (_single_id(config.get("bos_token_id")),
                                                                    _single_id(config.get("eos_token_id"))):
            said = (f"config.json has no {id_key}" if index is None else
                    f"config.json {id_key} {index} is not in the vocabulary" if piece is None else
                    f"config.json {id_key} {index} is {json.dumps(piece, ensure_ascii=False)}, "
                    + ("not a special token" if index not in vocab.special else "BOS or EOS"))
            return None, f"{said}; the pad is chosen as for a tokenizer without one"
        return piece, f"config.json {id_key} {index}"
    if index is None:
        raise unfixable(f"{cfg} has no {id_key} to tell the token by" if value is None else
                        f"{cfg} gives {id_key} {json.dumps(value)}, not one id")
    if piece is None:
        raise unfixable(f"{cfg}'s {id_key} {index} is not in the tokenizer's vocabulary ({vocab.source}, "
                        f"{len(vocab.pieces)} tokens)")
    own = vocab.declared.get(key)
    if own is not None and own != index:
        raise unfixable(f"{cfg}'s {id_key} {index} ({json.dumps(piece, ensure_ascii=False)}) is not the "
                        f"{key[:-6].upper()} of {vocab.source} (id {own})")
    if index not in vocab.special or index == vocab.unk_id:
        raise unfixable(f"{cfg}'s {id_key} {index} is {json.dumps(piece, ensure_ascii=False)}, "
                        + ("the unknown token" if index == vocab.unk_id else "not a special token of the vocabulary"))
    return piece, f"config.json {id_key} {index}"


def _tokenizer_error(model_cfg, local: Path | None, e: Exception) -> Exception | None:
    """One-line error for a failed AutoTokenizer.from_pretrained; None to let an unexpected one through."""
    package = _missing_package(e)
    sp_model = local / "tokenizer.model" if local is not None else None
    if package == "tiktoken" and not (sp_model is not None and sp_model.is_file() and _is_tiktoken(sp_model)):
        # transformers reads a tokenizer.model as tiktoken only after SentencePiece failed (a warning says why),
        # so "tiktoken is required" for a SentencePiece file means that sentencepiece or protobuf is missing.
        package = " ".join(_not_installed(SENTENCEPIECE_NEEDS)) or package
    if package is not None:
        return _pip_error(model_cfg.name_or_path, "tokenizer", package)
    if isinstance(e, ImportError):
        return _library_error(model_cfg.name_or_path, "tokenizer", e)
    if local is None:
        return _load_error(model_cfg, e) if isinstance(e, OSError) else None
    # Anything else that fails while reading the files of a local directory is about those files.
    if not any((local / n).is_file() for n in TOKENIZER_FILES) and not any(local.glob("*.tiktoken")):
        return ConfigError(f"model.name_or_path: {local} has no tokenizer files (tokenizer.json, or tokenizer.model "
                           "for a SentencePiece tokenizer); copy the model's tokenizer files into it "
                           f"(huggingface-cli download ID --include 'tokenizer*' --local-dir {local})")
    from finetune.architectures import catalog

    for name in ("tokenizer.json", "added_tokens.json", "chat_template.json"):
        if (local / name).is_file():
            try:
                catalog.read_json_object(local / name, f"download it again (huggingface-cli download ID {name} "
                                                       f"--local-dir {local})")
            except ConfigError as broken:
                return broken
    source = next((local / n for n in TOKENIZER_FILES if (local / n).is_file()), local)
    return ConfigError(f"model.name_or_path: cannot load the tokenizer from {source} ({type(e).__name__}: "
                       f"{_first_line(e)}); download the tokenizer files again (huggingface-cli download ID "
                       f"--include 'tokenizer*' --local-dir {local})")


def quantization_config(choices: dict[str, Any]):
    """The BitsAndBytesConfig for a plan's choices, or None for an unquantized base."""
    import torch
    from transformers import BitsAndBytesConfig

    compute = getattr(torch, DTYPES[choices["compute_dtype"]])
    # layers the plan keeps in the compute dtype (a family whose code reads their .weight directly)
    skip = list(choices.get("keep_unquantized") or []) or None
    if choices["quantization"] == "nf4":
        return BitsAndBytesConfig(
            llm_int8_skip_modules=skip,
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=bool(choices["double_quant"]),
            bnb_4bit_compute_dtype=compute,
            # FSDP flattens all parameters of a wrapped layer into one tensor of one dtype: store
            # the packed 4-bit weights as that dtype (same bytes) so they can be sharded with the rest.
            bnb_4bit_quant_storage=compute if choices.get("distributed") == "fsdp" else torch.uint8,
        )
    if choices["quantization"] == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return None


def download_size(model_cfg, params_total: int | None = None) -> int | None:
    """Bytes of the checkpoint a hub id would download (its parameters in its stored dtype), when the
    catalog knows the model: `params_total` as the plan counted it (traced families too), else the
    hand-written rules' count; None otherwise."""
    from finetune.architectures import catalog
    from finetune.architectures import spec as arch

    try:
        config, _ = catalog.model_config(model_cfg.name_or_path)
        # without the plan's count, the hand-written families only (a traced one needs finetune.probes)
        params = params_total if params_total else arch.from_config(config).params_total
    except ConfigError:
        return None
    stored = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    return params * (4 if stored == "float32" else 2)


def check_disk_space(model_cfg, cache_dir: Path | None = None, params_total: int | None = None) -> None:
    """Before a download: is there room for the checkpoint in the Hugging Face cache?

    Checked only for hub ids that are not cached yet and whose size the catalog knows; a
    download that fills the disk halfway wastes an hour and can break other programs.
    """
    from huggingface_hub import constants, try_to_load_from_cache

    name = model_cfg.name_or_path
    if is_tiny(name) or Path(name).expanduser().exists():
        return
    size = download_size(model_cfg, params_total)
    if size is None:
        return
    for index in ("model.safetensors.index.json", "model.safetensors"):
        if isinstance(try_to_load_from_cache(name, index, revision=model_cfg.revision), str):
            return  # already downloaded
    from finetune.paths import free_bytes

    root = Path(cache_dir or constants.HF_HUB_CACHE)
    free = free_bytes(root)
    needed = int(size * 1.05) + (1 << 30)  # the checkpoint, 5% for the tokenizer and shard slack, 1 GiB spare
    if free < needed:
        raise EnvError(
            f"model.name_or_path: downloading {name} needs about {needed / 1e9:.0f} GB in {root}, and only "
            f"{free / 1e9:.0f} GB are free; free some space or point HF_HOME at a bigger disk"
        )


# Config fields a quantized load must change, by model_type. RWKV rescales its weights in place every
# `rescale_every` blocks in inference (an fp16 overflow guard; the final LayerNorm makes it output-neutral): on
# 4-bit layers under peft that re-quantizes a wrapped module and fails (transformers 5.24, peft 0.21:
# "attribute 'weight' already exists"), so evaluation and chat of a QLoRA RWKV would crash. bf16 needs no guard.
QUANTIZED_CONFIG_OVERRIDES: dict[str, dict[str, Any]] = {"rwkv": {"rescale_every": 0}}


def _quantized_overrides(model_cfg) -> dict[str, Any]:
    from finetune.architectures import catalog

    try:
        model_type = catalog.model_config(model_cfg.name_or_path)[0].get("model_type")
    except ConfigError:
        return {}
    return dict(QUANTIZED_CONFIG_OVERRIDES.get(model_type, {}))


def load_model(model_cfg, choices: dict[str, Any], device: str, placement=None, params_total: int | None = None):
    """The frozen base model, quantized as the plan chose, on `device` ("cuda" or "cpu"), with the plan's
    attention implementation (a model reloaded for evaluation, merge or chat computes as it trained,
    whatever transformers' default is; GPT-J plans SDPA from transformers 5.24, eager before).

    `placement` (finetune.distributed.Placement) says where this rank's model goes; the train stage
    passes the one its training arguments' process group gives (finetune.train.rank_placement). By
    default the model is this process's alone, on its current CUDA device. `params_total` (the plan's count)
    sizes the disk check before a download, for traced families too (:func:`download_size`)."""
    local = local_model_dir(model_cfg)
    if local is not None:
        check_model_files(local, trust_remote_code=bool(model_cfg.trust_remote_code))
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    check_disk_space(model_cfg, params_total=params_total)
    path = str(local or model_cfg.name_or_path)
    kwargs: dict[str, Any] = dict(_hub_kwargs(model_cfg))
    kwargs["dtype"] = getattr(torch, DTYPES[choices["compute_dtype"]])
    kwargs["quantization_config"] = quantization_config(choices)
    kwargs["use_safetensors"] = True  # never unpickle weights
    attention = ATTENTION.get(choices.get("attention", ""))
    if attention:
        kwargs["attn_implementation"] = attention
    if choices["quantization"] != "none":
        kwargs.update(_quantized_overrides(model_cfg))
    if placement is None:
        from finetune.distributed import placement as placement_for

        on_gpu = device == "cuda"
        placement = placement_for("none", device, torch.cuda.current_device() if on_gpu else 0,
                                  torch.cuda.device_count() if on_gpu else 1)
    os.environ.update(placement.env)
    if placement.device_map is not None:
        kwargs["device_map"] = placement.device_map
    from finetune.models import experts

    # the fused MoE experts quantized too (finetune/models/experts.py), when the plan says so
    quantizing_experts = experts.loading() if choices.get("quantized_experts") else contextlib.nullcontext()
    try:
        with quantizing_experts:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ImportError, SafetensorError) as e:
        error = _model_error(model_cfg, local, e)
        if error is None:
            raise
        raise error from e
    model.config.use_cache = False  # no KV cache during training (it only costs memory)
    if device == "cpu":
        _keep_cpu_4bit_layout(model)
    return model


def check_model_files(local: Path, trust_remote_code: bool = False) -> None:
    """A local model directory's config and weights, checked before transformers builds the model.

    Found here, a missing shard or an architecture this transformers does not know is one line
    before loading starts (a 70B checkpoint takes minutes to quantize), not a traceback after.
    """
    from finetune.architectures import catalog

    config = catalog.read_local_config(local)
    cfg_file = local / "config.json"
    model_type = config.get("model_type")
    if not (trust_remote_code and "auto_map" in config):
        import transformers
        from transformers import CONFIG_MAPPING

        remote = ("; the model ships its own code: set model.trust_remote_code=true if you trust it"
                  if "auto_map" in config else "")
        if not model_type:
            raise ConfigError(f"model.name_or_path: {cfg_file} has no model_type (llama, mistral, ...), which "
                              f"transformers needs to choose the architecture; add it{remote}")
        if model_type not in CONFIG_MAPPING:
            raise ConfigError(f"model.name_or_path: {cfg_file} has model_type '{model_type}', which transformers "
                              f"{transformers.__version__} does not know; fix model_type, or upgrade transformers "
                              f"if the model is newer{remote}")
    if (local / "model.safetensors").is_file():
        return
    index = local / "model.safetensors.index.json"
    again = f"download the weights again (huggingface-cli download ID --local-dir {local})"
    if index.is_file():
        weight_map = catalog.read_json_object(index, again).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConfigError(f"model.name_or_path: {index} has no weight_map naming the shard files; {again}")
        missing = sorted({str(f) for f in weight_map.values() if not (local / str(f)).is_file()})
        if missing:
            listed = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise ConfigError(f"model.name_or_path: {local} lacks {len(missing)} of the weight shards that {index.name} "
                              f"names ({listed}); {again}")
        return
    pickled = sorted(p.name for p in local.glob("pytorch_model*.bin"))
    if pickled:
        raise ConfigError(f"model.name_or_path: {local} holds only pickled weights ({pickled[0]}), which are never "
                          "loaded (unpickling can run code); download the model's safetensors weights, or convert "
                          "these to safetensors with a script you trust (load, then model.save_pretrained(DIR))")
    raise ConfigError(f"model.name_or_path: {local} has no weights (model.safetensors, or model.safetensors.index.json "
                      f"and its shards); download them (huggingface-cli download ID --local-dir {local}); "
                      "stages=[data,preflight] need only the config and the tokenizer")


def _model_error(model_cfg, local: Path | None, e: Exception) -> Exception | None:
    """One-line error for a failed AutoModelForCausalLM.from_pretrained (OSError, ImportError, SafetensorError);
    None to let an unexpected one through."""
    from safetensors import SafetensorError, safe_open

    package = _missing_package(e)
    if package is not None:
        return _pip_error(model_cfg.name_or_path, "model", package)
    if isinstance(e, ImportError):
        return _library_error(model_cfg.name_or_path, "model", e)
    if local is None:
        return _load_error(model_cfg, e) if isinstance(e, OSError) else None
    again = f"download it again (huggingface-cli download ID --local-dir {local})"
    if isinstance(e, SafetensorError):
        for file in sorted(local.glob("*.safetensors")):
            try:
                with safe_open(str(file), framework="pt"):
                    pass
            except (SafetensorError, OSError) as bad:
                return ConfigError(f"model.name_or_path: {file} is not a readable safetensors file "
                                   f"({_first_line(bad)}); it is truncated or corrupt: {again}")
    if isinstance(e, FileNotFoundError) and e.filename:
        return ConfigError(f"model.name_or_path: {e.filename} is missing; {again}")
    return ConfigError(f"model.name_or_path: cannot load the model in {local} ({type(e).__name__}: "
                       f"{_first_line(e)})")


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
    from peft import PeftConfig, PeftModel

    from finetune.models import experts

    base = load_model(model_cfg, choices, device)
    config = PeftConfig.from_pretrained(str(adapter_dir))
    experts.register_lora(config, base)  # LoRA on 4-bit experts: our ParamWrapper (finetune/models/experts.py)
    model = PeftModel.from_pretrained(base, str(adapter_dir), config=config, autocast_adapter_dtype=False)
    if choices["quantization"] != "none":
        lora_to_bf16(model)
    model.eval()
    return model


def lora_to_bf16(model, adapter: str | None = None) -> None:
    """The LoRA weights (of `adapter`, or every adapter) in bf16, as TRL trains them on a quantized base; DoRA's
    magnitude vector stays as it is (TRL keeps it in fp32)."""
    import torch

    for name, param in model.named_parameters():
        if "lora_" in name and "magnitude" not in name and (adapter is None or f".{adapter}." in name):
            param.data = param.data.to(torch.bfloat16)
