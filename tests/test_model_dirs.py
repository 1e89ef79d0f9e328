"""Real model directories: a SentencePiece-only Llama checkpoint works exactly; a broken one is one line.

Meta's original Llama checkpoints ship config.json and the SentencePiece tokenizer.model,
with no tokenizer.json. Here such a directory is made from the tiny Llama's config.json and a
tokenizer.model trained with sentencepiece on the project's own sample text, trained the way
Meta's was (BPE, byte fallback, no normalization). Then each broken variant a user meets
(missing, truncated or corrupt files, stale tokenizer configs, missing weight shards, unknown
architectures, missing libraries) gives one line, ``error: ...``, naming the file and what to do,
with the contract's exit code: 2 for the model directory, 5 for a library that is not installed.

The preflight runs the CLI in a fresh process (the point there is also that it never imports torch
or transformers); the data stage runs in-process, as the CLI's job runs it (compose + run_pipeline),
and errors print through the CLI's own reporting (finetune.cli.report), which keeps the file fast.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.samples.medical import encyclopedia, generate_rows
from finetune import cli
from finetune.architectures import catalog, tiny
from finetune.config import ModelConfig, compose
from finetune.errors import ConfigError, EnvError, FinetuneError
from finetune.models import loader

SP_VOCAB = 1000
# The tiny Llama's config.json (finetune/architectures/tiny.py): its embedding has 2048 rows, more than the
# tokenizer here has tokens, as many real models have spare rows.
TINY_CONFIG = tiny.spec("tiny:llama")


def _sample_texts() -> list[str]:
    texts = list(encyclopedia())
    for row in generate_rows():
        texts += [row["instruction"], row["input"], row["output"]]
    return [t for t in texts if t]


def _train_sentencepiece() -> bytes:
    """A tokenizer.model trained as Meta's Llama one was: BPE with byte fallback, identity normalization."""
    import sentencepiece

    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_sample_texts()), model_writer=out, vocab_size=SP_VOCAB, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    )
    return out.getvalue()


@pytest.fixture(autouse=True)
def _errors_as_users_see_them(monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)  # with it, the CLI shows tracebacks


@pytest.fixture(scope="module")
def sp_model_bytes() -> bytes:
    return _train_sentencepiece()


@pytest.fixture(scope="module")
def sp(sp_model_bytes):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_proto=sp_model_bytes)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, sp_model_bytes) -> Path:
    """config.json + tokenizer.model, nothing else: how Meta's original Llama checkpoints ship."""
    d = tmp_path_factory.mktemp("models") / "llama-sp"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(TINY_CONFIG, indent=2))
    (d / "tokenizer.model").write_bytes(sp_model_bytes)
    return d


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    """The tiny Llama (random weights) saved in 4 safetensors shards with their index, as big checkpoints are."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(TINY_CONFIG)
    config.pop("architectures")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
    d = tmp_path_factory.mktemp("models") / "llama-sharded"
    model.save_pretrained(d, max_shard_size="300KB")
    assert len(list(d.glob("model-*-of-*.safetensors"))) > 1 and (d / "model.safetensors.index.json").is_file()
    return d


def _write_chats(path: Path) -> tuple[Path, list[tuple[str, str]]]:
    """The sample Q&A set as a messages-format file (one user and one assistant turn a row)."""
    chats = [(r["instruction"] + (f"\n\n{r['input']}" if r["input"] else ""), r["output"]) for r in generate_rows()]
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": user},
                                                      {"role": "assistant", "content": answer}]}) + "\n"
                            for user, answer in chats))
    return path, chats


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert "Traceback" not in text, text
    assert len(lines) == 1, text
    assert lines[0].startswith("error: model.name_or_path: "), text
    return lines[0]


def _reported(ex: BaseException, capsys) -> tuple[int, str]:
    """What the CLI prints for `ex` and the exit code it returns (finetune.cli.report, as a job does)."""
    capsys.readouterr()
    code = cli.report(ex)
    return code, _one_line(capsys.readouterr().err)


def _run_stages(model_dir: Path | str, stages: str, run_dir: Path, capsys) -> tuple[int, str]:
    """The recipe's stages in-process, as the CLI's job runs them; (exit code, the one error line)."""
    from finetune.pipeline import run_pipeline

    cfg = compose(["+recipe=tiny-demo", f"model.name_or_path={model_dir}", f"stages={stages}"])
    try:
        run_pipeline(cfg, run_dir)
    except FinetuneError as ex:
        return _reported(ex, capsys)
    raise AssertionError(f"{stages} on {model_dir} did not fail")


PREFLIGHT_SCRIPT = (
    "import sys\n"
    "sys.argv = ['finetune', '+recipe=tiny-demo', 'model.name_or_path=' + sys.argv[1], 'stages=[preflight]']\n"
    "from finetune import cli\n"
    "try:\n"
    "    cli.main()\n"
    "except SystemExit as e:\n"
    "    code = e.code\n"
    "print('EXIT', code, 'IMPORTED', 'torch' in sys.modules, 'transformers' in sys.modules)\n"
)


def _preflight(model_dir: Path | str, cwd: Path, imports: bool = False) -> tuple[int, str]:
    """`finetune ... stages=[preflight]` in a fresh process: (exit code, the one error line); asserts
    that it imported neither torch nor transformers (unless `imports`: an architecture without hand-written
    rules asks transformers whether it can build it)."""
    proc = subprocess.run([sys.executable, "-c", PREFLIGHT_SCRIPT, str(model_dir)], cwd=cwd, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    words = proc.stdout.split()
    if not imports:
        assert words[words.index("IMPORTED") + 1:] == ["False", "False"], proc.stdout
    return int(words[words.index("EXIT") + 1]), _one_line(proc.stderr)


# ---- a SentencePiece-only Llama directory works, exactly -------------------------------------------

def test_sentencepiece_only_llama_dir_runs_the_data_stage_with_exact_counts(llama_dir, sp, tmp_path):
    """`finetune +recipe=tiny-demo model.name_or_path=DIR stages=[data] ...`: every row kept, and the token and
    trained-token counts in data_report.json are sentencepiece's own."""
    from finetune.pipeline import run_pipeline

    data, chats = _write_chats(tmp_path / "chats.jsonl")
    # The llama-2 template renders <s>[INST] user [/INST] answer </s>; the answer and </s> are trained.
    totals, trained = [], []
    for user, answer in chats:
        prompt = f"[INST] {user.strip()} [/INST]"
        ids = sp.encode(f"{prompt} {answer.strip()} ")
        assert ids[:len(sp.encode(prompt))] == sp.encode(prompt)  # the answer starts on a token boundary
        totals.append(1 + len(ids) + 1)
        trained.append(len(ids) - len(sp.encode(prompt)) + 1)

    cfg = compose(["+recipe=tiny-demo", f"model.name_or_path={llama_dir}", "stages=[data]", "dataset.format=messages",
                   f"dataset.path={data}", "dataset.max_seq_len=1024"])
    run_pipeline(cfg, tmp_path / "run")
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["rows_read"] == report["rows_kept"] == len(chats)
    assert report["rows_rejected"] == report["duplicates"] == report["truncated"] == 0
    assert report["train_rows"] + report["eval_rows"] == len(chats) and report["eval_rows"] > 0
    assert report["tokens"]["total"] == sum(totals)
    assert report["tokens"]["trained"] == sum(trained)
    assert report["tokens"]["max"] == max(totals)


def test_sentencepiece_tokenizer_is_fast_and_encodes_as_sentencepiece(llama_dir, sp):
    from data_prep.samples.corpus import documents

    tok = loader.load_tokenizer(ModelConfig(name_or_path=str(llama_dir), chat_template="llama-2"),
                                model_vocab_size=TINY_CONFIG["vocab_size"])
    assert tok.is_fast
    assert len(tok) == sp.get_piece_size() == SP_VOCAB
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    assert (tok.bos_token_id, tok.eos_token_id) == (sp.bos_id(), sp.eos_id())
    assert tok.pad_token == "<unk>"  # a pad distinct from EOS, as Llama recipes use
    texts = _sample_texts() + list(documents().values()) + ["Ça va? ✓  two  spaces, a tab\tand 数字 12345 🙂 "]
    for text in texts:
        assert tok(text, add_special_tokens=False).input_ids == sp.encode(text), text


def test_sentencepiece_dir_ids_and_masks_equal_apply_chat_template(llama_dir, tmp_path):
    """The data stage's batched ids and labels are transformers' own for this tokenizer, row by row."""
    from data_prep.prepare import prepare
    from finetune.config import DatasetConfig, DatasetFormat

    tok = loader.load_tokenizer(ModelConfig(name_or_path=str(llama_dir), chat_template="llama-2"),
                                model_vocab_size=TINY_CONFIG["vocab_size"])
    path, chats = _write_chats(tmp_path / "chats.jsonl")
    data = prepare(DatasetConfig(path=str(path), format=DatasetFormat.messages, eval_fraction=0.0,
                                 max_seq_len=1024), tok, "llama-2")
    assert len(data.train) == len(chats)
    for ex in data.train:
        user, answer = chats[int(ex.location.rsplit(":", 1)[1]) - 1]
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        ref = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert ex.input_ids == ref["input_ids"]
        assert ex.labels == [t if m else -100 for t, m in zip(ref["input_ids"], ref["assistant_masks"], strict=True)]
        trained = [t for t in ex.labels if t != -100]
        assert trained[-1] == tok.eos_token_id and tok.decode(trained[:-1]).strip() == answer.strip()


def test_stale_llamatokenizer_class_still_loads(llama_dir, sp, tmp_path):
    """Old conversions name the class LLaMATokenizer, which transformers no longer has: it falls back to
    reading tokenizer.model, and the tokenizer is the same."""
    d = _copy(llama_dir, tmp_path / "stale")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LLaMATokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "model_max_length": 1000000000000000019884624838656}))
    tok = loader.load_tokenizer(ModelConfig(name_or_path=str(d)), model_vocab_size=TINY_CONFIG["vocab_size"])
    assert tok.is_fast and (tok.bos_token_id, tok.eos_token_id) == (sp.bos_id(), sp.eos_id())
    text = _sample_texts()[3]
    assert tok(text, add_special_tokens=False).input_ids == sp.encode(text)


# ---- a broken directory: one line, the right exit code --------------------------------------------

def _no_tokenizer(d: Path) -> str:
    (d / "tokenizer.model").unlink()
    return f"{d} has no tokenizer files"


def _truncated_sp_model(d: Path) -> str:
    data = (d / "tokenizer.model").read_bytes()
    (d / "tokenizer.model").write_bytes(data[:len(data) // 2])
    return f"{d / 'tokenizer.model'} is not a readable SentencePiece model"


def _garbage_sp_model(d: Path) -> str:
    (d / "tokenizer.model").write_bytes(b"<html>404: not found</html>\n")
    return f"{d / 'tokenizer.model'} is not a readable SentencePiece model"


def _truncated_tokenizer_json(d: Path) -> str:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(d).save_pretrained(d)  # now with tokenizer.json (what hub repos hold)
    text = (d / "tokenizer.json").read_text()
    (d / "tokenizer.json").write_text(text[:len(text) // 2])
    return f"{d / 'tokenizer.json'} is truncated"


def _corrupt_tokenizer_config(d: Path) -> str:
    (d / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer",, }')
    return f"{d / 'tokenizer_config.json'} is not valid JSON"


# What early LLaMATokenizer conversions on the hub hold: read as it is, transformers 5 recurses until RecursionError.
EMPTY_SPECIAL = {"bos_token": "", "eos_token": "", "model_max_length": 1000000000000000019884624838656,
                 "tokenizer_class": "LLaMATokenizer", "unk_token": ""}


def _empty_special_tokens_without_config_id(d: Path) -> str:
    # Fixed from config.json's ids where they are there (see the tests of special tokens below); here BOS is not.
    (d / "tokenizer_config.json").write_text(json.dumps(EMPTY_SPECIAL))
    (d / "config.json").write_text(json.dumps({k: v for k, v in TINY_CONFIG.items() if k != "bos_token_id"}))
    return (f"{d / 'tokenizer_config.json'} sets bos_token to an empty string (old LLaMATokenizer conversions did), "
            f"and {d / 'config.json'} has no bos_token_id")


def _truncated_config(d: Path) -> str:
    text = (d / "config.json").read_text()
    (d / "config.json").write_text(text[:len(text) // 2])
    return f"{d / 'config.json'} is truncated"


def _binary_config(d: Path) -> str:
    (d / "config.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    return f"{d / 'config.json'} is not a JSON text file"


@pytest.mark.parametrize("breakage", [_no_tokenizer, _truncated_sp_model, _garbage_sp_model, _truncated_tokenizer_json,
                                      _corrupt_tokenizer_config, _empty_special_tokens_without_config_id,
                                      _truncated_config,
                                      _binary_config], ids=lambda f: f.__name__.strip("_"))
def test_broken_tokenizer_dir_is_one_line_exit_2(breakage, llama_dir, tmp_path, capsys):
    d = _copy(llama_dir, tmp_path / "model")
    expected = breakage(d)
    code, line = _run_stages(d, "[data]", tmp_path / "run", capsys)
    assert code == 2
    assert expected in line
    assert "download" in line or "set it to" in line or "copy" in line  # says what to do


@pytest.mark.parametrize("absent, packages", [
    (["sentencepiece"], "sentencepiece"),
    (["google.protobuf"], "protobuf"),
    (["sentencepiece", "google.protobuf"], "sentencepiece protobuf"),
])
def test_missing_sentencepiece_is_exit_5_saying_what_to_install(absent, packages, llama_dir, tmp_path, capsys,
                                                                monkeypatch):
    for module in absent:
        monkeypatch.setitem(sys.modules, module, None)  # `import sentencepiece` now fails, as when not installed
    code, line = _run_stages(llama_dir, "[data]", tmp_path / "run", capsys)
    assert code == EnvError.exit_code == 5
    assert str(llama_dir / "tokenizer.model") in line and line.endswith(f"pip install {packages}")


def test_missing_sentencepiece_is_read_from_transformers_exception(llama_dir, monkeypatch):
    """Without our check of the directory (a hub id has none), transformers' own error says "tiktoken is
    required" (its fallback after SentencePiece failed): still EnvError, naming sentencepiece."""
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    monkeypatch.setattr(loader, "check_tokenizer_files", lambda local: None)
    with pytest.raises(EnvError) as info:
        loader.load_tokenizer(ModelConfig(name_or_path=str(llama_dir)))
    assert str(info.value).endswith("pip install sentencepiece")
    assert isinstance(info.value.__cause__, ValueError) and "tiktoken" in str(info.value.__cause__)


def test_tiktoken_vocabulary_without_tiktoken_is_exit_5(llama_dir, tmp_path, capsys, monkeypatch):
    """Llama 3's original tokenizer.model is a tiktoken file: that needs tiktoken, not sentencepiece."""
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    d = _copy(llama_dir, tmp_path / "model")
    (d / "tokenizer.model").write_text("IQ== 0\nIg== 1\nIw== 2\n")
    code, line = _run_stages(d, "[data]", tmp_path / "run", capsys)
    assert code == 5 and "tiktoken vocabulary" in line and line.endswith("pip install tiktoken")


def test_truncated_config_json_is_the_same_line_in_preflight_and_data(llama_dir, tmp_path, capsys):
    d = _copy(llama_dir, tmp_path / "model")
    _truncated_config(d)
    code, line = _preflight(d, tmp_path)
    assert code == 2
    assert f"{d / 'config.json'} is truncated" in line and "download it again" in line
    assert _run_stages(d, "[data]", tmp_path / "run", capsys) == (2, line)


def test_missing_model_path_is_exit_2_in_preflight_and_data(tmp_path, capsys):
    missing = tmp_path / "models" / "llama-2-7b"
    code, line = _preflight(missing, tmp_path)
    assert code == 2
    assert f"{missing} does not exist" in line
    assert _run_stages(missing, "[data]", tmp_path / "run", capsys) == (2, line)
    relative = "./models/llama-2-7b"
    assert _run_stages(relative, "[data]", tmp_path / "run", capsys)[0] == 2


def test_a_file_is_not_a_model_directory(llama_dir, tmp_path, capsys):
    code, line = _run_stages(llama_dir / "config.json", "[data]", tmp_path / "run", capsys)
    assert code == 2 and "is a file, not a model directory" in line


def test_hub_ids_are_not_taken_for_paths():
    assert catalog.local_dir("meta-llama/Llama-2-7b-hf") is None
    assert catalog.local_dir("gpt2") is None
    for path in ("/nowhere/llama", "./llama", "../llama", "~/nowhere-xyz/llama", "models/meta/llama"):
        with pytest.raises(ConfigError):
            catalog.local_dir(path)


# ---- the weights, at training load ----------------------------------------------------------------

CHOICES = {"quantization": "none", "double_quant": False, "compute_dtype": "fp32"}


def test_sharded_checkpoint_loads(weights_dir):
    model = loader.load_model(ModelConfig(name_or_path=str(weights_dir)), CHOICES, "cpu")
    assert type(model).__name__ == "LlamaForCausalLM"


def _missing_shard(d: Path) -> str:
    shard = sorted(d.glob("model-*-of-*.safetensors"))[1]
    shard.unlink()
    return f"{d} lacks 1 of the weight shards that model.safetensors.index.json names ({shard.name})"


def _truncated_shard(d: Path) -> str:
    shard = sorted(d.glob("model-*-of-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) - 100])  # an interrupted download
    return f"{shard} is not a readable safetensors file"


def _truncated_index(d: Path) -> str:
    index = d / "model.safetensors.index.json"
    index.write_text(index.read_text()[:60])
    return f"{index} is truncated"


def _no_weights(d: Path) -> str:
    for f in d.glob("model*.safetensors*"):
        f.unlink()
    return f"{d} has no weights"


def _pickled_weights_only(d: Path) -> str:
    for f in d.glob("model*.safetensors*"):
        f.unlink()
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    return f"{d} holds only pickled weights (pytorch_model.bin)"


def _unknown_model_type(d: Path) -> str:
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "model_type": "llamazoid"}))
    return f"{d / 'config.json'} has model_type 'llamazoid', which transformers"


def _no_model_type(d: Path) -> str:
    config = json.loads((d / "config.json").read_text())
    del config["model_type"]
    (d / "config.json").write_text(json.dumps(config))
    return f"{d / 'config.json'} has no model_type"


def _corrupt_config(d: Path) -> str:
    (d / "config.json").write_text("")
    return f"{d / 'config.json'} is empty"


@pytest.mark.parametrize("breakage", [_missing_shard, _truncated_shard, _truncated_index, _no_weights,
                                      _pickled_weights_only, _unknown_model_type, _no_model_type, _corrupt_config],
                         ids=lambda f: f.__name__.strip("_"))
def test_broken_weights_dir_is_one_line_exit_2(breakage, weights_dir, tmp_path, capsys):
    d = _copy(weights_dir, tmp_path / "model")
    expected = breakage(d)
    with pytest.raises(ConfigError) as info:
        loader.load_model(ModelConfig(name_or_path=str(d)), CHOICES, "cpu")
    code, line = _reported(info.value, capsys)
    assert code == 2
    assert expected in line


def _shard_cut_short(d: Path) -> str:
    shard = sorted(d.glob("model-*-of-*.safetensors"))[1]
    size = shard.stat().st_size
    with shard.open("r+b") as f:
        f.truncate(size - 1000)  # a download cut short: the header is whole, the tensors are not
    return f"{d} has 1 incomplete weight file: {shard.name} (truncated: {size - 1000:,} of {size:,} bytes)"


@pytest.mark.parametrize("breakage", [_missing_shard, _shard_cut_short], ids=lambda f: f.__name__.strip("_"))
def test_broken_weights_stop_the_command_before_the_data_stage(breakage, weights_dir, llama_dir, tmp_path):
    """As a user runs it: a missing or truncated shard is one line, exit 2, before the data stage or an MLflow run,
    and the rejected command leaves no run directory."""
    d = _copy(weights_dir, tmp_path / "model")
    shutil.copy(llama_dir / "tokenizer.model", d / "tokenizer.model")
    expected = breakage(d)
    proc = subprocess.run([sys.executable, "-m", "finetune", "+recipe=tiny-demo", f"model.name_or_path={d}",
                           "tracking.system_metrics=false"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr and expected in errors[0], proc.stderr[-2000:]
    assert "data:" not in proc.stdout, "stopped before the data stage"
    assert not list((tmp_path / "outputs").glob("*/*")) and not (tmp_path / "mlflow.db").exists()


def test_a_whole_sharded_checkpoint_passes_the_size_check(weights_dir):
    from finetune.models import weights

    files = weights.weight_files(weights_dir)
    assert len(files) > 1
    weights.check_sizes(files, weights_dir)
    assert all(weights.expected_size(f)[0] == f.stat().st_size for f in files)


def test_unknown_model_type_in_preflight_is_one_line_exit_2(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path / "model")
    (d / "config.json").write_text(json.dumps({**TINY_CONFIG, "model_type": "llamazoid"}))
    code, line = _preflight(d, tmp_path, imports=True)
    assert code == 2 and "llamazoid" in line and "transformers" in line


def _clear_transformers_availability_caches():
    from transformers.utils import import_utils

    for value in vars(import_utils).values():
        if callable(getattr(value, "cache_clear", None)):
            value.cache_clear()


def test_missing_bitsandbytes_at_training_load_is_exit_5(weights_dir, capsys, monkeypatch):
    # transformers caches "is bitsandbytes available" per process: clear it on both sides, so that the
    # simulated absence is seen here and not by the tests that run after this one
    _clear_transformers_availability_caches()
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    try:
        with pytest.raises(EnvError) as info:
            loader.load_model(ModelConfig(name_or_path=str(weights_dir)), {**CHOICES, "quantization": "nf4"}, "cpu")
    finally:
        monkeypatch.undo()
        _clear_transformers_availability_caches()
    code, line = _reported(info.value, capsys)
    assert code == 5 and "bitsandbytes" in line and "pip install" in line


# ---- special tokens: fixed where unambiguous, else one line ----------------------------------------

ALL_EOS = {"tokenizer_class": "LLaMATokenizer", "bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>",
           "model_max_length": 10**30}


def _all_eos_dir(llama_dir: Path, dst: Path) -> Path:
    """The original LLaMA conversion: a class name transformers no longer has, and </s> for every special token."""
    d = _copy(llama_dir, dst)
    (d / "tokenizer_config.json").write_text(json.dumps(ALL_EOS))
    (d / "special_tokens_map.json").write_text(json.dumps({k: ALL_EOS[k] for k in ("bos_token", "eos_token",
                                                                                  "unk_token")}))
    return d


def _assert_chats_start_with_bos_and_report_the_fixes(d: Path, tok, sp, tmp_path: Path) -> None:
    """The data stage on the sample chats with model directory `d`: every example starts with BOS and ends with
    EOS, and data_report.json lists the tokenizer's fixes."""
    from finetune.pipeline import run_pipeline

    data, _ = _write_chats(tmp_path / "chats.jsonl")
    cfg = compose(["+recipe=tiny-demo", f"model.name_or_path={d}", "stages=[data]", "dataset.format=messages",
                   f"dataset.path={data}", "dataset.max_seq_len=1024"])
    result = run_pipeline(cfg, tmp_path / "run")
    assert all(e.input_ids[0] == sp.bos_id() and e.input_ids[-1] == sp.eos_id() for e in result["data"].train)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["tokenizer_fixes"] == tok.finetune_fixes


def test_a_tokenizer_listing_eos_for_every_special_token_is_fixed_and_reported(llama_dir, sp, tmp_path):
    """Chat examples start with the real BOS (not </s>), text documents get BOS and EOS, and the data report
    says what was fixed."""
    from finetune.pipeline import run_pipeline

    d = _all_eos_dir(llama_dir, tmp_path / "all-eos")
    tok = loader.load_tokenizer(ModelConfig(name_or_path=str(d), chat_template="llama-2"),
                                model_vocab_size=TINY_CONFIG["vocab_size"])
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (sp.bos_id(), sp.eos_id(), sp.unk_id())
    assert tok.pad_token_id not in (tok.bos_token_id, tok.eos_token_id)
    assert tok("a").input_ids[0] == sp.bos_id()
    assert len(tok.finetune_fixes) == 4 and str(d / "tokenizer_config.json") in tok.finetune_fixes[0]
    assert tok.finetune_fixes[3] == "the tokenizer has no pad token; pad is '<unk>' (id 0), the unknown token"

    _assert_chats_start_with_bos_and_report_the_fixes(d, tok, sp, tmp_path)

    docs = tmp_path / "notes.txt"
    docs.write_text(_sample_texts()[0])
    cfg = compose(["+recipe=tiny-demo", f"model.name_or_path={d}", "stages=[data]", "dataset.format=text",
                   f"dataset.path={docs}", "dataset.eval_fraction=0"])
    text = run_pipeline(cfg, tmp_path / "run-text")["data"]
    ids = [t for e in text.train for t in e.input_ids]
    assert ids[0] == sp.bos_id() and ids[-1] == sp.eos_id()


def test_a_pad_token_that_is_bos_is_replaced_and_reported(llama_dir, tmp_path):
    """pad = BOS would mask BOS out of the loss: the unknown token pads instead, and the fix is listed."""
    d = _all_eos_dir(llama_dir, tmp_path / "pad-bos")
    (d / "tokenizer_config.json").write_text(json.dumps({**ALL_EOS, "bos_token": "<s>", "pad_token": "<s>"}))
    tok = loader.load_tokenizer(ModelConfig(name_or_path=str(d), chat_template="llama-2"),
                                model_vocab_size=TINY_CONFIG["vocab_size"])
    assert tok.pad_token == "<unk>"
    assert "the tokenizer's pad token '<s>' is one the model learns (BOS, EOS or the end of a turn); pad is '<unk>' (id 0), the unknown token" \
        in tok.finetune_fixes


def test_a_sound_tokenizer_is_left_alone():
    tok = loader.load_tokenizer(ModelConfig(name_or_path="tiny:llama"), model_vocab_size=2048)
    assert tok.finetune_fixes == []


def _files(d: Path) -> dict[str, tuple[bytes, int]]:
    return {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in sorted(d.iterdir())}


def test_empty_special_tokens_are_fixed_from_config_json_and_reported(llama_dir, sp, tmp_path):
    """The original LLaMA conversions' "" for BOS, EOS and UNK ({"content": ""} in special_tokens_map.json):
    BOS and EOS are config.json's ids, UNK the unknown piece of tokenizer.model, and an empty pad is none
    (config.json's pad_token_id 3 is a byte piece); each fix is a line of the data report, and the files
    stay as they are."""

    d = _copy(llama_dir, tmp_path / "empty")
    (d / "tokenizer_config.json").write_text(json.dumps(EMPTY_SPECIAL))
    (d / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": {"content": "", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False},
        "eos_token": "", "unk_token": {"content": ""}, "pad_token": ""}))
    before = _files(d)
    tok = loader.load_tokenizer(ModelConfig(name_or_path=str(d), chat_template="llama-2"),
                                model_vocab_size=TINY_CONFIG["vocab_size"])
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (sp.bos_id(), sp.eos_id(), sp.unk_id()) \
        == (TINY_CONFIG["bos_token_id"], TINY_CONFIG["eos_token_id"], 0)
    assert tok.pad_token == "<unk>"  # chosen as for a tokenizer without a pad, never EOS
    assert tok("a").input_ids[0] == sp.bos_id()
    text = _sample_texts()[3]
    assert tok(text, add_special_tokens=False).input_ids == sp.encode(text)
    config, smap = d / "tokenizer_config.json", d / "special_tokens_map.json"
    none = ('none (config.json pad_token_id 3 is "<0x00>", not a special token; the pad is chosen as for a '
            'tokenizer without one)')
    assert tok.finetune_fixes[:7] == [
        f'{config}: bos_token "" -> "<s>" (config.json bos_token_id 1)',
        f'{config}: eos_token "" -> "</s>" (config.json eos_token_id 2)',
        f'{config}: unk_token "" -> "<unk>" (the unknown piece of tokenizer.model, id 0)',
        f'{smap}: bos_token "" -> "<s>" (config.json bos_token_id 1)',
        f'{smap}: eos_token "" -> "</s>" (config.json eos_token_id 2)',
        f'{smap}: unk_token "" -> "<unk>" (the unknown piece of tokenizer.model, id 0)',
        f'{smap}: pad_token "" -> {none}',
    ]
    assert _files(d) == before

    _assert_chats_start_with_bos_and_report_the_fixes(d, tok, sp, tmp_path)
    assert _files(d) == before


@pytest.mark.parametrize("pad_token_id, pad", [(0, "<unk>"), (3, None), (None, None)])
def test_an_empty_pad_token_is_config_json_pad_or_none(pad_token_id, pad, llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path / "empty-pad")
    (d / "config.json").write_text(json.dumps({**TINY_CONFIG, "pad_token_id": pad_token_id}))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                                          "pad_token": ""}))
    overrides, lines = loader.empty_special_tokens(d)
    assert overrides == {"pad_token": pad} and len(lines) == 1
    assert lines[0].startswith(f'{d / "tokenizer_config.json"}: pad_token "" -> ')
    assert lines[0].endswith('"<unk>" (config.json pad_token_id 0)' if pad else
                             "the pad is chosen as for a tokenizer without one)")
    tok = loader.load_tokenizer(ModelConfig(name_or_path=str(d)), model_vocab_size=TINY_CONFIG["vocab_size"])
    assert tok.pad_token == "<unk>" and tok.finetune_fixes[0] == lines[0]


def test_empty_special_tokens_are_told_by_a_tokenizer_json_vocabulary(llama_dir, tmp_path):
    """With a tokenizer.json (what hub repos hold), its vocabulary tells the tokens; an id that names an ordinary
    piece is no special token to take."""
    from transformers import AutoTokenizer

    d = _copy(llama_dir, tmp_path / "fast")
    AutoTokenizer.from_pretrained(d).save_pretrained(d)
    (d / "tokenizer.model").unlink()
    (d / "tokenizer_config.json").write_text(json.dumps(EMPTY_SPECIAL))
    overrides, lines = loader.empty_special_tokens(d)
    assert overrides == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    assert lines[2] == f'{d / "tokenizer_config.json"}: unk_token "" -> "<unk>" (the unknown piece of tokenizer.json, id 0)'
    (d / "config.json").write_text(json.dumps({**TINY_CONFIG, "eos_token_id": 100}))
    with pytest.raises(ConfigError) as info:
        loader.empty_special_tokens(d)
    assert str(info.value) == (
        f"model.name_or_path: {d / 'tokenizer_config.json'} sets eos_token to an empty string (old LLaMATokenizer "
        f"conversions did), and {d / 'config.json'}'s eos_token_id 100 is \"<0x61>\", not a special token of the "
        "vocabulary; set it to the token itself (Llama's: eos_token \"</s>\") or remove the key")


@pytest.mark.parametrize("config_update, special, needle", [
    ({"bos_token_id": 5000}, {}, "bos_token"),  # BOS = EOS, and config.json's BOS id is not in the vocabulary
    # empty tokens, and config.json does not tell them (absent, not one id, outside the vocabulary, not special)
    ({"eos_token_id": None}, {"eos_token": ""}, "sets eos_token to an empty string (old LLaMATokenizer "
                                                "conversions did), and {d}/config.json has no eos_token_id"),
    ({"eos_token_id": [2, 3]}, {"eos_token": ""}, "gives eos_token_id [2, 3], not one id"),
    ({"eos_token_id": 5000}, {"eos_token": ""}, "config.json's eos_token_id 5000 is not in the tokenizer's vocabulary"),
    # the first conversions' config.json: bos_token_id 0 (<unk>), eos_token_id 1 (<s>)
    ({"bos_token_id": 0, "eos_token_id": 1}, {"bos_token": "", "eos_token": ""},
     "config.json's bos_token_id 0 (\"<unk>\") is not the BOS of {d}/tokenizer.model (id 1); set it to the token "
     "itself (tokenizer.model's BOS is \"<s>\")"),
])
def test_special_tokens_that_cannot_be_fixed_are_one_line(config_update, special, needle, llama_dir, tmp_path,
                                                          capsys):
    d = _all_eos_dir(llama_dir, tmp_path / "bad")
    (d / "config.json").write_text(json.dumps({**TINY_CONFIG, **config_update}))
    (d / "tokenizer_config.json").write_text(json.dumps({**ALL_EOS, **special}))
    before = _files(d)
    code, line = _run_stages(d, "[data]", tmp_path / "run", capsys)
    assert code == 2 and needle.format(d=d) in line and "tokenizer_config.json" in line
    assert _files(d) == before
