"""Optional: EleutherAI's lm-evaluation-harness tasks on the base model and on the adapter.

    eval:
      lm_eval_tasks: [finetune_medical_mc]   # or hellaswag, arc_easy, ... (those download their data)
      lm_eval_limit: 100                     # examples per task; null: all

Runs when `lm-eval` is installed (`pip install lm-eval`); a recipe that asks for tasks
without it stops before any work (exit 5). Offline, only tasks with local data work:
the built-in `finetune_medical_mc` (four-way multiple choice written from the project's
medical sample set) always does, and `eval.lm_eval_include_path` adds a directory of your
own task YAMLs.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from finetune.errors import EnvError

log = logging.getLogger(__name__)

BUILTIN_TASK = "finetune_medical_mc"


def installed() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def require(cfg) -> None:
    """Before any work: a recipe that asks for harness tasks needs the harness."""
    if cfg.eval.lm_eval_tasks and not installed():
        raise EnvError("eval.lm_eval_tasks needs lm-evaluation-harness: pip install 'lm-eval>=0.4.5' "
                       "(or set eval.lm_eval_tasks=[])")


def builtin_tasks_dir() -> Path:
    """The built-in local task (YAML + JSONL), written into the cache once."""
    from data_prep.samples.medical import multiple_choice_rows
    from finetune.paths import cache_dir

    root = cache_dir() / "lm_eval_tasks"
    data = root / f"{BUILTIN_TASK}.jsonl"
    spec = root / f"{BUILTIN_TASK}.yaml"
    if not spec.is_file():
        root.mkdir(parents=True, exist_ok=True)
        data.write_text("".join(json.dumps(r) + "\n" for r in multiple_choice_rows()))
        spec.write_text(
            f"task: {BUILTIN_TASK}\n"
            "dataset_path: json\n"
            "dataset_kwargs:\n"
            "  data_files:\n"
            f"    test: {data}\n"
            "test_split: test\n"
            "output_type: multiple_choice\n"
            'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
            'doc_to_choice: "{{choices}}"\n'
            'doc_to_target: "{{answer}}"\n'
            "metric_list:\n"
            "  - metric: acc\n"
            "    aggregation: mean\n"
            "    higher_is_better: true\n"
        )
    return root


def _scores(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from the harness's results (drops stderr and the filter suffix)."""
    out: dict[str, dict[str, float]] = {}
    for task, values in results.get("results", {}).items():
        for key, value in values.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or "_stderr" in key:
                continue
            metric = key.split(",")[0]
            if metric in ("sample_len",):
                continue
            out.setdefault(task, {})[metric] = float(value)
    return out


def run(cfg, model, tokenizer) -> dict[str, dict[str, dict[str, float]]]:
    """{"adapter": {task: {metric: v}}, "base": {...}} for eval.lm_eval_tasks."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    paths = [str(builtin_tasks_dir())]
    if cfg.eval.lm_eval_include_path:
        paths.append(str(Path(cfg.eval.lm_eval_include_path).expanduser()))
    manager = TaskManager(include_path=paths)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.eval.batch_size)
    tasks = list(cfg.eval.lm_eval_tasks)

    def evaluate() -> dict[str, dict[str, float]]:
        return _scores(lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager,
                                               limit=cfg.eval.lm_eval_limit, log_samples=False))

    out = {"adapter": evaluate()}
    if cfg.eval.compare_base:
        with model.disable_adapter():
            out["base"] = evaluate()
    for which, scores in out.items():
        for task, metrics in scores.items():
            log.info("lm-eval %s %s: %s", which, task, ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    return out
