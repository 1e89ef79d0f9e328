"""SFT, then DPO: train.init_adapter starts a run from an earlier run's adapter (a run directory, or an MLflow
runs:/ or models:/ URI), on the CPU with the real stack (4-bit tiny base, peft, TRL, MLflow SQLite).

What a user relies on: DPO's reference is the adapter training started from (so the first step's loss is log 2
exactly, which a reference of the bare base would not give); the new adapter moves away from it and its
held-out pairs are scored against it too; the saved adapter is the trained one only; the run links to the run
it continues (tags, MLflow's parent outside a sweep); a sweep over train.beta from it lands as parent +
children; the plan counts its shape and TRL's frozen copy; bad input is one line.
"""

from __future__ import annotations

import json
import math

import pytest
from safetensors.torch import load_file

from finetune.config import compose
from finetune.errors import ConfigError
from finetune.pipeline import run_pipeline

pytestmark = pytest.mark.slow  # needs the session's SFT run (conftest: sft_run) and trains DPO


@pytest.fixture(scope="module")
def sft(sft_run):
    """The session's SFT run of the tiny demo (tests/conftest.py: sft_run; rank 8, where the DPO recipe says 16),
    its MLflow store beside it."""
    return {k: sft_run[k] for k in ("root", "uri", "run_dir", "run_id")}


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _dpo(sft, init, *extra):
    return compose(["+recipe=tiny-dpo-demo", f"train.init_adapter={init}", f"tracking.uri={sft['uri']}",
                    "tracking.register_model=false", "tracking.system_metrics=false", *extra])


def test_dpo_from_the_sft_adapter_trains_against_it_and_links_to_its_run(sft, tmp_path):
    cfg = _dpo(sft, f"runs:/{sft['run_id']}/adapter", "train.max_steps=10", "train.save_steps=10")
    assert cfg.adapter.rank == 16  # the recipe's; the SFT adapter's shape replaces it
    result = run_pipeline(cfg, tmp_path / "dpo" / "run")
    work = result["work_dir"]

    # the reference is the SFT adapter: policy == reference at step 1, so the loss is exactly log 2
    losses = [loss for _, loss in result["train"].loss_history]
    assert abs(losses[0] - math.log(2)) < 1e-3, losses
    report = result["eval"]
    assert report.reference == "init" and report.init is not None
    # ... which the bare base is not: had the base been the reference, step 1 would not have been log 2
    assert abs(report.init.logp_margin - report.base.logp_margin) > 1.0
    assert report.adapter.logp_margin > report.init.logp_margin  # DPO moved the SFT adapter towards chosen
    assert len(report.rows) == report.pairs and all("init_margin" in row for row in report.rows)

    # the saved adapter is the trained one, in the SFT adapter's shape, without TRL's reference copy
    saved = json.loads((work / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 8 and not (work / "adapter" / "ref").exists()
    before = load_file(sft["run_dir"] / "adapter" / "adapter_model.safetensors")
    after = load_file(work / "adapter" / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    assert any((before[k].float() - after[k].float()).abs().max() > 0 for k in before)

    run = _client(sft["uri"]).get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["init_adapter_run_id"] == sft["run_id"] and tags["lineage"] == sft["run_id"]
    assert tags["mlflow.parentRunId"] == sft["run_id"]  # listed under the SFT run in the UI
    assert run.data.params["adapter.rank"] == "8"
    assert run.data.metrics["eval/init_preference_accuracy"] == report.init.preference_accuracy
    assert json.loads((work / "lineage.json").read_text())["lineage"] == [sft["run_id"]]


def test_an_optuna_search_over_beta_from_the_sft_adapter_tags_its_best_trial(sft, run_cli):
    """A sweep over train.beta (Hydra's Optuna sweeper, 3 trials) from the SFT adapter lands as an MLflow parent
    with three FINISHED children; the best trial by tracking.sweep_metric is tagged on the parent and on itself."""
    proc = run_cli("-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.seed=0",
                   "hydra.sweeper.direction=maximize", "+recipe=tiny-dpo-demo", "train.beta=interval(0.05,0.5)",
                   f"train.init_adapter={sft['run_dir']}", "train.max_steps=3", "train.save_steps=3",
                   "eval.generate_examples=0", "tracking.sweep_metric=eval/reward_margin",
                   "tracking.sweep_direction=maximize", f"tracking.uri={sft['uri']}",
                   "tracking.system_metrics=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = _client(sft["uri"])
    runs = client.search_runs([client.get_experiment_by_name("finetune").experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("sweep") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(children) == 3
    assert len({r.data.params["train.beta"] for r in children}) == 3
    assert all(r.info.status == "FINISHED" and r.data.tags["init_adapter_run_id"] == sft["run_id"]
               for r in children)  # the lineage is a tag; MLflow's parent stays the sweep's
    best = max(children, key=lambda r: r.data.metrics["eval/reward_margin"])
    assert parent.data.tags["best_run_id"] == best.info.run_id
    assert parent.data.tags["best_metric"] == "eval/reward_margin (maximize)"
    assert parent.data.tags["best_overrides"].startswith("train.beta=")
    assert [r.info.run_id for r in children if r.data.tags.get("best_in_sweep") == "true"] == [best.info.run_id]
    # one model version for the sweep, the best trial's (its jobs log their models unregistered)
    child_ids = {r.info.run_id for r in children}
    versions = [v for v in client.search_model_versions("name='tiny-dpo-demo'") if v.run_id in child_ids]
    assert [v.run_id for v in versions] == [best.info.run_id]
    assert parent.data.tags["best_model"] == f"models:/tiny-dpo-demo/{versions[0].version}"
    [closing] = [line for line in proc.stdout.splitlines() if line.startswith("sweep done: 3 jobs; best: job ")]
    assert f"MLflow run {best.info.run_id}, registered as models:/tiny-dpo-demo/{versions[0].version}" in closing
    assert "train.beta=" in closing and "eval/reward_margin = " in closing

def test_the_plan_counts_the_init_adapters_shape_and_trls_reference_copy(sft, tmp_path):
    fresh = run_pipeline(compose(["+recipe=tiny-dpo-demo", "adapter.rank=8", "adapter.alpha=16",
                                  "stages=[preflight]"]), tmp_path / "a")["plan"]
    from_sft = run_pipeline(_dpo(sft, sft["run_dir"], "stages=[preflight]"), tmp_path / "b")["plan"]
    lora = fresh.breakdown_bytes["lora_params"]
    # the trained copy in bf16 (a quantized base) + TRL's frozen "ref" copy, created by peft in fp32
    assert from_sft.breakdown_bytes["lora_params"] == lora + lora * 2
    assert any("train.init_adapter" in line for line in from_sft.explanation)
    orpo = run_pipeline(_dpo(sft, sft["run_dir"], "train.method=orpo", "stages=[preflight]"), tmp_path / "c")["plan"]
    assert orpo.breakdown_bytes["lora_params"] == lora  # ORPO has no reference


def test_bad_init_adapters_are_one_line_each(sft, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    halfway = tmp_path / "halfway"
    halfway.mkdir()
    (halfway / "adapter_config.json").write_text((sft["run_dir"] / "adapter" / "adapter_config.json").read_text())
    cases = [(tmp_path / "missing", "does not exist"), (empty, "holds no adapter"),
             (halfway, "no weights"), ("runs:/0123456789abcdef0123456789abcdef/adapter", "does not exist in")]
    for init, message in cases:
        with pytest.raises(ConfigError, match=message) as e:
            run_pipeline(_dpo(sft, init, "stages=[data,preflight,train]"), tmp_path / "run")
        assert "\n" not in str(e.value)
    other = sft["root"] / "other"
    other.mkdir()
    config = json.loads((sft["run_dir"] / "adapter" / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps(dict(config, base_model_name_or_path="meta-llama/Llama-2-7b-hf")))
    (other / "adapter_model.safetensors").write_bytes((sft["run_dir"] / "adapter" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match="was trained on meta-llama/Llama-2-7b-hf"):
        run_pipeline(_dpo(sft, other, "stages=[preflight]"), tmp_path / "run2")
