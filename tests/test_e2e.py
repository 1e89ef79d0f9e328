"""End to end on the CPU: real bitsandbytes NF4, real peft, real TRL, real MLflow (SQLite).

A tiny Llama (built locally, loaded with from_pretrained) is fine-tuned on the
project's medical sample set. The assertions are what a user relies on: the
frozen base did not move, the adapter did, the loss went down, the adapter beats
the base on held-out data, the saved adapter reproduces the trained model, and
MLflow holds a finished run with everything in it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from finetune.config import compose
from finetune.models.loader import load_with_adapter
from finetune.pipeline import run_pipeline

pytestmark = pytest.mark.slow

STEPS = 40  # tests/conftest.py: sft_run trains this many


@pytest.fixture(scope="module")
def trained(sft_run):
    """The session's tiny-demo run (tests/conftest.py: sft_run), shared by the tests below."""
    assert sft_run["cfg"].train.max_steps == STEPS
    results = sft_run["results"]
    # The trained model's logits on a few held-out examples, taken once for the tests below (in this module's
    # view of the results: the session's stay as the pipeline returned them).
    results = {**results, "probe": _probe(results["model"], results["data"].eval[:4])}
    return sft_run["cfg"], results, sft_run["root"]


def _probe(model, examples):
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.zeros((len(examples), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.input_ids)] = 1
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    return ids, mask, logits


def _fresh_base(cfg, plan):
    from finetune.models.loader import load_model

    return load_model(cfg.model, plan.choices, "cpu")


def test_the_adapter_and_checkpoints_are_written_with_the_users_umask(trained):
    """A shared outputs folder stays readable to the team: every file of the adapter and the checkpoints has the
    mode the umask gives (safetensors' atomic save alone would leave the weights 0600)."""
    from finetune.paths import umask

    cfg, results, root = trained
    run_dir = results["work_dir"]
    files = [p for p in (run_dir / "adapter").iterdir()] + list((run_dir / "checkpoints").glob("*/*"))
    assert any(p.name == "adapter_model.safetensors" for p in files)
    # and the MLflow artifacts beside the store: the adapter, and the logged model's own copy of its weights
    logged = [p for p in (root / "mlruns").rglob("*") if p.is_file()]
    assert any(p.name == "adapter_model.safetensors" and "models" in p.parts for p in logged)
    wrong = {str(p): oct(p.stat().st_mode & 0o777) for p in files + logged
             if p.stat().st_mode & 0o777 != 0o666 & ~umask()}
    assert not wrong


def test_base_weights_unchanged_and_lora_weights_changed(trained):
    import torch

    cfg, results, _ = trained
    model = results["model"]
    fresh = _fresh_base(cfg, results["plan"]).state_dict()
    trained_state = model.state_dict()
    base_keys = 0
    for key, value in trained_state.items():
        if "lora_" in key:
            continue
        plain = key.replace("base_model.model.", "", 1).replace(".base_layer", "")
        assert plain in fresh, key
        assert torch.equal(value.cpu(), fresh[plain].cpu()), f"frozen weight {plain} changed"
        base_keys += 1
    assert base_keys >= 20
    lora_b = [v for k, v in trained_state.items() if "lora_B" in k]
    assert lora_b and all(float(v.float().abs().sum()) > 0 for v in lora_b), "every LoRA B moved off its zero init"
    # The quantized layers really are 4-bit.
    q = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(q).__name__ == "Linear4bit" and q.weight.quant_state.quant_type == "nf4"


def test_loss_goes_down(trained):
    _, results, _ = trained
    losses = [loss for _, loss in results["train"].loss_history]
    assert len(losses) == STEPS
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_adapter_beats_the_base_on_held_out_data(trained):
    _, results, _ = trained
    report = results["eval"]
    assert report.base is not None
    assert report.adapter.examples == results["data"].report.eval_rows > 0
    assert report.adapter.loss < report.base.loss - 0.5
    assert report.adapter.perplexity < report.base.perplexity


def test_saved_adapter_reproduces_the_trained_logits(trained):
    import torch
    from peft import PeftModel

    cfg, results, _ = trained
    adapter_dir = Path(results["train"].adapter_dir)
    assert {"adapter_config.json", "adapter_model.safetensors", "chat_template.jinja"} <= {
        p.name for p in adapter_dir.iterdir()}
    ids, mask, expected = results["probe"]
    real = mask.bool()

    # What evaluation and chat use: the LoRA weights back in bf16, as TRL trained them.
    reloaded = load_with_adapter(cfg.model, results["plan"].choices, adapter_dir, "cpu")
    with torch.no_grad():
        got = reloaded(input_ids=ids, attention_mask=mask).logits
    # Tolerance: the same NF4 base and bf16 LoRA kernels on the same inputs; float reassociation only.
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)

    # peft's plain load computes the adapter in fp32 (it upcasts whatever autocast_adapter_dtype
    # says): the same model up to bf16 rounding of the LoRA path, a few hundredths of a logit.
    plain = PeftModel.from_pretrained(_fresh_base(cfg, results["plan"]), adapter_dir)
    plain.eval()
    with torch.no_grad():
        upcast = plain(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(upcast[real], expected[real], atol=0.15, rtol=0.02)


def test_chat_template_is_saved_with_the_adapter(trained):
    _, results, _ = trained
    saved = (Path(results["train"].adapter_dir) / "chat_template.jinja").read_text()
    assert "[INST]" in saved and "generation" in saved


def test_mlflow_run_holds_params_metrics_and_artifacts(trained):
    from mlflow.tracking import MlflowClient

    cfg, results, work = trained
    run_dir = results["run_dir"]
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    assert run_id == results["run_id"]
    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.name_or_path"] == "tiny:llama"
    assert params["adapter.rank"] == "8"
    assert params["plan.quantization"] == "nf4"
    assert run.data.tags["recipe"] == "tiny-demo"
    assert run.data.tags["dataset_fingerprint"] == results["data"].report.fingerprint

    history = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in history] == list(range(1, STEPS + 1))
    values = [m.value for m in history]
    assert sum(values[-5:]) < sum(values[:5])
    metrics = run.data.metrics
    assert metrics["eval/adapter_loss"] < metrics["eval/base_loss"]
    assert "eval/adapter_rougeL" in metrics and "eval/base_rougeL" in metrics
    assert any(k.startswith("system/cpu_utilization") for k in metrics), "system metrics are on"
    assert run.inputs.dataset_inputs and run.inputs.dataset_inputs[0].dataset.digest == \
        results["data"].report.fingerprint
    versions = client.search_model_versions(f"name='{cfg.name}'")
    assert [v.run_id for v in versions] == [run_id], "the adapter is registered under the recipe's name"

    def listing(path=None):
        out = []
        for f in client.list_artifacts(run_id, path):
            out.extend(listing(f.path) if f.is_dir else [f.path])
        return out

    artifacts = set(listing())
    assert {"plan.json", "data_report.json", "config.yaml", "eval.json", "plan_memory.png", "loss_curves.png",
            "token_lengths.png", "eval/generations.json",
            "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
            "adapter/chat_template.jinja"} <= artifacts


def test_run_directory_holds_every_stage_output(trained):
    _, results, _ = trained
    run_dir = results["run_dir"]
    for name in ("config.yaml", "data_report.json", "plan.json", "eval.json", "run.json", "adapter"):
        assert (run_dir / name).exists(), name
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["choices"]["seq_len_source"] == "data"
    assert plan["choices"]["max_seq_len"] == results["data"].report.tokens.max


def test_a_crash_marks_the_run_failed(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    import finetune.train

    def broken_train(*args, **kwargs):
        raise RuntimeError("injected failure in the train stage")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(finetune.train, "train", broken_train)
    cfg = compose(["+recipe=tiny-demo", "train.max_steps=2"])
    run_dir = tmp_path / "outputs" / "run"
    with pytest.raises(RuntimeError, match="injected"):
        run_pipeline(cfg, run_dir)
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id)
    assert run.info.status == "FAILED"
    assert "injected failure" in run.data.tags["error"]


def test_cli_demo_prints_adapter_and_run_id(run_cli, tmp_path):
    from mlflow.tracking import MlflowClient

    proc = run_cli("+recipe=tiny-demo", "train.max_steps=10", "train.save_steps=10", "eval.generate_examples=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    adapter = re.search(r"adapter (\S+/adapter)", out)
    run_id = re.search(r"MLflow run ([0-9a-f]{32})", out)
    assert adapter and run_id, out[-2000:]
    assert (Path(adapter.group(1)) / "adapter_model.safetensors").is_file()
    runs = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_runs(experiment_ids=["1"])
    assert [r.info.run_id for r in runs] == [run_id.group(1)]
    assert runs[0].info.status == "FINISHED"


def test_logged_mlflow_model_reloads_offline(trained):
    import os

    import mlflow

    _, results, work = trained
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    mlflow.set_tracking_uri(f"sqlite:///{work}/mlflow.db")
    pipe = mlflow.transformers.load_model(results["model_uri"])
    out = pipe("<s>[INST] What causes influenza? [/INST]", max_new_tokens=8, do_sample=False)
    assert out[0]["generated_text"].startswith("<s>[INST] What causes influenza? [/INST]")
    assert len(out[0]["generated_text"]) > len("<s>[INST] What causes influenza? [/INST]")
