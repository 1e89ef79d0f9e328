"""GRPO end to end (issue 26): `make demo-grpo`'s recipe learns its rewards on the CPU, MLflow holds the per-function
reward curves and the adapter beats the base on held-out prompts; a bad reward declaration is one line, exit 2."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow  # the demo itself: about 30 s on 2 cores
def test_grpo_demo_learns_its_rewards_and_beats_the_base(run_cli, tmp_path):
    proc = run_cli("+recipe=tiny-grpo-demo", "hydra.run.dir=run", "tracking.register_model=false",
                   "tracking.system_metrics=false")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report["prompts"] == 16
    assert report["adapter"]["reward"] > report["base"]["reward"] + 0.5, report
    assert set(report["adapter"]) == {"reward", "starts_with_a_word", "says_the_cause"}
    history = json.loads((tmp_path / "run" / "train_result.json").read_text())["reward_history"]
    assert set(history) == {"reward", "starts_with_a_word", "says_the_cause"}
    first, last = history["reward"][:5], history["reward"][-5:]
    assert sum(v for _, v in last) > sum(v for _, v in first), history["reward"]
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert "generation" in plan["breakdown_bytes"] and plan["choices"]["generation_batch_size"] % 8 == 0
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("finetune").experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["eval/adapter_reward"] > run.data.metrics["eval/base_reward"]
    for name in ("starts_with_a_word", "says_the_cause"):
        curve = client.get_metric_history(run.info.run_id, f"train/rewards/{name}/mean")
        assert len(curve) == 30
        assert f"eval/adapter_reward/{name}" in run.data.metrics


@pytest.mark.parametrize("override, names", [
    ("reward.functions=[{name: regexp, pattern: x}]", "reward.functions.0"),
    ("reward.functions=[{name: regex, pattern: '(unclosed'}]", "reward.functions.0"),
    ("reward.functions=[{name: exact_match, column: solution_text}]", "solution_text"),
    ("reward.functions=[{name: 'no_such_module:f'}]", "reward.functions.0"),
])
def test_a_bad_reward_declaration_is_one_line_and_exit_2(run_cli, override, names):
    proc = run_cli("+recipe=tiny-grpo-demo", override, "stages=[data]")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    # (the tiny model's first build in this worker prints its shard bar)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip() and "model shards" not in line]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert names in lines[0], lines[0]
