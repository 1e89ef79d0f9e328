"""What practitioners expect of a training run: evaluation during training with the best
checkpoint kept and early stopping, NEFTune, rsLoRA and DoRA, fp16 on cards without bf16,
and a disk-space check before a download."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.config import ModelConfig, compose
from finetune.errors import EnvError
from finetune.models import loader
from finetune.models.loader import load_with_adapter
from finetune.pipeline import run_pipeline
from finetune.train import fix_trainable_dtype

pytestmark = pytest.mark.slow

BASE = ["+recipe=tiny-demo", "stages=[data,preflight,train]"]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_eval_during_training_keeps_the_best_checkpoint_and_stops_early(workdir):
    # A learning rate ten times too high: the eval loss is best at the first evaluation, then worse.
    cfg = compose(BASE + ["train.max_steps=80", "train.eval_steps=4", "train.save_steps=4",
                          "train.early_stopping_patience=2", "train.learning_rate=0.03", "train.keep_checkpoints=5"])
    result = run_pipeline(cfg, workdir / "tiny-demo" / "run")
    run_dir = result["work_dir"]
    assert result["train"].steps == 12, "stopped after two evaluations without improvement"
    state = json.loads((run_dir / "checkpoints" / "checkpoint-12" / "trainer_state.json").read_text())
    evals = {e["step"]: e["eval_loss"] for e in state["log_history"] if "eval_loss" in e}
    assert sorted(evals) == [4, 8, 12]
    best = min(evals, key=evals.get)
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{best}")
    final = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    kept = load_file(run_dir / "checkpoints" / f"checkpoint-{best}" / "adapter_model.safetensors")
    assert final.keys() == kept.keys()
    for key in final:
        assert final[key].dtype == torch.bfloat16, "the best adapter stays in the dtype it was trained in"
        assert torch.equal(final[key], kept[key]), "the saved adapter is the best checkpoint, not the last"

    from mlflow.tracking import MlflowClient

    history = MlflowClient(f"sqlite:///{workdir}/mlflow.db").get_metric_history(result["run_id"], "eval/loss")
    assert [m.step for m in history] == [4, 8, 12]


def test_neftune_noise_changes_training_not_inference(workdir):
    plain = run_pipeline(compose(BASE + ["train.max_steps=6"]), workdir / "a" / "tiny-demo" / "run")
    noisy = run_pipeline(compose(BASE + ["train.max_steps=12", "train.neftune_noise_alpha=5"]),
                         workdir / "b" / "tiny-demo" / "run")
    # Same seed, same batches: the only difference is the noise on the input embeddings.
    assert plain["train"].loss_history[0][1] != noisy["train"].loss_history[0][1]
    # and it still learns: the last steps' mean below the first steps' (one step against one is noise)
    losses = [loss for _, loss in noisy["train"].loss_history]
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    model = noisy["model"]
    assert not model.get_input_embeddings()._forward_hooks, "the noise hook is gone after training"
    ids = torch.tensor([noisy["data"].eval[0].input_ids])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_dora_and_rslora_train_and_reload(workdir):
    cfg = compose(BASE + ["train.max_steps=12", "adapter.use_dora=true", "adapter.use_rslora=true"])
    result = run_pipeline(cfg, workdir / "tiny-demo" / "run")
    adapter_dir = Path(result["train"].adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["use_rslora"] is True
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    magnitudes = [k for k in weights if "lora_magnitude_vector" in k]
    assert magnitudes, "DoRA learns a magnitude vector per adapted layer"
    assert all(weights[k].dtype == torch.float32 for k in magnitudes), "TRL keeps DoRA magnitudes in fp32"
    losses = [loss for _, loss in result["train"].loss_history]
    assert sum(losses[-3:]) < sum(losses[:3])

    ids = torch.tensor([result["data"].eval[0].input_ids])
    trained = result["model"]
    trained.eval()
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        got = load_with_adapter(cfg.model, result["plan"].choices, adapter_dir, "cpu")(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_fp16_plans_keep_fp32_master_weights(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    for param in model.parameters():  # what TRL does to a quantized model's trainable parameters
        if param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    fix_trainable_dtype(model, "bf16")
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}
    fix_trainable_dtype(model, "fp16")
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.float32}, "frozen ones untouched"


def test_no_bf16_card_plans_fp16_compute():
    from finetune.preflight import run_preflight

    plan = run_preflight(compose(["+recipe=llama2-7b-medical", "hardware.bf16=false"]))
    assert plan.choices["compute_dtype"] == "fp16"


def test_disk_space_is_checked_before_a_download(tmp_path, monkeypatch):
    model = ModelConfig(name_or_path="meta-llama/Llama-2-70b-hf")
    size = loader.download_size(model)
    assert size == pytest.approx(2 * 68_976_648_192)
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - 50 * 10**9, 50 * 10**9))
    with pytest.raises(EnvError) as info:
        loader.check_disk_space(model, tmp_path / "hub")
    assert "146 GB" in str(info.value) and "50 GB" in str(info.value) and "HF_HOME" in str(info.value)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**13, 0, 10**13))
    loader.check_disk_space(model, tmp_path / "hub")  # room enough: no error
    loader.check_disk_space(ModelConfig(name_or_path="tiny:llama"), tmp_path / "hub")  # local: never checked


def test_disk_space_of_a_traced_family_is_sized_by_the_plan(tmp_path, monkeypatch):
    from finetune.preflight import run_preflight

    plan = run_preflight(compose(["+recipe=qwen3-8b"])).to_dict()  # Qwen3: traced, no hand-written rules
    model = ModelConfig(name_or_path=plan["model"]["name"])
    params = plan["model"]["params_total"]
    assert loader.download_size(model) is None  # the models layer alone knows only the hand-written families
    assert loader.download_size(model, params) == 2 * params  # bf16 on the hub
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - 10**9, 10**9))
    with pytest.raises(EnvError) as info:
        loader.check_disk_space(model, tmp_path / "hub", params_total=params)
    assert "1 GB" in str(info.value) and "HF_HOME" in str(info.value)
