"""MLflow tracking: our only module that talks to MLflow.

One run per training invocation. The run always ends: FINISHED on success, FAILED
with the error (as a tag and an ``error.txt`` artifact) on a crash, KILLED on an
interrupt; never left RUNNING. Its id is written to ``run.json`` in the run
directory so that later stages (and a resumed run) find it.

mlflow is imported lazily: importing it costs ~2 s, which a preflight dry run
must not pay.
"""

from __future__ import annotations

import json
import logging
import re
import traceback
from pathlib import Path
from typing import Any

from finetune.errors import EnvError

log = logging.getLogger(__name__)

# Keys that could hold credentials are never logged (a recipe key named *token* or *secret*,
# say, from a user's own extension of the schema).
_SECRET = re.compile(r"(token|secret|password|passwd|api[_-]?key|credential)", re.IGNORECASE)
_MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value's length


def absolute_uri(uri: str) -> str:
    """sqlite:///mlflow.db -> sqlite:////abs/cwd/mlflow.db, so the run.json record (and MLflow's
    per-URI store cache) keeps pointing at the same file whatever the working directory later is."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and ":memory:" not in uri:
        return prefix + str(Path(uri[len(prefix):]).expanduser().resolve())
    return uri


def redact(params: dict[str, Any]) -> dict[str, Any]:
    return {k: ("<redacted>" if _SECRET.search(k) else v) for k, v in params.items()}


class Tracker:
    """Context manager around one MLflow run."""

    def __init__(self, uri: str, experiment: str, run_name: str, run_dir: Path, run_id: str | None = None):
        self.uri = absolute_uri(uri)
        self.experiment = experiment
        self.run_name = run_name
        self.run_dir = run_dir
        self.run_id = run_id  # set: continue that run (a resumed training run)
        self.resumed = run_id is not None
        self._mlflow: Any = None
        self._client: Any = None

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> Tracker:
        import mlflow
        from mlflow.tracking import MlflowClient

        self._mlflow = mlflow
        mlflow.set_tracking_uri(self.uri)
        try:
            exp = mlflow.set_experiment(self.experiment)
            if self.run_id is not None:
                run = mlflow.start_run(run_id=self.run_id)
            else:
                run = mlflow.start_run(run_name=self.run_name, experiment_id=exp.experiment_id)
        except Exception as e:
            raise EnvError(f"tracking.uri: cannot open the MLflow store at {self.uri} "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
        self._client = MlflowClient(self.uri)
        self.run_id = run.info.run_id
        (self.run_dir / "run.json").write_text(json.dumps({
            "run_id": self.run_id, "experiment_id": exp.experiment_id, "experiment": self.experiment,
            "tracking_uri": self.uri,
        }, indent=2) + "\n")
        log.info("MLflow run %s in experiment '%s' (%s)%s", self.run_id, self.experiment, self.uri,
                 " continued" if self.resumed else "")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._mlflow is None:
            return
        status = "FINISHED"
        if exc is not None:
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) or getattr(exc, "exit_code", 0) in (130, 143) \
                else "FAILED"
            try:
                self._mlflow.set_tag("error", f"{type(exc).__name__}: {str(exc)[:4000]}")
                self._mlflow.log_text("".join(traceback.format_exception(exc_type, exc, tb)), "error.txt")
            except Exception:  # never mask the original error
                log.exception("could not record the error in MLflow")
        try:
            self._mlflow.flush_async_logging()
        finally:
            self._mlflow.end_run(status=status)

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

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if path.is_dir():
            self._mlflow.log_artifacts(str(path), artifact_path=artifact_path or path.name)
        else:
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)


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


def read_run_json(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "run.json"
    return json.loads(path.read_text()) if path.is_file() else None
