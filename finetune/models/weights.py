"""A model directory's safetensors weights, checked against their own headers before any work.

A safetensors file starts with an 8-byte little-endian header length and a JSON header that gives
every tensor's byte range in the data that follows: the file's size must be exactly
8 + header + the end of the last range. A download cut short (a full disk, a dropped connection,
an `rsync` still running) fails that test in microseconds, reading a few kilobytes, while loading
would fail only after the data stage ran and minutes of quantizing went into the earlier shards.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from finetune.errors import ConfigError

# A header is a few hundred bytes per tensor; 100 MB is safetensors' own limit.
_MAX_HEADER = 100_000_000


def _header(file: Path) -> tuple[dict | None, int, str]:
    """(the JSON header of safetensors file `file`, its length, '') or (None, 0, why it cannot be read)."""
    try:
        with file.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return None, 0, f"it is {len(head)} bytes long, too short for a safetensors header"
            (length,) = struct.unpack("<Q", head)
            if length > _MAX_HEADER:
                return None, 0, "its first 8 bytes are not a safetensors header length (not a safetensors file?)"
            raw = f.read(length)
    except OSError as e:
        return None, 0, f"it cannot be read ({e.strerror})"
    if len(raw) < length:
        return None, 0, f"its header is cut short ({len(raw)} of {length} bytes)"
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return None, 0, "its header is not valid JSON"
    if not isinstance(header, dict):
        return None, 0, "its header is not a JSON object"
    return header, length, ""


def _tensors(header: dict):
    return ((name, entry) for name, entry in header.items() if name != "__metadata__")


def expected_size(file: Path) -> tuple[int | None, str]:
    """(the size `file`'s header says it has, '') or (None, why its header cannot be read)."""
    header, length, why = _header(file)
    if header is None:
        return None, why
    end = 0
    for name, entry in _tensors(header):
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return None, f"its header gives tensor {name} no data_offsets"
        end = max(end, offsets[1])
    return 8 + length + end, ""


def tensor_totals(files: list[Path]) -> tuple[int, int]:
    """(elements, bytes) of every tensor the safetensors `files` hold, from their headers alone (a few KB read):
    what a model written from them takes on disk, in their own dtypes or another. Packed 4-bit tensors (a
    pre-quantized checkpoint's U8 weights) count two elements a byte. (0, 0) for files without a readable
    header (the weight check names those)."""
    elements = size = 0
    for file in files:
        header, _, _ = _header(file)
        for _, entry in _tensors(header or {}):
            if not isinstance(entry, dict):
                continue
            n = 1
            for dim in entry.get("shape") or []:
                n *= int(dim)
            offsets = entry.get("data_offsets") or [0, 0]
            nbytes = int(offsets[1]) - int(offsets[0])
            elements += 2 * nbytes if entry.get("dtype") == "U8" and n > 1 else n
            size += nbytes
    return elements, size


def check_sizes(files: list[Path], where: Path) -> None:
    """Every weight file complete: its size what its header says. ConfigError naming the first bad one."""
    again = f"download it again (huggingface-cli download ID --local-dir {where})"
    bad = []
    for file in files:
        size, why = expected_size(file)
        actual = file.stat().st_size
        if size is None:
            bad.append(f"{file.name} ({why})")
        elif actual != size:
            state = "truncated" if actual < size else "longer than its header says"
            bad.append(f"{file.name} ({state}: {actual:,} of {size:,} bytes)")
    if bad:
        listed = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise ConfigError(f"model.name_or_path: {where} has {len(bad)} incomplete weight "
                          f"file{'s' if len(bad) > 1 else ''}: {listed}; {again}")


def weight_files(local: Path) -> list[Path]:
    """The safetensors files a model directory loads from: model.safetensors, or the shards its index names
    (those present: a missing shard is check_model_files' error)."""
    single = local / "model.safetensors"
    if single.is_file():
        return [single]
    index = local / "model.safetensors.index.json"
    try:
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
    except (OSError, ValueError, AttributeError):
        return []
    return [local / name for name in sorted({str(v) for v in weight_map.values()}) if (local / name).is_file()]
