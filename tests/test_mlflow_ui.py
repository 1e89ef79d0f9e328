"""Comparing runs in the real MLflow UI: a real tracking server, a real 2-job sweep, headless Chromium.

Also: what happens when the tracking server is not there, and that no secret reaches MLflow.
The browser comes from Debian's packages (chromium, chromium-driver), which `make browser` installs
(the first step of `make test`); this test must run, not skip.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune.tracking import wait_for_server

pytestmark = pytest.mark.slow

SCREENSHOTS = Path(os.environ.get("FINETUNE_SCREENSHOTS", "")) if os.environ.get("FINETUNE_SCREENSHOTS") else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    """Debian's chromium and chromedriver, which `make browser` (the first step of `make test`) installs."""
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        pytest.fail("chromium and chromedriver are not installed: run `make browser` (apt-get install chromium "
                    "chromium-driver); make test does it first")
    return browser, driver


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    store = tmp_path / "server"
    store.mkdir()
    mlflow = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{store}/mlflow.db",
         "--artifacts-destination", str(store / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        assert wait_for_server(uri, timeout=120), "the MLflow server did not start"
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def _browser(chromium):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    browser, driver = chromium
    options = Options()
    options.binary_location = browser
    # As root in a container, with no network beyond loopback: no sandbox, no background traffic.
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1600,1400"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def _wait_for_text(driver, needles: list[str], timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = driver.find_element("tag name", "body").text
        if all(n in text for n in needles):
            return text
        time.sleep(0.5)
    raise AssertionError(f"the page never showed {needles}; it shows:\n{text[:3000]}")


def test_sweep_runs_line_up_in_the_mlflow_compare_view(run_cli, mlflow_server, chromium, tmp_path):
    """A 2-job multirun against the server (with a password in its URI): the parent and both children FINISHED,
    lined up in the compare view; the sweep's own files (multirun.yaml, the parent's record) hold the masked URI
    only."""
    from mlflow.tracking import MlflowClient

    password = "Pw4TestOnly-s3Wp"
    uri = mlflow_server.replace("http://", f"http://bob:{password}@")
    proc = run_cli("-m", "+recipe=tiny-demo", "adapter.rank=4,8", "train.max_steps=6", "eval.generate_examples=2",
                   "tracking.register_model=false", "tracking.system_metrics=false", f"tracking.uri={uri}",
                   timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert password not in proc.stdout + proc.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "multirun.yaml" for p in written) and any(p.name == "mlflow_parent_run.json" for p in written)
    assert [p for p in written if password.encode() in p.read_bytes()] == []

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("finetune")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert sorted(r.data.params["adapter.rank"] for r in children) == ["4", "8"]
    assert all(r.info.status == "FINISHED" and "eval/adapter_loss" in r.data.metrics for r in children)

    ids = [r.info.run_id for r in children]
    url = (f"{mlflow_server}/#/compare-runs?runs={json.dumps(ids)}"
           f"&experiments={json.dumps([experiment.experiment_id])}")
    driver = _browser(chromium)
    try:
        driver.get(url)
        text = _wait_for_text(driver, ["Comparing 2 Runs", "adapter.rank", "eval/adapter_loss", *ids])
        # The swept param shows both values in its row; the metric row has both runs' values.
        lines = [line.strip() for line in text.splitlines()]
        # The parameters table: the swept key's row holds both runs' values.
        rank_rows = [line.split()[1:] for line in lines if line.split()[:1] == ["adapter.rank"] and len(line.split()) == 3]
        assert rank_rows and sorted(rank_rows[0]) == ["4", "8"], [line for line in lines if "adapter.rank" in line]
        # The metrics table (a grid: names, then each run's value on a line, shown to 4 significant digits).
        for r in children:
            shown = f"{r.data.metrics['eval/adapter_loss']:.4g}"
            assert shown in lines, (shown, lines[lines.index("eval/adapter_loss") - 3:][:60])
        shot = tmp_path / "mlflow-compare.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        if SCREENSHOTS is not None:
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, SCREENSHOTS / shot.name)
    finally:
        driver.quit()


def test_unreachable_tracking_server_stops_before_training(run_cli, tmp_path):
    dead = f"http://127.0.0.1:{_free_port()}"
    proc = run_cli("+recipe=tiny-demo", "train.max_steps=2", f"tracking.uri={dead}")
    assert proc.returncode == 5, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and dead in lines[0] and "fallback_local" in lines[0]
    assert not list(tmp_path.glob("outputs/tiny-demo/*/checkpoints")), "nothing was trained"


def test_unreachable_server_with_fallback_logs_locally_and_says_so(run_cli, tmp_path):
    from mlflow.tracking import MlflowClient

    dead = f"http://127.0.0.1:{_free_port()}"
    proc = run_cli("+recipe=tiny-demo", "train.max_steps=2", "stages=[data,preflight,train]",
                   "tracking.register_model=false", f"tracking.uri={dead}", "tracking.fallback_local=true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LOGGING THIS RUN LOCALLY" in proc.stdout + proc.stderr
    runs = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_runs(experiment_ids=["1"])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


def test_no_secret_reaches_mlflow(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from finetune.config import compose
    from finetune.pipeline import run_pipeline
    from finetune.tracking import redact

    secret = "hf_TESTSECRETvalue0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", secret)
    monkeypatch.chdir(tmp_path)
    result = run_pipeline(compose(["+recipe=tiny-demo", "train.max_steps=2", "eval.generate_examples=2"]),
                          tmp_path / "outputs" / "tiny-demo" / "run")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(result["run_id"])
    assert secret not in json.dumps([run.data.params, run.data.tags])
    local = client.download_artifacts(result["run_id"], "", str(tmp_path / "downloaded"))
    for path in Path(local).rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    assert redact({"model.hf_token": secret, "eval.max_new_tokens": 5}) == {"model.hf_token": "<redacted>",
                                                                           "eval.max_new_tokens": 5}


def test_a_password_in_the_tracking_uri_is_written_nowhere(run_cli, mlflow_server, tmp_path):
    """The run logs to the server with the real URI; every file it writes (the run directory with Hydra's
    .hydra/, run.json, the log), its console, and what the server stores show only http://alice:***@..."""
    from mlflow.tracking import MlflowClient

    password = "Pw4TestOnly-x7Qz9"
    uri = mlflow_server.replace("http://", f"http://alice:{password}@")
    masked = mlflow_server.replace("http://", "http://alice:***@")
    proc = run_cli("+recipe=tiny-demo", "stages=[data,preflight,train]", "train.max_steps=2",
                   "tracking.register_model=false", "tracking.system_metrics=false", f"tracking.uri={uri}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert password not in proc.stdout + proc.stderr
    assert masked in proc.stdout

    written = [p for p in tmp_path.rglob("*") if p.is_file()]  # outputs/ (.hydra included) and the server's store
    assert any(p.parent.name == ".hydra" for p in written) and any(p.name == "mlflow.db" for p in written)
    assert [p for p in written if password.encode() in p.read_bytes()] == []
    run_dir = next((tmp_path / "outputs" / "tiny-demo").glob("*/run.json")).parent
    assert json.loads((run_dir / "run.json").read_text())["tracking_uri"] == masked
    assert f"uri: {masked}" in (run_dir / "config.yaml").read_text()
    assert f"tracking.uri={masked}" in (run_dir / ".hydra" / "overrides.yaml").read_text()

    client = MlflowClient(mlflow_server)  # the run reached the server, its params masked
    [run] = client.search_runs([client.get_experiment_by_name("finetune").experiment_id])
    assert run.info.status == "FINISHED" and "train/loss" in run.data.metrics
    assert run.data.params["tracking.uri"] == masked and run.data.params["adapter.rank"] == "16"
