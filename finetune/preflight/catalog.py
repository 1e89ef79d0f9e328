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
def models() -> dict[str, dict[str, Any]]:
    data = json.loads((_HERE / "models.json").read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


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
    catalog = models()
    if name_or_path in catalog:
        return dict(catalog[name_or_path]), "catalog"
    lowered = {k.lower(): k for k in catalog}
    if name_or_path.lower() in lowered:
        return dict(catalog[lowered[name_or_path.lower()]]), "catalog"
    raise ConfigError(
        f"model.name_or_path: '{name_or_path}' is neither a local directory with a config.json nor in the "
        f"built-in catalog ({', '.join(sorted(catalog))}); download its config.json into a directory and "
        "point model.name_or_path at it"
    )
