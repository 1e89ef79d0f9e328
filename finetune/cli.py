"""The `finetune` command: Hydra composes the recipe, the pipeline runs the stages.

    finetune +recipe=tiny-demo
    finetune +recipe=llama2-7b-medical stages=[preflight] hardware=rtx4090
    finetune -m +recipe=tiny-demo adapter.rank=8,16

Exit codes (contract, docs/DESIGN.md): 0 success, 2 recipe/config error,
3 data error, 4 does not fit, 5 environment, 130/143 interrupted, 1 anything else.
A multirun exits with the worst (highest) code of its jobs.

Expected errors print one line, ``error: ...``, and no traceback; set
HYDRA_FULL_ERROR=1 to see the traceback. Hydra itself reports composition errors
(a misspelled key, a missing recipe) in several lines and exits 1; we map those to
one line and exit 2 by wrapping Hydra's reporting function for the duration of
the call (hydra-core is pinned to 1.3.x, and tests/test_cli.py holds this to it).

Only this module, the config schema and the preflight are imported before a stage
needs more: `finetune --help` and a preflight dry run never import torch or mlflow.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from finetune.config import register_configs
from finetune.errors import ConfigError, EnvError, FinetuneError
from finetune.paths import disk_error, recipes_dir

# Exit codes of the jobs run by this process (one per job; several in a multirun), and of a multirun's jobs
# wherever its launcher ran them (read back from their job directories by SweepCallback).
_EXIT_CODES: list[int] = []
_SWEEP_CODES: list[int] = []
SWEEP_JOB_FILE = "sweep_job.json"  # in a multirun job's directory: its exit code, objective and MLflow run
# Sweep directories of multirun jobs run in this process, and those SweepCallback has ended: a sweep stopped by
# Ctrl-C never reaches the callback, and its parent run is ended on the way out instead.
_LOCAL_SWEEPS: set[str] = set()
_ENDED_SWEEPS: set[str] = set()


def _full_error() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def print_error(message: str) -> None:
    from finetune.redaction import mask

    sys.stderr.write(f"error: {mask(message)}\n")
    sys.stderr.flush()


# Hydra's launcher and sweeper plugins for clusters (the `cluster` extra): the config group they add -> package
CLUSTER_PLUGINS = {
    "hydra/launcher/ray": "hydra-ray-launcher", "hydra/launcher/ray_aws": "hydra-ray-launcher",
    "hydra/launcher/ray_cluster": "hydra-ray-launcher",
    "hydra/launcher/submitit_slurm": "hydra-submitit-launcher", "hydra/launcher/submitit_local": "hydra-submitit-launcher",
    "hydra/sweeper/optuna": "hydra-optuna-sweeper",
}


def _available_recipes() -> list[str]:
    return sorted(p.stem for p in (recipes_dir() / "recipe").glob("*.yaml"))


def describe_config_error(ex: BaseException) -> str:
    """One line for a Hydra / OmegaConf composition error: the key at fault and what to do."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

    recipes = ", ".join(_available_recipes()) or "none found"
    if isinstance(ex, MissingConfigException):
        group, _, name = (ex.missing_cfg_file or "").rpartition("/")
        if group == "recipe":
            return (f"no recipe named '{name}' (recipes: {recipes}; "
                    f"add your own with --config-dir DIR holding DIR/recipe/NAME.yaml)")
        plugin = CLUSTER_PLUGINS.get(f"{group}/{name}")
        if plugin is not None:
            return (f"{group}={name} needs {plugin}, which is not installed: pip install "
                    "'finetune-recipes[cluster]' (Ray, SLURM and Optuna for sweeps)")
        if group:
            options = f" (options: {', '.join(ex.options)})" if ex.options else ""
            return f"no {group} named '{name}'{options}"
        return str(ex).splitlines()[0]
    if isinstance(ex, OverrideParseException):
        return f"cannot parse the override: {str(ex).splitlines()[0]}"

    # Find the OmegaConf error that says which key is at fault.
    cause: BaseException | None = ex
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        key = getattr(cause, "full_key", None) or getattr(cause, "key", None) or "?"
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
            # Hydra names the whole override ("Could not override 'adaptr.rank'"); OmegaConf only its first part.
            m = re.search(r"override '([^']+)'", str(ex))
            key = m.group(1) if m else key
            return (f"unknown recipe key '{key}': check its spelling "
                    f"(`finetune +recipe=NAME --cfg job` lists every key)")
        if key == "name" and re.search(r"Missing mandatory value: name$|Incompatible value 'None'",
                                        str(cause).splitlines()[0]):
            return f"no recipe given: run finetune +recipe=NAME (recipes: {recipes})"
        if isinstance(cause, ValidationError):
            return f"{key}: {str(cause).splitlines()[0]}"
        return f"{key}: {str(cause).splitlines()[0]}"
    text = " ".join(line.strip() for line in str(ex).splitlines() if line.strip())
    return text or type(ex).__name__


def classify(ex: BaseException) -> tuple[int, str]:
    """Exit code and one-line message for an exception that reached the top."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(ex, FinetuneError):
        return ex.exit_code, str(ex)
    disk = _disk_error(ex)
    if disk is not None:
        return EnvError.exit_code, disk
    syntax = _yaml_syntax_error(ex)
    if syntax is not None:
        return ConfigError.exit_code, syntax
    if isinstance(ex, (HydraException, OmegaConfBaseException)):
        return ConfigError.exit_code, describe_config_error(ex)
    return 1, f"{type(ex).__name__}: {ex}"


# What a run needs the disk for, and where else it can write: the train command's words for a disk error
_RUN_FULL = ("a run needs room for its checkpoints and, the first time, the prepared dataset and the downloaded "
             "model", "hydra.run.dir=DIR, FINETUNE_CACHE=DIR, HF_HOME=DIR")
_RUN_ELSEWHERE = "hydra.run.dir=DIR, FINETUNE_CACHE=DIR for the cache"


def _disk_error(ex: BaseException) -> str | None:
    return disk_error(ex, needs=_RUN_FULL[0], elsewhere=_RUN_FULL[1], writable_elsewhere=_RUN_ELSEWHERE)


def _yaml_syntax_error(ex: BaseException) -> str | None:
    """One line for a recipe file that is not valid YAML (Hydra lets PyYAML's error through, with its
    multi-line message): file:line:column, what PyYAML expected, and the line where the construct began."""
    import yaml

    seen: set[int] = set()
    cause: BaseException | None = ex
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, yaml.MarkedYAMLError):
            mark = cause.problem_mark or cause.context_mark
            where = f"{mark.name}:{mark.line + 1}:{mark.column + 1}" if mark is not None else "a recipe file"
            problem = cause.problem or "invalid YAML"
            context = ""
            if cause.context and cause.context_mark is not None and cause.context_mark is not mark:
                context = f" ({cause.context}, which began at line {cause.context_mark.line + 1})"
            return f"{where}: YAML syntax error: {problem}{context}; fix the file"
        if isinstance(cause, yaml.YAMLError):
            return f"a recipe file is not valid YAML: {' '.join(str(cause).split())}"
        cause = cause.__cause__ or cause.__context__
    return None


def report(ex: Exception) -> int:
    """Print an error the way the contract says (one line; a traceback only for unexpected ones)
    and return its exit code. With HYDRA_FULL_ERROR=1 the exception propagates instead."""
    if _full_error():
        raise ex
    code, message = classify(ex)
    if code == 1:
        traceback.print_exception(ex)
    print_error(message)
    return code


@contextlib.contextmanager
def _hydra_errors_as_exit_codes() -> Iterator[None]:
    """Replace Hydra's multi-line error report (exit 1) with ours: one line, the right exit code."""
    import hydra._internal.utils as hydra_utils

    original = hydra_utils.run_and_report

    def run_and_report(func: Callable[[], Any]) -> Any:
        try:
            return func()
        except Exception as ex:
            sys.exit(report(ex))

    hydra_utils.run_and_report = run_and_report
    try:
        yield
    finally:
        hydra_utils.run_and_report = original


def _run_job(cfg: DictConfig) -> tuple[int, float | None]:
    """One job: validate the recipe, run the pipeline, turn expected errors into an exit code. Returns the code
    and, in a multirun, the job's objective (tracking.sweep_metric) for the sweeper; a multirun job also leaves
    both in its directory (sweep_job.json), for the process that ends the sweep, wherever the job ran."""
    from hydra.core.hydra_config import HydraConfig

    from finetune.config import to_run_config

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = str(hydra_cfg.mode) == "RunMode.MULTIRUN"
    _mask_hydra_files(hydra_cfg, run_dir, multirun)
    sweep = _sweep_info(hydra_cfg) if multirun else None
    if sweep is not None:
        _LOCAL_SWEEPS.add(sweep["dir"])
    code, objective, results, run_cfg = 0, None, {}, None
    try:
        run_cfg = to_run_config(cfg)
        from finetune.pipeline import run_pipeline

        results = run_pipeline(run_cfg, run_dir, sweep=sweep)
        objective = _objective(run_cfg, results) if multirun else None
    except KeyboardInterrupt as ex:
        # Ctrl-C or SIGTERM: stop here, do not go on with the next job of a sweep.
        code = getattr(ex, "exit_code", 130)
        print_error(str(ex) or "interrupted")
        if multirun:
            _record_sweep_job(run_dir, code, None, results, run_cfg, sweep)
        sys.exit(code)
    except Exception as ex:
        if not multirun:  # a rejected command leaves no run directory behind (finetune/pipeline.py)
            from finetune.distributed import is_leader
            from finetune.pipeline import remove_rejected_run_dir

            if is_leader():
                remove_rejected_run_dir(run_dir, ex)
        code = report(ex)
    finally:
        _release_memory()
    if multirun:
        _record_sweep_job(run_dir, code, objective, results, run_cfg, sweep)
    return code, objective


def _objective(run_cfg, results: dict[str, Any]) -> float | None:
    """tracking.sweep_metric of the job, from its eval report (None, with a warning, if it has none)."""
    import logging

    report = results.get("eval")
    metrics = report.metrics() if report is not None else {}
    value = metrics.get(run_cfg.tracking.sweep_metric)
    if value is None:
        logging.getLogger(__name__).warning(
            "tracking.sweep_metric=%s: this job logged no such metric (%s); the sweeper gets no objective from it",
            run_cfg.tracking.sweep_metric, ", ".join(sorted(metrics)) or "no eval stage ran")
        return None
    return float(value)


def _record_sweep_job(run_dir: Path, code: int, objective: float | None, results: dict[str, Any], run_cfg,
                      sweep: dict[str, Any] | None = None) -> None:
    import json

    record = {"exit_code": code, "objective": objective, "run_id": results.get("run_id"),
              "metric": run_cfg.tracking.sweep_metric if run_cfg else None,
              "direction": run_cfg.tracking.sweep_direction if run_cfg else None,
              # the job's logged model, registered by the sweep's end if this job is the best
              "model_uri": results.get("model_uri"),
              "register_as": run_cfg.name if run_cfg and run_cfg.tracking.register_model else None,
              "overrides": " ".join((sweep or {}).get("overrides", []))}
    with contextlib.suppress(OSError):
        (run_dir / SWEEP_JOB_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _mask_hydra_files(hydra_cfg: Any, run_dir: Path, multirun: bool) -> None:
    """Hydra saves the composed config and the command line (.hydra/config.yaml, hydra.yaml,
    overrides.yaml; a sweep's multirun.yaml) before the job starts, with every value as given: a
    tracking URI's password included. Rewrite them masked, first thing in the job (the run itself
    keeps the real values). Rewritten rather than not written (`hydra.output_subdir=null`), so that
    Hydra's record of the run stays where its users look for it."""
    from finetune.redaction import mask_file

    if hydra_cfg.output_subdir is not None:
        saved = run_dir / str(hydra_cfg.output_subdir)
        for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
            if (saved / name).is_file():
                mask_file(saved / name)
    if multirun and (Path(str(hydra_cfg.sweep.dir)) / "multirun.yaml").is_file():
        mask_file(Path(str(hydra_cfg.sweep.dir)) / "multirun.yaml")


def _release_memory() -> None:
    """Between the jobs of a sweep (one process runs them one after another): drop the last job's
    model and give its GPU memory back, so the next job starts with a clean device."""
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


class SweepCallback(Callback):
    """Hydra calls this in the process that launched a multirun, once every job is done, wherever the launcher
    ran them (here, on a Ray cluster, on SLURM): the jobs' exit codes come back from their directories
    (sweep_job.json, on the shared filesystem), the multirun exits with the worst, and the sweep's MLflow parent
    run ends FINISHED (FAILED if a job failed) with its best job tagged (tracking.sweep_metric)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Before any job: the sweep gets a directory of its own, so two sweeps started in the same second never
        share job directories or an MLflow parent run (`<time>-sweep-2`, by an exclusive mkdir). The jobs are
        composed again from the command line's Hydra overrides (wherever the launcher runs them), so the chosen
        directory goes there as one more override. A directory given explicitly (hydra.sweep.dir=DIR) is
        reused as asked, but an earlier sweep's parent run record in it is dropped: this sweep gets its own."""
        from omegaconf import open_dict

        from finetune.config import unique_dir
        from finetune.tracking import PARENT_FILE

        given = any(str(o).split("=", 1)[0].lstrip("+~") == "hydra.sweep.dir" for o in config.hydra.overrides.hydra)
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not given:
            chosen = Path(unique_dir(str(sweep_dir)))
            if chosen != sweep_dir:
                with open_dict(config):
                    config.hydra.sweep.dir = str(chosen)
                    config.hydra.overrides.hydra.append(f"hydra.sweep.dir={chosen}")
                sweep_dir = chosen
        with contextlib.suppress(OSError):
            (sweep_dir / PARENT_FILE).unlink(missing_ok=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        import json

        from finetune.tracking import end_sweep_parent

        sweep_dir = Path(str(config.hydra.sweep.dir))
        jobs = []
        for path in sorted(sweep_dir.glob(f"*/{SWEEP_JOB_FILE}")):
            with contextlib.suppress(OSError, ValueError):
                jobs.append(dict(json.loads(path.read_text()), dir=path.parent.name))
        killed = _killed_jobs(sweep_dir, {j["dir"] for j in jobs})
        codes = [int(j["exit_code"]) for j in jobs] + [137] * len(killed) or [1]
        _SWEEP_CODES.extend(codes)
        scored = [j for j in jobs if j.get("objective") is not None and j.get("run_id")]
        best = None
        if scored:
            pick = max if scored[0].get("direction") == "maximize" else min
            best = pick(scored, key=lambda j: j["objective"])
        _ENDED_SWEEPS.add(str(sweep_dir))
        registered = None
        try:
            registered = end_sweep_parent(sweep_dir, ok=all(c == 0 for c in codes), best=best)
        except Exception as e:  # the sweep's own results stand; say what could not be recorded
            print_error(f"could not end the sweep's MLflow parent run ({type(e).__name__}: {e})")
        print(_sweep_summary(sweep_dir, jobs, codes, best, registered, killed), flush=True)


def _killed_jobs(sweep_dir: Path, recorded: set[str]) -> list[str]:
    """The jobs of a sweep that died without recording their exit code (kill -9, the OOM killer, a lost node):
    their directories lack sweep_job.json. Their MLflow runs, still RUNNING, are marked KILLED here."""
    from finetune.runs import dead_runs, holder

    killed = sorted((p.name for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()
                     and p.name not in recorded and holder(p) is None), key=int) if sweep_dir.is_dir() else []
    dead = [(d, r) for d, r in dead_runs(sweep_dir, exclude=[]) if d.name in killed]
    if dead:
        try:
            from mlflow.tracking import MlflowClient

            from finetune.tracking import absolute_uri, end_dead_runs

            by_uri: dict[str, list] = {}
            for run_dir, record in dead:
                by_uri.setdefault(str(record.get("tracking_uri")), []).append((run_dir, record))
            for uri, runs in by_uri.items():
                if "***" not in uri:  # a masked URI (a password in it): the job itself must end it
                    end_dead_runs(MlflowClient(absolute_uri(uri)), {uri}, runs, sweep_dir)
        except Exception as e:  # the sweep's result stands
            print_error(f"could not mark the killed jobs' MLflow runs KILLED ({type(e).__name__}: {e})")
    return killed


def _sweep_summary(sweep_dir: Path, jobs: list[dict[str, Any]], codes: list[int], best: dict[str, Any] | None,
                   registered: str | None, killed: list[str] = ()) -> str:
    """The sweep's closing line: how many jobs, how many failed, the best by tracking.sweep_metric and its model."""
    failed = sum(1 for c in codes if c != 0) - len(killed)
    total = len(jobs) + len(killed)
    head = f"sweep done: {total} job{'s' if total != 1 else ''}" + (f", {failed} failed" if failed else "")
    if killed:
        head += f", {len(killed)} killed (job {', '.join(killed)}: no exit code recorded; MLflow runs marked KILLED)"
    if best is None:
        metric = next((j.get("metric") for j in jobs if j.get("metric")), "tracking.sweep_metric")
        return f"{head}; no job logged {metric}, so none is best and no model was registered ({sweep_dir})"
    line = (f"{head}; best: job {best.get('dir')} ({best.get('overrides') or 'no overrides'}) with {best['metric']} "
            f"= {best['objective']:.6g} ({best.get('direction') or 'minimize'}), MLflow run {best['run_id']}")
    if registered:
        line += f", registered as {registered}"
    return f"{line} ({sweep_dir})"


def _swept_keys() -> set[str]:
    """The keys the command line sweeps (adapter.rank=8,16 or range/choice/glob), parsed as Hydra does."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except Exception:  # Hydra has already accepted these; never fail a job over a label
        return set()
    return {o.key_or_group for o in overrides if o.is_sweep_override()}


def _sweep_info(hydra_cfg: Any) -> dict[str, Any]:
    """What a multirun job knows of its sweep: the sweep directory and this job's values of the swept keys."""
    swept = _swept_keys()
    task = list(hydra_cfg.overrides.task)
    return {
        "dir": str(hydra_cfg.sweep.dir),
        "job_num": int(hydra_cfg.job.num),
        "overrides": [o for o in task if o.split("=", 1)[0].lstrip("+~") in swept] or task,
    }


@hydra.main(version_base="1.3", config_path=str(recipes_dir()), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    code, objective = _run_job(cfg)
    _EXIT_CODES.append(code)
    # what a sweeper optimizes (hydra/sweeper=optuna); NaN marks a job without one as failed to Optuna
    return objective if objective is not None else float("nan")


def main() -> None:
    from finetune.redaction import install as mask_secrets_in_output
    from finetune.signals import install_process_handlers

    mask_secrets_in_output()  # log records and stdout / stderr: credentials by value (finetune/redaction.py)
    install_process_handlers()
    register_configs()
    for registry in (_EXIT_CODES, _SWEEP_CODES, _LOCAL_SWEEPS, _ENDED_SWEEPS):
        registry.clear()
    try:
        with _hydra_errors_as_exit_codes():
            _hydra_main()
    finally:
        _end_interrupted_sweeps()
    sys.exit(max(_EXIT_CODES + _SWEEP_CODES, default=0))


def _end_interrupted_sweeps() -> None:
    """The parent runs of sweeps that stopped before Hydra's end-of-multirun callback (Ctrl-C, SIGTERM)."""
    ended = {str(Path(e)) for e in _ENDED_SWEEPS}
    left = {d for d in _LOCAL_SWEEPS if str(Path(d)) not in ended}
    if not left:
        return
    from finetune.tracking import end_sweep_parent

    for sweep_dir in left:
        end_sweep_parent(Path(sweep_dir), ok=False)


if __name__ == "__main__":
    main()
