"""Checkpoints that count, and finding the one to continue from.

The Trainer writes ``checkpoint-N/`` in place, file by file: a crash (or kill -9) while
saving leaves a directory that looks like a checkpoint but is not one. A checkpoint
counts only once :class:`~finetune.train.callbacks.CheckpointMarkerCallback` has written
``checkpoint-N/COMPLETE`` after the Trainer finished saving it, and resume only ever
considers those.

``train.resume``:

* ``auto`` (default): continue the newest complete checkpoint of an *unfinished* run of
  the same recipe (a run directory under ``outputs/<recipe>/`` without a final
  ``train_result.json``). If the resolved recipe or the data fingerprint differ from that
  run's, refuse and list what changed: continuing would silently mix two experiments.
* ``never``: always start fresh.
* a path (a ``checkpoint-N`` directory, or a run directory): continue there even if the
  recipe changed (the changes are listed and recorded).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from finetune.errors import ConfigError

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
CHECKPOINTS = "checkpoints"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")

# Keys that do not change what training computes: a resumed run may differ in these.
_IGNORED = ("train.resume", "stages")
_IGNORED_PREFIXES = ("eval.",)


@dataclass
class ResumePoint:
    run_dir: Path  # the interrupted run's directory: training continues there
    checkpoint: Path
    step: int
    run_id: str | None  # its MLflow run, from run.json
    changes: list[str] = field(default_factory=list)  # recipe changes, when forced by an explicit path

    def describe(self) -> str:
        return f"{self.checkpoint} (step {self.step})"


def mark_complete(checkpoint: Path) -> None:
    """Record that `checkpoint` was written completely (fsync'd, so it survives a power cut)."""
    marker = checkpoint / COMPLETE
    with open(marker, "w") as f:
        f.write("ok\n")
        f.flush()
        os.fsync(f.fileno())


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints of a run, oldest first."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    out = []
    for child in root.iterdir():
        m = _CHECKPOINT_RE.match(child.name)
        if m and (child / COMPLETE).is_file() and (child / "trainer_state.json").is_file():
            out.append((int(m.group(1)), child))
    return sorted(out)


def is_finished(run_dir: Path) -> bool:
    return (run_dir / "train_result.json").is_file()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def recipe_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'key: old -> new' for every training-relevant key that differs."""
    a, b = _flatten(old), _flatten(new)
    changes = []
    for key in sorted(set(a) | set(b)):
        if key in _IGNORED or key.startswith(_IGNORED_PREFIXES):
            continue
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            changes.append(f"{key}: {a.get(key, '<unset>')} -> {b.get(key, '<unset>')}")
    return changes


def _run_id(run_dir: Path) -> str | None:
    path = run_dir / "run.json"
    return json.loads(path.read_text()).get("run_id") if path.is_file() else None


def _fingerprint(run_dir: Path) -> str | None:
    path = run_dir / "data_report.json"
    return json.loads(path.read_text()).get("fingerprint") if path.is_file() else None


def _differences(run_dir: Path, recipe: dict[str, Any], fingerprint: str) -> list[str]:
    config = run_dir / "config.yaml"
    old = yaml.safe_load(config.read_text()) if config.is_file() else {}
    changes = recipe_changes(old, recipe)
    old_fp = _fingerprint(run_dir)
    if old_fp is not None and old_fp != fingerprint:
        changes.append(f"data fingerprint: {old_fp} -> {fingerprint} (the dataset, tokenizer, template or "
                       "data settings changed)")
    return changes


def _checkpoint_at(path: Path) -> tuple[Path, Path, int]:
    """(run_dir, checkpoint, step) for an explicit train.resume path."""
    path = path.expanduser().resolve()
    m = _CHECKPOINT_RE.match(path.name)
    if m:
        if not (path / COMPLETE).is_file():
            raise ConfigError(f"train.resume: {path} is not a complete checkpoint (no {COMPLETE} marker: the "
                              "save was interrupted); pick an earlier one")
        return path.parent.parent, path, int(m.group(1))
    found = complete_checkpoints(path)
    if not found:
        raise ConfigError(f"train.resume: no complete checkpoint in {path / CHECKPOINTS}")
    step, checkpoint = found[-1]
    return path, checkpoint, step


def resolve(resume: str, recipe_dir: Path, current_run_dir: Path, recipe: dict[str, Any],
            fingerprint: str) -> ResumePoint | None:
    """The checkpoint to continue from under `train.resume`, or None to start fresh."""
    if resume == "never":
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.exists():
            raise ConfigError(f"train.resume: {resume} does not exist (use auto, never, or a checkpoint path)")
        run_dir, checkpoint, step = _checkpoint_at(path)
        changes = _differences(run_dir, recipe, fingerprint)
        if changes:
            log.warning("train.resume=%s: continuing although the recipe changed: %s", resume, "; ".join(changes))
        return ResumePoint(run_dir, checkpoint, step, _run_id(run_dir), changes)

    candidates: list[tuple[float, int, Path, Path]] = []
    if recipe_dir.is_dir():
        for run_dir in recipe_dir.iterdir():
            if not run_dir.is_dir() or run_dir.resolve() == current_run_dir.resolve() or is_finished(run_dir):
                continue
            found = complete_checkpoints(run_dir)
            if found:
                step, checkpoint = found[-1]
                candidates.append(((checkpoint / COMPLETE).stat().st_mtime, step, run_dir, checkpoint))
    if not candidates:
        return None
    _, step, run_dir, checkpoint = max(candidates)
    changes = _differences(run_dir, recipe, fingerprint)
    if changes:
        raise ConfigError(
            f"train.resume=auto: the interrupted run {run_dir} (checkpoint at step {step}) was trained with a "
            f"different recipe - {'; '.join(changes)}. Start fresh with train.resume=never, or continue it "
            f"anyway with train.resume={checkpoint}"
        )
    return ResumePoint(run_dir, checkpoint, step, _run_id(run_dir))
