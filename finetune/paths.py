"""Where the project keeps what it builds once: tiny models, sample data, processed datasets."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$FINETUNE_CACHE, else $XDG_CACHE_HOME/finetune, else ~/.cache/finetune."""
    explicit = os.environ.get("FINETUNE_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "finetune"


def free_bytes(path: Path | str) -> int:
    """Free bytes on the disk that holds `path`, or would hold it once created (its nearest existing parent)."""
    import shutil

    probe = Path(path).expanduser()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def recipes_dir() -> Path:
    """The shipped recipe tree: inside the installed package (a wheel maps the top-level
    recipes/ to finetune/recipes), or the repository's recipes/ in an editable install."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "recipes", package.parent / "recipes"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"the recipe tree is missing: neither {package / 'recipes'} nor {package.parent / 'recipes'}")
