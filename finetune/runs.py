"""Checkpoints that count, and finding the one to continue from.

The Trainer writes ``checkpoint-N/`` in place, file by file: a crash (or kill -9) while
saving leaves a directory that looks like a checkpoint but is not one. A checkpoint
counts only once :class:`~finetune.train.callbacks.CheckpointMarkerCallback` has written
``checkpoint-N/COMPLETE`` after the Trainer finished saving it, and resume only ever
considers those.

``train.resume``:

* ``auto`` (default): continue the newest complete checkpoint of an *unfinished* run of
  the same recipe (a run directory under ``outputs/<recipe>/`` without a final
  ``train_result.json``) trained with the same resolved recipe and data fingerprint. An
  interrupted run whose recipe or data differ is another experiment: continuing it would
  silently mix two, so it is left alone (one warning lists what changed and how to continue
  it by name) and a new run starts: it blocks no later run.
* ``never``: always start fresh.
* a path (a ``checkpoint-N`` directory, or a run directory): continue there even if the
  recipe changed (the changes are listed and recorded).

One process per run directory: a run holds an exclusive ``flock`` on ``<run_dir>/run.lock``
while it works there (:func:`claim`; under torchrun only rank 0 takes it). The kernel drops
the lock when the process ends, however it ends (``kill -9`` included), so a free lock means
nobody is working there: ``auto`` never resumes a run whose lock is held (a second terminal
running the same command starts a run of its own), an explicit path to one is refused, and
a run directory whose lock is free but whose MLflow run is still RUNNING is a dead run
(:func:`dead_runs`; the pipeline marks it KILLED).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from finetune.errors import ConfigError

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
CHECKPOINTS = "checkpoints"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
LOCK = "run.lock"
# Someone probing a lock (holder()) holds it for microseconds: a lock counts as taken by a live run only
# after it stayed taken this many tries apart.
_LOCK_TRIES = 10
_LOCK_WAIT_S = 0.02

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
    lock: RunLock | None = None  # run_dir's lock, taken for this process (rank 0); released with the run

    def describe(self) -> str:
        return f"{self.checkpoint} (step {self.step})"


class RunLock:
    """This process's exclusive lock on a run directory (``run.lock``), held until :meth:`release`
    (or the end of the process, however it ends). The file records who holds it."""

    def __init__(self, run_dir: Path, file, record: dict[str, Any]):
        self.run_dir = run_dir
        self.record = record
        self._file = file

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _flock(file) -> bool:
    for attempt in range(_LOCK_TRIES):
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt + 1 < _LOCK_TRIES:
                time.sleep(_LOCK_WAIT_S)
    return False


def claim(run_dir: Path, owner: Path | None = None) -> RunLock | None:
    """Take `run_dir`'s lock for this process; None if a live process holds it.

    `owner` is the directory of the invocation taking it (default `run_dir`): the ranks of one
    torchrun launch share it, so the other ranks know the lock is their leader's."""
    run_dir.mkdir(parents=True, exist_ok=True)
    file = open(run_dir / LOCK, "a+")  # held open for the run's lifetime: RunLock closes it
    if not _flock(file):
        file.close()
        return None
    record = {"pid": os.getpid(), "host": socket.gethostname(), "run_dir": str((owner or run_dir).resolve()),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    file.seek(0)
    file.truncate()
    file.write(json.dumps(record) + "\n")
    file.flush()
    return RunLock(run_dir, file, record)


def lock_record(run_dir: Path) -> dict[str, Any]:
    """What the last holder of `run_dir`'s lock wrote about itself ({} if nothing readable)."""
    try:
        record = json.loads((run_dir / LOCK).read_text() or "{}")
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def holder(run_dir: Path) -> dict[str, Any] | None:
    """The record of the live process holding `run_dir`'s lock, or None when nobody holds it
    (a run directory that never had a lock, too: written before locks existed)."""
    try:
        file = open(run_dir / LOCK)  # a probe never creates the file
    except FileNotFoundError:
        return None
    with file:
        if _flock(file):
            return None
    return lock_record(run_dir)


def describe_holder(record: dict[str, Any]) -> str:
    parts = [f"pid {record['pid']}" if "pid" in record else "another process"]
    if record.get("host") and record["host"] != socket.gethostname():
        parts.append(f"on {record['host']}")
    if record.get("since"):
        parts.append(f"since {record['since']}")
    return " ".join(parts)


def _busy(run_dir: Path, current_run_dir: Path, take_lock: bool) -> tuple[RunLock | None, dict[str, Any] | None]:
    """(our lock on run_dir, None), or (None, the live holder's record) when another run works there.

    Rank 0 (`take_lock`) takes the lock; the other ranks only look, and count a lock taken by their
    own leader (it names their invocation's directory) as free, so every rank decides the same."""
    if take_lock:
        lock = claim(run_dir, owner=current_run_dir)
        return (lock, None) if lock is not None else (None, lock_record(run_dir))
    record = holder(run_dir)
    if record is not None and record.get("run_dir") == str(current_run_dir.resolve()):
        record = None
    return None, record


def dead_runs(recipe_dir: Path, exclude: list[Path]) -> list[tuple[Path, dict[str, Any]]]:
    """(run directory, its run.json) for every run directory under `recipe_dir` that names an
    MLflow run but has no live process (a free lock): killed with -9, crashed, or ended normally.
    The caller checks MLflow for the ones still marked RUNNING."""
    skip = {p.resolve() for p in exclude}
    out = []
    if not recipe_dir.is_dir():
        return out
    for run_dir in sorted(recipe_dir.iterdir()):
        record_path = run_dir / "run.json"
        if run_dir.resolve() in skip or not record_path.is_file() or holder(run_dir) is not None:
            continue
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("run_id"):
            out.append((run_dir, record))
    return out


def last_change(run_dir: Path) -> float:
    """When a run directory last changed (its files and checkpoints), in seconds since the epoch:
    about when its process died."""
    latest = run_dir.stat().st_mtime
    for folder in (run_dir, run_dir / CHECKPOINTS):
        if folder.is_dir():
            for entry in os.scandir(folder):
                try:
                    latest = max(latest, entry.stat(follow_symlinks=False).st_mtime)
                except OSError:
                    pass
    return latest


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
            fingerprint: str, take_lock: bool = True) -> ResumePoint | None:
    """The checkpoint to continue from under `train.resume`, or None to start fresh.

    A run directory another live process works in is never chosen. With `take_lock` (rank 0), the
    chosen one's lock is taken for this process (ResumePoint.lock; the caller releases it)."""
    if resume == "never":
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.exists():
            raise ConfigError(f"train.resume: {resume} does not exist (use auto, never, or a checkpoint path)")
        run_dir, checkpoint, step = _checkpoint_at(path)
        lock = None
        if run_dir.resolve() != current_run_dir.resolve():  # this invocation's own directory is held already
            lock, busy = _busy(run_dir, current_run_dir, take_lock)
            if busy is not None:
                raise ConfigError(f"train.resume={resume}: {run_dir} is still being trained by another run "
                                  f"({describe_holder(busy)}); wait for it to end, or stop it (Ctrl-C saves a "
                                  "checkpoint), then run this again")
        changes = _differences(run_dir, recipe, fingerprint)
        if changes:
            log.warning("train.resume=%s: continuing although the recipe changed: %s", resume, "; ".join(changes))
        return ResumePoint(run_dir, checkpoint, step, _run_id(run_dir), changes, lock)

    candidates: list[tuple[float, int, Path, Path]] = []
    if recipe_dir.is_dir():
        for run_dir in recipe_dir.iterdir():
            if not run_dir.is_dir() or run_dir.resolve() == current_run_dir.resolve() or is_finished(run_dir):
                continue
            found = complete_checkpoints(run_dir)
            if found:
                step, checkpoint = found[-1]
                candidates.append(((checkpoint / COMPLETE).stat().st_mtime, step, run_dir, checkpoint))
    skipped: list[str] = []
    for _, step, run_dir, checkpoint in sorted(candidates, reverse=True):  # the newest first
        try:
            changes = _differences(run_dir, recipe, fingerprint)
        except (OSError, ValueError, yaml.YAMLError):
            changes = ["its config.yaml or data_report.json cannot be read"]
        if changes:
            # another experiment, interrupted: it stays as it is (resumable by name), and blocks nothing
            log.warning("train.resume=auto: not resuming the interrupted run %s (checkpoint at step %d): it was "
                        "trained with a different recipe - %s; continue it with train.resume=%s",
                        run_dir, step, "; ".join(changes), checkpoint)
            continue
        lock, busy = _busy(run_dir, current_run_dir, take_lock)
        if busy is not None:
            skipped.append(f"{run_dir} ({describe_holder(busy)})")
            continue
        if skipped:
            log.warning("train.resume=auto: not resuming %s: still running; resuming the interrupted %s instead",
                        ", ".join(skipped), run_dir)
        return ResumePoint(run_dir, checkpoint, step, _run_id(run_dir), lock=lock)
    if skipped:
        log.warning("train.resume=auto: not resuming %s: still running (one process per run directory); "
                    "starting a new run in %s", ", ".join(skipped), current_run_dir)
    return None
