"""The data stage: Alpaca rows -> chat template -> tokens, with honest counts and masks."""

from __future__ import annotations

import json
import random

import pytest

from data_prep.prepare import in_eval_split, prepare
from data_prep.samples import medical
from finetune.config import DatasetConfig, DatasetFormat, ModelConfig
from finetune.errors import ConfigError, DataError
from finetune.models.loader import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(ModelConfig(name_or_path="tiny:llama", chat_template="llama-2"), model_vocab_size=2048)


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _cfg(path, **kw) -> DatasetConfig:
    kw.setdefault("format", DatasetFormat.alpaca)
    return DatasetConfig(path=str(path), **kw)


def test_sample_set_is_large_and_varied():
    rows = medical.generate_rows()
    assert len(rows) >= 200
    assert len({(r["instruction"], r["input"]) for r in rows}) == len(rows)
    assert sum(1 for r in rows if r["input"]) >= 30
    assert all(r["output"].strip() for r in rows)


def test_pad_token_is_distinct_from_eos(tokenizer):
    assert tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_trained_tokens_are_exactly_the_answer_and_the_end_token(tokenizer):
    data = prepare(_cfg("sample:medical-qa", eval_fraction=0.15, max_seq_len=256), tokenizer, "llama-2")
    rows = {r["output"] for r in medical.generate_rows()}
    checked = 0
    for ex in data.train[:50]:
        trained = [t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != -100]
        assert trained[-1] == tokenizer.eos_token_id
        answer = tokenizer.decode(trained[:-1]).strip()
        assert answer in rows
        # the trained ids are a contiguous tail of the example: the prompt is never trained on
        first = next(i for i, lab in enumerate(ex.labels) if lab != -100)
        assert all(lab != -100 for lab in ex.labels[first:])
        assert ex.labels[:first] == [-100] * first
        checked += 1
    assert checked == 50


def test_ids_equal_the_tokenizers_ids_for_the_rendered_text(tokenizer):
    data = prepare(_cfg("sample:medical-qa", eval_fraction=0.0), tokenizer, "llama-2")
    ex = data.train[3]
    text = tokenizer.decode(ex.input_ids)
    assert tokenizer(text, add_special_tokens=False).input_ids == ex.input_ids
    assert text.startswith("<s>[INST] ") and text.endswith(" </s>")


def test_train_on_inputs_trains_every_token(tokenizer):
    data = prepare(_cfg("sample:medical-qa", train_on_inputs=True, eval_fraction=0.0), tokenizer, "llama-2")
    assert all(ex.labels == ex.input_ids for ex in data.train)


def test_report_counts_every_row_with_its_location(tokenizer, tmp_path):
    good = medical.generate_rows()[:60]
    rows = list(good) + [
        '{"instruction": "truncated line", "output": ',  # invalid JSON
        {"instruction": "No answer here", "input": "", "output": "   "},  # empty answer
        {"instruction": "What is fever?", "input": "", "output": 42},  # not a string
        {"input": "x", "output": "y"},  # missing instruction
        good[0],  # a duplicate
    ]
    path = _write_jsonl(tmp_path / "data.jsonl", rows)
    data = prepare(_cfg(path, max_rejected_fraction=0.5), tokenizer, "llama-2")
    r = data.report
    assert r.rows_read == 65
    assert r.rejected == {"empty_answer": 1, "invalid_json": 1, "missing_field": 1, "not_a_string": 1}
    assert r.duplicates == 1
    assert r.rows_kept == 60 == r.train_rows + r.eval_rows
    assert r.rows_read == r.rows_kept + r.rows_rejected + r.duplicates
    locations = {e["reason"]: e["location"] for e in r.rejected_examples}
    assert locations["invalid_json"] == f"{path}:61"
    assert locations["empty_answer"] == f"{path}:62"
    assert locations["missing_field"] == f"{path}:64"


def test_too_many_rejections_is_a_data_error_with_a_summary(tokenizer, tmp_path):
    rows = medical.generate_rows()[:20] + [{"instruction": "q", "output": ""}] * 3 + ["{bad json"] * 2
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as info:
        prepare(_cfg(path), tokenizer, "llama-2")
    message = str(info.value)
    assert info.value.exit_code == 3
    assert "empty_answer: 3" in message  # every rejected row counts, duplicates or not
    assert "invalid_json: 2" in message
    assert "dataset.max_rejected_fraction" in message


def test_over_long_rows_are_rejected_and_counted(tokenizer, tmp_path):
    rows = medical.generate_rows()[:40] + [{"instruction": "Say it long.", "output": "fever " * 400}]
    path = _write_jsonl(tmp_path / "long.jsonl", rows)
    data = prepare(_cfg(path, max_seq_len=128, max_rejected_fraction=0.1), tokenizer, "llama-2")
    assert data.report.rejected == {"too_long": 1}
    assert all(len(ex.input_ids) <= 128 for ex in data.train + data.eval)


def test_split_is_stable_when_rows_are_reordered_or_appended(tokenizer, tmp_path):
    rows = medical.generate_rows()
    first = prepare(_cfg(_write_jsonl(tmp_path / "a.jsonl", rows), eval_fraction=0.2), tokenizer, "llama-2")
    shuffled = list(rows)
    random.Random(1).shuffle(shuffled)
    extra = [{"instruction": f"Extra question {i}?", "input": "", "output": f"Extra answer {i}."} for i in range(20)]
    second = prepare(_cfg(_write_jsonl(tmp_path / "b.jsonl", shuffled + extra), eval_fraction=0.2),
                     tokenizer, "llama-2")
    def evals(d):
        return {tuple(ex.input_ids) for ex in d.eval}
    assert evals(first) <= evals(second)
    assert not (evals(second) - evals(first)) & {tuple(ex.input_ids) for ex in first.train}
    assert 0.1 < first.report.eval_rows / first.report.rows_kept < 0.3


def test_in_eval_split_depends_only_on_content():
    assert in_eval_split("abc", 0.5) == in_eval_split("abc", 0.5)
    share = sum(in_eval_split(f"row {i}", 0.25) for i in range(4000)) / 4000
    assert 0.22 < share < 0.28


def test_base_model_without_template_needs_one(tokenizer):
    tokenizer.chat_template = None
    with pytest.raises(ConfigError) as info:
        prepare(_cfg("sample:medical-qa"), tokenizer, None)
    assert "model.chat_template" in str(info.value)


def test_chatml_needs_its_tokens(tokenizer):
    with pytest.raises(ConfigError) as info:
        prepare(_cfg("sample:medical-qa"), tokenizer, "chatml")
    assert "<|im_start|>" in str(info.value)


def test_auto_detects_alpaca(tokenizer):
    data = prepare(_cfg("sample:medical-qa", format=DatasetFormat.auto), tokenizer, "llama-2")
    assert data.report.format == "alpaca" and data.report.format_detected


def test_missing_path_is_a_data_error(tokenizer, tmp_path):
    with pytest.raises(DataError) as info:
        prepare(_cfg(tmp_path / "nope.jsonl"), tokenizer, "llama-2")
    assert "nope.jsonl" in str(info.value)
