"""Every shipped dataset config composes; the ones that need no network prepare."""

from __future__ import annotations

import pytest

from data_prep.prepare import prepare
from finetune.config import compose
from finetune.models.loader import load_tokenizer
from finetune.paths import recipes_dir
from finetune.probes.packing import padding_free_packing

DATASETS = sorted(p.stem for p in (recipes_dir() / "dataset").glob("*.yaml"))
LOCAL = ["medical-demo", "medical-notes", "medical-mixed-demo"]


def test_the_shipped_dataset_configs():
    assert {"alpaca", "sharegpt", "medical", "medical-notes"} <= set(DATASETS)


@pytest.mark.parametrize("name", DATASETS)
def test_every_dataset_config_composes(name):
    preference = ["train.method=dpo"] if name in ("medical-pairs", "ultrafeedback") else []  # preference methods
    if name in ("medical-prompts", "gsm8k"):  # GRPO's prompts: its method and a reward
        preference = ["train.method=grpo", "train.effective_batch_size=16", "reward.functions=[{name: regex, pattern: x}]"]
    cfg = compose(["+recipe=tiny-demo", f"dataset={name}", *preference])
    assert cfg.dataset.path or cfg.dataset.sources
    text = (recipes_dir() / "dataset" / f"{name}.yaml").read_text()
    assert text.startswith("# ") and "finetune +recipe=" in text  # says what it is for and how to run it


@pytest.mark.parametrize("name", LOCAL)
def test_local_dataset_configs_prepare(name, tiny_model_dir):
    cfg = compose(["+recipe=tiny-demo", f"dataset={name}"])
    tokenizer = load_tokenizer(cfg.model, 2048)
    data = prepare(cfg.dataset, tokenizer, cfg.model.chat_template, packing_probe=padding_free_packing, model_type="llama")
    r = data.report
    assert r.rows_kept > 0 and not r.rejected and len(data.train) == r.train_rows > 0
    assert r.rows_read == r.rows_kept + r.duplicates + sum(s.weight_dropped for s in r.sources)
    if name == "medical-mixed-demo":
        assert [s.format for s in r.sources] == ["alpaca", "text"] and r.format == "mixed"
        qa, notes = r.sources
        assert notes.weight_dropped > 0 and notes.train_examples > 0 and qa.train_examples == qa.train_rows
