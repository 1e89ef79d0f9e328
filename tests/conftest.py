"""Shared fixtures: a private cache for tiny models and sample data, and a CLI runner.

Nothing here reaches the network: the tiny model is built locally (once per test
session, into the cache) and loaded with from_pretrained; the sample data is
written by the project.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def finetune_cache(tmp_path_factory) -> Path:
    """FINETUNE_CACHE for the whole session (a caller's own is kept, so repeated runs reuse a build)."""
    if os.environ.get("FINETUNE_CACHE"):
        path = Path(os.environ["FINETUNE_CACHE"])
    else:
        path = tmp_path_factory.mktemp("cache")
        os.environ["FINETUNE_CACHE"] = str(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(finetune_cache) -> Path:
    from finetune.models.tiny import ensure_built

    return ensure_built("tiny:llama")


@pytest.fixture
def run_cli(tmp_path):
    """Run the installed `finetune` command in a fresh working directory; returns CompletedProcess."""

    def run(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: int = 600):
        full_env = dict(os.environ)
        full_env.pop("HYDRA_FULL_ERROR", None)
        full_env.update(env or {})
        return subprocess.run(
            [sys.executable, "-m", "finetune", *args],
            cwd=cwd or tmp_path, env=full_env, capture_output=True, text=True, timeout=timeout,
        )

    return run
