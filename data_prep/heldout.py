"""The run's first held-out conversations on disk (``<run>/heldout.jsonl``): for the stages that run after the
run's data is gone. finetune-export checks its GGUF files in llama.cpp on them and computes its importance
matrix over them. Written by the data stage (chat formats; a text corpus has none)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

FILE = "heldout.jsonl"


def write(conversations: list[list[dict[str, Any]]], run_dir: Path, limit: int = 32) -> None:
    """The first `limit` conversations, one JSON object per line, written under a temporary name and renamed."""
    conversations = list(conversations)[:limit]
    if conversations:
        tmp = run_dir / f".{FILE}.tmp"
        tmp.write_text("".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in conversations))
        tmp.replace(run_dir / FILE)


def read(run_dir: Path) -> list[list[dict[str, Any]]]:
    """The conversations of `run_dir`'s heldout.jsonl ([] when it has none; unreadable lines left out)."""
    path = run_dir / FILE
    conversations = []
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                row = json.loads(line)
                if isinstance(row, dict) and isinstance(row.get("messages"), list) and row["messages"]:
                    conversations.append(row["messages"])
    return conversations
