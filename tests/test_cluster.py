"""Sweeps on a real cluster engine: a 2-job multirun through Hydra's Ray launcher onto a local Ray cluster that
the test starts on 127.0.0.1 (ray start --head) and stops itself.

Needs the cluster extra (`pip install 'finetune-recipes[cluster]'`, or `make test-cluster`, which installs it
and runs this file); Ray is not in the dev install (its wheel is large), so `make test` skips this module.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("hydra_plugins.hydra_ray_launcher")

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_cluster(tmp_path):
    """A one-node Ray cluster on 127.0.0.1, its processes started from the test's directory with its
    environment (the tiny models' cache), stopped at the end."""
    ray = str(Path(sys.executable).with_name("ray"))
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    start = subprocess.run([ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                            "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stderr[-3000:]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_a_sweep_through_the_ray_launcher_ends_with_a_parent_and_its_children(ray_cluster, run_cli, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = run_cli("-m", "hydra/launcher=ray_cluster", f"hydra.launcher.ray.init.address={ray_cluster}",
                   "+recipe=tiny-demo", "adapter.rank=4,8", "train.max_steps=2", "stages=[data,preflight,train]",
                   f"tracking.uri={uri}", "tracking.register_model=false", "tracking.system_metrics=false",
                   timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("finetune").experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("sweep") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED"
    assert sorted(r.data.params["adapter.rank"] for r in children) == ["4", "8"]
    assert all(r.info.status == "FINISHED" for r in children)
    # the jobs ran in Ray's worker processes, not in the launching one
    assert "Ray Launcher is launching 2 jobs" in proc.stdout + proc.stderr
