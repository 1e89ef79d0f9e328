"""dataset.format: text — domain corpora from directories, globs and row files, cut into max_seq_len blocks."""

from __future__ import annotations

import csv
import json

import pytest

from data_prep import encode, readers
from data_prep.prepare import RejectedRowsError, prepare
from finetune.config import DatasetConfig, DatasetFormat, ModelConfig
from finetune.models.loader import load_tokenizer

PARAGRAPH = ("Asthma is a chronic condition in which the airways narrow and swell. Typical signs are wheezing, "
             "shortness of breath and chest tightness; inhaled corticosteroids control it. ")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(ModelConfig(name_or_path="tiny:llama", chat_template="llama-2"), model_vocab_size=2048)


def _text_cfg(path, **kw) -> DatasetConfig:
    kw.setdefault("format", DatasetFormat.text)
    kw.setdefault("max_seq_len", 64)
    kw.setdefault("eval_fraction", 0.0)
    return DatasetConfig(path=str(path), **kw)


def _doc_ids(tokenizer, text: str) -> list[int]:
    """What the tokenizer gives for a whole document, with its BOS, and the EOS we append."""
    return tokenizer(text).input_ids + [tokenizer.eos_token_id]


def _blocks_by_doc(data) -> dict[str, list[list[int]]]:
    out: dict[str, list[list[int]]] = {}
    for ex in data.train:
        assert ex.labels == ex.input_ids  # a corpus trains on every token
        out.setdefault(ex.location, []).append(ex.input_ids)
    return out


def _corpus(tmp_path):
    root = tmp_path / "corpus"
    (root / "notes").mkdir(parents=True)
    docs = {f"notes/visit-{i}.txt": f"Visit {i}. " + PARAGRAPH * (1 + i % 4) for i in range(12)}
    docs["reference.md"] = "# Asthma\n\n" + PARAGRAPH * 3
    for name, text in docs.items():
        (root / name).write_text(text)
    (root / "notes" / "scan.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))  # binary
    (root / "notes" / "latin1.txt").write_bytes("Fièvre et toux.".encode("latin-1"))  # not UTF-8
    (root / "notes" / "blank.txt").write_text("  \n\n\t ")  # nothing in it
    (root / "zz-copy.txt").write_text("  " + docs["reference.md"].upper() + "\n")  # a duplicate, normalized
    (root / "figure.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")  # not a text file: skipped, listed
    return root, docs


def test_a_corpus_directory_is_read_counted_and_cut_into_blocks(tokenizer, tmp_path):
    root, docs = _corpus(tmp_path)
    data = prepare(_text_cfg(root, max_rejected_fraction=0.3), tokenizer, None)
    r = data.report
    assert r.format == "text" and r.chat_template == "none (text)" and r.masking == "none"
    assert r.rows_read == len(docs) + 4  # every file with a text suffix is a row: kept, rejected or a duplicate
    assert r.rejected == {"binary_file": 1, "undecodable": 1, "empty_text": 1}
    assert r.duplicates == 1 and r.rows_kept == r.documents == len(docs)
    assert r.rows_read == r.rows_kept + r.rows_rejected + r.duplicates
    where = {e["reason"]: e for e in r.rejected_examples}
    assert where["binary_file"]["location"] == str(root / "notes" / "scan.txt")
    assert "NUL" in where["binary_file"]["detail"]
    assert where["undecodable"]["location"] == str(root / "notes" / "latin1.txt")
    assert where["undecodable"]["detail"] == "not UTF-8 at byte 2"  # F, i, then the latin-1 è
    assert r.files_skipped == [{"path": str(root / "figure.png"), "why": r.files_skipped[0]["why"]}]
    assert ".txt" in r.files_skipped[0]["why"]

    blocks = _blocks_by_doc(data)
    assert set(blocks) == {str(root / name) for name in docs}
    for name, text in docs.items():
        got = blocks[str(root / name)]
        assert all(len(b) <= 64 for b in got) and all(len(b) == 64 for b in got[:-1])
        assert [t for b in got for t in b] == _doc_ids(tokenizer, text)  # no boundary drift, BOS and EOS kept
    assert r.tokens.max == 64 and r.tokens.trained == r.tokens.total
    # every token is trained: the store keeps no labels column, TRL's collator takes them from input_ids
    assert "labels" not in data.to_dataset("train").column_names


def test_a_glob_picks_the_files_it_names(tokenizer, tmp_path):
    root, docs = _corpus(tmp_path)
    data = prepare(_text_cfg(f"{root}/notes/visit-*.txt"), tokenizer, None)
    assert data.report.rows_read == data.report.documents == 12


def test_row_files_with_a_text_column(tokenizer, tmp_path):
    texts = [f"Note {i}: " + PARAGRAPH * (1 + i % 3) for i in range(10)]
    jsonl = tmp_path / "notes.jsonl"
    jsonl.write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(texts))
                     + json.dumps({"id": 99}) + "\n" + json.dumps({"body": 7}) + "\n")
    data = prepare(_text_cfg(jsonl, text_column="body", max_rejected_fraction=0.2), tokenizer, None)
    r = data.report
    assert r.documents == 10 and r.rejected == {"missing_field": 1, "not_a_string": 1}
    assert {e["location"] for e in r.rejected_examples} == {f"{jsonl}:11", f"{jsonl}:12"}
    assert "body" in r.rejected_examples[0]["detail"]
    blocks = _blocks_by_doc(data)
    for i, text in enumerate(texts):
        assert [t for b in blocks[f"{jsonl}:{i + 1}"] for t in b] == _doc_ids(tokenizer, text)

    table = tmp_path / "notes.csv"
    with table.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["title", "text"])
        w.writerows([[f"t{i}", t] for i, t in enumerate(texts)])
    data = prepare(_text_cfg(table), tokenizer, None)
    assert data.report.documents == 10 and not data.report.rejected


def test_auto_detects_text(tokenizer, tmp_path):
    root, _ = _corpus(tmp_path)
    data = prepare(_text_cfg(root / "notes", format=DatasetFormat.auto, max_rejected_fraction=0.5), tokenizer, None)
    assert data.report.format == "text" and data.report.format_detected
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("".join(json.dumps({"text": PARAGRAPH + str(i)}) + "\n" for i in range(5)))
    assert prepare(_text_cfg(jsonl, format=DatasetFormat.auto), tokenizer, None).report.format == "text"


def test_control_token_text_in_a_document_is_text(tokenizer, tmp_path):
    path = tmp_path / "page.txt"
    path.write_text("An HTML page says <s>struck</s> and ends.")
    (ex,) = prepare(_text_cfg(path), tokenizer, None).train
    body = ex.input_ids[1:-1]
    assert tokenizer.bos_token_id not in body and tokenizer.eos_token_id not in body
    assert tokenizer.decode(body) == "An HTML page says <s>struck</s> and ends."


@pytest.mark.parametrize("positions", ["byte lengths", "tokenizer offsets"])
def test_long_documents_are_tokenized_in_windows_with_the_same_tokens(tokenizer, tmp_path, monkeypatch, positions):
    """A long document is tokenized in overlapping windows joined where both agree, a buffer at a time (a file
    above WHOLE_TEXT_BYTES is also read in pieces); the tokens equal a single-pass tokenization. Token positions
    come from byte lengths (byte-level BPE) or from the tokenizer's offsets (any other tokenizer)."""
    if positions == "tokenizer offsets":
        monkeypatch.setattr(encode, "byte_lengths", lambda backend: None)
    monkeypatch.setattr(readers, "WHOLE_TEXT_BYTES", 30_000)
    monkeypatch.setattr(readers, "TEXT_WINDOW_BYTES", 3000)
    monkeypatch.setattr(encode, "LONG_DOC_CHARS", 5000)
    monkeypatch.setattr(encode, "SPAN_WINDOW_CHARS", 1500)
    monkeypatch.setattr(encode, "STREAM_CHARS", 7000)
    monkeypatch.setattr(encode, "SEAM_MARGIN_CHARS", 400)
    monkeypatch.setattr(encode, "SEAM_CONTEXT_CHARS", 200)
    # characters the tiny tokenizer splits into several byte tokens (seams may fall inside them)
    words = (PARAGRAPH + "Ça coûte 12,50 € — ✓ naïve café 🩺🧬 日本語.\n\n").split(" ")

    def prose(n: int) -> str:
        return " ".join(words[i % len(words)] for i in range(n))
    docs = {"big.txt": prose(9000), "medium.md": prose(3000), "small.txt": PARAGRAPH}  # ~60 kB, ~20 kB, short
    for name, text in docs.items():
        (tmp_path / name).write_text(text)
    windows, seams = [], []
    pieces, seam = readers.TextFile.pieces, encode.TextEncoder._seam
    monkeypatch.setattr(readers.TextFile, "pieces", lambda self: (windows.append(p) or p for p in pieces(self)))
    monkeypatch.setattr(encode.TextEncoder, "_seam", staticmethod(lambda *a: seams.append(1) or seam(*a)))
    data = prepare(_text_cfg(tmp_path, max_seq_len=128), tokenizer, None)
    assert len(windows) > 15 and len(seams) > 30  # read in many pieces, joined at many seams
    blocks = _blocks_by_doc(data)
    for name, text in docs.items():
        assert [t for b in blocks[str(tmp_path / name)] for t in b] == _doc_ids(tokenizer, text), name
        assert all(len(b) == 128 for b in blocks[str(tmp_path / name)][:-1])

    bad = tmp_path / "bad" / "big-binary.txt"
    bad.parent.mkdir()
    big = docs["big.txt"].encode()
    bad.write_bytes(big[:40_000] + b"\x00\x01" + big[:40_000])  # above WHOLE_TEXT_BYTES: checked in one pass
    with pytest.raises(RejectedRowsError) as info:  # the only file is rejected: nothing to train on
        prepare(_text_cfg(bad.parent, max_rejected_fraction=1.0), tokenizer, None)
    r = info.value.report
    assert r.rejected == {"binary_file": 1} and r.rejected_examples[0]["detail"].startswith("holds NUL bytes (at byte 40000)")


def test_the_sample_corpus(tokenizer):
    data = prepare(DatasetConfig(path="sample:medical-notes", format=DatasetFormat.auto, max_seq_len=128,
                                 eval_fraction=0.1), tokenizer, None)
    r = data.report
    assert r.format == "text" and r.documents >= 60 and not r.rejected
    assert r.train_rows > r.documents * 0.9  # long documents become several blocks
    assert all(len(ex.input_ids) <= 128 for ex in data.train)
    eval_docs = {ex.location for ex in data.eval}
    assert eval_docs and not eval_docs & {ex.location for ex in data.train}  # a document is on one side only


def test_a_progress_bar_on_a_terminal(tokenizer, tmp_path, monkeypatch):
    import io

    from rich.console import Console

    from data_prep import prepare as stage

    out = io.StringIO()
    monkeypatch.setattr(stage, "PROGRESS_MIN_BYTES", 0)
    monkeypatch.setattr(stage, "_progress_console", lambda: Console(file=out, force_terminal=True, width=100))
    root, docs = _corpus(tmp_path)
    prepare(_text_cfg(root, max_rejected_fraction=0.5), tokenizer, None)
    assert "data" in out.getvalue() and "rows" in out.getvalue()
