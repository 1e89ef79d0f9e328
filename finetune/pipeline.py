"""Runs the stages in order: data -> preflight -> train -> eval.

Each stage takes the previous stage's output object and returns its own; each
output is written as JSON into the run directory, and (in a training run) logged to
MLflow through finetune.tracking. A run that only plans (``stages=[preflight]``)
opens no MLflow run and imports neither torch nor mlflow.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from finetune.architectures import catalog
from finetune.architectures.catalog import ResolvedModel
from finetune.config import RunConfig, Stage, flatten, to_plain_dict
from finetune.distributed import is_leader, world
from finetune.errors import ConfigError, FinetuneError
from finetune.quiet import quiet_libraries

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
    for pkg in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "mlflow",
                "hydra-core"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _model_config(cfg: RunConfig, model: ResolvedModel) -> dict | None:
    """The model's config.json: as resolved offline, else through transformers (the hub, when online); None if it
    cannot be read."""
    if model.config is not None:
        return model.config
    try:
        from transformers import AutoConfig

        from finetune.models.loader import resolve_path

        return AutoConfig.from_pretrained(resolve_path(cfg.model), revision=cfg.model.revision,
                                          trust_remote_code=cfg.model.trust_remote_code).to_dict()
    except Exception:  # no network, no access: packing falls back to padded batches and the report says why
        return None


def resolve_init_adapter(cfg: RunConfig, stages: set[str]):
    """train.init_adapter as a local adapter (an MLflow URI downloaded once into the cache), checked against the
    recipe's base model; its LoRA shape replaces the recipe's adapter.* (training continues those weights, and
    the plan must count them). None without one. A run that only plans reads a local adapter's shape, and
    plans an MLflow URI's with the recipe's adapter.* (it imports no mlflow)."""
    from dataclasses import replace

    from finetune.models import adapters

    spec = cfg.train.init_adapter
    if not spec:
        return None
    from finetune.tracking.artifacts import is_mlflow_uri

    if is_mlflow_uri(spec):
        if Stage.train.value not in stages:
            log.warning("train.init_adapter=%s is read when training; this plan uses the recipe's adapter.* "
                        "(rank %d), which that adapter's shape replaces then", spec, cfg.adapter.rank)
            return None
        from finetune.paths import cache_dir
        from finetune.tracking import absolute_uri
        from finetune.tracking.artifacts import download_adapter

        tracking_uri = absolute_uri(cfg.tracking.uri)
        path, run_id = download_adapter(spec, tracking_uri, cache_dir())
        init = adapters.from_directory(path, spec)
        init.run_id, init.tracking_uri = run_id or init.run_id, tracking_uri if run_id else init.tracking_uri
        if run_id and (not init.lineage or init.lineage[-1] != run_id):
            init.lineage = [*init.lineage, run_id]
    else:
        init = adapters.from_directory(spec)
    if not adapters.same_model(init, cfg.model):
        raise ConfigError(f"train.init_adapter: {spec} was trained on {init.base_model}, and this recipe's model is "
                          f"{cfg.model.name_or_path}; an adapter only continues on the base it was trained on")
    settings = init.adapter_settings()
    changed = {k: (getattr(cfg.adapter, k), v) for k, v in settings.items() if getattr(cfg.adapter, k) != v}
    if changed:
        log.info("train.init_adapter: continuing %s's LoRA shape: %s", init.path,
                 ", ".join(f"adapter.{k}={new} (recipe: {old})" for k, (old, new) in changed.items()))
        cfg.adapter = replace(cfg.adapter, **settings)
    return init


def run_data_stage(cfg: RunConfig, run_dir: Path, model: ResolvedModel | None = None):
    """Prepare (or reuse) the dataset; writes data_report.json and token_lengths.png into the run directory.
    `model`: the run's model as the pipeline resolved it (resolved here when not given)."""
    from data_prep.prepare import RejectedRowsError, prepare
    from data_prep.report import write_histogram
    from data_prep.templates import BUILTIN
    from finetune.models.loader import load_tokenizer

    model = model or catalog.resolve_model(cfg.model.name_or_path)
    builtin = BUILTIN.get(cfg.model.chat_template or "")
    tokenizer = load_tokenizer(cfg.model, model.vocab_size, builtin.jinja if builtin else None)
    _remove_orphaned_builds()
    model_config = _model_config(cfg, model) if cfg.dataset.packing and not (cfg.preference or cfg.grpo) else None
    try:
        if cfg.grpo:  # prompts and their reference columns, for GRPO's sampled completions
            from data_prep import prompts
            from finetune import rewards

            functions = rewards.build(cfg.reward, tokenizer)  # every declaration checked before the data is read
            data = prompts.prepare(cfg.dataset, tokenizer, cfg.model.chat_template)
            rewards.check_columns(functions, set(data.columns), cfg.dataset.path or "dataset.sources")
        elif cfg.preference:  # pairs (or KTO's labelled completions) for a preference method
            from data_prep import preference

            data = preference.prepare(cfg.dataset, tokenizer, cfg.model.chat_template)
            if data.kind == "unpaired" and cfg.train.method.value != "kto":
                raise ConfigError(f"train.method={cfg.train.method.value} trains on pairs (prompt / chosen / "
                                  f"rejected), but {cfg.dataset.path or 'dataset.sources'} holds unpaired completion "
                                  "+ label rows: use train.method=kto, or pair the rows")
        else:
            from finetune.probes.packing import padding_free_packing

            # the facts about the model the data stage needs, handed over (data_prep imports no model layer)
            data = prepare(cfg.dataset, tokenizer, cfg.model.chat_template,
                           model_type=(model_config or {}).get("model_type"), model_config=model_config,
                           packing_probe=padding_free_packing)
    except RejectedRowsError as e:
        if is_leader():
            e.report.write(run_dir / "data_report.json")  # the rejected rows, with their locations, for the user
        raise
    if is_leader():
        data.report.write(run_dir / "data_report.json")
        write_histogram(data.lengths, data.report, run_dir / "token_lengths.png")
        from data_prep import heldout

        heldout.write(data.eval_messages, run_dir)
    r = data.report
    rejected = f", {r.rows_rejected} rejected ({', '.join(f'{k} {v}' for k, v in r.rejected.items())})" \
        if r.rows_rejected else ""
    packing = f"; packed into {r.packing.rows} rows ({r.packing.efficiency:.0%} full)" if r.packing.enabled else ""
    log.info("data: %d rows read (%s%s), %d kept%s, %d duplicates; %d train / %d eval; tokens p50 %d / p95 %d / "
             "max %d; template %s%s%s", r.rows_read, r.format, " detected" if r.format_detected else "", r.rows_kept,
             rejected, r.duplicates, r.train_rows, r.eval_rows, r.tokens.p50, r.tokens.p95, r.tokens.max,
             r.chat_template, packing, " (reused from the cache)" if r.cache_hit else "")
    if r.multi_turn.get("split_examples") or r.multi_turn.get("setting") not in (None, "auto"):
        from data_prep.preview import multi_turn_line

        log.info("data: %s", multi_turn_line(r))
    if r.packing.requested and not r.packing.enabled:
        log.warning("data: dataset.packing is on but %s", r.packing.reason)
    if cfg.dataset.preview:
        if cfg.grpo:
            from data_prep.prompts import show
        elif cfg.preference:
            from data_prep.preference import show
        else:
            from data_prep.preview import show

        show(data, tokenizer, cfg.dataset.preview, console)
    return data, tokenizer


def _check_weights(cfg: RunConfig) -> None:
    """The weights training will load, checked before any stage runs: every shard the index names is there, and
    each safetensors file has the size its header gives (finetune/models/weights.py). A local directory, or the
    hub snapshot already in the cache; a hub model not downloaded yet is checked by its download."""
    from finetune.models import weights
    from finetune.models.loader import base_model_dir, check_model_files, local_model_dir

    local = local_model_dir(cfg.model)
    if local is None:
        try:
            local = Path(base_model_dir(cfg.model))  # the hub snapshot in the cache, never a network call
        except Exception:  # not in the cache (or no hub at all): training downloads it, and says if it cannot
            return
    check_model_files(local, trust_remote_code=bool(cfg.model.trust_remote_code))
    weights.check_sizes(weights.weight_files(local), local)


def _remove_orphaned_builds() -> None:
    """Half-built dataset stores of processes killed while preparing data (store.remove_orphans)."""
    from data_prep.store import remove_orphans
    from finetune.paths import cache_dir

    remove_orphans(cache_dir() / "datasets")


def _move_hydra_output(old: Path, new: Path) -> None:
    """This invocation's Hydra record (.hydra/) and log follow it from `old` to `new`."""
    if (old / ".hydra").is_dir():
        shutil.copytree(old / ".hydra", new / ".hydra", dirs_exist_ok=True)
    root = logging.getLogger()
    here = {old.resolve(), old.absolute()}  # a FileHandler keeps its file's absolute (unresolved) path
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent in here:
            moved = logging.FileHandler(new.resolve() / Path(handler.baseFilename).name, encoding=handler.encoding)
            moved.setFormatter(handler.formatter)
            moved.setLevel(handler.level)
            for f in handler.filters:
                moved.addFilter(f)
            root.removeHandler(handler)
            handler.close()
            root.addHandler(moved)


# What an earlier run left in its directory, removed by train.overwrite=true (this invocation's Hydra record and log,
# and the lock, stay)
_KEPT_ON_OVERWRITE = {".hydra", "run.lock"}


def _resumes_here(cfg: RunConfig, run_dir: Path) -> bool:
    """train.resume names this directory (or one of its checkpoints): continuing it here is what was asked."""
    if cfg.train.resume in ("auto", "never"):
        return False
    target, here = Path(cfg.train.resume).expanduser().resolve(), run_dir.resolve()
    return target == here or here in target.parents


def _refuse_used_run_dir(cfg: RunConfig, run_dir: Path, leader: bool) -> None:
    """A run directory given twice (hydra.run.dir, a multi-node RUN_ID reused) that holds a finished or an
    interrupted run: starting there would overwrite its recipe, plan and, step by step, its checkpoints and
    adapter, and leave its merged/ and export/ no longer matching. Refused unless train.resume names it, or
    train.overwrite=true (the old run's files are removed first, by rank 0, once it holds the directory's lock)."""
    from finetune.runs import complete_checkpoints, is_finished

    if not run_dir.is_dir() or _resumes_here(cfg, run_dir):
        return
    finished = is_finished(run_dir)
    done = complete_checkpoints(run_dir)
    if not finished and not done:
        return
    if cfg.train.overwrite:
        if leader:
            removed = sorted(p.name for p in run_dir.iterdir()
                             if p.name not in _KEPT_ON_OVERWRITE and p.suffix != ".log")
            for name in removed:
                path = run_dir / name
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            log.warning("train.overwrite=true: removed the %s run in %s (%s)", "finished" if finished else
                        "interrupted", run_dir, ", ".join(removed))
        return
    if finished:
        raise ConfigError(f"hydra.run.dir: {run_dir} holds a finished run (adapter in {run_dir / 'adapter'}); give "
                          "this run a new directory (leave hydra.run.dir out; make train-multi: a new RUN_ID), or "
                          "replace that run with train.overwrite=true (its adapter, results, merged/ and export/ "
                          "are removed)")
    raise ConfigError(f"hydra.run.dir: {run_dir} holds an interrupted run (complete checkpoint at step "
                      f"{done[-1][0]}); continue it with train.resume={run_dir}, or give this launch a new "
                      "directory (make train-multi: a new RUN_ID), where train.resume=auto finds it, or start "
                      "over there with train.overwrite=true")


# What a command that failed before its MLflow run began leaves in its run directory: removed with the directory
# (a rejected command leaves nothing behind). A data error's data_report.json, which lists the rejected rows,
# is kept, as is anything else.
_BOOKKEEPING = {".hydra", "run.lock", "config.yaml", "data_report.json", "token_lengths.png", "heldout.jsonl",
                "plan.json", "plan_memory.png"}


def remove_rejected_run_dir(run_dir: Path, error: BaseException) -> None:
    """`run_dir` removed when `error` ended the command before it wrote anything but bookkeeping there."""
    from data_prep.prepare import RejectedRowsError
    from finetune.runs import holder

    try:
        entries = list(run_dir.iterdir())
    except OSError:
        return
    if holder(run_dir) is not None:  # another live run works there (this one moved beside it): never touched
        return
    if isinstance(error, RejectedRowsError) or any(
            p.name not in _BOOKKEEPING and p.suffix != ".log" for p in entries):
        return
    with contextlib.suppress(OSError):
        shutil.rmtree(run_dir)


def _claim_run_dir(run_dir: Path, held: contextlib.ExitStack) -> Path:
    """The run directory this run owns, locked for as long as the run lasts (rank 0 only).

    Normally `run_dir` itself. If another live run works there (two runs started within the same
    second get the same timestamped directory from Hydra; or one explicit hydra.run.dir given
    twice), this run moves to the first new `<dir>-2`, `<dir>-3`, ... beside it. Under torchrun
    the ranks were all given that directory, so there it is an error instead."""
    from finetune.runs import claim, describe_holder, lock_record

    lock = claim(run_dir)
    if lock is None:
        other = describe_holder(lock_record(run_dir))
        if world()[1] > 1:
            raise ConfigError(f"hydra.run.dir: {run_dir} is the directory of another run still in progress "
                              f"({other}); give this launch a new one (make train-multi names one per launch)")
        for n in itertools.count(2):
            moved = run_dir.with_name(f"{run_dir.name}-{n}")
            try:
                moved.mkdir(parents=True)  # exclusive: of two runs racing for it, one gets it
            except FileExistsError:
                continue
            lock = claim(moved)
            if lock is not None:
                break
        _move_hydra_output(run_dir, moved)
        log.warning("run directory %s belongs to another run still in progress (%s): this run uses %s",
                    run_dir, other, moved)
        run_dir = moved
    held.enter_context(lock)
    return run_dir


def run_pipeline(cfg: RunConfig, run_dir: Path, sweep: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the recipe's stages in `run_dir`; returns what each stage produced (for callers and tests).

    A training run that continues an interrupted one (train.resume) trains on in that run's
    directory and MLflow run; `run_dir` then holds this invocation's log and a resume.json
    pointing there.

    One run per run directory: rank 0 holds a lock on `run_dir` (and on the resumed run's
    directory) until the run ends; a `run_dir` held by another live run is swapped for a new
    one beside it (results["run_dir"] says which).
    """
    dirs: list[Path] = []  # the run directory this invocation claimed (rank 0), for remove_rejected_run_dir
    try:
        with contextlib.ExitStack() as held:  # the run directories' locks, released last
            return _run_stages(cfg, run_dir, sweep, held, dirs)
    except Exception as error:
        if is_leader() and sweep is None:  # a sweep's job directories keep their record (sweep_job.json)
            for path in dirs:
                remove_rejected_run_dir(path, error)
        raise


def _run_stages(cfg: RunConfig, run_dir: Path, sweep: dict[str, Any] | None,
                held: contextlib.ExitStack, dirs: list[Path]) -> dict[str, Any]:
    from finetune.preflight import Plan, run_preflight, write_plan
    from finetune.preflight.show import show_plan

    quiet_libraries()
    stages = _stages(cfg)
    leader = is_leader()
    # the model, resolved once (config.json, offline first) and handed to every stage
    resolved = catalog.resolve_model(cfg.model.name_or_path)
    if Stage.train.value in stages:
        from finetune.train import check_world

        check_world(cfg)  # before any work, and before an MLflow run exists
        _check_weights(cfg)  # a missing or truncated shard: one line now, not after the data stage
    if Stage.preflight.value in stages:
        resolved.require()  # a hub id neither local nor in the catalog cannot be planned: say so before the hub
    if Stage.eval.value in stages:
        from finetune.evaluate.harness import require

        require(cfg)  # lm-eval tasks asked for: the harness must be there before hours of training
    init = resolve_init_adapter(cfg, stages)  # before the recipe is recorded: adapter.* are the adapter's
    run_dir.mkdir(parents=True, exist_ok=True)
    if leader:
        run_dir = _claim_run_dir(run_dir, held)
        dirs.append(run_dir)
    _refuse_used_run_dir(cfg, run_dir, leader)  # after the claim: never clears a directory a live run works in
    recipe = to_plain_dict(cfg)
    if leader:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    results: dict[str, Any] = {"run_dir": run_dir}

    data = tokenizer = None
    if Stage.data.value in stages:
        data, tokenizer = run_data_stage(cfg, run_dir, resolved)
        results["data"] = data

    resume_point = None
    if Stage.train.value in stages:
        from finetune.runs import resolve

        # A sweep's jobs are different recipes side by side: they start fresh (auto-resume is for single runs).
        mode = "never" if (sweep is not None and cfg.train.resume == "auto") else cfg.train.resume
        resume_point = resolve(mode, run_dir.parent, run_dir, recipe, data.report.fingerprint, take_lock=leader)
        if resume_point is not None and resume_point.lock is not None:
            held.enter_context(resume_point.lock)
    work_dir = resume_point.run_dir if resume_point is not None else run_dir
    results["work_dir"] = work_dir

    plan = None
    if resume_point is not None:
        # The interrupted run's plan (after any out-of-memory re-plan): the adapter continues on it.
        plan = Plan(**json.loads((work_dir / "plan.json").read_text()))
        if leader:
            (run_dir / "resume.json").write_text(json.dumps({
                "resumed_run_dir": str(work_dir.resolve()), "checkpoint": str(resume_point.checkpoint),
                "step": resume_point.step, "recipe_changes": resume_point.changes}, indent=2) + "\n")
        log.info("resuming %s from %s", work_dir, resume_point.describe())
    elif Stage.preflight.value in stages:
        plan = run_preflight(cfg, data.report if data is not None else None, model=resolved)
        if leader:
            write_plan(plan, run_dir)
    if plan is not None and leader:
        show_plan(plan, console)
    results["plan"] = plan

    if Stage.train.value not in stages:
        console.print(f"[bold]done[/bold]: {', '.join(s.value for s in cfg.stages)} -> {run_dir}")
        return results

    from finetune.tracking import NullTracker, Tracker

    run_name = f"{cfg.name}/{work_dir.name}"
    if sweep is not None:  # the compare view lists runs by name: say what this job changed
        changed = [o for o in sweep["overrides"] if not o.startswith(("+recipe=", "hydra."))]
        run_name = f"{cfg.name}/{sweep['job_num']} {' '.join(changed)}".strip()
    tracker = (Tracker(cfg.tracking, run_name=run_name, run_dir=work_dir,
                       run_id=resume_point.run_id if resume_point else None, sweep=sweep, recipe=cfg.name)
               if leader else NullTracker())
    with tracker:
        results["run_id"] = tracker.run_id
        if leader:
            from finetune.runs import dead_runs

            # Runs of this recipe whose process died (kill -9, a crash) without ending their MLflow run.
            tracker.end_dead_runs(dead_runs(run_dir.parent, exclude=[run_dir, work_dir]), found_by=run_dir)
        if resume_point is None:
            _log_run_start(tracker, cfg, plan, data, work_dir, sweep, init)
        else:
            tracker.set_tags({"resumed_from_step": resume_point.step, "resumed_by": str(run_dir.resolve())})
            if resume_point.changes:
                tracker.log_dict({"changes": resume_point.changes}, f"resumes/step-{resume_point.step}.json")
        results.update(_train_and_eval(cfg, plan, data, tokenizer, work_dir, tracker, stages, resume_point, init,
                                       resolved))
    if leader:
        console.print(f"[bold green]done[/bold green]: adapter {results['train'].adapter_dir}")
        console.print(f"MLflow run {results['run_id']} (experiment '{cfg.tracking.experiment}', {tracker.uri}); "
                      "see it with `make ui`")
    return results


def _lineage_tags(tracker, init, run_dir: Path, sweep) -> dict[str, str]:
    """The run's link to the run whose adapter it starts from: tags, lineage.json in the run directory (for its
    own descendants), and, outside a sweep (whose jobs hang under the sweep's parent), MLflow's parent tag when
    that run is in this store's experiment, so the UI lists it under the run it continues."""
    from finetune.models.adapters import LINEAGE_FILE

    tags = {"init_adapter": init.spec, "init_adapter_path": str(init.path)}
    if init.run_id:
        tags["init_adapter_run_id"] = init.run_id
    if init.lineage:
        tags["lineage"] = " > ".join(init.lineage)
    record = {"init_adapter": init.spec, "lineage": init.lineage}
    (run_dir / LINEAGE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    if sweep is None and init.run_id and tracker.has_run(init.run_id):
        tags["mlflow.parentRunId"] = init.run_id
    return tags


def _log_run_start(tracker, cfg: RunConfig, plan, data, run_dir: Path, sweep, init=None) -> None:
    params = flatten(cfg)
    params.update({f"plan.{k}": v for k, v in plan.choices.items()})
    params.update({f"plan.predicted_{k}": v for k, v in plan.predicted.items()})
    tracker.log_params(params)
    paths = [cfg.dataset.path] if cfg.dataset.path else [src.path for src in cfg.dataset.sources]
    tags = {"recipe": cfg.name, "model": cfg.model.name_or_path, "dataset": " + ".join(paths),
            "dataset_fingerprint": data.report.fingerprint, "run_dir": str(run_dir.resolve())}
    commit = _git_commit()
    if commit:
        tags["git_commit"] = commit
    tags.update({f"version.{k}": v for k, v in _versions().items()})
    if sweep is not None:
        tags["sweep_dir"] = sweep["dir"]
        tags["sweep_job"] = sweep["job_num"]
        tags["sweep_overrides"] = " ".join(sweep["overrides"])
    if init is not None:
        tags.update(_lineage_tags(tracker, init, run_dir, sweep))
    tracker.set_tags(tags)
    for name in ("config.yaml", "plan.json", "data_report.json", "token_lengths.png", "lineage.json"):
        if (run_dir / name).is_file():
            tracker.log_artifact(run_dir / name)
    from data_prep.readers import source_files
    from finetune.tracking import charts

    tracker.log_artifact(charts.memory_breakdown(plan.to_dict(), run_dir / "plan_memory.png"))
    files = []
    for path in paths:
        try:
            files += source_files(path)
        except FinetuneError:
            pass
    tracker.log_dataset(" + ".join(paths), files, data.report.fingerprint, data.report.rows_kept)


def _train_and_eval(cfg: RunConfig, plan, data, tokenizer, run_dir: Path, tracker, stages: set[str],
                    resume_point=None, init=None, resolved: ResolvedModel | None = None):
    from finetune.train import train

    out: dict[str, Any] = {}
    init_path = init.path if init is not None else None
    result, model = train(cfg, plan, data, tokenizer, run_dir, tracker, resume_point, init_adapter=init_path,
                          resolved=resolved)
    out["train"] = result
    out["model"] = model
    if not is_leader():
        return out  # rank 0 saves, evaluates and reports
    from finetune.tracking import charts

    (run_dir / "train_result.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    _record_measured_memory(run_dir, result, tracker)
    tracker.log_artifact(Path(result.adapter_dir), artifact_path="adapter")
    tracker.log_artifact(run_dir / "train_result.json")
    tracker.log_artifact(charts.loss_curves(result.loss_history, result.eval_history, run_dir / "loss_curves.png"))
    tracker.log_metrics({"train/tokens_per_s": result.tokens_per_s})

    if result.reward_history:  # GRPO: the mean reward per step, the total and each function's
        tracker.log_artifact(charts.reward_curves(result.reward_history, run_dir / "reward_curves.png"))

    if Stage.eval.value in stages and cfg.grpo:
        from finetune.evaluate import rewards as reward_eval

        report = reward_eval.evaluate(cfg, data, model, tokenizer)
        report.write(run_dir / "eval.json")
        tracker.log_metrics(report.metrics())
        tracker.log_artifact(run_dir / "eval.json")
        if report.rows:
            tracker.log_table(report.rows, "eval/completions.json")
        out["eval"] = report
    elif Stage.eval.value in stages and cfg.preference:
        from finetune.evaluate import preference

        report = preference.evaluate(cfg, data, model, tokenizer, init_adapter=init_path,
                                     quantized=result.choices["quantization"] != "none")
        report.write(run_dir / "eval.json")
        tracker.log_metrics(report.metrics())
        tracker.log_artifact(run_dir / "eval.json")
        if report.rows:
            tracker.log_table(report.rows, "eval/preference_pairs.json")
        if report.generation is not None:
            tracker.log_table(report.generation.rows, "eval/generations.json")
        out["eval"] = report
    elif Stage.eval.value in stages:
        from finetune.evaluate import evaluate

        report = evaluate(cfg, data, model, tokenizer, init_adapter=init_path,
                          quantized=result.choices["quantization"] != "none")
        report.write(run_dir / "eval.json")
        tracker.log_metrics(report.metrics())
        tracker.log_artifact(run_dir / "eval.json")
        if report.generation is not None:
            tracker.log_table(report.generation.rows, "eval/generations.json")
        out["eval"] = report

    if cfg.tracking.register_model:
        from finetune.models.loader import base_model_dir

        out["model_uri"] = tracker.log_adapter_model(
            model, tokenizer, base_model_dir(cfg.model), registered_name=cfg.name,
            pip_requirements=_pip_requirements())
    return out


def _record_measured_memory(run_dir: Path, result, tracker) -> None:
    """The measured peak beside the prediction: plan.json's `measured`, ratios in MLflow (CUDA);
    the CPU's peak RSS, marked as not comparable."""
    from finetune.preflight.measured import record_measurement

    path = run_dir / "plan.json"
    plan, metrics = record_measurement(json.loads(path.read_text()), result.peak_memory)
    path.write_text(json.dumps(plan, indent=2) + "\n")
    tracker.log_metrics(metrics)
    tracker.log_artifact(path)  # plan.json again, now with the measurement


def _pip_requirements() -> list[str]:
    """What the logged MLflow model needs, pinned to what trained it (inferring them is slow and
    imports the whole environment)."""
    versions = _versions()
    return [f"{pkg}=={versions[pkg]}" for pkg in ("torch", "transformers", "peft", "accelerate", "bitsandbytes")
            if pkg in versions]
