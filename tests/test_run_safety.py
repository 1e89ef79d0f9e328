"""One run per run directory, and an MLflow store that never lies about which runs are alive.

The CLI tests run `python -m finetune` as a user would (two terminals, kill -9, a fresh start);
the others check the pieces they rely on: the run directory's lock, the SQLite store opened by
several processes at once, the tags of a resumed run, the dataset cache's unfinished builds.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from finetune import runs as resume
from finetune.config import TrackingConfig, compose
from finetune.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
# Short CLI runs: no eval, no model registry, no system-metrics sampler.
QUIET = ["tracking.system_metrics=false", "tracking.register_model=false", "stages=[data,preflight,train]"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def _start(cwd: Path, args: list[str], log_name: str) -> tuple[subprocess.Popen, Path]:
    """A `finetune` process in `cwd`; its stdout and stderr go to a file (a pipe nobody reads would fill)."""
    out = cwd / f"{log_name}.txt"
    with open(out, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "finetune", "+recipe=tiny-demo", *args], cwd=cwd,
                                env=_env(), stdout=f, stderr=subprocess.STDOUT, text=True)
    return proc, out


def _wait_for(predicate, timeout: float, *procs: subprocess.Popen) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if any(p.poll() is not None for p in procs):
            return bool(predicate())
        time.sleep(0.05)
    return False


def _kill(*procs: subprocess.Popen) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    for proc in procs:
        proc.wait(timeout=60)


def _client(cwd: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{cwd}/mlflow.db")


def _run_id(run_dir: Path) -> str:
    return json.loads((run_dir / "run.json").read_text())["run_id"]


# -- the run directory's lock -------------------------------------------------------------------


def _interrupted_run(recipe_dir: Path, name: str, recipe: dict, fingerprint: str = "fp") -> Path:
    """A run directory as an interrupted run leaves it: its recipe, data report, a complete checkpoint."""
    run_dir = recipe_dir / name
    checkpoint = run_dir / resume.CHECKPOINTS / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    resume.mark_complete(checkpoint)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(recipe))
    (run_dir / "data_report.json").write_text(json.dumps({"fingerprint": fingerprint}))
    (run_dir / "run.json").write_text(json.dumps({"run_id": "abc"}))
    return run_dir


def test_a_launch_into_an_interrupted_runs_directory_is_refused_before_it_overwrites_anything(tmp_path):
    """The same hydra.run.dir (or multi-node RUN_ID) twice: train.resume=auto continues runs beside this one,
    so starting fresh here would overwrite the interrupted run; it is refused, naming how to continue it."""
    from finetune.pipeline import run_pipeline

    recipe = {"name": "tiny-demo"}
    run_dir = _interrupted_run(tmp_path, "job-17", recipe)
    with pytest.raises(ConfigError, match=r"holds an interrupted run \(complete checkpoint at step 4\); continue "
                                          rf"it with train.resume={run_dir}"):
        run_pipeline(compose(["+recipe=tiny-demo", "stages=[data,preflight,train]"]), run_dir)
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == recipe  # untouched


def test_auto_resume_leaves_a_live_run_alone_and_says_so(tmp_path, caplog):
    recipe = {"adapter": {"rank": 16}}
    live = _interrupted_run(tmp_path, "live", recipe)
    current = tmp_path / "current"
    other = resume.claim(live)  # another process's run, training there now
    assert other is not None
    try:
        with caplog.at_level(logging.WARNING, logger="finetune.runs"):
            assert resume.resolve("auto", tmp_path, current, recipe, "fp") is None
        lines = [r.getMessage() for r in caplog.records if "still running" in r.getMessage()]
        assert len(lines) == 1 and str(live) in lines[0] and f"pid {os.getpid()}" in lines[0]
        assert "starting a new run" in lines[0]

        with pytest.raises(ConfigError, match="still being trained by another run"):
            resume.resolve(str(live), tmp_path, current, recipe, "fp")
    finally:
        other.release()

    point = resume.resolve("auto", tmp_path, current, recipe, "fp")  # its process is gone: resumable
    assert point is not None and point.run_dir == live and point.step == 4
    assert point.lock is not None and resume.holder(live)["run_dir"] == str(current.resolve())
    point.lock.release()
    assert resume.holder(live) is None


def test_auto_resume_takes_the_newest_run_that_is_not_live(tmp_path):
    recipe = {"adapter": {"rank": 16}}
    dead = _interrupted_run(tmp_path, "older", recipe)
    live = _interrupted_run(tmp_path, "newer", recipe)
    marker = dead / resume.CHECKPOINTS / "checkpoint-4" / resume.COMPLETE
    os.utime(marker, (marker.stat().st_mtime - 60,) * 2)
    other = resume.claim(live)
    try:
        point = resume.resolve("auto", tmp_path, tmp_path / "current", recipe, "fp")
        assert point is not None and point.run_dir == dead
        point.lock.release()
    finally:
        other.release()


def test_other_ranks_count_their_leaders_lock_as_theirs(tmp_path):
    """Under torchrun only rank 0 takes locks; the other ranks must still pick the same run."""
    recipe = {"adapter": {"rank": 16}}
    run = _interrupted_run(tmp_path, "interrupted", recipe)
    launch = tmp_path / "launch"  # the one hydra.run.dir every rank was given
    leader = resume.claim(run, owner=launch)
    try:
        point = resume.resolve("auto", tmp_path, launch, recipe, "fp", take_lock=False)
        assert point is not None and point.run_dir == run and point.lock is None
        # A lock taken by another launch is another run's, for every rank.
        assert resume.resolve("auto", tmp_path, tmp_path / "elsewhere", recipe, "fp", take_lock=False) is None
    finally:
        leader.release()


def test_a_lock_is_freed_when_its_process_is_killed(tmp_path):
    run = tmp_path / "run"
    code = ("import sys, time; from pathlib import Path; from finetune import runs as resume; "
            "lock = resume.claim(Path(sys.argv[1])); print('locked', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert resume.holder(run)["pid"] == proc.pid
        assert resume.claim(run) is None
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert resume.holder(run) is None
    assert resume.dead_runs(tmp_path, exclude=[]) == []  # no run.json: nothing for MLflow to end
    (run / "run.json").write_text(json.dumps({"run_id": "abc", "tracking_uri": "sqlite:////x.db"}))
    assert [d for d, _ in resume.dead_runs(tmp_path, exclude=[])] == [run]
    assert resume.dead_runs(tmp_path, exclude=[run]) == []


# -- the MLflow store ------------------------------------------------------------------------------

_OPEN_STORE = """
import sys
from pathlib import Path
import mlflow  # imported before the start signal: the processes then open the store together
from finetune.config import TrackingConfig
from finetune.tracking import Tracker
db, name = Path(sys.argv[1]), sys.argv[2]
run_dir = db.parent / name
run_dir.mkdir()
print("ready", flush=True)
sys.stdin.readline()
with Tracker(TrackingConfig(uri=f"sqlite:///{db}", system_metrics=False), run_name=name, run_dir=run_dir):
    pass
"""


def test_processes_starting_together_on_a_new_store_all_succeed(tmp_path):
    """MLflow creates a new SQLite store's tables on first use; two processes doing it at once fail
    ("table runs already exists", "duplicate column name: step") unless one waits for the other."""
    db = tmp_path / "mlflow.db"
    procs = [subprocess.Popen([sys.executable, "-c", _OPEN_STORE, str(db), f"run{i}"], cwd=tmp_path, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(2)]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready"
        for proc in procs:  # go
            proc.stdin.write("\n")
            proc.stdin.flush()
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        _kill(*procs)
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-2000:]
    runs = _client(tmp_path).search_runs(experiment_ids=["1"])
    assert sorted(r.info.run_name for r in runs) == ["run0", "run1"]
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_a_resumed_run_drops_the_error_of_its_last_attempt(tmp_path, monkeypatch):
    from finetune.tracking import Tracker

    monkeypatch.chdir(tmp_path)  # MLflow puts the artifacts in ./mlruns

    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", system_metrics=False)
    with pytest.raises(RuntimeError), Tracker(cfg, run_name="r", run_dir=tmp_path) as tracker:
        raise RuntimeError("out of disk")
    run_id = tracker.run_id
    failed = _client(tmp_path).get_run(run_id)
    assert failed.info.status == "FAILED" and "out of disk" in failed.data.tags["error"]

    with Tracker(cfg, run_name="r", run_dir=tmp_path, run_id=run_id):  # what a resumed run does
        running = _client(tmp_path).get_run(run_id)
        assert running.info.status == "RUNNING"
        assert "error" not in running.data.tags, "the resumed run is not failing"
    finished = _client(tmp_path).get_run(run_id)
    assert finished.info.status == "FINISHED" and "error" not in finished.data.tags


def test_the_error_tag_and_error_txt_are_masked(tmp_path, monkeypatch):
    """An exception's text can hold a credential (a URI with its password, an environment secret): the FAILED
    run's `error` tag and `error.txt` get it masked, as params and logs do."""
    from finetune.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_SecretValue0123456789")
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", system_metrics=False)
    with pytest.raises(RuntimeError), Tracker(cfg, run_name="r", run_dir=tmp_path) as tracker:
        raise RuntimeError("GET https://bob:pa55word@hub.example/x?token=abc123 with hf_SecretValue0123456789")
    run = _client(tmp_path).get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    error_txt = (Path(run.info.artifact_uri.removeprefix("file://")) / "error.txt").read_text()
    for text in (run.data.tags["error"], error_txt):
        assert "https://bob:***@hub.example/x?token=*** with ***" in text
        assert "pa55word" not in text and "abc123" not in text and "hf_SecretValue" not in text


# -- the dataset cache -------------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_unfinished_dataset_builds_of_dead_processes_are_removed(tmp_path):
    from data_prep import store

    dead, alive = _dead_pid(), os.getppid()
    root = tmp_path / "datasets"
    made = {name: root / name for name in (f"aaa.tmp-{dead}", f"bbb.old-{dead}", f"ccc.tmp-{alive}",
                                           f"ddd.tmp-{alive}", "eee", f"fff.tmp-{os.getpid()}")}
    for path in made.values():
        path.mkdir(parents=True)
        (path / "train.arrow").write_bytes(b"x")
    two_days_ago = time.time() - 2 * 86400  # a live pid, but nothing written for two days: reused pid
    for path in (made[f"ddd.tmp-{alive}"] / "train.arrow", made[f"ddd.tmp-{alive}"]):
        os.utime(path, (two_days_ago, two_days_ago))

    removed = store.remove_orphans(root)
    assert sorted(p.name for p in removed) == [f"aaa.tmp-{dead}", f"bbb.old-{dead}", f"ddd.tmp-{alive}"]
    assert sorted(p.name for p in root.iterdir()) == sorted([f"ccc.tmp-{alive}", "eee", f"fff.tmp-{os.getpid()}"])
    assert store.remove_orphans(tmp_path / "missing") == []


def test_the_next_run_removes_a_build_left_by_kill_9(tmp_path, finetune_cache, tiny_model_dir, monkeypatch):
    from finetune.pipeline import run_pipeline

    monkeypatch.chdir(tmp_path)
    orphan = finetune_cache / "datasets" / f"0123456789abcdef.tmp-{_dead_pid()}"
    orphan.mkdir(parents=True)
    (orphan / "train.arrow").write_bytes(b"half written")
    run_pipeline(compose(["+recipe=tiny-demo", "stages=[data]"]), tmp_path / "outputs" / "tiny-demo" / "run")
    assert not orphan.exists()


def test_make_clean_cache_removes_the_datasets_and_keeps_the_models(tmp_path):
    if subprocess.run(["make", "--version"], capture_output=True).returncode != 0:
        pytest.skip("no make")
    for sub in ("datasets/abc", "models/tiny-llama-1", "samples"):
        (tmp_path / sub).mkdir(parents=True)
    env = {**os.environ, "FINETUNE_CACHE": str(tmp_path)}
    proc = subprocess.run(["make", "-s", "clean-cache"], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "samples"]


# -- through the CLI, as a user would ----------------------------------------------------------------


def _finetune(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finetune", "+recipe=tiny-demo", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=600)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


@pytest.mark.slow
def test_a_finished_run_is_never_overwritten_an_interrupted_one_blocks_nothing_and_rejections_leave_nothing(
        tmp_path):
    """As a user would: an interrupted run of other overrides lies under outputs/tiny-demo/; a plain run still
    starts (a new run beside it). Reusing the finished run's directory is refused in one line (exit 2), leaving
    its adapter and export/ as they were; train.overwrite=true replaces the run and removes the stale export.
    Commands rejected before their MLflow run begins (a bad value; a ConfigError after the data stage) leave no
    run directory."""
    recipe_dir = tmp_path / "outputs" / "tiny-demo"
    from finetune.config import to_plain_dict

    interrupted = _interrupted_run(recipe_dir, "2026-01-01_00-00-00",
                                   to_plain_dict(compose(["+recipe=tiny-demo", "adapter.rank=4", *QUIET])))
    mine = recipe_dir / "mine"
    train = ["train.max_steps=2", f"hydra.run.dir={mine}", *QUIET]
    first = _finetune(tmp_path, *train)
    assert first.returncode == 0, first.stderr[-3000:]
    said = first.stdout + first.stderr
    assert "not resuming the interrupted run" in said and "adapter.rank: 4 -> 16" in said
    assert (interrupted / resume.CHECKPOINTS / "checkpoint-4" / resume.COMPLETE).is_file(), "left as it was"
    adapter = (mine / "adapter" / "adapter_model.safetensors").read_bytes()
    (mine / "export").mkdir()
    (mine / "export" / "model-q4_k_m.gguf").write_bytes(b"GGUF of that adapter")

    again = _finetune(tmp_path, *train)
    assert again.returncode == 2
    line = _one_error_line(again)
    assert f"{mine} holds a finished run" in line and "train.overwrite=true" in line and "new directory" in line
    assert (mine / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert (mine / "export" / "model-q4_k_m.gguf").is_file()
    assert len(_client(tmp_path).search_runs(experiment_ids=["1"])) == 1, "no MLflow run for the refused command"

    over = _finetune(tmp_path, *train, "train.overwrite=true", "train.seed=7")
    assert over.returncode == 0, over.stderr[-3000:]
    assert "train.overwrite=true: removed the finished run" in over.stdout + over.stderr
    assert not (mine / "export").exists(), "the stale export went with the run it was made from"
    assert (mine / "adapter" / "adapter_model.safetensors").read_bytes() != adapter

    before = sorted(p.name for p in recipe_dir.iterdir())
    bad_value = _finetune(tmp_path, "train.learning_rate=-1", *QUIET)
    assert bad_value.returncode == 2 and "train.learning_rate" in _one_error_line(bad_value)
    after_data = _finetune(tmp_path, "train.resume=/no/such/checkpoint", *QUIET)  # refused after the data stage
    assert after_data.returncode == 2 and "/no/such/checkpoint does not exist" in _one_error_line(after_data)
    assert sorted(p.name for p in recipe_dir.iterdir()) == before, "rejected commands leave no run directory"


@pytest.mark.slow
def test_the_same_command_in_a_second_terminal_starts_its_own_run(tmp_path):
    """Terminal 1 trains; terminal 2 runs the same command: train.resume=auto must not join it."""
    args = ["train.max_steps=400", "train.save_steps=2", *QUIET]
    first, first_out = _start(tmp_path, args, "first")
    second = None
    try:
        assert _wait_for(lambda: any(tmp_path.glob("outputs/tiny-demo/*/checkpoints/checkpoint-2/COMPLETE")),
                         180, first), first_out.read_text()[-3000:]
        first_dir = next(tmp_path.glob("outputs/tiny-demo/*/run.json")).parent
        second, second_out = _start(tmp_path, args, "second")

        def second_started() -> bool:  # its own run, or (the old behaviour) a resume of the first
            return any(d != first_dir and ((d / "run.json").exists() or (d / "resume.json").exists())
                       for d in tmp_path.glob("outputs/tiny-demo/*"))

        assert _wait_for(second_started, 180, first, second), second_out.read_text()[-3000:]
    finally:
        _kill(first, *([second] if second else []))
    second_dir = next(d for d in tmp_path.glob("outputs/tiny-demo/*") if d != first_dir)
    assert not (second_dir / "resume.json").exists(), "the second terminal resumed the live run"
    assert (second_dir / "run.json").exists()
    assert _run_id(first_dir) != _run_id(second_dir)
    log = second_out.read_text()
    skipped = [line for line in log.splitlines() if "not resuming" in line]
    assert len(skipped) == 1 and str(first_dir) in skipped[0] and f"pid {first.pid}" in skipped[0], log[-3000:]


@pytest.mark.slow
def test_runs_started_together_get_their_own_directories_and_mlflow_runs(tmp_path):
    """Two runs in the same run directory (two starts within one second share Hydra's timestamped
    directory; here: one explicit hydra.run.dir, given to both), against a store neither created yet."""
    args = ["train.max_steps=2", "hydra.run.dir=outputs/tiny-demo/together", *QUIET]
    procs = [_start(tmp_path, args, f"run{i}") for i in range(2)]
    try:
        for proc, out in procs:
            proc.wait(timeout=300)
            assert proc.returncode == 0, out.read_text()[-3000:]
    finally:
        _kill(*(p for p, _ in procs))
    dirs = sorted(p.parent.name for p in tmp_path.glob("outputs/tiny-demo/*/run.json"))
    assert dirs == ["together", "together-2"]
    together = tmp_path / "outputs" / "tiny-demo"
    assert all((together / d / "adapter" / "adapter_model.safetensors").is_file() for d in dirs)
    runs = _client(tmp_path).search_runs(experiment_ids=["1"])
    assert sorted(r.info.run_id for r in runs) == sorted(_run_id(together / d) for d in dirs)
    assert {r.info.status for r in runs} == {"FINISHED"}
    # The one that moved says so, in its own log (Hydra's log followed it to its directory).
    assert "belongs to another run still in progress" in (together / "together-2" / "cli.log").read_text()


@pytest.mark.slow
def test_after_kill_9_a_fresh_start_marks_the_dead_run_killed_and_the_same_command_resumes_it(tmp_path):
    """kill -9 loses at most the steps since the last checkpoint: a fresh start (train.resume=never) ends the
    dead run's MLflow run as KILLED, and the original command (train.resume=auto) then continues the dead run
    from its newest complete checkpoint."""
    cmd = ["train.max_steps=40", "train.save_steps=5", *QUIET]
    first, first_out = _start(tmp_path, cmd, "first")
    try:
        assert _wait_for(lambda: any(tmp_path.glob("outputs/tiny-demo/*/checkpoints/checkpoint-10/COMPLETE")),
                         180, first), first_out.read_text()[-3000:]
    finally:
        _kill(first)  # SIGKILL: nothing runs on the way out, the MLflow run stays RUNNING
        first.wait(timeout=60)
    dead_dir = next(tmp_path.glob("outputs/tiny-demo/*/run.json")).parent
    dead_id = _run_id(dead_dir)
    assert _client(tmp_path).get_run(dead_id).info.status == "RUNNING"
    last = resume.complete_checkpoints(dead_dir)[-1][0]
    assert 10 <= last < 40
    killed_at = time.time()

    again = subprocess.run([sys.executable, "-m", "finetune", "+recipe=tiny-demo", "train.max_steps=2",
                            "train.resume=never", *QUIET], cwd=tmp_path, env=_env(), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    dead = _client(tmp_path).get_run(dead_id)
    assert dead.info.status == "KILLED"
    assert dead.info.start_time <= dead.info.end_time <= killed_at * 1000 + 1000, "ended when it died"
    assert "kill -9" in dead.data.tags["ended_by"]
    assert f"{dead_id} ({dead_dir}) was still RUNNING" in again.stdout
    fresh = next(d for d in tmp_path.glob("outputs/tiny-demo/*") if (d / "run.json").exists() and d != dead_dir)
    assert _client(tmp_path).get_run(_run_id(fresh)).info.status == "FINISHED"

    resumed = subprocess.run([sys.executable, "-m", "finetune", "+recipe=tiny-demo", *cmd], cwd=tmp_path,
                             env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = json.loads((dead_dir / "train_result.json").read_text())
    assert result["resumed_from_step"] == last and result["steps"] == 40
    assert _client(tmp_path).get_run(dead_id).info.status == "FINISHED"


def test_make_ui_first_marks_runs_killed_outright_as_killed(tmp_path):
    """What `make ui` runs before the UI (python -m finetune.tracking): a run directory whose process is gone
    (kill -9, the OOM killer) while its MLflow run is RUNNING is marked KILLED; a live one is left alone."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("finetune")
    dead, live = client.create_run(experiment), client.create_run(experiment)
    for name, run in (("dead", dead), ("live", live)):
        run_dir = tmp_path / "outputs" / "tiny-demo" / name
        run_dir.mkdir(parents=True)
        (run_dir / "run.json").write_text(json.dumps({"run_id": run.info.run_id, "tracking_uri": uri}))
    lock = resume.claim(tmp_path / "outputs" / "tiny-demo" / "live")  # a process still training there
    try:
        proc = subprocess.run([sys.executable, "-m", "finetune.tracking"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)
    finally:
        lock.release()
    assert proc.returncode == 0, proc.stderr
    assert "marked 1 MLflow run KILLED whose process is gone" in proc.stdout and dead.info.run_id in proc.stdout
    assert client.get_run(dead.info.run_id).info.status == "KILLED"
    assert client.get_run(live.info.run_id).info.status == "RUNNING"


def test_a_rejected_command_never_removes_a_directory_a_live_run_works_in(tmp_path):
    """Two commands given one hydra.run.dir: the second moves beside the live first one (<dir>-2); when it is then
    rejected, only its own directory goes, never the live run's (which holds nothing but bookkeeping yet)."""
    from finetune.errors import ConfigError
    from finetune.pipeline import remove_rejected_run_dir

    live = tmp_path / "run"
    lock = resume.claim(live)
    (live / "config.yaml").write_text("name: tiny-demo\n")
    mine = tmp_path / "run-2"
    (mine / ".hydra").mkdir(parents=True)
    try:
        for path in (live, mine):
            remove_rejected_run_dir(path, ConfigError("rejected"))
        assert (live / "config.yaml").is_file(), "the live run's directory is left alone"
        assert not mine.exists(), "the rejected command's own directory is gone"
    finally:
        lock.release()
