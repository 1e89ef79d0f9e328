"""Function calling on the tiny model: the sample set, ChatML with tools, the demo recipe and chat --tools.

The masks are checked on the project's own function-calling sample (``sample:tool-calls``) with the
built-in ChatML template: each call the assistant makes and each answer it gives is trained, ending with
<|im_end|>; the tools' schemas, the user's question and the tool's result are read, not trained. The
recipe ``tiny-tools-demo`` then trains through the CLI, and ``finetune-chat --tools`` renders the same
prompt the data stage did and stops at the end of the turn.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from data_prep.prepare import prepare
from data_prep.samples.tools import TOOLS, generate_rows
from finetune.config import DatasetConfig, DatasetFormat, ModelConfig
from finetune.models.loader import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(ModelConfig(name_or_path="tiny:llama", chat_template="chatml"), model_vocab_size=2048)


def _runs(ex) -> list[list[int]]:
    runs, current = [], []
    for t, label in zip(ex.input_ids, ex.labels, strict=True):
        if label != -100:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_sample_tool_calls_train_the_calls_and_answers_and_not_the_results(tokenizer):
    cfg = DatasetConfig(path="sample:tool-calls", format=DatasetFormat.messages, max_seq_len=512,
                        eval_fraction=0.0, max_rejected_fraction=0.0)
    data = prepare(cfg, tokenizer, "chatml")
    rows = generate_rows()
    assert data.report.rows_kept == len(rows) == len(data.train)  # nothing rejected, nothing cut
    calls = answers = 0
    for ex in data.train:
        text = tokenizer.decode(ex.input_ids)
        trained = [tokenizer.decode(run) for run in _runs(ex)]
        assert "<tools>" in text and '"name": "' in text  # the row's schemas reached the template
        assert all(run.endswith("<|im_end|>") for run in trained)  # every trained turn ends where it stops
        assert not any("<tool_response>" in run or "# Tools" in run or "<|im_start|>" in run for run in trained)
        for run in trained:
            if run.startswith("<tool_call>"):
                calls += 1
                call = json.loads(run[len("<tool_call>"):-len("</tool_call><|im_end|>")])
                assert call["name"] in TOOLS and isinstance(call["arguments"], dict)
                assert f'"{call["name"]}"' in text.split("\n</tools>")[0]  # it calls a declared tool
            else:
                answers += 1
    expected_calls = sum(1 for r in rows for m in r["messages"] if m.get("tool_calls"))
    assert calls == expected_calls == 180
    assert answers == len(rows)  # each conversation's final answer, after the tool's result or directly


def test_chat_tools_file_errors_are_one_line(tmp_path):
    from finetune.chat import load_tools
    from finetune.errors import FinetuneError

    bad = tmp_path / "tools.json"
    for text, needle in (("{not json", "not JSON"), ('[{"type": "function", "function": {}}]', r"tools\[0\] has no function name"),
                         ("[]", "empty")):
        bad.write_text(text)
        with pytest.raises(FinetuneError, match=needle):
            load_tools(str(bad))
    bad.write_text(json.dumps({"tools": list(TOOLS.values())}))  # {"tools": [...]} as OpenAI's request has it
    assert [t["function"]["name"] for t in load_tools(str(bad))] == list(TOOLS)


@pytest.mark.slow
def test_tools_demo_trains_and_chat_renders_the_tools_and_stops_at_im_end(run_cli, tmp_path):
    proc = run_cli("+recipe=tiny-tools-demo", "train.max_steps=80", "train.save_steps=80",
                   "eval.generate_examples=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = next((tmp_path / "outputs" / "tiny-tools-demo").iterdir())
    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["rows_kept"] == 240 and report["chat_template"] == "chatml"
    evaluation = json.loads((run_dir / "eval.json").read_text())
    assert evaluation["adapter"]["loss"] < evaluation["base"]["loss"] - 1.0  # it learned the calls' format
    generation = json.loads((run_dir / "adapter" / "generation_config.json").read_text())
    assert 5 in generation["eos_token_id"]  # <|im_end|>

    from finetune.chat import Chat

    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([TOOLS["find_clinic"]]))
    prompt = "Is there a clinic open near me in Lyon?"
    chat = Chat(str(run_dir / "adapter"), tools=[TOOLS["find_clinic"]], max_new_tokens=200)
    assert '"name": "find_clinic"' in chat.prompt_text(prompt).split("\n</tools>")[0]
    out = subprocess.run([sys.executable, "-m", "finetune.chat", str(run_dir / "adapter"), "--tools", str(tools),
                          "--prompt", prompt, "--max-new-tokens", "200"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    answer = chat.ask(prompt)
    assert answer and answer in out.stdout  # the command gives what the class gives
    ids = chat.tokenizer(answer, add_special_tokens=False).input_ids
    assert len(ids) < 150  # it stopped at <|im_end|>, far short of max_new_tokens
