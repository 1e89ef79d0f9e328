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


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # One thread per worker (and per process it starts): two workers on two cores, not four threads
        # spinning for them. The tiny models' steps are too small to gain from a second thread anyway.
        os.environ["OMP_NUM_THREADS"] = "1"
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def finetune_cache(tmp_path_factory) -> Path:
    """FINETUNE_CACHE for the whole session (a caller's own is kept, so repeated runs reuse a build)."""
    if os.environ.get("FINETUNE_CACHE"):
        path = Path(os.environ["FINETUNE_CACHE"])
    else:
        if os.environ.get("PYTEST_XDIST_WORKER"):
            # pytest-xdist: the workers share one cache (under the run's common temp directory), so each tiny
            # model is built once; every cache write is atomic (paths.store_entry, tiny.ensure_built).
            path = tmp_path_factory.getbasetemp().parent / "cache"
            path.mkdir(exist_ok=True)
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


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory, finetune_cache) -> dict:
    """One trained tiny-demo SFT run for every module that needs a trained adapter (the end-to-end checks, merge
    and chat, export, training from an adapter): 40 steps, rank 8 (the DPO recipe says 16, so an adapter's own
    shape is seen to win), its MLflow store beside it. Tests add to it only what the tools add to a run (the
export beside the adapter, its MLflow artifacts); any other change is made to a copy.
    Returns {"cfg", "results" (run_pipeline's), "root", "uri", "run_dir", "run_id"}."""
    from finetune.config import compose
    from finetune.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("sft-run")
    uri = f"sqlite:///{root}/mlflow.db"
    old = os.getcwd()
    os.chdir(root)  # MLflow keeps artifacts beside its store, relative to the working directory
    try:
        cfg = compose(["+recipe=tiny-demo", "train.max_steps=40", "train.save_steps=20", "adapter.rank=8",
                       "adapter.alpha=16", f"tracking.uri={uri}"])
        results = run_pipeline(cfg, root / "outputs" / "tiny-demo" / "run")
    finally:
        os.chdir(old)
    return {"cfg": cfg, "results": results, "root": root, "uri": uri, "run_dir": results["work_dir"],
            "run_id": results["run_id"]}


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
