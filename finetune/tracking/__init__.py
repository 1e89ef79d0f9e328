"""MLflow tracking: our only module that talks to MLflow.

One run per training invocation (a Hydra multirun: one parent run for the sweep, one
child per job, so the UI's compare view lines the jobs up). The run always ends:
FINISHED on success, FAILED with the error (as a tag and an ``error.txt`` artifact) on
a crash, KILLED on an interrupt; never left RUNNING. Its id is written to ``run.json``
in the run directory, so that later stages and a resumed run find it. A process killed
outright (kill -9, a crash of the machine) cannot end its run: the next run of the same
recipe does (:meth:`Tracker.end_dead_runs`, KILLED, ended when its directory last changed).
A resumed run is RUNNING again and loses the ``error`` tag of the attempt it continues.

Several runs may start at once against a new SQLite store: creating (or upgrading) its
tables is done under a lock file beside it (``mlflow.db.lock``), one process at a time.

A remote tracking server that does not answer fails the run before any work starts
(exit 5), unless the recipe says ``tracking.fallback_local: true``: then the run is
logged into ./mlflow.db, and the log says so loudly.

mlflow is imported lazily: importing it costs ~2 s, which a preflight dry run must not pay.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import re
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

from finetune.errors import EnvError
from finetune.redaction import mask

log = logging.getLogger(__name__)

# Keys that could hold credentials are never logged (hf_token, api_key, secret, ... from a user's own
# extension of the schema): matched on the words of a key's last segment, so that eval.max_new_tokens
# or train/num_tokens are not mistaken for one.
_SECRET_WORDS = {"token", "secret", "password", "passwd", "apikey", "credential", "credentials", "auth"}
_MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value's length
LOCAL_URI = "sqlite:///mlflow.db"
# System metrics (CPU/GPU memory, utilization) every 5 s: MLflow's 10 s default misses short runs.
SYSTEM_METRICS_SECONDS = 5
PARENT_FILE = "mlflow_parent_run.json"
# Tags that say how a run's last attempt ended: a resumed run drops them.
_ENDED_TAGS = ("error", "ended_by")


def absolute_uri(uri: str) -> str:
    """sqlite:///mlflow.db -> sqlite:////abs/cwd/mlflow.db, so the run.json record (and MLflow's
    per-URI store cache) keeps pointing at the same file whatever the working directory later is."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and ":memory:" not in uri:
        return prefix + str(Path(uri[len(prefix):]).expanduser().resolve())
    return uri


def is_secret(key: str) -> bool:
    last = re.split(r"[./]", key.lower())[-1]
    words = re.split(r"[_\-]", last)
    return bool(_SECRET_WORDS & set(words)) or "api_key" in last or "apikey" in last


def redact(params: dict[str, Any]) -> dict[str, Any]:
    """Params / tags as logged: a key named like a credential loses its value; any other string value
    has the credentials it carries masked (http://user:***@host, ?token=***, an environment secret's
    value: finetune/redaction.py)."""
    def value(v: Any) -> Any:
        return v if v is None or isinstance(v, int | float) else mask(str(v))

    return {k: ("<redacted>" if is_secret(k) else value(v)) for k, v in params.items()}


def check_reachable(uri: str, fallback_local: bool) -> str:
    """The URI to log to: `uri` if its server answers; else ./mlflow.db (fallback_local) or EnvError."""
    if not uri.startswith(("http://", "https://")):
        return uri
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
        return uri
    except requests.RequestException as e:
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        if not fallback_local:
            raise EnvError(f"tracking.uri: no MLflow server answers at {uri} ({reason}); start it, fix "
                           "tracking.uri, or set tracking.fallback_local=true to log into ./mlflow.db") from e
        log.warning("!" * 78)
        log.warning("tracking.uri %s does not answer (%s)", uri, reason)
        log.warning("LOGGING THIS RUN LOCALLY into %s (tracking.fallback_local=true); `make ui` shows it",
                    absolute_uri(LOCAL_URI))
        log.warning("!" * 78)
        return LOCAL_URI


@contextlib.contextmanager
def _store_lock(uri: str):
    """Held while this process first opens a SQLite store: MLflow creates and migrates a new store's
    tables on first open, and two processes doing that at once fail ("table runs already exists",
    "duplicate column name"). Other stores (a server, a database server) need nothing here."""
    prefix = "sqlite:///"
    db = Path(uri[len(prefix):]) if uri.startswith(prefix) and ":memory:" not in uri else None
    if db is None or not db.parent.is_dir():  # a missing folder: MLflow's own error says so
        yield
        return
    with open(f"{db}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# sweep parent record file -> the real tracking URI (the file holds it masked)
_PARENT_URIS: dict[str, str] = {}


def sweep_parent(uri: str, experiment: str, sweep: dict[str, Any], name: str) -> str:
    """The parent run of a Hydra multirun (created by its first job, found by the others)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    record = Path(sweep["dir"]) / PARENT_FILE
    with _locked(record):
        if record.is_file():
            return json.loads(record.read_text())["run_id"]
        mlflow.set_tracking_uri(uri)
        exp = mlflow.set_experiment(experiment)
        client = MlflowClient(uri)
        run = client.create_run(exp.experiment_id, run_name=f"{name}/sweep-{Path(sweep['dir']).name}",
                                tags={"recipe": name, "sweep_dir": str(Path(sweep["dir"]).resolve()),
                                      "sweep": "true"})
        # The file says where the parent is, credentials masked; the real URI stays in this process for
        # end_sweep_parent (Hydra's basic launcher runs every job, and then ends the sweep, here).
        _PARENT_URIS[str(record.resolve())] = uri
        record.write_text(json.dumps({"run_id": run.info.run_id, "tracking_uri": mask(uri)}, indent=2) + "\n")
        return run.info.run_id


def end_sweep_parent(sweep_dir: Path, ok: bool, best: dict[str, Any] | None = None) -> str | None:
    """Called once the multirun is over: the parent run ends FINISHED, or FAILED if a job failed. `best` (a job's
    sweep record: run_id, objective, metric, dir, model_uri, register_as) is tagged on the parent (best_run_id,
    best_value, ...) and on that child (best_in_sweep), and its logged model, only that one, is registered as a
    new version of `register_as` (a sweep's jobs log their models unregistered: one version per sweep, not one
    per job). Returns that version's models:/NAME/N URI, or None."""
    record = sweep_dir / PARENT_FILE
    if not record.is_file():
        return None
    from mlflow.tracking import MlflowClient

    info = json.loads(record.read_text())
    uri = _PARENT_URIS.get(str(record.resolve()), info["tracking_uri"])
    client = MlflowClient(uri)
    registered = None
    if best is not None and best.get("model_uri") and best.get("register_as"):
        import mlflow

        mlflow.set_tracking_uri(uri)
        try:
            version = mlflow.register_model(best["model_uri"], best["register_as"])
            registered = f"models:/{version.name}/{version.version}"
            client.set_tag(info["run_id"], "best_model", registered)
        except Exception as e:  # a store without a registry: the best job's model stays logged, unregistered
            log.warning("could not register the best job's model %s (%s: %s)", best["model_uri"], type(e).__name__,
                        str(e).splitlines()[0] if str(e) else "")
    if best is not None:
        child = client.get_run(best["run_id"])
        client.set_tag(info["run_id"], "best_run_id", best["run_id"])
        client.set_tag(info["run_id"], "best_value", f"{best['objective']:.6g}")
        client.set_tag(info["run_id"], "best_metric", f"{best['metric']} ({best.get('direction') or 'minimize'})")
        client.set_tag(info["run_id"], "best_job", str(best.get("dir", "")))
        client.set_tag(info["run_id"], "best_overrides", child.data.tags.get("sweep_overrides", ""))
        client.set_tag(best["run_id"], "best_in_sweep", "true")
    client.set_terminated(info["run_id"], status="FINISHED" if ok else "FAILED")
    return registered


def end_dead_runs(client, uris: set[str], runs: list[tuple[Path, dict[str, Any]]], found_by: Path | str,
                  skip: str | None = None) -> list[str]:
    """The MLflow runs of dead run directories (finetune.runs.dead_runs: no process holds their lock; killed with
    -9, by the OOM killer, a crash) that are still RUNNING in the store `uris` names: KILLED, ended when the
    directory last changed (about when the process died), tagged ``ended_by``. Returns their ids."""
    from finetune.runs import last_change

    ended = []
    for run_dir, record in runs:
        run_id = record.get("run_id")
        if not run_id or run_id == skip or record.get("tracking_uri") not in uris:
            continue
        try:
            info = client.get_run(run_id).info
            if info.status != "RUNNING":
                continue
            end_ms = max(int(last_change(run_dir) * 1000), info.start_time or 0)
            client.set_tag(run_id, "ended_by", f"{Path(found_by).resolve()}: no process was running it "
                           "any more (kill -9, the OOM killer, a crash or a power cut)")
            client.set_terminated(run_id, status="KILLED", end_time=end_ms)
        except Exception as e:  # a deleted run, a store that changed: never fail this command over it
            log.warning("could not end the MLflow run %s of %s (%s: %s)", run_id, run_dir, type(e).__name__,
                        str(e).splitlines()[0] if str(e) else "")
            continue
        log.warning("MLflow run %s (%s) was still RUNNING but its process is gone (kill -9, the OOM killer or a "
                    "crash): marked KILLED", run_id, run_dir)
        ended.append(run_id)
    return ended


def end_dead_runs_under(outputs: Path, uri: str) -> list[str]:
    """Every dead run under `outputs` (outputs/<recipe>/<run>/ and a sweep's outputs/<recipe>/<time>-sweep/<job>/)
    still RUNNING in the store at `uri`, marked KILLED (what `make ui` does before it lists the runs)."""
    from mlflow.tracking import MlflowClient

    from finetune.runs import dead_runs

    uri = absolute_uri(uri)
    found = []
    for recipe_dir in sorted(p for p in Path(outputs).glob("*") if p.is_dir()):
        found += dead_runs(recipe_dir, exclude=[])
        for sweep_dir in sorted(p for p in recipe_dir.glob("*-sweep*") if p.is_dir()):
            found += dead_runs(sweep_dir, exclude=[])
    if not found:
        return []
    return end_dead_runs(MlflowClient(uri), {uri, mask(uri)}, found, outputs)


class Tracker:
    """Context manager around one MLflow run."""

    def __init__(self, cfg_tracking, run_name: str, run_dir: Path, run_id: str | None = None,
                 sweep: dict[str, Any] | None = None, recipe: str = ""):
        self.uri = absolute_uri(cfg_tracking.uri)
        self.cfg = cfg_tracking
        self.experiment = cfg_tracking.experiment
        self.run_name = run_name
        self.run_dir = run_dir
        self.run_id = run_id  # set: continue that run (a resumed training run)
        self.resumed = run_id is not None
        self.sweep = sweep
        self.recipe = recipe
        self.parent_run_id: str | None = None
        self.experiment_id: str | None = None
        self._mlflow: Any = None
        self._client: Any = None

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> Tracker:
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = absolute_uri(check_reachable(self.uri, self.cfg.fallback_local))
        self._mlflow = mlflow
        mlflow.set_tracking_uri(self.uri)
        if self.cfg.system_metrics:
            mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_SECONDS)
        try:
            with _store_lock(self.uri):  # the first use of the store in this process creates its tables
                exp = mlflow.set_experiment(self.experiment)
            if self.run_id is not None:
                run = mlflow.start_run(run_id=self.run_id, log_system_metrics=self.cfg.system_metrics)
            else:
                if self.sweep is not None:
                    self.parent_run_id = sweep_parent(self.uri, self.experiment, self.sweep, self.recipe)
                run = mlflow.start_run(run_name=self.run_name, experiment_id=exp.experiment_id,
                                       parent_run_id=self.parent_run_id, nested=self.parent_run_id is not None,
                                       log_system_metrics=self.cfg.system_metrics)
        except EnvError:
            raise
        except Exception as e:
            raise EnvError(f"tracking.uri: cannot open the MLflow store at {self.uri} "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
        self._client = MlflowClient(self.uri)
        self.experiment_id = exp.experiment_id
        self.run_id = run.info.run_id
        if self.resumed:  # RUNNING again (start_run did that): what ended the last attempt no longer holds
            for key in _ENDED_TAGS:
                if key in run.data.tags:
                    self._client.delete_tag(self.run_id, key)
        (self.run_dir / "run.json").write_text(json.dumps({
            "run_id": self.run_id, "experiment_id": exp.experiment_id, "experiment": self.experiment,
            "tracking_uri": mask(self.uri), "parent_run_id": self.parent_run_id,
        }, indent=2) + "\n")
        log.info("MLflow run %s in experiment '%s' (%s)%s", self.run_id, self.experiment, mask(self.uri),
                 " continued" if self.resumed else "")
        return self

    def end_dead_runs(self, runs: list[tuple[Path, dict[str, Any]]], found_by: Path) -> list[str]:
        """End the MLflow runs of dead run directories (finetune.runs.dead_runs: no process
        holds them) that are still RUNNING in this store: see :func:`end_dead_runs`."""
        return end_dead_runs(self._client, {self.uri, mask(self.uri)}, runs, found_by, skip=self.run_id)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._mlflow is None:
            return
        status = "FINISHED"
        if exc is not None:
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            try:
                from finetune.redaction import mask

                # masked like params and logs: an exception's text can hold a URI's password or a token
                self._mlflow.set_tag("error", mask(f"{type(exc).__name__}: {exc}")[:4000])
                self._mlflow.log_text(mask("".join(traceback.format_exception(exc_type, exc, tb))), "error.txt")
            except Exception:  # never mask the original error
                log.exception("could not record the error in MLflow")
        try:
            self._mlflow.flush_async_logging()
        finally:
            self._mlflow.end_run(status=status)

    def has_run(self, run_id: str) -> bool:
        """Is `run_id` a run of this store and of this run's experiment?"""
        try:
            return self._client.get_run(run_id).info.experiment_id == self.experiment_id
        except Exception:  # not in this store (another server, a deleted run)
            return False

    # -- logging -----------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        clean = {k: str(v)[:_MAX_PARAM_VALUE] for k, v in redact(params).items()}
        items = list(clean.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self._mlflow.log_params(dict(items[i:i + 100]))

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._mlflow.set_tags({k: str(v) for k, v in redact(tags).items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        # Asynchronous: a training step never waits on the tracking store (flushed at the end).
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step, synchronous=False)

    def log_metric_history(self, entries: list[tuple[str, float, int, int]]) -> None:
        """Many (key, value, step, timestamp_ms) points in one write (a training run's buffered steps)."""
        from mlflow.entities import Metric

        metrics = [Metric(key, float(value), timestamp, step) for key, value, step, timestamp in entries]
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self._client.log_batch(self.run_id, metrics=metrics[i:i + 1000], synchronous=False)

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        self._mlflow.log_dict(data, artifact_file)

    def record_replan(self, number: int, event: dict[str, Any]) -> None:
        """An out-of-memory re-plan: params cannot change once logged, so the event and the new plan
        go to a tag, a metric at the step, and replans/<n>.json."""
        self.set_tags({"oom_replans": number})
        self.log_metrics({"train/oom_replans": number}, step=event["step"])
        self.log_dict(event, f"replans/{number}.json")

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """Rows as an MLflow table (the UI's artifact view shows it, and compares it across runs)."""
        if rows:
            columns = {key: [row.get(key) for row in rows] for key in rows[0]}
            self._mlflow.log_table(data=columns, artifact_file=artifact_file)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if path.is_dir():
            self._mlflow.log_artifacts(str(path), artifact_path=artifact_path or path.name)
        else:
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_dataset(self, source: str, files: list[Path], fingerprint: str, rows: int) -> None:
        """The training data as an MLflow input, identified by our content fingerprint (the data is not copied)."""
        from mlflow.data.meta_dataset import MetaDataset

        if files:
            import os

            from mlflow.data.dataset_source_registry import resolve_dataset_source

            # One file, or the folder that holds them all (a directory, a glob, several sources).
            where = files[0] if len(files) == 1 else Path(os.path.commonpath([str(f.resolve()) for f in files]))
            with warnings.catch_warnings():
                # MLflow registers its local-file source twice ("" and "file" schemes) and warns that a
                # local path "can be interpreted in multiple ways": both are the same class.
                warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways.*")
                src = resolve_dataset_source(str(where.expanduser().resolve()))
        else:
            from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

            src = HuggingFaceDatasetSource(path=mask(source))
        dataset = MetaDataset(source=src, name=mask(source), digest=fingerprint)
        self._mlflow.log_input(dataset, context="training", tags={"rows": str(rows)})

    def log_adapter_model(self, model, tokenizer, base_model_path: str, registered_name: str | None,
                          pip_requirements: list[str]) -> str | None:
        """The adapter as an MLflow transformers model, registered as a new version of `registered_name` (in a
        sweep, not registered here: the sweep's end registers its best job's model, end_sweep_parent).

        peft models are logged as the adapter plus a reference to the base model. We pass the base
        as a local directory (never a hub id, which MLflow would resolve online to a commit) and
        explicit pip requirements (inferring them imports and inspects the environment, slowly);
        so the logged model reloads offline with mlflow.transformers.load_model.
        Returns the model URI, or None if logging failed (the adapter stays an artifact either way).
        """
        try:
            info = self._mlflow.transformers.log_model(
                transformers_model={"model": model, "tokenizer": tokenizer}, name="model",
                task="text-generation", base_model_path=base_model_path,
                registered_model_name=registered_name if self.sweep is None else None,
                pip_requirements=pip_requirements)
        except Exception as e:  # a registry-less server, say: keep the run, say what happened
            log.warning("could not log the adapter as an MLflow model (%s: %s); it is still an artifact",
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            return None
        _umask_local_artifacts(self._mlflow, info)
        return info.model_uri


def _umask_local_artifacts(mlflow, info) -> None:
    """A logged model's files in a local artifact store get the user's umask (its peft weights are written by
    safetensors' atomic save, mode 0600: a shared mlruns/ would be unreadable to the team), like the run's own."""
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    from finetune.paths import apply_umask

    try:
        location = mlflow.get_logged_model(info.model_id).artifact_location
    except Exception as e:  # an older MLflow or a remote store: nothing local to fix
        log.debug("logged model's artifact location unknown (%s)", e)
        return
    parsed = urlparse(location)
    if parsed.scheme in ("", "file"):
        apply_umask(url2pathname(parsed.path))


class NullTracker:
    """What ranks other than 0 get: every call does nothing (rank 0 tracks the run)."""

    run_id = None
    resumed = False
    uri = ""

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def wait_for_server(uri: str, timeout: float = 60.0) -> bool:
    """Poll an MLflow server's /health until it answers (for tests and scripts)."""
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(uri.rstrip("/") + "/health", timeout=2).ok:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.3)
    return False
