"""Evaluation: answer metrics, and the optional lm-evaluation-harness tasks on base and adapter."""

from __future__ import annotations

import json

import pytest

from finetune.config import compose
from finetune.errors import EnvError
from finetune.evaluate import harness
from finetune.evaluate.generation import exact_match, prompts_and_references, score, token_f1
from finetune.pipeline import run_pipeline


def test_answer_metrics():
    assert token_f1("The flu is caused by a virus.", "the flu is caused by a virus") == 1.0
    assert exact_match("The flu is caused by a virus.", "flu is caused by virus") == 1.0  # articles, case, punctuation
    assert token_f1("rest and fluids", "fluids") == pytest.approx(0.5)
    assert token_f1("", "anything") == 0.0
    perfect, per = score(["rest and fluids"], ["rest and fluids"])
    assert perfect.rougeL == 1.0 and perfect.exact_match == 1.0 and perfect.chrf == 100.0
    worse, _ = score(["headache"], ["rest and fluids"])
    assert worse.rougeL == 0.0 and worse.token_f1 == 0.0 and worse.chrf < 20
    assert per[0]["token_f1"] == 1.0


def test_prompts_end_before_the_last_answer():
    conv = [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2"}]
    prompts, refs = prompts_and_references([conv])
    assert prompts == [conv[:4]] and refs == ["a2"]


def test_harness_tasks_need_the_harness_before_any_work(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(harness, "installed", lambda: False)
    with pytest.raises(EnvError) as info:
        run_pipeline(compose(["+recipe=tiny-demo", "eval.lm_eval_tasks=[finetune_medical_mc]"]),
                     tmp_path / "outputs" / "tiny-demo" / "run")
    assert "pip install" in str(info.value) and info.value.exit_code == 5
    assert not (tmp_path / "outputs" / "tiny-demo" / "run" / "data_report.json").exists(), "nothing ran"


@pytest.mark.slow
def test_harness_task_on_base_and_adapter(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose(["+recipe=tiny-demo", "train.max_steps=10", "eval.generate_examples=0",
                   "eval.lm_eval_tasks=[finetune_medical_mc]", "eval.lm_eval_limit=12",
                   "tracking.register_model=false", "tracking.system_metrics=false"])
    result = run_pipeline(cfg, tmp_path / "outputs" / "tiny-demo" / "run")
    scores = json.loads((result["work_dir"] / "eval.json").read_text())["lm_eval"]
    for which in ("adapter", "base"):
        acc = scores[which]["finetune_medical_mc"]["acc"]
        assert 0.0 <= acc <= 1.0 and acc * 12 == pytest.approx(round(acc * 12)), "a share of 12 questions"
    from mlflow.tracking import MlflowClient

    metrics = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(result["run_id"]).data.metrics
    assert "eval/lm_eval/finetune_medical_mc/acc_adapter" in metrics
    assert "eval/lm_eval/finetune_medical_mc/acc_base" in metrics
