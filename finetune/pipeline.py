"""Runs the stages in order: data -> preflight -> train -> eval.

Each stage takes the previous stage's output object and returns its own; each
output is written as JSON into the run directory, and (in a training run) logged to
MLflow through finetune.tracking. A run that only plans (``stages=[preflight]``)
opens no MLflow run and imports neither torch nor mlflow.
"""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import warnings
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from finetune.config import RunConfig, Stage, flatten, to_plain_dict
from finetune.errors import ConfigError

log = logging.getLogger(__name__)
# soft_wrap: long lines (paths, run ids) stay whole for grep and copy-paste; tables keep their layout.
console = Console(stderr=False, highlight=False, soft_wrap=True)


def _stages(cfg: RunConfig) -> set[str]:
    stages = {s.value for s in cfg.stages}
    if Stage.eval.value in stages and Stage.train.value not in stages:
        raise ConfigError("stages: eval runs on the adapter trained in the same invocation; "
                          "use stages=[data,preflight,train,eval] (the default)")
    if Stage.train.value in stages:
        stages |= {Stage.data.value, Stage.preflight.value}  # training needs the tokens and the plan
    return stages


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "mlflow", "hydra-core"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _model_vocab_size(cfg: RunConfig) -> int | None:
    from finetune.preflight import catalog

    try:
        return int(catalog.model_config(cfg.model.name_or_path)[0]["vocab_size"])
    except (ConfigError, KeyError, TypeError, ValueError):
        return None


def _model_type(cfg: RunConfig) -> str | None:
    """The model's architecture (config.json model_type), offline when the catalog knows it; None if unknown."""
    from finetune.preflight import catalog

    try:
        return catalog.model_config(cfg.model.name_or_path)[0].get("model_type")
    except ConfigError:
        pass
    try:
        from transformers import AutoConfig

        from finetune.models.loader import resolve_path

        return AutoConfig.from_pretrained(resolve_path(cfg.model), revision=cfg.model.revision,
                                          trust_remote_code=cfg.model.trust_remote_code).model_type
    except Exception:  # no network, no access: packing falls back to padded batches and the report says why
        return None


def run_data_stage(cfg: RunConfig, run_dir: Path):
    """Prepare (or reuse) the dataset; writes data_report.json and token_lengths.png into the run directory."""
    from data_prep.prepare import RejectedRowsError, prepare
    from data_prep.report import write_histogram
    from finetune.models.loader import load_tokenizer

    tokenizer = load_tokenizer(cfg.model, _model_vocab_size(cfg))
    model_type = _model_type(cfg) if cfg.dataset.packing else None
    try:
        data = prepare(cfg.dataset, tokenizer, cfg.model.chat_template, model_type=model_type)
    except RejectedRowsError as e:
        e.report.write(run_dir / "data_report.json")  # the rejected rows, with their locations, for the user
        raise
    data.report.write(run_dir / "data_report.json")
    write_histogram(data.lengths, data.report, run_dir / "token_lengths.png")
    r = data.report
    rejected = f", {r.rows_rejected} rejected ({', '.join(f'{k} {v}' for k, v in r.rejected.items())})" \
        if r.rows_rejected else ""
    packing = f"; packed into {r.packing.rows} rows ({r.packing.efficiency:.0%} full)" if r.packing.enabled else ""
    log.info("data: %d rows read (%s%s), %d kept%s, %d duplicates; %d train / %d eval; tokens p50 %d / p95 %d / "
             "max %d; template %s%s%s", r.rows_read, r.format, " detected" if r.format_detected else "", r.rows_kept,
             rejected, r.duplicates, r.train_rows, r.eval_rows, r.tokens.p50, r.tokens.p95, r.tokens.max,
             r.chat_template, packing, " (reused from the cache)" if r.cache_hit else "")
    if r.packing.requested and not r.packing.enabled:
        log.warning("data: dataset.packing is on but %s", r.packing.reason)
    if cfg.dataset.preview:
        from data_prep.preview import show

        show(data, tokenizer, cfg.dataset.preview, console)
    return data, tokenizer


def _quiet_libraries() -> None:
    # bitsandbytes warns on every CPU run that an optional kernel package is missing, then
    # falls back to its own CPU kernel, which is what we want; keep its real warnings.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # transformers deprecates the name TRL 1.16 still calls; nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning)


def run_pipeline(cfg: RunConfig, run_dir: Path, sweep: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the recipe's stages in `run_dir`; returns what each stage produced (for callers and tests)."""
    from finetune.preflight import run_preflight, write_plan
    from finetune.preflight.show import show_plan

    _quiet_libraries()
    stages = _stages(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    recipe = to_plain_dict(cfg)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    results: dict[str, Any] = {"run_dir": run_dir}

    data = tokenizer = None
    if Stage.data.value in stages:
        data, tokenizer = run_data_stage(cfg, run_dir)
        results["data"] = data

    plan = None
    if Stage.preflight.value in stages:
        plan = run_preflight(cfg, data.report if data is not None else None)
        write_plan(plan, run_dir)
        show_plan(plan, console)
        results["plan"] = plan

    if Stage.train.value not in stages:
        console.print(f"[bold]done[/bold]: {', '.join(s.value for s in cfg.stages)} -> {run_dir}")
        return results

    from finetune.tracking import Tracker

    with Tracker(cfg.tracking.uri, cfg.tracking.experiment, run_name=f"{cfg.name}/{run_dir.name}",
                 run_dir=run_dir) as tracker:
        results["run_id"] = tracker.run_id
        _log_run_start(tracker, cfg, plan, data, run_dir, sweep)
        results.update(_train_and_eval(cfg, plan, data, tokenizer, run_dir, tracker, stages))
    console.print(f"[bold green]done[/bold green]: adapter {results['train'].adapter_dir}")
    console.print(f"MLflow run {results['run_id']} (experiment '{cfg.tracking.experiment}', {tracker.uri}); "
                  "see it with `make ui`")
    return results


def _log_run_start(tracker, cfg: RunConfig, plan, data, run_dir: Path, sweep) -> None:
    params = flatten(cfg)
    params.update({f"plan.{k}": v for k, v in plan.choices.items()})
    params.update({f"plan.predicted_{k}": v for k, v in plan.predicted.items()})
    tracker.log_params(params)
    tags = {"recipe": cfg.name, "model": cfg.model.name_or_path, "dataset": cfg.dataset.path,
            "dataset_fingerprint": data.report.fingerprint, "run_dir": str(run_dir.resolve())}
    commit = _git_commit()
    if commit:
        tags["git_commit"] = commit
    tags.update({f"version.{k}": v for k, v in _versions().items()})
    if sweep is not None:
        tags["sweep_dir"] = sweep["dir"]
        tags["sweep_job"] = sweep["job_num"]
    tracker.set_tags(tags)
    for name in ("config.yaml", "plan.json", "data_report.json", "token_lengths.png"):
        tracker.log_artifact(run_dir / name)


def _train_and_eval(cfg: RunConfig, plan, data, tokenizer, run_dir: Path, tracker, stages: set[str]):
    from finetune.train import train

    out: dict[str, Any] = {}
    result, model = train(cfg, plan, data, tokenizer, run_dir, tracker)
    (run_dir / "train_result.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    tracker.log_artifact(Path(result.adapter_dir), artifact_path="adapter")
    tracker.log_artifact(run_dir / "train_result.json")
    tracker.log_metrics({"train/trained_tokens_per_s": result.trained_tokens_per_s})
    out["train"] = result
    out["model"] = model

    if Stage.eval.value in stages:
        from finetune.evaluate import evaluate

        report = evaluate(cfg, data, model, tokenizer)
        report.write(run_dir / "eval.json")
        tracker.log_metrics(report.metrics())
        tracker.log_artifact(run_dir / "eval.json")
        out["eval"] = report
    return out
