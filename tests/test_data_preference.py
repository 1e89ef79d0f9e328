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


# ---- TRL's own tokenization, cached like the SFT data -------------------------------------------------------

def _trl_ids(tokenizer, rows: list[dict]) -> list[dict]:
    """TRL 1.16's DPOTrainer._prepare_dataset on the rows (its map over a datasets.Dataset, unbound: the
    method uses nothing of the trainer for conversational rows), without its max_length filter."""
    from types import SimpleNamespace

    from datasets import Dataset
    from trl import DPOTrainer

    args = SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    out = DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tokenizer), Dataset.from_list(rows), tokenizer,
                                      args, "train")
    return [{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in out]


def _ours(data, split: str) -> list[dict]:
    return list(data.tokenized(split))


def _exact(tokenizer, data) -> int:
    compared = 0
    for split in ("train", "eval"):
        rows = data.train if split == "train" else data.eval
        if rows:
            assert _ours(data, split) == _trl_ids(tokenizer, rows)
            compared += len(rows)
    return compared


def _sample_cfg(*overrides):
    return _cfg("sample:medical-pairs", "dataset.max_seq_len=2048", *overrides)


def test_the_ids_are_trls_own_on_the_tiny_model_and_a_second_run_reads_the_cache(tokenizer):
    cfg = _sample_cfg()
    data = preference.prepare(cfg.dataset, tokenizer, cfg.model.chat_template)
    assert data.report.rows_kept > 200 and not data.report.cache_hit
    assert _exact(tokenizer, data) == data.report.rows_kept
    again = preference.prepare(cfg.dataset, tokenizer, cfg.model.chat_template)
    assert again.report.cache_hit and again.store_dir == data.store_dir
    assert again.report.fingerprint == data.report.fingerprint
    assert again.train == data.train and again.eval_locations == data.eval_locations
    assert list(again.lengths) == list(data.lengths)
    assert _ours(again, "train") == _ours(data, "train")
    # the same length fields as the SFT data's report
    r = again.report
    assert r.tokens.max == max(data.lengths) and r.tokens.total == int(sum(data.lengths))
    assert 0 < r.packing.padded_efficiency <= 1 and r.packing.row_tokens_max <= r.tokens.max
    assert not r.packing.enabled and r.truncated == 0


REAL = {"llama3-instruct": None, "qwen3": None, "deepseek_v3": None, "llama2": "llama-2"}


@pytest.fixture(scope="module")
def real_dirs(tmp_path_factory):
    import real_tokenizers

    root = tmp_path_factory.mktemp("real")
    try:
        return {v: real_tokenizers.model_dir("llama3" if v.startswith("llama3") else v, root / v, variant=v)
                for v in REAL}
    except real_tokenizers.Unavailable as e:  # no cached copy and no registry
        pytest.skip(str(e))


@pytest.mark.parametrize("variant", sorted(REAL))
def test_the_ids_are_trls_own_on_real_tokenizers(variant, real_dirs, tmp_path):
    from finetune.config import ModelConfig

    tok = load_tokenizer(ModelConfig(name_or_path=str(real_dirs[variant]), chat_template=REAL[variant]))
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, how can I help?"}]
    rows = [{"prompt": ([{"role": "system", "content": "Answer briefly."}] if i % 3 == 0 else [])
             + (history if i % 2 else []) + [{"role": "user", "content": f"Question {i}: what is condition {i}?"}],
             "chosen": [{"role": "assistant", "content": f"Condition {i} is real, {'and rare' * (i % 4)}."}],
             "rejected": [{"role": "assistant", "content": f" Condition {i} is a myth.\n"}]} for i in range(40)]
    cfg = _cfg(_write(tmp_path / "pairs.jsonl", rows), "dataset.max_seq_len=1024", "dataset.eval_fraction=0.2")
    data = preference.prepare(cfg.dataset, tok, REAL[variant])
    assert data.report.rows_kept == len(rows)
    assert _exact(tok, data) == len(rows)
