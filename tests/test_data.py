"""The data stage on chat data: formats, validation with locations, templates and masks, counts.

Real tokenizers and templates (the tiny Llama's byte-level BPE, transformers' renderer);
files written here. What is checked is what a user relies on: every row is accounted
for, bad rows are named by file:line or row index, and the trained tokens are exactly
the answers and their end token.
"""

from __future__ import annotations

import csv
import json
import logging
import random

import pytest

from data_prep.prepare import RejectedRowsError, in_eval_split, prepare
from data_prep.samples import medical
from finetune.config import DatasetConfig, DatasetFormat, LengthPolicy, ModelConfig, SourceConfig
from finetune.errors import ConfigError, DataError, EnvError
from finetune.models.loader import load_tokenizer

# Meta's Llama-2-chat template as it ships (no {% generation %} markers): renders exactly as the built-in llama-2.
META_LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
# A Qwen-style ChatML template as tokenizers ship it (no markers).
PLAIN_CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
    " + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(ModelConfig(name_or_path="tiny:llama", chat_template="llama-2"), model_vocab_size=2048)


@pytest.fixture
def chatml_tokenizer(tiny_model_dir):
    # The tiny tokenizer ships the ChatML markers as special tokens (models.tiny.CHATML_TOKENS).
    tok = load_tokenizer(ModelConfig(name_or_path="tiny:llama"), model_vocab_size=2048)
    assert tok.convert_tokens_to_ids("<|im_end|>") != tok.unk_token_id
    return tok


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _cfg(path, **kw) -> DatasetConfig:
    kw.setdefault("format", DatasetFormat.alpaca)
    return DatasetConfig(path=str(path), **kw)


def _trained_runs(ex) -> list[list[int]]:
    """The contiguous runs of trained token ids of an example."""
    runs, current = [], []
    for t, label in zip(ex.input_ids, ex.labels, strict=True):
        if label != -100:
            assert label == t
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def _accounted(r) -> bool:
    weight_dropped = sum(s.weight_dropped for s in r.sources)
    return r.rows_read == r.rows_kept + r.rows_rejected + r.duplicates + weight_dropped


def _conversations(n: int, seed: int = 0) -> list[dict]:
    """ShareGPT rows: multi-turn, some with a system prompt, some non-ASCII text."""
    rows = medical.generate_rows()
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.sample(rows, 2)
        turns = [{"from": "human", "value": f"{a['instruction']} (#{i})"}, {"from": "gpt", "value": a["output"]}]
        if i % 2:
            turns += [{"from": "human", "value": b["instruction"] + " Ça va? ✓"}, {"from": "gpt", "value": b["output"]}]
        if i % 3 == 0:
            turns = [{"from": "system", "value": "You are a careful medical assistant."}] + turns
        out.append({"conversations": turns})
    return out


# ---- the sample set, the Llama-2 template, masks ---------------------------------------------------

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


def test_ids_and_masks_equal_apply_chat_template(tokenizer, tmp_path):
    """Multi-turn, system prompts, non-ASCII: our batched ids and labels are transformers' own, row by row."""
    path = _write_jsonl(tmp_path / "chats.jsonl", _conversations(60))
    data = prepare(_cfg(path, format=DatasetFormat.sharegpt, eval_fraction=0.0), tokenizer, "llama-2")
    assert len(data.train) == 60
    for ex in data.train:
        row = json.loads(path.read_text().splitlines()[int(ex.location.rsplit(":", 1)[1]) - 1])
        roles = {"human": "user", "gpt": "assistant", "system": "system"}
        messages = [{"role": roles[t["from"]], "content": t["value"]} for t in row["conversations"]]
        ref = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        assert ex.input_ids == ref["input_ids"]
        assert ex.labels == [t if m else -100 for t, m in zip(ref["input_ids"], ref["assistant_masks"], strict=True)]


def test_every_assistant_turn_is_trained_with_its_end_token(tokenizer, tmp_path):
    rows = _conversations(30)
    path = _write_jsonl(tmp_path / "chats.jsonl", rows)
    data = prepare(_cfg(path, format=DatasetFormat.sharegpt, eval_fraction=0.0), tokenizer, "llama-2")
    by_line = {i + 1: r for i, r in enumerate(rows)}
    for ex in data.train:
        answers = [t["value"].strip() for t in by_line[int(ex.location.rsplit(":", 1)[1])]["conversations"]
                   if t["from"] == "gpt"]
        runs = _trained_runs(ex)
        assert len(runs) == len(answers)
        for run, answer in zip(runs, answers, strict=True):
            assert run[-1] == tokenizer.eos_token_id
            assert tokenizer.decode(run[:-1]).strip() == answer


def test_train_on_inputs_trains_every_token(tokenizer):
    data = prepare(_cfg("sample:medical-qa", train_on_inputs=True, eval_fraction=0.0), tokenizer, "llama-2")
    assert all(ex.labels == ex.input_ids for ex in data.train)


@pytest.mark.parametrize("template, end", [("alpaca", "</s>"), ("chatml", "<|im_end|>")])
def test_builtin_templates_train_the_answer_and_its_end_token(chatml_tokenizer, template, end, tmp_path):
    rows = medical.generate_rows()[:40]
    path = _write_jsonl(tmp_path / "a.jsonl", rows)
    data = prepare(_cfg(path, eval_fraction=0.0), chatml_tokenizer, template)
    outputs = {r["output"] for r in rows}
    end_id = chatml_tokenizer.convert_tokens_to_ids(end)
    for ex in data.train:
        (run,) = _trained_runs(ex)
        assert run[-1] == end_id
        assert chatml_tokenizer.decode(run[:-1]) in outputs


@pytest.mark.parametrize("own, builtin", [(META_LLAMA2, "llama-2"), (PLAIN_CHATML, "chatml")])
def test_tokenizers_own_template_without_markers_masks_exactly(chatml_tokenizer, own, builtin, tmp_path):
    """A shipped template with no {% generation %} markers: the masks found from prefix renderings equal the
    masks of the equivalent built-in template with markers, token for token."""
    path = _write_jsonl(tmp_path / "chats.jsonl", _conversations(40))
    cfg = _cfg(path, format=DatasetFormat.sharegpt, eval_fraction=0.0)
    expected = prepare(cfg, chatml_tokenizer, builtin)
    chatml_tokenizer.chat_template = own
    got = prepare(cfg, chatml_tokenizer, None)
    assert got.report.masking == "prefixes" and got.report.chat_template == "tokenizer"
    assert got.template == own  # the tokenizer's template is what is saved and used at inference
    assert [(e.input_ids, e.labels) for e in got.train] == [(e.input_ids, e.labels) for e in expected.train]


# Renders the last answer differently from earlier ones (as Qwen3 and QwQ give only the last answer a reasoning
# block): a conversation's earlier answers read differently once later turns follow.
REWRITING = (
    "{% for m in messages %}{% if m['role'] == 'assistant' and loop.last %}{{ ' FINAL: ' + m['content'] + "
    "eos_token }}{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}{% else %}"
    "{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}{% endif %}{% endfor %}")


def _as_messages(row):
    return [{"role": {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]), "content": t["value"]}
            for t in row["conversations"]]


def _answer_ids(tok, conv, k):
    """What inference trains toward for answer k: the rendering up to it, less the prompt rendering before it."""
    full = tok.apply_chat_template(conv[:k + 1], tokenize=True, return_dict=False)
    prompt = tok.apply_chat_template(conv[:k], tokenize=True, add_generation_prompt=True, return_dict=False)
    assert full[:len(prompt)] == prompt
    return full, full[len(prompt):]


@pytest.mark.parametrize("policy", ["auto", "split", "last", "full"])
def test_template_that_rewrites_history_loses_no_row_under_each_multi_turn_policy(tokenizer, tmp_path, policy):
    tokenizer.chat_template = REWRITING
    rows = _conversations(20, seed=3)
    path = _write_jsonl(tmp_path / "chats.jsonl", rows)
    data = prepare(_cfg(path, format=DatasetFormat.sharegpt, eval_fraction=0.0, multi_turn=policy), tokenizer, None)
    r = data.report
    assert r.rejected == {} and r.rows_kept == len(rows)  # no row is rejected for how the template renders
    convs = [_as_messages(row) for row in rows]
    multi = [c for c in convs if sum(m["role"] == "assistant" for m in c) > 1]
    examples = list(data.train)
    if policy in ("auto", "split"):
        # one example per answer where the template rewrites history, each exactly as inference renders it
        expected = []
        for conv in convs:
            answers = [k for k, m in enumerate(conv) if m["role"] == "assistant"]
            if policy == "auto" and len(answers) == 1:
                expected.append(_answer_ids(tokenizer, conv, answers[0]))
            else:
                expected += [_answer_ids(tokenizer, conv, k) for k in answers]
        assert [(e.input_ids, _trained_runs(e)) for e in examples] == [(ids, [tail]) for ids, tail in expected]
        assert r.multi_turn["applied"] == ({"split": len(multi), "whole": len(convs) - len(multi)} if policy == "auto"
                                           else {"split": len(convs)})
        assert r.multi_turn["split_examples"] == sum(len([m for m in c if m["role"] == "assistant"]) for c in multi)
        assert r.multi_turn["repeated_prefix_tokens"] > 0
        assert any("answer 2/2" in e.location for e in examples)
    elif policy == "last":
        assert len(examples) == len(convs)
        for e, conv in zip(examples, convs, strict=True):
            assert (e.input_ids, _trained_runs(e)) == (lambda f: (f[0], [f[1]]))(_answer_ids(tokenizer, conv,
                                                                                                len(conv) - 1))
    else:  # full: one render of the conversation, every answer trained as it appears in it
        assert len(examples) == len(convs)
        for e, conv in zip(examples, convs, strict=True):
            whole = tokenizer.apply_chat_template(conv, tokenize=True, return_dict=False)
            assert e.input_ids == whole
            answers = [m["content"] for m in conv if m["role"] == "assistant"]
            runs = [tokenizer.decode(run) for run in _trained_runs(e)]
            assert len(runs) == len(answers)
            for text, answer in zip(runs, answers, strict=True):
                assert answer.strip() in text and text.endswith(tokenizer.eos_token)


def test_base_model_without_template_needs_one(tokenizer):
    tokenizer.chat_template = None
    with pytest.raises(ConfigError) as info:
        prepare(_cfg("sample:medical-qa"), tokenizer, None)
    assert "model.chat_template" in str(info.value)


def test_chatml_needs_its_tokens(tmp_path):
    # Llama 2's published tokenizer has no <|im_start|>/<|im_end|> (the tiny one now ships them).
    import real_tokenizers

    llama2 = load_tokenizer(ModelConfig(name_or_path=str(real_tokenizers.model_dir("llama2", tmp_path / "l2"))))
    with pytest.raises(ConfigError) as info:
        prepare(_cfg("sample:medical-qa"), llama2, "chatml")
    assert "<|im_start|>" in str(info.value)


# ---- validation: every row counted, every bad row named ---------------------------------------------

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
    assert locations["not_a_string"] == f"{path}:63"
    assert locations["missing_field"] == f"{path}:64"


def test_undecodable_bytes_and_control_tokens_are_rejected_by_line(tokenizer, tmp_path):
    good = medical.generate_rows()[:30]
    path = tmp_path / "mixed.jsonl"
    with path.open("wb") as f:
        for r in good:
            f.write(json.dumps(r).encode() + b"\n")
        f.write(b'{"instruction": "caf\xe9?", "output": "latin-1, not UTF-8"}\n')  # line 31
        f.write(json.dumps({"instruction": "Say", "output": "the end </s> and more"}).encode() + b"\n")  # line 32
        f.write(json.dumps({"instruction": "Lone surrogate", "output": "\udc80"}).encode() + b"\n")  # line 33
    data = prepare(_cfg(path, max_rejected_fraction=0.2, eval_fraction=0.0), tokenizer, "llama-2")
    r = data.report
    assert r.rejected == {"undecodable": 2, "control_token": 1}
    where = sorted((e["reason"], e["location"]) for e in r.rejected_examples)
    assert where == [("control_token", f"{path}:32"), ("undecodable", f"{path}:31"), ("undecodable", f"{path}:33")]
    assert _accounted(r) and r.rows_kept == 30


def test_sharegpt_variants_and_malformed_conversations(tokenizer, tmp_path):
    q, a = "What causes asthma?", "Allergens, infections and cold air."
    rows = [
        {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]},  # 1 classic
        {"conversations": [{"from": "user", "value": q + " (2)"}, {"from": "assistant", "value": a}]},  # 2
        {"messages": [{"from": "human", "value": q + " (3)"}, {"from": "gpt", "value": a}]},  # 3 messages key
        {"conversations": [{"role": "user", "content": q + " (4)"}, {"role": "assistant", "content": a}]},  # 4
        {"conversations": [{"from": "gpt", "value": a}, {"from": "human", "value": q}]},  # 5 starts with assistant
        {"conversations": [{"from": "human", "value": q + " (6)"}, {"from": "gpt", "value": "  "}]},  # 6 empty
        {"conversations": [{"from": "human", "value": q + " (7)"}, {"from": "robot", "value": a}]},  # 7 bad role
        {"conversations": [{"from": "human", "value": q + " (8)"}]},  # 8 ends with the user
        {"conversations": "not a list"},  # 9
        {"conversations": [{"from": "human", "value": q + " (10)"}, {"from": "gpt", "value": ["x"]}]},  # 10
    ]
    path = _write_jsonl(tmp_path / "sharegpt.jsonl", rows)
    data = prepare(_cfg(path, format=DatasetFormat.sharegpt, max_rejected_fraction=1.0, eval_fraction=0.0),
                   tokenizer, "llama-2")
    r = data.report
    assert r.rows_kept == 4 and r.rows_read == 10
    assert r.rejected == {"bad_role_order": 2, "empty_answer": 1, "unknown_role": 1, "not_a_list": 1,
                          "not_a_string": 1}
    by_line = {int(e["location"].rsplit(":", 1)[1]): e for e in r.rejected_examples}
    assert by_line[5]["reason"] == "bad_role_order" and "starts with 'assistant'" in by_line[5]["detail"]
    assert by_line[6]["reason"] == "empty_answer"
    assert by_line[8]["reason"] == "bad_role_order" and "ends with a user turn" in by_line[8]["detail"]
    for ex in data.train:
        (run,) = _trained_runs(ex)
        assert tokenizer.decode(run[:-1]).strip() == a


def test_messages_format_and_its_errors(tokenizer, tmp_path):
    ok = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Q{i}?"},
                        {"role": "assistant", "content": f"Answer {i}."}]} for i in range(8)]
    bad = [
        {"messages": [{"role": "assistant", "content": "first"}, {"role": "user", "content": "then"}]},
        {"messages": [{"role": "user", "content": "no content"}, {"role": "assistant"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]},
        {"text": "no messages key"},
    ]
    path = _write_jsonl(tmp_path / "messages.jsonl", ok + bad)
    data = prepare(_cfg(path, format=DatasetFormat.messages, max_rejected_fraction=1.0, eval_fraction=0.0),
                   tokenizer, "llama-2")
    assert data.report.rejected == {"bad_role_order": 1, "missing_field": 2, "unknown_role": 1}
    assert {e["location"] for e in data.report.rejected_examples} == {f"{path}:{i}" for i in range(9, 13)}
    assert sorted(tokenizer.decode(_trained_runs(ex)[0][:-1]).strip() for ex in data.train) == \
        sorted(f"Answer {i}." for i in range(8))


def test_json_array_rows_are_named_by_index(tokenizer, tmp_path):
    rows = medical.generate_rows()[:20] + [{"instruction": "q", "output": ""}, ["not", "an", "object"]]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    data = prepare(_cfg(path, max_rejected_fraction=0.2, eval_fraction=0.0), tokenizer, "llama-2")
    assert data.report.rejected == {"empty_answer": 1, "not_an_object": 1}
    assert sorted(e["location"] for e in data.report.rejected_examples) == [f"{path}[20]", f"{path}[21]"]


def test_a_byte_order_mark_costs_no_row(tokenizer, tmp_path):
    """A file saved by a Windows editor starts with UTF-8's byte-order mark: JSONL, JSON and CSV keep every row, a
    text document does not begin with it."""
    rows = medical.generate_rows()[:12]
    bom = b"\xef\xbb\xbf"
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_bytes(bom + "".join(json.dumps(r) + "\n" for r in rows).encode())
    array = tmp_path / "rows.json"
    array.write_bytes(bom + json.dumps(rows).encode())
    for path in (jsonl, array):
        report = prepare(_cfg(path, eval_fraction=0.0), tokenizer, "llama-2").report
        assert (report.rows_read, report.rows_kept, report.rows_rejected) == (12, 12, 0), (path, report.rejected)

    from data_prep.readers import _text

    doc = tmp_path / "doc.txt"
    doc.write_bytes(bom + b"Fever is a raised body temperature.")
    assert next(_text(doc, None)).data == "Fever is a raised body temperature."


def test_a_broken_json_array_is_a_data_error_naming_the_line(tokenizer, tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": \n')
    with pytest.raises(DataError) as info:
        prepare(_cfg(path), tokenizer, "llama-2")
    assert f"{path}:4" in str(info.value) and "JSON Lines" in str(info.value)


def test_csv_rows_and_a_csv_with_a_missing_column(tokenizer, tmp_path):
    rows = medical.generate_rows()[:30]
    good = tmp_path / "good.csv"
    with good.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(rows)
    with good.open("a", newline="") as f:
        f.write('"Too many fields",,"an answer","extra"\n')  # line 32
    data = prepare(_cfg(good, max_rejected_fraction=0.1, eval_fraction=0.0), tokenizer, "llama-2")
    assert data.report.rows_kept == 30
    assert data.report.rejected_examples == [{"location": f"{good}:32", "reason": "bad_csv_row",
                                              "detail": "4 fields where the header has 3"}]

    missing = tmp_path / "missing.csv"
    with missing.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["instruction", "input"])  # no output column
        w.writerows([[r["instruction"], r["input"]] for r in rows])
    with pytest.raises(RejectedRowsError) as info:
        prepare(_cfg(missing), tokenizer, "llama-2")
    assert info.value.exit_code == 3
    assert "missing_field: 30" in str(info.value) and f"{missing}:2 (missing field 'output')" in str(info.value)
    report = info.value.report
    assert report.rejected == {"missing_field": 30} and report.rows_read == 30
    assert [e["location"] for e in report.rejected_examples] == [f"{missing}:{i}" for i in (2, 3, 4)]


def test_parquet_rows(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = medical.generate_rows()[:25] + [{"instruction": "Nothing to say", "input": "", "output": None}]
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    data = prepare(_cfg(path, max_rejected_fraction=0.1, eval_fraction=0.0), tokenizer, "llama-2")
    assert data.report.rows_kept == 25
    assert data.report.rejected_examples == [{"location": f"{path}[25]", "reason": "missing_field",
                                              "detail": "missing field 'output'"}]


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
    assert data.report.rejected_examples[0]["location"] == f"{path}:41"
    assert all(len(ex.input_ids) <= 128 for ex in data.train + data.eval)


def test_truncate_policy_keeps_the_start_and_counts_it(tokenizer, tmp_path):
    rows = medical.generate_rows()[:40] + [{"instruction": "Say it long.", "output": "fever " * 400},
                                           {"instruction": "Long question " * 100, "output": "Short."}]
    path = _write_jsonl(tmp_path / "long.jsonl", rows)
    data = prepare(_cfg(path, max_seq_len=128, length_policy=LengthPolicy.truncate, eval_fraction=0.0,
                        max_rejected_fraction=0.1), tokenizer, "llama-2")
    r = data.report
    assert r.truncated == 1  # the long answer, cut to 128 tokens
    assert r.rejected == {"too_long": 1}  # the long question: nothing to learn is left after the cut
    assert "nothing to learn" in r.rejected_examples[0]["detail"]
    (cut,) = [ex for ex in data.train if ex.location == f"{path}:41"]
    assert len(cut.input_ids) == 128 and cut.labels[-1] != -100 and cut.input_ids[-1] != tokenizer.eos_token_id
    assert r.tokens.max == 128


def test_duplicates_are_found_on_normalized_text(tokenizer, tmp_path):
    base = medical.generate_rows()[:20]
    variants = [dict(base[0], output=base[0]["output"].upper()), dict(base[1], instruction="  " + base[1]["instruction"]
                                                                       .replace(" ", "   ") + "\n")]
    path = _write_jsonl(tmp_path / "dupes.jsonl", base + variants + [base[2]])
    r = prepare(_cfg(path), tokenizer, "llama-2").report
    assert r.duplicates == 3 and r.rows_kept == 20 and _accounted(r)
    r = prepare(_cfg(path, dedup=False), tokenizer, "llama-2").report
    assert r.duplicates == 0 and r.rows_kept == 23


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


def test_eval_split_keeps_the_conversations(tokenizer):
    data = prepare(_cfg("sample:medical-qa", eval_fraction=0.2), tokenizer, "llama-2")
    assert len(data.eval_messages) == data.report.eval_rows > 0
    assert all(m[-1]["role"] == "assistant" for m in data.eval_messages)


# ---- formats: auto, several sources with weights, hub ids ---------------------------------------------

@pytest.mark.parametrize("row, fmt", [
    ({"instruction": "What is {i}?", "input": "", "output": "It is {i}."}, "alpaca"),
    ({"conversations": [{"from": "human", "value": "What is {i}?"}, {"from": "gpt", "value": "It is {i}."}]},
     "sharegpt"),
    ({"messages": [{"role": "user", "content": "What is {i}?"}, {"role": "assistant", "content": "It is {i}."}]},
     "messages"),
])
def test_auto_detects_the_format_and_says_so(tokenizer, tmp_path, caplog, row, fmt):
    rows = [json.loads(json.dumps(row).replace("{i}", str(i))) for i in range(12)]
    path = _write_jsonl(tmp_path / "rows.jsonl", rows)
    with caplog.at_level(logging.INFO, logger="data_prep"):
        data = prepare(_cfg(path, format=DatasetFormat.auto, eval_fraction=0.0), tokenizer, "llama-2")
    assert data.report.format == fmt and data.report.format_detected
    assert f"detected {fmt} from {path}:1" in caplog.text
    assert sorted(tokenizer.decode(_trained_runs(ex)[0][:-1]).strip() for ex in data.train) == \
        sorted(f"It is {i}." for i in range(12))


def test_auto_on_unknown_rows_names_the_row(tokenizer, tmp_path):
    path = _write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as info:
        prepare(_cfg(path, format=DatasetFormat.auto), tokenizer, "llama-2")
    assert f"{path}:1" in str(info.value) and "dataset.format" in str(info.value)


def test_sources_are_mixed_with_weights(tokenizer, tmp_path):
    alpaca_rows = medical.generate_rows()[:80]
    chats = _conversations(60, seed=7)
    a = _write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows)
    s = _write_jsonl(tmp_path / "chats.jsonl", chats)
    unweighted = prepare(DatasetConfig(sources=[SourceConfig(path=str(a)), SourceConfig(path=str(s))],
                                       eval_fraction=0.2), tokenizer, "llama-2")
    cfg = DatasetConfig(sources=[SourceConfig(path=str(a), format=DatasetFormat.alpaca, weight=2.0),
                                 SourceConfig(path=str(s), format=DatasetFormat.sharegpt, weight=0.5)],
                        eval_fraction=0.2)
    data = prepare(cfg, tokenizer, "llama-2")
    r = data.report
    assert r.format == "mixed" and _accounted(r)
    src_a, src_s = r.sources
    assert (src_a.format, src_s.format) == ("alpaca", "sharegpt")
    assert src_a.train_examples == 2 * src_a.train_rows  # weight 2: every training row twice
    assert 0.25 * 48 < src_s.train_examples < 0.75 * 48 and src_s.weight_dropped > 0  # weight 0.5: about half
    assert src_s.train_rows + src_s.weight_dropped + src_s.eval_rows == unweighted.report.sources[1].rows_kept
    assert r.eval_rows == unweighted.report.eval_rows  # held-out rows are never weighted
    assert r.train_rows == src_a.train_examples + src_s.train_examples == len(data.train)
    locations = [ex.location for ex in data.train]
    assert all(locations.count(loc) == 2 for loc in locations if loc.startswith(str(a)))
    # the same half every time: thinning is by content, not by chance
    again = prepare(cfg, tokenizer, "llama-2")
    assert sorted(ex.location for ex in again.train) == sorted(locations)


def test_a_hub_id_offline_is_a_clear_error(tokenizer, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises((EnvError, DataError)) as info:
        prepare(_cfg("nobody-here/no-such-dataset-xyz"), tokenizer, "llama-2")
    message = str(info.value)
    assert "nobody-here/no-such-dataset-xyz" in message and "dataset.path" in message


def test_missing_path_is_a_data_error(tokenizer, tmp_path):
    with pytest.raises(DataError) as info:
        prepare(_cfg(tmp_path / "nope.jsonl"), tokenizer, "llama-2")
    assert "nope.jsonl" in str(info.value)


# ---- preview -------------------------------------------------------------------------------------

def test_preview_highlights_exactly_the_trained_tokens(tokenizer):
    from rich.console import Console

    from data_prep.preview import TRAINED, render, show

    data = prepare(_cfg("sample:medical-qa"), tokenizer, "llama-2")
    ex = data.train[0]
    text = render(ex, tokenizer)
    highlighted = "".join(text.plain[s.start:s.end] for s in text.spans if s.style == TRAINED)
    assert highlighted == tokenizer.decode([t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != -100])
    assert highlighted.endswith("</s>") and "[INST]" not in highlighted
    console = Console(record=True, width=100)
    show(data, tokenizer, 2, console)
    out = console.export_text()
    assert "preview: 2 of" in out and data.train[1].location in out
