"""Preference tuning through the pipeline (train.method: dpo | orpo | kto | simpo), on the CPU with the real
stack: a 4-bit NF4 tiny base, peft LoRA, TRL's own trainers, MLflow SQLite.

The demo recipe (tiny-dpo-demo) finishes in MLflow with the adapter preferring the chosen answers of the
held-out pairs more often than the base does; the other methods each train; an interrupted DPO run resumes to
the adapter of the uninterrupted one; the plan counts chosen and rejected in one forward.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from finetune.config import compose
from finetune.errors import ConfigError, Interrupted
from finetune.pipeline import run_pipeline
from finetune.preflight import run_preflight
from finetune.train import callbacks as train_callbacks

pytestmark = pytest.mark.slow


def _mlflow(workdir):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{workdir}/mlflow.db")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_dpo_demo_prefers_the_chosen_answers_more_than_the_base(workdir, monkeypatch):
    import trl

    def no_retokenizing(*args, **kwargs):  # the data stage's ids go to the trainer as they are
        raise AssertionError("DPOTrainer tokenized the dataset again")

    monkeypatch.setattr(trl.DPOTrainer, "_prepare_dataset", no_retokenizing)
    cfg = compose(["+recipe=tiny-dpo-demo", "tracking.register_model=false", "tracking.system_metrics=false"])
    result = run_pipeline(cfg, workdir / "outputs" / "tiny-dpo-demo" / "run")
    losses = [loss for _, loss in result["train"].loss_history]
    assert len(losses) == cfg.train.max_steps
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses  # DPO starts at log 2
    report = result["eval"]
    assert report.pairs == len(result["data"].eval) > 10
    assert report.adapter.preference_accuracy > report.base.preference_accuracy
    assert report.adapter.logp_margin > report.base.logp_margin and report.reward_margin > 0

    run = _mlflow(workdir).get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["eval/adapter_preference_accuracy"] > run.data.metrics["eval/base_preference_accuracy"]
    assert run.data.params["train.method"] == "dpo"
    # the generation evals as for SFT: greedy answers to held-out prompts, scored against the chosen answers
    assert report.generation is not None and report.generation.examples == cfg.eval.generate_examples
    assert report.generation.rows[0]["reference"] == result["data"].eval[0]["chosen"][0]["content"]
    assert "eval/adapter_rougeL" in run.data.metrics and "eval/base_rougeL" in run.data.metrics
    # the adapter is plain peft's, on the model's own modules
    adapter = json.loads((result["work_dir"] / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and "q_proj" in adapter["target_modules"]


@pytest.mark.parametrize("method", ["orpo", "kto", "simpo"])
def test_each_preference_method_trains_the_tiny_model(method, workdir):
    cfg = compose(["+recipe=tiny-dpo-demo", f"train.method={method}", "train.max_steps=6", "train.save_steps=6",
                   "stages=[data,preflight,train]", "tracking.system_metrics=false"])
    result = run_pipeline(cfg, workdir / "outputs" / method / "run")
    assert result["train"].steps == 6
    losses = [loss for _, loss in result["train"].loss_history]
    assert all(loss == loss for loss in losses)  # finite, not NaN
    before = load_file(next((workdir / "outputs" / method / "run" / "checkpoints").glob("checkpoint-6"))
                       / "adapter_model.safetensors")
    assert any(t.abs().sum() > 0 for k, t in before.items() if "lora_B" in k)  # B starts at zero: it learned


def test_interrupted_dpo_resumes_to_the_uninterrupted_adapter(workdir, monkeypatch):
    base = ["+recipe=tiny-dpo-demo", "train.max_steps=8", "train.save_steps=4", "stages=[data,preflight,train]",
            "tracking.system_metrics=false"]
    straight = run_pipeline(compose(base), workdir / "a" / "run")

    original = train_callbacks.StopOnSignalCallback.on_step_end

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 4 and self.stop.signum is None:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(train_callbacks.StopOnSignalCallback, "on_step_end", on_step_end)
    first = workdir / "b" / "first"
    with pytest.raises(Interrupted):
        run_pipeline(compose(base), first)
    monkeypatch.setattr(train_callbacks.StopOnSignalCallback, "on_step_end", original)
    resumed = run_pipeline(compose(base), workdir / "b" / "second")
    assert resumed["work_dir"] == first and resumed["train"].resumed_from_step == 4
    for (s1, l1), (s2, l2) in zip(straight["train"].loss_history, resumed["train"].loss_history, strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-5, abs=1e-6)
    a = load_file(straight["work_dir"] / "adapter" / "adapter_model.safetensors")
    b = load_file(first / "adapter" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), atol=1e-5, rtol=1e-4)


def test_the_plan_counts_chosen_and_rejected_in_one_forward():
    common = ["+recipe=llama2-7b-medical", "stages=[preflight]", "preflight.pin.micro_batch_size=4",
              "preflight.pin.gradient_checkpointing=true", "preflight.pin.quantization=nf4"]
    sft = run_preflight(compose(common)).to_dict()
    dpo = run_preflight(compose(common + ["train.method=dpo", "dataset.format=preference"])).to_dict()
    as_8 = run_preflight(compose(common[:2] + ["preflight.pin.micro_batch_size=8"] + common[3:])).to_dict()
    # a DPO micro-batch of 4 pairs is 8 sequences through the model
    assert dpo["predicted"]["peak_allocated_bytes"] == as_8["predicted"]["peak_allocated_bytes"]
    assert dpo["predicted"]["peak_allocated_bytes"] > sft["predicted"]["peak_allocated_bytes"]
    assert any("train.method=dpo" in line for line in dpo["explanation"])


def test_the_dpo_trainer_passes_the_data_stages_ids_through_and_prepares_anything_else(tiny_model_dir):
    from types import SimpleNamespace

    import trl
    from datasets import Dataset

    from data_prep import preference
    from finetune import methods
    from finetune.models.loader import load_tokenizer

    cfg = compose(["+recipe=tiny-dpo-demo"])
    tokenizer = load_tokenizer(cfg.model)
    data = preference.prepare(cfg.dataset, tokenizer, cfg.model.chat_template)
    trainer = methods.trainer_base("dpo")
    assert issubclass(trainer, trl.DPOTrainer) and methods.trainer_base("orpo") is not trainer
    train, evaluation = methods.datasets(cfg, data)
    assert set(train.column_names) == set(methods.TOKENIZED) and len(evaluation) == len(data.eval)
    args = SimpleNamespace(dataset_num_proc=None, max_length=cfg.dataset.max_seq_len, truncation_mode="keep_start")
    fake = trainer.__new__(trainer)  # only the method is under test: no model, no __init__
    fake._tokenizer = tokenizer
    assert trainer._prepare_dataset(fake, train, tokenizer, args, "train") is train
    rows = Dataset.from_list(data.train[:4])  # conversational rows: TRL's own preparation, the same ids
    assert list(trainer._prepare_dataset(fake, rows, tokenizer, args, "train").select_columns(
        list(methods.TOKENIZED))) == list(train.select(range(4)))


def test_a_preference_method_on_sft_data_is_one_line():
    with pytest.raises(ConfigError) as info:
        compose(["+recipe=tiny-demo", "train.method=dpo"])
    assert "dataset.format" in str(info.value) and "preference" in str(info.value)
    with pytest.raises(ConfigError) as info:
        compose(["+recipe=tiny-dpo-demo", "train.method=sft"])
    assert str(info.value).startswith("train.method")
