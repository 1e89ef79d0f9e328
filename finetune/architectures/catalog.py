"""Where a model's config comes from, offline first: tiny specs, a local config.json, the catalog.

The catalog (models.json) holds the config.json fields of the models people fine-tune,
keyed by hub id, so that a plan for meta-llama/Llama-2-70b-hf needs no download.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from finetune.architectures import tiny
from finetune.errors import ConfigError

_HERE = Path(__file__).resolve().parent


@cache
def _models_file() -> dict[str, Any]:
    return json.loads((_HERE / "models.json").read_text())


@cache
def models() -> dict[str, dict[str, Any]]:
    """Catalog configs by hub id (aliases such as chat variants excluded: see :func:`aliases`)."""
    return {k: v for k, v in _models_file().items() if not k.startswith("_")}


@cache
def aliases() -> dict[str, str]:
    """Hub ids whose config.json has the same shape as a catalog entry (chat/instruct variants)."""
    return dict(_models_file().get("_aliases", {}))


def resolve_catalog_name(name: str) -> str | None:
    """The catalog key for a hub id or alias (case-insensitive), or None."""
    catalog, alias = models(), aliases()
    for table in (catalog, alias):
        lowered = {k.lower(): k for k in table}
        key = lowered.get(name.lower())
        if key is not None:
            return key if table is catalog else alias[key]
    return None


def _is_path(name: str) -> bool:
    """Whether `name` can only be a local path: a hub id is `name` or `owner/name`."""
    return (name.startswith(("/", "~", "./", "../", ".\\", "..\\")) or name in (".", "..") or "\\" in name
            or name.count("/") > 1)


def local_dir(name_or_path: str) -> Path | None:
    """The local model directory that `name_or_path` names, or None for a hub id or catalog name.

    A name that can only be a path (absolute, ./, ../, ~, or more than one '/') and is not a
    directory is a ConfigError here, in every stage alike, rather than a hub lookup that fails.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConfigError(f"model.name_or_path: {name_or_path} is a file, not a model directory; "
                          "point it at the directory that holds config.json")
    if _is_path(name_or_path):
        shown = name_or_path if str(path) == name_or_path and path.is_absolute() else f"{name_or_path} ({path.absolute()})"
        raise ConfigError(f"model.name_or_path: {shown} does not exist; point it at a model directory "
                          "(config.json, the tokenizer files and the weights) or at a hub id")
    return None


def read_local_config(path: Path) -> dict[str, Any]:
    """The config.json of local model directory `path`; a ConfigError naming the file if it is missing or broken."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"model.name_or_path: {path} has no config.json; download the model's config.json "
                          f"into it (huggingface-cli download ID config.json --local-dir {path})")
    return read_json_object(cfg_file, f"download it again (huggingface-cli download ID config.json --local-dir {path}) "
                                      "or fix it")


def read_json_object(file: Path, fix: str) -> dict[str, Any]:
    """A model directory's JSON file (config.json, tokenizer_config.json, ...), which must hold an object;
    else a ConfigError naming the file, what is wrong with it, and `fix` (what to do)."""
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"model.name_or_path: {file} is not a JSON text file (byte {e.start} is not UTF-8); "
                          f"{fix}") from e
    except OSError as e:
        raise ConfigError(f"model.name_or_path: cannot read {file} ({e.strerror or e})") from e
    if not text.strip():
        raise ConfigError(f"model.name_or_path: {file} is empty; {fix}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        # Cut short (an interrupted download): the error is at the end, or in a string that never closes.
        ends_early = e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string")
        what = "is truncated: its JSON ends early" if ends_early else "is not valid JSON"
        raise ConfigError(f"model.name_or_path: {file} {what} ({e.msg}, line {e.lineno}); {fix}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"model.name_or_path: {file} holds a JSON {type(data).__name__}, not an object; {fix}")
    return data


def model_config(name_or_path: str) -> tuple[dict[str, Any], str]:
    """(config dict, where it came from) for a tiny model, a local directory, or a catalog hub id."""
    if tiny.is_tiny(name_or_path):
        return tiny.spec(name_or_path), "built-in tiny model"
    path = local_dir(name_or_path)
    if path is not None:
        return read_local_config(path), str(path / "config.json")
    key = resolve_catalog_name(name_or_path)
    if key is not None:
        return dict(models()[key]), "catalog"
    raise ConfigError(
        f"model.name_or_path: '{name_or_path}' is neither a local directory with a config.json nor in the "
        f"built-in catalog ({len(models())} models, e.g. {', '.join(sorted(models())[:4])}, ...); download its "
        "config.json into a directory (huggingface-cli download ID config.json --local-dir DIR) and point "
        "model.name_or_path at it"
    )


@dataclass(frozen=True)
class ResolvedModel:
    """The model of a run as the pipeline resolves it once, before any stage: its config.json (offline: a
    tiny spec, a local directory, the catalog) and where that came from. Every stage receives this object
    instead of looking the model up again. `config` is None when it cannot be read offline; `error` then
    says why, and a stage that needs the config raises it (the data stage can go on without it)."""

    name_or_path: str
    config: dict[str, Any] | None
    source: str = ""
    error: ConfigError | None = field(default=None, compare=False)

    @property
    def model_type(self) -> str | None:
        return (self.config or {}).get("model_type")

    @property
    def vocab_size(self) -> int | None:
        value = (self.config or {}).get("vocab_size")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def require(self) -> dict[str, Any]:
        """The config.json, or the ConfigError that says why it could not be read."""
        if self.config is None:
            raise self.error or ConfigError(f"model.name_or_path: no config.json for '{self.name_or_path}'")
        return self.config


def resolve_model(name_or_path: str) -> ResolvedModel:
    try:
        config, source = model_config(name_or_path)
    except ConfigError as e:
        return ResolvedModel(name_or_path, None, error=e)
    return ResolvedModel(name_or_path, config, source)

