"""Sample datasets the project writes itself (no network): ``dataset.path: sample:NAME``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from data_prep.samples import corpus, medical, tools

# name -> (file or directory name in the cache, writer)
SAMPLES: dict[str, tuple[str, Callable[[Path], Path]]] = {
    "medical-qa": ("medical_qa.jsonl", medical.write),
    "medical-notes": (f"medical_notes-v{corpus.VERSION}", corpus.write),
    "medical-pairs": ("medical_pairs.jsonl", medical.write_pairs),
    "tool-calls": ("tool_calls.jsonl", tools.write),
}

PREFIX = "sample:"


def is_sample(path: str) -> bool:
    return path.startswith(PREFIX)


def resolve(path: str) -> Path:
    """The file (or directory) behind ``sample:NAME``, written into the cache on first use."""
    from finetune.errors import ConfigError
    from finetune.paths import cache_dir

    name = path[len(PREFIX):]
    if name not in SAMPLES:
        raise ConfigError(f"dataset.path: no sample named '{name}' (samples: {', '.join(sorted(SAMPLES))})")
    file_name, writer = SAMPLES[name]
    target = cache_dir() / "samples" / file_name
    if not target.exists():
        writer(target)
    return target
