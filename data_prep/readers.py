"""Read dataset rows and documents from files, directories, globs or the Hub, each with its location.

Our own readers rather than ``datasets.load_dataset("json")``: that one fails a whole
file on one bad line, while we reject the line, name it (``file.jsonl:12``) and go on.
Every reader streams (a line, a CSV row, a Parquet batch, a text window at a time),
so a corpus larger than memory can be prepared.

Locations: ``file.jsonl:12`` (line), ``file.csv:7`` (the line a row ends on),
``file.json[3]`` / ``file.parquet[3]`` / ``owner/name[17]`` (row index), ``notes/a.txt``
(a whole text file).
"""

from __future__ import annotations

import codecs
import csv
import glob
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_prep import samples
from finetune.errors import DataError, EnvError

ROW_FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")
TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".text")
# Text files up to this size are read whole; larger ones are validated and tokenized in windows.
WHOLE_TEXT_BYTES = 8 << 20
TEXT_WINDOW_BYTES = 1 << 20
BOM = b"\xef\xbb\xbf"  # UTF-8's byte-order mark, which Windows editors write first: not part of the data
NUL = b"\x00"  # text files never hold it; binary files (images, PDFs, archives) nearly always do

OnBytes = Callable[[int], None] | None


@dataclass
class RawRow:
    location: str  # file.jsonl:12, file.json[3], file.csv:7, owner/name[17], notes/a.txt
    data: Any  # the parsed row, a document's text, or a TextFile; None when `error` says why it is unreadable
    error: str | None = None  # a rejection reason from reading (invalid_json, undecodable, binary_file, ...)
    detail: str = ""


@dataclass
class TextFile:
    """A text document too large to hold in memory at once: read again, in windows, when needed."""

    path: Path
    size: int

    def pieces(self, window: int | None = None) -> Iterator[str]:
        window = window or TEXT_WINDOW_BYTES
        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        with self.path.open("rb") as f:
            if f.read(len(BOM)) != BOM:
                f.seek(0)
            for chunk in iter(lambda: f.read(window), b""):
                text = decoder.decode(chunk)
                if text:
                    yield text
            tail = decoder.decode(b"", final=True)
            if tail:
                yield tail

    def scan(self, feed: Callable[[str], None]) -> tuple[str, str] | None:
        """One streaming pass: feeds the decoded text to `feed`; returns (reason, detail) when the
        file is not UTF-8 text (and stops there), else None."""
        offset = 0
        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        with self.path.open("rb") as f:
            if f.read(len(BOM)) == BOM:
                offset = len(BOM)
            else:
                f.seek(0)
            for chunk in iter(lambda: f.read(TEXT_WINDOW_BYTES), b""):
                if NUL in chunk:
                    return "binary_file", f"holds NUL bytes (at byte {offset + chunk.index(NUL)}): not a text file"
                try:
                    text = decoder.decode(chunk)
                except UnicodeDecodeError as e:
                    return "undecodable", f"not UTF-8 at byte {offset + e.start}"
                feed(text)
                offset += len(chunk)
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                return "undecodable", f"not UTF-8 at byte {offset} (a truncated character at the end)"
        return None


@dataclass
class Listing:
    """What a dataset path names: local files (and what was skipped), or a hub id."""

    path: str
    files: list[Path] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path": ..., "why": ...}
    hub_id: str | None = None

    @property
    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def looks_like_hub_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith((".", "~", "/")) and "*" not in path


def _accepts(f: Path, fmt: str) -> bool:
    suffix = f.suffix.lower()
    if suffix in ROW_FILE_SUFFIXES:
        return True
    return fmt in ("text", "auto") and suffix in TEXT_SUFFIXES


def _select(candidates: list[Path], fmt: str, origin: str) -> tuple[list[Path], list[dict[str, str]]]:
    files, skipped = [], []
    for f in sorted(candidates):
        if not f.is_file():
            continue
        if f.name.startswith(".") or f.name.endswith(".meta.json"):
            skipped.append({"path": str(f), "why": "hidden or metadata file"})
        elif _accepts(f, fmt):
            files.append(f)
        else:
            kinds = ROW_FILE_SUFFIXES + (TEXT_SUFFIXES if fmt in ("text", "auto") else ())
            skipped.append({"path": str(f), "why": f"not a dataset file ({', '.join(kinds)})"})
    if not files:
        kinds = ROW_FILE_SUFFIXES + (TEXT_SUFFIXES if fmt in ("text", "auto") else ())
        raise DataError(f"dataset.path: {origin} holds no {', '.join(kinds)} files"
                        + (f" ({len(skipped)} other files skipped)" if skipped else ""))
    return files, skipped


def list_source(path: str, fmt: str = "auto") -> Listing:
    """The files behind a dataset path (a file, a directory, a glob, a sample), or a hub id."""
    if samples.is_sample(path):
        target = samples.resolve(path)
        if target.is_dir():
            files, skipped = _select(list(target.rglob("*")), fmt, str(target))
            return Listing(path, files, skipped)
        return Listing(path, [target])
    p = Path(path).expanduser()
    if p.is_file():
        return Listing(path, [p])
    if p.is_dir():
        files, skipped = _select(list(p.rglob("*")), fmt, str(p))
        return Listing(path, files, skipped)
    if any(ch in path for ch in "*?["):
        matches = [Path(f) for f in glob.glob(str(p), recursive=True)]
        if not any(m.is_file() for m in matches):
            raise DataError(f"dataset.path: the pattern {path} matches no files")
        files, skipped = _select(matches, fmt, f"the pattern {path}")
        return Listing(path, files, skipped)
    if looks_like_hub_id(path):
        return Listing(path, hub_id=path)
    raise DataError(f"dataset.path: {path} does not exist (a file, directory, glob, hub id "
                    f"owner/name, or a sample: {', '.join(samples.PREFIX + n for n in sorted(samples.SAMPLES))})")


def is_text_file(f: Path) -> bool:
    return f.suffix.lower() in TEXT_SUFFIXES


# ---- row files ------------------------------------------------------------------------------

def _jsonl(path: Path, on_bytes: OnBytes) -> Iterator[RawRow]:
    loads = json.loads
    pending = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            pending += len(raw)
            if on_bytes is not None and pending > (1 << 20):
                on_bytes(pending)
                pending = 0
            if lineno == 1 and raw.startswith(BOM):  # Windows editors start UTF-8 files with a byte-order mark
                raw = raw[len(BOM):]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield RawRow(f"{path}:{lineno}", None, "undecodable", f"not UTF-8 at byte {e.start} of the line")
                continue
            if not line.strip():
                continue
            try:
                yield RawRow(f"{path}:{lineno}", loads(line))
            except json.JSONDecodeError as e:
                yield RawRow(f"{path}:{lineno}", None, "invalid_json", f"{e.msg} (column {e.colno})")
    if on_bytes is not None and pending:
        on_bytes(pending)


def _json(path: Path, on_bytes: OnBytes) -> Iterator[RawRow]:
    # One JSON array must be parsed whole. Bytes that are not UTF-8 become lone surrogates
    # (surrogateescape), which the row's validation rejects as `undecodable`, naming the row.
    try:
        data = json.loads(path.read_bytes().removeprefix(BOM).decode("utf-8", errors="surrogateescape"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg}); a JSON file must hold one array "
                        "of rows (use JSON Lines, one row per line, to have bad rows skipped and counted)") from e
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: a JSON file must hold an array of rows, found {type(data).__name__}")
    if on_bytes is not None:
        on_bytes(path.stat().st_size)
    for i, row in enumerate(data):
        yield RawRow(f"{path}[{i}]", row)


def _csv(path: Path, on_bytes: OnBytes) -> Iterator[RawRow]:
    with path.open("r", encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            return
        width = len(reader.fieldnames)
        for row in reader:
            # line_num is the line the row ended on (rows may span lines inside quotes).
            loc = f"{path}:{reader.line_num}"
            extra = row.pop(None, None)  # fields beyond the header
            if extra is not None:
                yield RawRow(loc, None, "bad_csv_row", f"{width + len(extra)} fields where the header has {width}")
                continue
            yield RawRow(loc, row)  # a short row has None for its missing fields: rejected as missing_field
    if on_bytes is not None:
        on_bytes(path.stat().st_size)


def _parquet(path: Path, on_bytes: OnBytes) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    index = 0
    pf = pq.ParquetFile(path)
    for batch in pf.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            yield RawRow(f"{path}[{index}]", row)
            index += 1
    if on_bytes is not None:
        on_bytes(path.stat().st_size)


def _text(path: Path, on_bytes: OnBytes) -> Iterator[RawRow]:
    """One document per text file; large files are handed on as a TextFile, read in windows later."""
    size = path.stat().st_size
    loc = str(path)
    if size > WHOLE_TEXT_BYTES:
        yield RawRow(loc, TextFile(path, size))
    else:
        raw = path.read_bytes().removeprefix(BOM)
        if NUL in raw:
            yield RawRow(loc, None, "binary_file", f"holds NUL bytes (at byte {raw.index(NUL)}): not a text file")
        else:
            try:
                yield RawRow(loc, raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield RawRow(loc, None, "undecodable", f"not UTF-8 at byte {e.start}")
    if on_bytes is not None:
        on_bytes(size)


_READERS = {".jsonl": _jsonl, ".ndjson": _jsonl, ".json": _json, ".csv": _csv, ".parquet": _parquet}


_HUB_LOADED: dict[str, Any] = {}  # id -> Dataset, so that the fingerprint and the read load it once


def _load_hub(dataset_id: str):
    import datasets

    if dataset_id not in _HUB_LOADED:
        _HUB_LOADED[dataset_id] = datasets.load_dataset(dataset_id, split="train")
    return _HUB_LOADED[dataset_id]


def _hub(dataset_id: str, on_bytes: OnBytes) -> Iterator[RawRow]:
    try:
        ds = _load_hub(dataset_id)
    except (ConnectionError, OSError) as e:
        raise EnvError(
            f"dataset.path: cannot load '{dataset_id}' from the Hub ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "check the network (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE must be unset) and the id, or point "
            "dataset.path at a local file"
        ) from e
    except Exception as e:  # datasets raises many kinds (DatasetNotFoundError, ValueError, ...)
        raise DataError(f"dataset.path: cannot load '{dataset_id}' from the Hub: {str(e).splitlines()[0]}") from e
    for i, row in enumerate(ds):
        yield RawRow(f"{dataset_id}[{i}]", row)


def hub_fingerprint(dataset_id: str) -> str:
    """datasets' own content fingerprint of a hub dataset (downloads it when not cached)."""
    try:
        return _load_hub(dataset_id)._fingerprint
    except Exception:  # the read itself reports the error with its context
        return f"hub:{dataset_id}"


def read_rows(listing: Listing, on_bytes: OnBytes = None) -> Iterator[RawRow]:
    """Every row (or text document) of a listing, in a stable order, each with its location."""
    if listing.hub_id is not None:
        yield from _hub(listing.hub_id, on_bytes)
        return
    for f in listing.files:
        if is_text_file(f):
            yield from _text(f, on_bytes)
            continue
        reader = _READERS.get(f.suffix.lower())
        if reader is None:
            raise DataError(f"dataset.path: {f}: unsupported file type '{f.suffix}' "
                            f"(supported: {', '.join(ROW_FILE_SUFFIXES + TEXT_SUFFIXES)})")
        yield from reader(f, on_bytes)


def source_files(path: str | None) -> list[Path]:
    """The local files behind a dataset path ([] for a hub id or no path); DataError when it names nothing."""
    if not path:
        return []
    return list_source(path).files
