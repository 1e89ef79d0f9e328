"""Adapters out of MLflow: a run's artifact (runs:/<run id>/adapter) or a registered model (models:/<name>/<version>,
models:/<name>@<alias>), downloaded once into the cache and used as a local adapter directory.

A registered model is what ``tracking.register_model`` logs: MLflow's transformers flavor, the peft adapter in a
subdirectory of the model; we take the directory that holds adapter_config.json. The download goes into a
hidden directory renamed into place when complete, so an interrupted download is never mistaken for an adapter.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import uuid
from pathlib import Path

from finetune.errors import ConfigError, EnvError
from finetune.redaction import mask

log = logging.getLogger(__name__)

SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")


def is_mlflow_uri(spec: str) -> bool:
    return str(spec).startswith(SCHEMES)


def _source_run(client, uri: str) -> str | None:
    """The id of the run that logged what `uri` names."""
    if uri.startswith("runs:/"):
        return uri[len("runs:/"):].split("/", 1)[0] or None
    if uri.startswith("models:/"):
        ref = uri[len("models:/"):].strip("/")
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return client.get_model_version_by_alias(name, alias).run_id
        name, _, version = ref.partition("/")
        if version.isdigit():
            return client.get_model_version(name, version).run_id
        if version == "latest" or not version:
            versions = client.search_model_versions(f"name='{name}'")
            return max(versions, key=lambda v: int(v.version)).run_id if versions else None
    return None


def _find_adapter(root: Path) -> Path | None:
    found = sorted(root.rglob("adapter_config.json"), key=lambda p: len(p.parts))
    return found[0].parent if found else None


def download_adapter(uri: str, tracking_uri: str, cache: Path) -> tuple[Path, str | None]:
    """(the local adapter directory, the id of the run that logged it) for an MLflow URI."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        run_id = _source_run(client, uri)
    except Exception as e:
        raise ConfigError(f"train.init_adapter: {uri}: no such model in the registry at {mask(tracking_uri)} "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    # keyed by the run that logged it too: an alias or "latest" that moves to another run is another entry, and a
    # run's artifacts never change, so an entry, once complete, is reused as it is
    key = hashlib.sha256(f"{mask(tracking_uri)}\n{uri}\n{run_id}".encode()).hexdigest()[:16]
    dest = cache / "adapters" / key
    if dest.is_dir() and _find_adapter(dest) is not None:
        return _find_adapter(dest), run_id
    tmp = dest.with_name(f".{key}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir(parents=True)
    try:
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp), tracking_uri=tracking_uri)
        except Exception as e:
            text = str(e).splitlines()[0] if str(e) else type(e).__name__
            if "RESOURCE_DOES_NOT_EXIST" in str(e) or "not found" in text.lower() or "No such" in text:
                raise ConfigError(f"train.init_adapter: {uri} does not exist in {mask(tracking_uri)} ({text}); "
                                  "runs:/<run id>/adapter names a finetune run's adapter") from e
            raise EnvError(f"train.init_adapter: could not download {uri} from {mask(tracking_uri)} ({text})") from e
        if _find_adapter(tmp) is None:
            raise ConfigError(f"train.init_adapter: {uri} holds no adapter (no adapter_config.json in what MLflow "
                              "returned); give runs:/<run id>/adapter or a model registered by finetune")
        try:
            tmp.rename(dest)
        except OSError:  # another process (a rank of this run) put the same download there first: use that one
            if _find_adapter(dest) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("train.init_adapter: %s downloaded to %s", uri, dest)
    return _find_adapter(dest), run_id


RUN_FILES = ("config.yaml", "plan.json")  # what a finetune run logs beside adapter/ (the recipe and the plan)


def download_run(uri: str, tracking_uri: str, cache: Path) -> Path:
    """A finetune run out of MLflow (runs:/<run id>[/...] or a model registered by finetune, models:/...), laid out
    as its run directory (adapter/, config.yaml, plan.json, run.json naming the run), for the tools that take a
    run directory (finetune-export)."""
    import json

    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        run_id = _source_run(client, uri)
        experiment_id = client.get_run(run_id).info.experiment_id if run_id else None
    except Exception as e:
        raise ConfigError(f"{uri}: not found in {mask(tracking_uri)} "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if not run_id:
        raise ConfigError(f"{uri}: MLflow names no run that logged it; give runs:/<run id> or models:/<name>/<version>")
    dest = cache / "runs" / hashlib.sha256(f"{mask(tracking_uri)}\n{run_id}".encode()).hexdigest()[:16]
    if not (dest / "adapter" / "adapter_config.json").is_file():
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.mkdir(parents=True)
        try:
            for name in ("adapter", *RUN_FILES):
                try:
                    mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{run_id}/{name}", dst_path=str(tmp),
                                                        tracking_uri=tracking_uri)
                except Exception as e:
                    raise ConfigError(f"{uri}: run {run_id} has no {name} artifact (not a finished finetune run?): "
                                      f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
            (tmp / "run.json").write_text(json.dumps({"run_id": run_id, "experiment_id": experiment_id,
                                                      "tracking_uri": mask(tracking_uri)}, indent=2) + "\n")
            if dest.exists():
                shutil.rmtree(dest)
            tmp.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def log_export(run_dir: Path, files: list[Path], params: dict[str, object], tracking_uri: str | None = None,
               metrics: dict[str, float] | None = None) -> str | None:
    """Log exported files (artifacts under export/), their params and the check's figures (metrics) to the MLflow
    run that trained the adapter (its run.json). Returns the run id, or None (with a warning) when that run cannot
    be reached: the export itself is done either way."""
    import json

    try:
        record = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        log.warning("%s has no run.json: the export is not logged to MLflow", run_dir)
        return None
    uri = tracking_uri or record.get("tracking_uri")
    if not uri or "***" in uri:
        log.warning("the run's tracking URI is masked (%s): pass --tracking-uri to log the export to MLflow", uri)
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run_id = record["run_id"]
    try:
        for path in files:
            client.log_artifact(run_id, str(path), "export")
        for key, value in params.items():
            try:
                client.log_param(run_id, key, value)
            except Exception:  # an earlier export logged another value: params are immutable, so a tag
                client.set_tag(run_id, key, value)
        for key, value in (metrics or {}).items():
            client.log_metric(run_id, key, float(value))
    except Exception as e:
        log.warning("could not log the export to MLflow run %s at %s (%s: %s)", run_id, mask(uri), type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "")
        return None
    return run_id
