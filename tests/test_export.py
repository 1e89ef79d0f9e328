"""finetune-export: the trained tiny model as GGUF through llama.cpp's own converter and quantizer, checked in
llama.cpp itself (llama-cpp-python, the gguf extra).

Each file loads in llama.cpp and gives the merged model's tokenization (chat prompts through llama.cpp's chat
path, text with special and added tokens), token types, logits and greedy tokens, and stops at the end-of-turn
token; export.json and the MLflow run record the figures. The Modelfiles' templates render what the chat
template renders. Real tokenizers (Llama 2, Llama 3, Qwen3) go through the same converter and check. Bad input is
one line that leaves nothing half-written.
"""

from __future__ import annotations

import importlib.metadata
import json
import re

import pytest
import torch

from finetune.errors import ConfigError

pytestmark = pytest.mark.slow  # needs the session's trained run (conftest: sft_run)
llama_cpp = pytest.importorskip("llama_cpp", reason="the gguf extra (make test installs it)")

QUANTS = ["q4_k_m", "f16", "q8_0"]  # the first: the Modelfile's


@pytest.fixture(scope="module")
def trained(sft_run):
    """The session's trained tiny-demo run (tests/conftest.py: sft_run)."""
    results = sft_run["results"]
    return {"root": sft_run["root"], "uri": sft_run["uri"], "run_dir": sft_run["run_dir"],
            "run_id": sft_run["run_id"], "model_uri": results["model_uri"], "data": results["data"]}


@pytest.fixture(scope="module")
def exported(trained):
    from finetune.export import export

    return export(str(trained["run_dir"]), quants=QUANTS, progress=False)


def _conversations(trained):
    return [m[:-1] for m in trained["data"].eval_messages[:6]]


def test_every_file_runs_in_llama_cpp_as_the_merged_model(trained, exported):
    from transformers import AutoTokenizer

    from finetune.export.check import load
    from finetune.models.merge import find_run, merged_model

    out = trained["run_dir"] / "export"
    record = json.loads((out / "export.json").read_text())
    assert record["llama_cpp"]["package"] == f"llama-cpp-python {importlib.metadata.version('llama-cpp-python')}"
    assert record["llama_cpp"]["ggml"] and record["llama_cpp"]["gguf_py"]  # the library and converter versions
    assert record["quants"] == QUANTS and set(record["files"]) == set(QUANTS)
    assert record["check"]["prompts_from"] == "heldout.jsonl"
    figures = record["check"]["files"]
    n = figures["f16"]["prompts"]
    assert n == 4
    for quant in QUANTS:
        f = figures[quant]
        assert f["prompt_ids_equal"] == n and f["text_ids_equal"] and f["end_of_turn_is_eog"], f
        assert not f["control_tokens_wrong"] and not f["user_defined_wrong"] and not f["special_ids_differ"], f
    assert figures["f16"]["max_logit_diff"] < 0.05 and figures["f16"]["top1_agreement"] == 1.0
    assert figures["f16"]["greedy_equal"] == n and not figures["f16"]["warnings"]
    assert figures["f16"]["ends_turn"] >= 1 and figures["f16"]["stops_at_end_of_turn"] == figures["f16"]["ends_turn"]
    assert figures["q8_0"]["top1_agreement"] > 0.9 and figures["q4_k_m"]["top1_agreement"] > 0.8
    assert (out / exported["files"]["q4_k_m"]).stat().st_size < (out / exported["files"]["f16"]).stat().st_size

    # and independently of the check: llama.cpp's own reading of the f16 file
    run = find_run(trained["run_dir"])
    merged, _, _ = merged_model(run)
    tokenizer = AutoTokenizer.from_pretrained(run.adapter_dir)
    llm = load(out / exported["files"]["f16"], 256)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    for token in ("<s>", "</s>", "<|im_start|>", "<|im_end|>"):  # control-type: never read as prompt text
        tid = tokenizer.convert_tokens_to_ids(token)
        assert llama_cpp.llama_vocab_get_attr(vocab, tid) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL, token
    conversation = _conversations(trained)[0]
    multi_turn = [*conversation, {"role": "assistant", "content": "Rest and fluids."},
                  {"role": "user", "content": "And </s> if it lasts? <s>"}]
    text = tokenizer.apply_chat_template(multi_turn, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    llm.eval(ids)
    with torch.no_grad():
        ours = merged(torch.tensor([ids])).logits[0].float().numpy()
    import numpy as np

    assert np.abs(ours - np.asarray(llm.scores[: len(ids)])).max() < 0.05
    llm.close()


def test_the_modelfile_renders_what_the_chat_template_renders(trained, exported):
    from transformers import AutoTokenizer

    from finetune.export.modelfile import read_shape

    out = trained["run_dir"] / "export"
    text = (out / "Modelfile").read_text()
    assert f"FROM ./{exported['files']['q4_k_m']}" in text and 'PARAMETER stop "</s>"' in text
    for quant in ("f16", "q8_0"):  # one Modelfile per file
        assert f"FROM ./{exported['files'][quant]}\n" in (out / f"Modelfile.{quant}").read_text()
    assert exported["modelfiles"] == {"q4_k_m": "Modelfile", "f16": "Modelfile.f16", "q8_0": "Modelfile.q8_0"}
    assert "PARAMETER num_ctx 1024" in text  # the model's context (tiny llama: 1024), not the training length
    assert "PARAMETER temperature 0" in text and "PARAMETER num_predict 48" in text  # tiny-demo's eval settings
    assert exported["modelfile_template"] and 'TEMPLATE """{{' in text
    tokenizer = AutoTokenizer.from_pretrained(trained["run_dir"] / "adapter")

    def render(messages, gen):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    shape = read_shape(render, tokenizer.bos_token)
    assert shape.go_template() in text
    for conversation in _conversations(trained) + [[{"role": "system", "content": "Be brief."},
                                                    *_conversations(trained)[0]]]:
        assert tokenizer.bos_token + shape.render(conversation) == render(conversation, True)


def test_the_export_is_logged_to_the_adapters_run_and_works_from_a_registered_model(trained, exported, tmp_path):
    from mlflow.tracking import MlflowClient

    from finetune.export import export

    client = MlflowClient(trained["uri"])
    run = client.get_run(trained["run_id"])
    out = trained["run_dir"] / "export"
    assert run.data.params["export.gguf.q8_0.bytes"] == str((out / exported["files"]["q8_0"]).stat().st_size)
    logged = {f.path for f in client.list_artifacts(trained["run_id"], "export")}
    assert {f"export/{exported['files']['q8_0']}", "export/Modelfile", "export/Modelfile.f16",
            "export/export.json"} <= logged
    assert run.data.params["export.llama_cpp"] == exported["llama_cpp"]["package"]
    assert run.data.metrics["export/f16/top1_agreement"] == 1.0
    assert run.data.metrics["export/q4_k_m/top1_agreement"] == exported["check"]["files"]["q4_k_m"]["top1_agreement"]

    assert trained["model_uri"]
    version = client.search_model_versions("name='tiny-demo'")[0].version
    again = export(f"models:/tiny-demo/{version}", out=tmp_path / "from-registry", quants=["q8_0"],
                   tracking_uri=trained["uri"], progress=False)
    assert again["mlflow_run_id"] == trained["run_id"]
    assert (tmp_path / "from-registry" / again["files"]["q8_0"]).read_bytes() == \
        (out / exported["files"]["q8_0"]).read_bytes()


def test_bad_input_is_one_line_and_leaves_nothing_half_written(trained, tmp_path, monkeypatch, capsys):
    import shutil

    import yaml

    from finetune import export as export_mod
    from finetune.export import llama_cpp as toolchain

    toolchain.tree()  # fetched once per cache, with its own progress line: not part of what is asserted here

    def one_line(argv, code):
        with pytest.raises(SystemExit) as e:
            export_mod.main([str(trained["run_dir"]), "--no-mlflow", *argv])
        assert e.value.code == code
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    assert one_line(["--quant", "q5_k"], 2).startswith(
        "error: --quant q5_k: no such GGUF type in llama.cpp (llama-cpp-python ")
    assert "q4_k_m" in one_line(["--quant", "q5_k"], 2)
    assert one_line(["--quant", "iq2_xs"], 2) == (
        "error: --quant iq2_xs: llama.cpp makes iq2_xs only with an importance matrix; add --imatrix")

    real_version = importlib.metadata.version

    def without_llama_cpp(name):
        if name == "llama-cpp-python":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", without_llama_cpp)
    line = one_line([], 5)  # an environment problem (finetune.errors.EnvError)
    assert "pip install 'finetune-recipes[gguf]'" in line and "make export" in line
    monkeypatch.undo()

    # a family llama.cpp's converter has no class for: refused before the merge, naming it and the version
    gptj = tmp_path / "gptj-run"
    shutil.copytree(trained["run_dir"], gptj, ignore=shutil.ignore_patterns("checkpoints", "export"))
    recipe = yaml.safe_load((gptj / "config.yaml").read_text())
    recipe["model"]["name_or_path"] = "tiny:gptj"
    (gptj / "config.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.setattr("finetune.models.merge.merged_model", lambda *a, **k: pytest.fail("merged before refusing"))
    with pytest.raises(ConfigError, match=r"llama.cpp \(llama-cpp-python .*\) cannot convert 'gptj' models"):
        export_mod.export(str(gptj), out=tmp_path / "gptj", log_to_mlflow=False, progress=False)
    assert not (tmp_path / "gptj").exists()
    monkeypatch.undo()

    # a directory that is not an earlier export is not written into (an earlier export is replaced whole below)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    capsys.readouterr()  # what building the tiny GPT-J above printed
    assert one_line(["--out", str(other)], 2) == (
        f"error: --out {other}: holds other files and no export.json of an earlier export; choose a new or empty "
        "directory")
    assert [p.name for p in other.iterdir()] == ["notes.txt"]

    incomplete = tmp_path / "incomplete"
    shutil.copytree(trained["run_dir"], incomplete, ignore=shutil.ignore_patterns("checkpoints", "export"))
    (incomplete / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(ConfigError, match="incomplete adapter"):
        export_mod.export(str(incomplete), out=tmp_path / "x", log_to_mlflow=False, progress=False)

    # too little disk: needed vs free in one line, from the base's headers before anything is loaded or written
    monkeypatch.setattr("finetune.paths.free_bytes", lambda path: 1 << 20)
    monkeypatch.setattr("finetune.models.merge.merged_model", lambda *a, **k: pytest.fail("merged before refusing"))
    line = one_line(["--out", str(tmp_path / "full")], 5)
    assert re.fullmatch(r"error: .*/full: the export \(the merged model, its 16-bit GGUF and the file asked for\) "
                        r"needs about \d+ MiB and only 1 MiB are free there; free some space or pass --out on a "
                        r"bigger disk", line), line
    assert not (tmp_path / "full").exists()
    monkeypatch.undo()

    # the disk filling while llama.cpp writes a file: one line, exit 5, and nothing of this export left behind
    def fails_halfway(src, dst, *args, **kwargs):
        dst.write_bytes(b"GGUF partial")
        raise OSError(28, "No space left on device", str(dst))

    monkeypatch.setattr(toolchain, "quantize", fails_halfway)
    with pytest.raises(SystemExit) as e:
        export_mod.main([str(trained["run_dir"]), "--no-mlflow", "--out", str(tmp_path / "broken"),
                         "--quant", "f16", "q4_k_m"])
    assert e.value.code == 5
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]  # after the steps done ("merging the adapter into its base: done in 1.2 s")
    assert "Traceback" not in err and sum(x.startswith("error: ") for x in err.splitlines()) == 1, err
    assert line.startswith(f"error: the disk holding {tmp_path / 'broken'}/.") and "is full" in line, line
    assert "No space left on device" in line and "--out DIR" in line
    assert not (tmp_path / "broken").exists()  # no partial file, no f16, no Modelfile, no work directory


def test_exporting_again_into_an_export_replaces_it_whole(trained, tmp_path):
    from finetune.export import export

    out = tmp_path / "again"
    first = export(str(trained["run_dir"]), out=out, quants=["q4_k_m", "f16"], log_to_mlflow=False, progress=False,
                   check=False)
    assert (out / first["files"]["f16"]).exists() and (out / "Modelfile.f16").exists()
    second = export(str(trained["run_dir"]), out=out, quants=["q8_0"], log_to_mlflow=False, progress=False,
                    check=False)
    assert sorted(p.name for p in out.iterdir()) == sorted([second["files"]["q8_0"], "Modelfile", "export.json"])
    assert f"FROM ./{second['files']['q8_0']}" in (out / "Modelfile").read_text()


def test_an_importance_matrix_from_the_held_out_split_makes_the_low_bit_types(trained, exported, tmp_path):
    """--imatrix: llama.cpp's llama-imatrix over the run's held-out conversations, then its quantizer with it:
    iq2_xs (which llama.cpp makes only with one) loads in llama.cpp, and Q4_K_M differs from the plain one."""
    from finetune.export import export

    record = export(str(trained["run_dir"]), out=tmp_path / "imatrix", quants=["q4_k_m", "iq2_xs"], imatrix=True,
                    log_to_mlflow=False, progress=False)
    assert record["imatrix"] is True
    assert not list((tmp_path / "imatrix").glob("imatrix*"))  # a working file, not an output
    with_matrix = (tmp_path / "imatrix" / record["files"]["q4_k_m"]).read_bytes()
    plain = (trained["run_dir"] / "export" / exported["files"]["q4_k_m"]).read_bytes()
    assert with_matrix != plain
    assert b"quantize.imatrix" in with_matrix[:1 << 16] and b"quantize.imatrix" not in plain[:1 << 16]  # llama.cpp's mark
    for quant in ("q4_k_m", "iq2_xs"):
        f = record["check"]["files"][quant]
        assert f["prompt_ids_equal"] == f["prompts"] and f["top1_agreement"] > 0.5, f


@pytest.mark.parametrize("name,variant", [("llama3", "llama3-instruct"), ("qwen3", None), ("llama2", None)])
def test_real_tokenizers_tokenize_in_llama_cpp_as_in_transformers(name, variant, tmp_path):
    """A random tiny Llama with a published tokenizer and chat template (Llama 3 Instruct, Qwen3, Llama 2), through
    llama.cpp's converter: its special tokens are control-type, multi-turn chat prompts (system prompt included)
    tokenize through llama.cpp's chat path as transformers tokenizes them, the end-of-turn token ends generation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.export import llama_cpp as toolchain
    from finetune.export.check import check_file
    from finetune.export.command import _stops
    from tests import real_tokenizers

    try:
        model_dir = real_tokenizers.random_llama(name, tmp_path / name, variant)
    except real_tokenizers.Unavailable as e:
        pytest.skip(str(e))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not tokenizer.chat_template:
        tokenizer.chat_template = (
            "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + "
            "' [/INST]' }}{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")
        tokenizer.save_pretrained(model_dir)
    path = tmp_path / f"{name}.gguf"
    toolchain.convert(model_dir, path, "f16")
    system = [] if name == "llama2" else [{"role": "system", "content": "You are terse."}]
    conversations = [
        [*system, {"role": "user", "content": "Hi there"}],
        [*system, {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
         {"role": "user", "content": f"And {tokenizer.eos_token} or <tool_call> in text?"}],
    ]
    merged = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    result = check_file(path, "f16", merged, tokenizer, conversations, _stops(tokenizer), float_type=True)
    assert not result.control_tokens_wrong and not result.user_defined_wrong and not result.special_ids_differ, result
    if name == "llama2":
        # llama.cpp's SentencePiece tokenizer puts a space before text that follows a special token (legacy
        # SentencePiece, as Meta's reference code tokenizes each turn); transformers reads this tokenizer.json
        # without it. The first turn is the same; the second ("</s><s>[INST]") is not, and the check says so.
        assert result.prompt_ids_equal == 1 and not result.text_ids_equal, result
        assert any("1 of 2 chat prompts" in w for w in result.warnings), result
    else:
        assert result.prompt_ids_equal == len(conversations) and result.text_ids_equal, result
    assert result.end_of_turn_is_eog, result
    assert result.max_logit_diff < 0.05, result
