"""Read dataset rows from files, directories, globs or the Hub, each with its location.

Our own readers rather than ``datasets.load_dataset("json")``: that one fails a whole
file on one bad line, while we reject the line, name it (``file.jsonl:12``) and go on.
"""

from __future__ import annotations

import csv
import glob
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep import samples
from finetune.errors import DataError, EnvError

ROW_FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")


@dataclass
class RawRow:
    location: str  # file.jsonl:12, file.json[3], file.csv:7, owner/name[17]
    data: Any  # the parsed row; None when `error` says why it could not be read
    error: str | None = None  # a rejection reason from reading (invalid_json, undecodable)
    detail: str = ""


def _jsonl(path: Path) -> Iterator[RawRow]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            loc = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield RawRow(loc, None, "undecodable", f"not UTF-8 at byte {e.start}")
                continue
            if not line.strip():
                continue
            try:
                yield RawRow(loc, json.loads(line))
            except json.JSONDecodeError as e:
                yield RawRow(loc, None, "invalid_json", e.msg)


def _json(path: Path) -> Iterator[RawRow]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); re-encode the file as UTF-8") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg}); a JSON file must hold one array "
                        "of rows (use JSON Lines, one row per line, to have bad rows skipped and counted)") from e
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: a JSON file must hold an array of rows, found {type(data).__name__}")
    for i, row in enumerate(data):
        yield RawRow(f"{path}[{i}]", row)


def _csv(path: Path) -> Iterator[RawRow]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); re-encode the file as UTF-8") from e
    reader = csv.DictReader(io.StringIO(text, newline=""))
    for row in reader:
        # line_num is the line the row ended on (rows may span lines inside quotes).
        yield RawRow(f"{path}:{reader.line_num}", {k: v for k, v in row.items() if k is not None})


def _parquet(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    for i, row in enumerate(table.to_pylist()):
        yield RawRow(f"{path}[{i}]", row)


_READERS = {".jsonl": _jsonl, ".ndjson": _jsonl, ".json": _json, ".csv": _csv, ".parquet": _parquet}


def _hub(dataset_id: str, revision: str | None = None) -> Iterator[RawRow]:
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, split="train", revision=revision)
    except (ConnectionError, OSError) as e:
        raise EnvError(
            f"dataset.path: cannot load '{dataset_id}' from the Hub ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "check the network and the id, or point dataset.path at a local file"
        ) from e
    except Exception as e:  # datasets raises many kinds (DatasetNotFoundError, ValueError, ...)
        raise DataError(f"dataset.path: cannot load '{dataset_id}' from the Hub: {str(e).splitlines()[0]}") from e
    for i, row in enumerate(ds):
        yield RawRow(f"{dataset_id}[{i}]", row)


def source_files(path: str) -> list[Path]:
    """The local files behind a dataset path (a file, a directory, or a glob); [] for a hub id."""
    if samples.is_sample(path):
        return [samples.resolve(path)]
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in ROW_FILE_SUFFIXES)
        if not files:
            raise DataError(f"dataset.path: {p} holds no {', '.join(ROW_FILE_SUFFIXES)} files")
        return files
    if any(ch in path for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
        if not files:
            raise DataError(f"dataset.path: the pattern {path} matches no files")
        return files
    return []


def looks_like_hub_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith((".", "~", "/"))


def read_rows(path: str) -> Iterator[RawRow]:
    """Every row of the dataset at `path`, in a stable order, each with its location."""
    files = source_files(path)
    if not files:
        if looks_like_hub_id(path):
            yield from _hub(path)
            return
        raise DataError(f"dataset.path: {path} does not exist (a file, directory, glob, hub id "
                        "owner/name, or sample:medical-qa)")
    for f in files:
        reader = _READERS.get(f.suffix.lower())
        if reader is None:
            raise DataError(f"dataset.path: {f}: unsupported file type '{f.suffix}' "
                            f"(supported: {', '.join(ROW_FILE_SUFFIXES)})")
        yield from reader(f)
