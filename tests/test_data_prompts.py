"""GRPO prompt data (dataset.format: prompts, data_prep/prompts.py): the shapes people have (plain prompts, chats,
Alpaca, GSM8K) read into one prompt with its reference columns; bad rows counted with their file:line; prompts
measured as generation renders them and never cut."""

from __future__ import annotations

import json

import pytest

from data_prep import prompts
from data_prep.formats import RowError
from data_prep.prepare import RejectedRowsError
from finetune.config import compose
from finetune.models.loader import load_tokenizer

QUESTION = "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May. How many in all?"
GSM8K = {"question": QUESTION, "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn all: 48+24 = 72.\n#### 72"}
USER = [{"role": "user", "content": QUESTION}]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(compose(["+recipe=tiny-demo"]).model)


def _cfg(path, *overrides):
    return compose(["+recipe=tiny-grpo-demo", f"dataset.path={path}", *overrides])


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_gsm8k_rows_give_the_question_and_the_final_number_as_the_answer():
    row = prompts.convert(GSM8K)
    assert row.prompt == USER
    assert row.references["answer"] == "72"
    assert row.references["solution"].startswith("In May she sold") and "####" not in row.references["solution"]
    assert prompts.convert({**GSM8K, "answer": "... #### 1,234"}).references["answer"] == "1234"


@pytest.mark.parametrize("row, answer", [
    ({"prompt": QUESTION, "answer": "72", "level": 2}, "72"),
    ({"prompt": USER}, None),
    ({"messages": USER + [{"role": "assistant", "content": "72"}]}, "72"),
    ({"conversations": [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": "72"}]}, "72"),
    ({"instruction": QUESTION, "input": "", "output": "72"}, "72"),
])
def test_every_shape_reads_as_the_user_prompt_with_its_references(row, answer):
    item = prompts.convert(row)
    assert item.prompt == USER
    assert item.references.get("answer") == answer
    if "level" in row:
        assert item.references["level"] == 2  # any other column is a reference the reward functions can read


def test_a_chat_keeps_its_history_and_system_prompt_and_drops_only_the_final_answer():
    chat = [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "1+1?"},
            {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]
    item = prompts.convert({"messages": chat})
    assert item.prompt == chat[:-1] and item.references == {"answer": "4"}


@pytest.mark.parametrize("row, reason", [
    ({"prompt": "  "}, "empty_prompt"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "no_user_turn"),
    ({"prompt": QUESTION, "completion": "72"}, "reserved_column"),
    ({"text": QUESTION}, "missing_field"),
    ({"prompt": 7}, "not_a_list"),
    (["not", "an", "object"], "not_an_object"),
])
def test_bad_rows_are_rejected_with_a_reason(row, reason):
    with pytest.raises(RowError) as e:
        prompts.convert(row)
    assert e.value.reason == reason


def test_prepare_counts_bad_and_too_long_rows_with_their_file_and_line(tmp_path, tokenizer):
    good = [{"prompt": f"Question {i}: what is condition {i}?", "answer": str(i)} for i in range(60)]
    rows = good[:10] + ["{not json"] + good[10:30] + [{"text": "no prompt"}] + good[30:] + [
        {"prompt": "long " * 400, "answer": "x"}, good[0]]
    path = _write(tmp_path / "prompts.jsonl", rows)
    cfg = _cfg(path, "dataset.max_rejected_fraction=0.1")
    data = prompts.prepare(cfg.dataset, tokenizer, "llama-2")
    r = data.report
    assert (r.rows_read, r.rows_kept, r.duplicates) == (64, 60, 1)
    assert r.rejected == {"invalid_json": 1, "missing_field": 1, "too_long": 1}
    locations = {e["reason"]: e["location"] for e in r.rejected_examples}
    assert locations["invalid_json"].endswith("prompts.jsonl:11")
    assert locations["missing_field"].endswith("prompts.jsonl:32")
    assert locations["too_long"].endswith("prompts.jsonl:63")
    assert r.train_rows + r.eval_rows == 60 and r.eval_rows > 0
    # measured as generation renders them: the template with its generation prompt
    longest = max(len(prompts.render(tokenizer, row["prompt"])) for row in data.train + data.eval)
    assert r.tokens.max == longest <= cfg.dataset.max_seq_len
    assert data.columns == ["answer"] and all(set(row) == {"prompt", "answer"} for row in data.train)
    ds = data.to_dataset("train")
    assert ds.column_names == ["prompt", "answer"] and len(ds) == r.train_rows


def test_too_many_bad_rows_stop_the_data_stage(tmp_path, tokenizer):
    rows = [{"prompt": f"Q{i}?"} for i in range(10)] + [{"text": "x"}] * 5
    with pytest.raises(RejectedRowsError, match=r"5 of 15 rows rejected"):
        prompts.prepare(_cfg(_write(tmp_path / "p.jsonl", rows)).dataset, tokenizer, "llama-2")


def test_the_sample_questions_map_onto_prompts_with_their_answers(tokenizer):
    data = prompts.prepare(_cfg("sample:medical-qa").dataset, tokenizer, "llama-2")
    assert data.report.rows_kept == 245 and data.report.rows_rejected == 0
    assert data.eval and all(isinstance(row["answer"], str) and row["answer"] for row in data.eval)
    # the held-out prompts with their reference answers, for heldout.jsonl (the export's check)
    assert data.eval_messages[0][-1]["role"] == "assistant"
