"""Using a trained adapter: merged into plain transformers weights, and chatted with."""

from __future__ import annotations

import json
import re
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
    from finetune.paths import umask

    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask()), "the user's umask, weights included (not 0600)"
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
    assert proc.returncode == 5, proc.stderr[-2000:]
    line = _one_error_line(proc)
    assert "File too large" in line and "ulimit -f" in line and "--out DIR" in line, line
    assert {p.name: p.read_bytes() for p in models.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (the merged tiny model is ~1.6 MiB); skips where this user cannot mount one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_merge_onto_a_too_small_disk_says_needed_vs_free_before_loading(run, small_disk):
    _, result = run
    proc = _merge_cli(result["train"].adapter_dir, "--out", small_disk / "merged")
    assert proc.returncode == 5, proc.stderr[-2000:]
    line = _one_error_line(proc)
    assert re.search(r"the merged model \([\d.]+[MB] parameters, \d bytes each\) needs about \d+ MiB and only 0 MiB are "
                     r"free there; free some space or pass --out on a bigger disk", line), line
    assert list(small_disk.iterdir()) == []  # nothing written, not even the directory


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


SHORT_CONTEXT = 160  # tokens: a few turns of the tiny demo's chat


@pytest.fixture(scope="module")
def short_context_adapter(run, tmp_path_factory):
    """A copy of the trained run whose base model (a copy of the tiny model) says in its config.json that its
    context is SHORT_CONTEXT tokens; its tokenizer still says 1024, so the config is seen to win."""
    import shutil

    import yaml

    from finetune.models.loader import base_model_dir

    cfg, result = run
    root = tmp_path_factory.mktemp("short-context")
    base = root / "base"
    shutil.copytree(base_model_dir(cfg.model), base)
    config = json.loads((base / "config.json").read_text())
    assert config["max_position_embeddings"] > SHORT_CONTEXT
    config["max_position_embeddings"] = SHORT_CONTEXT  # rotary positions: the weights do not depend on it
    (base / "config.json").write_text(json.dumps(config))
    run_dir = root / "run"
    shutil.copytree(result["run_dir"], run_dir, ignore=shutil.ignore_patterns("checkpoints"))
    recipe = yaml.safe_load((run_dir / "config.yaml").read_text())
    recipe["model"]["name_or_path"] = str(base)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(recipe))
    return run_dir / "adapter"


QUESTIONS = ["What causes influenza?", "What is asthma?", "How is diabetes treated?", "What are the signs of a "
             "migraine?", "When should I see a doctor about a fever?", "How is asthma treated?",
             "What causes high blood pressure?", "How can I avoid the flu?"]


def test_context_length_prefers_the_config_then_the_tokenizer():
    from types import SimpleNamespace

    from finetune.chat import context_length

    tokenizer = SimpleNamespace(model_max_length=1024)
    assert context_length({"max_position_embeddings": 2048, "n_positions": 512}, tokenizer) == 2048
    assert context_length({"n_positions": 512}, tokenizer) == 512
    assert context_length({"text_config": {"max_position_embeddings": 4096}}, tokenizer) == 4096
    assert context_length({}, tokenizer) == 1024
    assert context_length({}, SimpleNamespace(model_max_length=int(1e30))) is None  # transformers' "no limit"
    assert context_length(None, None) is None


def test_chat_drops_the_oldest_turns_to_fit_the_model_context(short_context_adapter, capsys):
    from finetune.chat import Chat

    chat = Chat(str(short_context_adapter), system="Answer briefly.", max_new_tokens=24)
    assert chat.context == SHORT_CONTEXT  # the base model's config, not the tokenizer's 1024
    calls = []
    generate = chat.model.generate

    def recording_generate(**kwargs):  # the real generation, its lengths written down
        out = generate(**kwargs)
        calls.append((kwargs["input_ids"][0].tolist(), kwargs["max_new_tokens"], out.shape[1]))
        return out

    chat.model.generate = recording_generate
    note = re.compile(r"note: dropped the (oldest turn|(\d+) oldest turns) of the conversation to fit the model's "
                      rf"context \({SHORT_CONTEXT} tokens\)")
    capsys.readouterr()
    trimmed = 0
    for question in QUESTIONS:
        before = list(chat.history)
        answer = chat.ask(question)
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        prompt, max_new, total = calls[-1]
        assert len(prompt) + max_new <= SHORT_CONTEXT and total <= SHORT_CONTEXT
        assert max_new == 24, "the prompt left room for the whole answer"
        kept = chat.history[:-2]
        assert chat.history[-2:] == [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        # what the model was given: the system message, the history kept and the new message, as rendered today
        assert prompt == chat._tokens(chat._render(question, "user", kept))
        assert chat.tokenizer.decode(prompt).count("Answer briefly.") == 1
        if err:
            (line,) = err  # one line per trimming
            match = note.fullmatch(line)
            assert match, line
            dropped = int(match.group(2) or 1)
            assert kept == before[2 * dropped:], "the oldest whole turns went, the later ones stayed"
            untrimmed = chat._tokens(chat._render(question, "user", before))
            assert len(untrimmed) + 24 > SHORT_CONTEXT, "nothing is dropped while the whole conversation fits"
            trimmed += 1
        else:
            assert kept == before
    assert trimmed >= 2 and len(chat.history) < 2 * len(QUESTIONS)


def _stderr_lines(proc) -> list[str]:
    """stderr without transformers' weight-loading progress bar."""
    return [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("Loading weights")]


def test_chat_refuses_a_message_longer_than_the_context_and_goes_on(short_context_adapter):
    long = "influenza " * 300
    script = "\n".join(QUESTIONS[:5] + [long] + QUESTIONS[5:6]) + "\n"
    proc = subprocess.run([sys.executable, "-m", "finetune.chat", str(short_context_adapter), "--max-new-tokens",
                           "24"], input=script, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    answers = [line for line in proc.stdout.splitlines() if line.startswith("model> ")]
    assert len(answers) == 6, proc.stdout  # every question answered, the long message refused
    lines = _stderr_lines(proc)
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors and len(errors) == 1, proc.stderr
    size = int(re.fullmatch(rf"error: this message is (\d+) tokens and the model's context is {SHORT_CONTEXT} "
                            r"\(with max_new_tokens 24\): shorten it", errors[0]).group(1))
    assert size > 300
    notes = [line for line in lines if line.startswith("note: dropped ")]
    assert notes and all(line in errors + notes for line in lines), proc.stderr  # no library warnings
    assert "maximum length" not in proc.stderr and "sequence length" not in proc.stderr

    proc = subprocess.run([sys.executable, "-m", "finetune.chat", str(short_context_adapter), "--max-new-tokens",
                           "24", "--prompt", long], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert _stderr_lines(proc) == [errors[0]], proc.stderr
