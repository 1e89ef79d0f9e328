"""The processed dataset is cached by fingerprint and reused; the data stage in the pipeline and on the CLI."""

from __future__ import annotations

import json

import pytest

from data_prep.prepare import RejectedRowsError, prepare
from data_prep.samples import medical
from finetune.config import DatasetConfig, DatasetFormat, ModelConfig
from finetune.models.loader import load_tokenizer
from finetune.probes.packing import padding_free_packing


@pytest.fixture
def tokenizer(tiny_model_dir):
    return load_tokenizer(ModelConfig(name_or_path="tiny:llama", chat_template="llama-2"), model_vocab_size=2048)


def _data_file(tmp_path, rows=None):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (rows or medical.generate_rows()[:80])))
    return path


def _cfg(path, **kw):
    kw.setdefault("format", DatasetFormat.alpaca)
    kw.setdefault("max_seq_len", 256)
    return DatasetConfig(path=str(path), **kw)


def test_a_second_run_with_nothing_changed_reuses_the_prepared_data(tokenizer, tmp_path):
    path = _data_file(tmp_path)
    first = prepare(_cfg(path), tokenizer, "llama-2")
    assert not first.report.cache_hit
    stored = first.store_dir / "train.arrow"
    written = stored.stat().st_mtime_ns
    second = prepare(_cfg(path), tokenizer, "llama-2")
    assert second.report.cache_hit and second.store_dir == first.store_dir
    assert stored.stat().st_mtime_ns == written  # loaded, not rebuilt
    assert second.report.fingerprint == first.report.fingerprint
    assert [(e.input_ids, e.labels, e.location) for e in second.train] == \
        [(e.input_ids, e.labels, e.location) for e in first.train]
    assert second.report.rows_kept == first.report.rows_kept and second.report.tokens == first.report.tokens


@pytest.mark.parametrize("change", ["content", "max_seq_len", "template", "tokenizer", "train_on_inputs",
                                    "packing", "eval_fraction"])
def test_what_changes_the_fingerprint(tokenizer, tmp_path, change):
    path = _data_file(tmp_path)
    base = prepare(_cfg(path), tokenizer, "llama-2")
    cfg, template, model_type = _cfg(path), "llama-2", "llama"
    if change == "content":
        path.write_text(path.read_text() + json.dumps({"instruction": "One more?", "output": "Yes."}) + "\n")
    elif change == "max_seq_len":
        cfg = _cfg(path, max_seq_len=200)
    elif change == "template":
        template = "alpaca"
    elif change == "tokenizer":
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|note|>"]})
    elif change == "train_on_inputs":
        cfg = _cfg(path, train_on_inputs=True)
    elif change == "packing":
        cfg = _cfg(path, packing=True)
    elif change == "eval_fraction":
        cfg = _cfg(path, eval_fraction=0.3)
    again = prepare(cfg, tokenizer, template, packing_probe=padding_free_packing, model_type=model_type)
    assert not again.report.cache_hit and again.report.fingerprint != base.report.fingerprint


def test_cache_false_rebuilds(tokenizer, tmp_path):
    path = _data_file(tmp_path)
    prepare(_cfg(path), tokenizer, "llama-2")
    again = prepare(_cfg(path, cache=False), tokenizer, "llama-2")
    assert not again.report.cache_hit and again.report.rows_kept == 80


def test_the_rejection_limit_applies_to_cached_data_too(tokenizer, tmp_path):
    rows = medical.generate_rows()[:40] + [{"instruction": "q", "output": ""}] * 4
    path = _data_file(tmp_path, rows)
    assert prepare(_cfg(path, max_rejected_fraction=0.2), tokenizer, "llama-2").report.rejected == {"empty_answer": 4}
    with pytest.raises(RejectedRowsError) as info:
        prepare(_cfg(path, max_rejected_fraction=0.05), tokenizer, "llama-2")
    assert info.value.report.cache_hit and "empty_answer: 4" in str(info.value)


def test_the_pipeline_writes_the_report_and_histogram(tmp_path):
    from finetune.config import compose
    from finetune.pipeline import run_data_stage

    cfg = compose(["+recipe=tiny-demo", "dataset.packing=true"])
    data, _ = run_data_stage(cfg, tmp_path)
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert report["rows_read"] == report["rows_kept"] + report["rows_rejected"] + report["duplicates"]
    assert report["packing"]["enabled"] and report["packing"]["architecture"] == "llama"
    png = (tmp_path / "token_lengths.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_cli_data_stage_alone_previews_and_a_data_error_exits_3(run_cli, tmp_path):
    proc = run_cli("+recipe=tiny-demo", "stages=[data]", "dataset.preview=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "preview: 2 of" in proc.stdout and "[/INST]" in proc.stdout
    assert "medical_qa.jsonl:" in proc.stdout

    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in medical.generate_rows()[:10]) + "{truncated\n" * 3)
    proc = run_cli("+recipe=tiny-demo", "stages=[data]", f"dataset.path={bad}", "hydra.run.dir=run")
    assert proc.returncode == 3
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "invalid_json: 3" in errors[0] and f"{bad}:11" in errors[0]
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())  # written for the user to look at
    assert report["rejected"] == {"invalid_json": 3}
