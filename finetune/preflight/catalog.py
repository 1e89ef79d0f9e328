"""Where a model's config comes from, offline first: tiny specs, a local config.json, the catalog.

The catalog (models.json) holds the config.json fields of the models people fine-tune,
keyed by hub id, so that a plan for meta-llama/Llama-2-70b-hf needs no download.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from finetune.errors import ConfigError
from finetune.models import tiny

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


def model_config(name_or_path: str) -> tuple[dict[str, Any], str]:
    """(config dict, where it came from) for a tiny model, a local directory, or a catalog hub id."""
    if tiny.is_tiny(name_or_path):
        return tiny.spec(name_or_path), "built-in tiny model"
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ConfigError(f"model.name_or_path: {path} has no config.json")
        try:
            return json.loads(cfg_file.read_text()), str(cfg_file)
        except json.JSONDecodeError as e:
            raise ConfigError(f"model.name_or_path: {cfg_file} is not valid JSON ({e.msg}, line {e.lineno})") from e
    key = resolve_catalog_name(name_or_path)
    if key is not None:
        return dict(models()[key]), "catalog"
    raise ConfigError(
        f"model.name_or_path: '{name_or_path}' is neither a local directory with a config.json nor in the "
        f"built-in catalog ({len(models())} models, e.g. {', '.join(sorted(models())[:4])}, ...); download its "
        "config.json into a directory (huggingface-cli download ID config.json --local-dir DIR) and point "
        "model.name_or_path at it"
    )
