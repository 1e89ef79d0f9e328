"""Using a trained adapter: merged into plain transformers weights, and chatted with."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(sft_run):
    """The session's trained tiny-demo run (tests/conftest.py: sft_run)."""
    return sft_run["cfg"], sft_run["results"]


def _ids(result):
    return torch.tensor([result["data"].eval[0].input_ids])


def test_merge_into_original_weights_matches_base_plus_adapter(run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.models.loader import base_model_dir
    from finetune.models.merge import merge

    cfg, result = run
    out = tmp_path / "merged"
    record = merge(result["train"].adapter_dir, out)
    assert "original" in record["base"]
    assert (out / "model.safetensors").is_file() and (out / "chat_template.jinja").is_file()
    assert json.loads((out / "merge.json").read_text())["base"] == record["base"]
    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers: no peft, no bitsandbytes
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert not any(type(m).__name__ == "Linear4bit" for m in merged.modules())

    base = AutoModelForCausalLM.from_pretrained(base_model_dir(cfg.model))
    reference = PeftModel.from_pretrained(base, result["train"].adapter_dir)
    ids = _ids(result)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    # Merging adds B @ A into W: the same function up to float rounding of the sum.
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_merge_into_the_dequantized_base_reproduces_the_trained_model(run, tmp_path):
    from transformers import AutoModelForCausalLM

    from finetune.models.loader import load_with_adapter
    from finetune.models.merge import merge

    cfg, result = run
    out = tmp_path / "merged-q"
    record = merge(result["train"].adapter_dir, out, from_quantized=True)
    assert "dequantized nf4" in record["base"]
    merged = AutoModelForCausalLM.from_pretrained(out)
    trained = load_with_adapter(cfg.model, result["plan"].choices, result["train"].adapter_dir, "cpu")
    ids = _ids(result)
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    # The trained model computes the LoRA path in bf16; the merged weights hold it in fp32.
    torch.testing.assert_close(got, expected, atol=5e-2, rtol=1e-2)


def test_merge_cli_says_which_base(run, tmp_path):
    _, result = run
    out = tmp_path / "cli-merged"
    proc = subprocess.run([sys.executable, "-m", "finetune.models.merge", result["train"].adapter_dir, "--out",
                           str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "into the original" in proc.stdout and str(out) in proc.stdout


def test_chat_uses_the_saved_template_and_streams_answers(run):
    from finetune.chat import Chat

    _, result = run
    chat = Chat(result["train"].adapter_dir, max_new_tokens=24)
    prompt = chat.prompt_text("What causes influenza?")
    assert prompt.startswith("<s>[INST] What causes influenza? [/INST]"), prompt
    answer = chat.ask("What causes influenza?")
    assert answer and "[INST]" not in answer
    follow_up = chat.prompt_text("And how is it treated?")
    assert follow_up.count("[INST]") == 2 and answer in follow_up, "the conversation carries on"


def test_chat_cli_answers_each_line_and_exits_on_eof(run):
    _, result = run
    proc = subprocess.run([sys.executable, "-m", "finetune.chat", result["train"].adapter_dir, "--max-new-tokens",
                           "16"], input="What causes influenza?\n/reset\nWhat is asthma?\n", capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    answers = [line for line in proc.stdout.splitlines() if line.startswith("model> ")]
    assert len(answers) == 2 and all(len(a) > len("model> ") for a in answers)
    assert "(conversation reset)" in proc.stdout


def test_chat_on_a_directory_without_an_adapter_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "finetune.chat", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "adapter_config.json" in proc.stderr


def _merge_cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "finetune.models.merge", *map(str, args)], capture_output=True,
                          text=True, timeout=300, **kwargs)


def _one_error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_merge_cli_never_replaces_a_folder_it_did_not_write(run, tmp_path):
    import resource

    _, result = run
    adapter = result["train"].adapter_dir
    models = tmp_path / "models"  # say, the user's whole models folder
    (models / "llama").mkdir(parents=True)
    (models / "llama" / "weights.bin").write_text("precious")
    proc = _merge_cli(adapter, "--out", models)
    assert proc.returncode == 2
    assert "--force" in _one_error_line(proc) and "merge.json" in proc.stderr
    assert (models / "llama" / "weights.bin").read_text() == "precious"

    proc = _merge_cli(adapter, "--out", models, "--force")  # asked for: replaced
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (models / "llama").exists() and (models / "merge.json").is_file()
    before = {p.name: p.read_bytes() for p in models.iterdir()}

    # An earlier merge output is ours to replace; a merge that fails while writing (here: a file size
    # limit, as a full disk would) leaves it as it was, and no half-written sibling behind.
    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))

    proc = _merge_cli(adapter, "--out", models, preexec_fn=small_files)
    assert proc.returncode != 0 and "File too large" in proc.stderr, proc.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in models.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def test_merge_and_chat_never_take_trust_remote_code_from_the_run_directory(run, tmp_path):
    import shutil

    import yaml

    from finetune.models.merge import find_run

    _, result = run
    theirs = tmp_path / "someone-elses-run"
    shutil.copytree(result["run_dir"], theirs, ignore=shutil.ignore_patterns("checkpoints"))
    config = yaml.safe_load((theirs / "config.yaml").read_text())
    config["model"]["trust_remote_code"] = True
    (theirs / "config.yaml").write_text(yaml.safe_dump(config))

    out = tmp_path / "merged"
    for proc in (_merge_cli(theirs / "adapter", "--out", out),
                 subprocess.run([sys.executable, "-m", "finetune.chat", str(theirs / "adapter"), "--prompt", "hi"],
                                capture_output=True, text=True, timeout=300)):
        assert proc.returncode == 2
        line = _one_error_line(proc)
        assert "trust_remote_code" in line and "--trust-remote-code" in line
    assert not out.exists()
    assert find_run(theirs / "adapter", trust_remote_code=True).model_cfg.trust_remote_code is True
    # The run's own recipe said false: still off without the flag (and nothing in it can turn it on).
    assert find_run(result["run_dir"]).model_cfg.trust_remote_code is False
