"""Preference data (dataset.format: preference, data_prep/preference.py): the shapes people have, read into one
canonical pair; bad rows counted with their file:line; de-duplicated; split by prompt; measured with the template."""

from __future__ import annotations

import json

import pytest

from data_prep import preference
from data_prep.formats import RowError
from data_prep.prepare import RejectedRowsError
from finetune.config import compose
from finetune.models.loader import load_tokenizer

PROMPT = "What causes influenza?"
GOOD = "Influenza is caused by influenza viruses."
BAD = "Influenza is caused by eating cold food."

SHAPES = {
    "strings": {"prompt": PROMPT, "chosen": GOOD, "rejected": BAD},
    "trl_conversational": {"prompt": [{"role": "user", "content": PROMPT}],
                           "chosen": [{"role": "assistant", "content": GOOD}],
                           "rejected": [{"role": "assistant", "content": BAD}]},
    "ultrafeedback": {"prompt": PROMPT,
                      "chosen": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": GOOD}],
                      "rejected": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": BAD}]},
    "anthropic_hh": {"chosen": f"\n\nHuman: {PROMPT}\n\nAssistant: {GOOD}",
                     "rejected": f"\n\nHuman: {PROMPT}\n\nAssistant: {BAD}"},
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_common_shape_reads_as_the_same_pair(shape):
    pair = preference.convert(SHAPES[shape])
    assert pair == preference.Pair([{"role": "user", "content": PROMPT}], GOOD, BAD)


def test_multi_turn_transcripts_keep_their_shared_history_as_the_prompt():
    history = "\n\nHuman: Hi\n\nAssistant: Hello, how can I help?\n\nHuman: " + PROMPT + "\n\nAssistant: "
    pair = preference.convert({"chosen": history + GOOD, "rejected": history + BAD})
    assert [m["role"] for m in pair.prompt] == ["user", "assistant", "user"]
    assert (pair.chosen, pair.rejected) == (GOOD, BAD)


def test_kto_rows_are_unpaired_completions_with_a_label():
    row = preference.convert({"prompt": PROMPT, "completion": GOOD, "label": True})
    assert row == preference.Unpaired([{"role": "user", "content": PROMPT}], GOOD, True)
    assert preference.convert({"prompt": PROMPT, "completion": BAD, "label": "false"}).label is False


@pytest.mark.parametrize("row, reason", [
    ({"prompt": PROMPT, "chosen": "  ", "rejected": BAD}, "empty_answer"),
    ({"prompt": PROMPT, "chosen": GOOD, "rejected": " " + GOOD.replace(" ", "  ") + "\n"}, "identical_pair"),
    ({"chosen": f"\n\nHuman: {PROMPT}\n\nAssistant: {GOOD}",
      "rejected": f"\n\nHuman: What is a migraine?\n\nAssistant: {BAD}"}, "prompt_mismatch"),
    ({"prompt": "What is a migraine?", **{k: SHAPES["ultrafeedback"][k] for k in ("chosen", "rejected")}},
     "prompt_mismatch"),
    ({"prompt": [{"role": "assistant", "content": PROMPT}], "chosen": GOOD, "rejected": BAD}, "bad_role_order"),
    ({"prompt": PROMPT, "chosen": GOOD}, "missing_field"),
    ({"prompt": PROMPT, "chosen": GOOD, "rejected": 3}, "not_a_string"),
    ({"prompt": PROMPT, "completion": GOOD, "label": "maybe"}, "bad_label"),
])
def test_bad_rows_say_why(row, reason):
    with pytest.raises(RowError) as info:
        preference.convert(row)
    assert info.value.reason == reason


@pytest.fixture
def tokenizer(tiny_model_dir):
    return load_tokenizer(compose(["+recipe=tiny-demo"]).model)


def _cfg(path, *overrides):
    return compose(["+recipe=tiny-demo", f"dataset.path={path}", "dataset.format=preference", "train.method=dpo",
                    *overrides])


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_prepare_counts_every_row_and_names_the_bad_ones(tmp_path, tokenizer):
    good = [{"prompt": f"Question {i}: what is condition {i}?", "chosen": f"Condition {i} is real.",
             "rejected": f"Condition {i} is a myth."} for i in range(60)]
    rows = [*good, good[3],  # a duplicate: counted, not rejected
            {"prompt": PROMPT, "chosen": GOOD, "rejected": GOOD},  # line 62
            "{not json",  # line 63
            {"prompt": PROMPT, "chosen": "word " * 400, "rejected": BAD},  # line 64: too long after the template
            {"prompt": PROMPT, "completion": GOOD, "label": True}]  # line 65: KTO row among pairs
    path = _write(tmp_path / "pairs.jsonl", rows)
    cfg = _cfg(path, "dataset.max_rejected_fraction=0.1", "dataset.max_seq_len=256")
    data = preference.prepare(cfg.dataset, tokenizer, cfg.model.chat_template)
    r = data.report
    assert r.rows_read == 65 and r.duplicates == 1
    assert r.rejected == {"identical_pair": 1, "invalid_json": 1, "too_long": 1, "mixed_shapes": 1}
    assert r.rows_read == r.rows_kept + r.rows_rejected + r.duplicates
    locations = {e["reason"]: e["location"] for e in r.rejected_examples}
    assert locations["identical_pair"].endswith("pairs.jsonl:62")
    assert locations["too_long"].endswith("pairs.jsonl:64")
    assert data.kind == "paired" and len(data.train) + len(data.eval) == r.rows_kept == 60
    assert 0 < len(data.eval) < 20
    # TRL's conversational shape, rendered by the recipe's chat template for every measured length
    assert set(data.train[0]) == {"prompt", "chosen", "rejected"}
    assert data.train[0]["chosen"][0]["role"] == "assistant"
    assert r.tokens.max <= 256 and r.tokens.trained < r.tokens.total


def test_pairs_answering_one_prompt_stay_on_one_side_of_the_split(tmp_path, tokenizer):
    rows = [{"prompt": f"Prompt {p}", "chosen": f"good answer {p}.{k}", "rejected": f"bad answer {p}.{k}"}
            for p in range(40) for k in range(3)]
    cfg = _cfg(_write(tmp_path / "p.jsonl", rows), "dataset.eval_fraction=0.3")
    data = preference.prepare(cfg.dataset, tokenizer, cfg.model.chat_template)
    train_prompts = {r["prompt"][0]["content"] for r in data.train}
    eval_prompts = {r["prompt"][0]["content"] for r in data.eval}
    assert eval_prompts and not train_prompts & eval_prompts
    assert len(data.eval) == 3 * len(eval_prompts)


def test_too_many_bad_rows_fail_the_data_stage_with_the_first_location(tmp_path, tokenizer):
    rows = [{"prompt": PROMPT, "chosen": GOOD, "rejected": GOOD}] * 3 + [SHAPES["strings"]]
    with pytest.raises(RejectedRowsError) as info:
        cfg = _cfg(_write(tmp_path / "bad.jsonl", rows))
        preference.prepare(cfg.dataset, tokenizer, cfg.model.chat_template)
    assert "bad.jsonl:1" in str(info.value) and "identical_pair" in str(info.value)


def test_the_sample_pairs_are_all_kept(tokenizer):
    cfg = _cfg("sample:medical-pairs")
    data = preference.prepare(cfg.dataset, tokenizer, cfg.model.chat_template)
    assert data.report.rows_rejected == 0 and data.report.rows_kept > 200
    assert all(r["chosen"] != r["rejected"] for r in data.train)
