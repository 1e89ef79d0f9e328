"""Where the project keeps what it builds once: tiny models, sample data, processed datasets."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """$FINETUNE_CACHE, else $XDG_CACHE_HOME/finetune, else ~/.cache/finetune."""
    explicit = os.environ.get("FINETUNE_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "finetune"


def cached_entry(filename: str, key: str) -> Any | None:
    """The entry `key` of the JSON table `filename` in the cache directory (measurements made once per
    installed release: finetune/probes/packing.py, finetune/probes/trace.py), or None."""
    try:
        return json.loads((cache_dir() / filename).read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def store_entry(filename: str, key: str, value: Any) -> None:
    """Add `key` to the JSON table `filename` in the cache directory, atomically (a concurrent reader sees the
    old or the new file, never half of one). A read-only cache costs a re-measurement next time, nothing else."""
    path = cache_dir() / filename
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            entries = json.loads(path.read_text())
        except (OSError, ValueError):
            entries = {}
        entries[key] = value
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as e:
        log.debug("%s not written (%s)", path, e)


def free_bytes(path: Path | str) -> int:
    """Free bytes on the disk that holds `path`, or would hold it once created (its nearest existing parent)."""
    import shutil

    probe = Path(path).expanduser()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


# errno values that mean "this machine's disk", not a bug: read-only, no permission, full, over quota
_READ_ONLY = {errno.EACCES, errno.EPERM, errno.EROFS}
_FULL = {errno.ENOSPC, errno.EDQUOT}
# How the Rust libraries say ENOSPC / EDQUOT: tokenizers "No space left on device (os error 28)", safetensors
# "IoError(Os { code: 28, kind: StorageFull, ... })"
_FULL_TEXT = re.compile(r"No space left on device|Disk quota exceeded|os error (?:28|122)\b|code: (?:28|122)\b|"
                        r"StorageFull|QuotaExceeded")
# torch.save's writer (PyTorchStreamWriter) says neither errno nor path when a write fails: "basic_ios::clear:
# iostream error", then "[enforce fail at inline_container.cc:NNN] . unexpected pos A vs B" (measured: a full
# tmpfs and a file over ulimit -f give the same two errors)
_TORCH_WRITE_TEXT = re.compile(r"basic_ios::clear: iostream error|inline_container\.cc:\d+\] \. unexpected pos|"
                               r"PytorchStreamWriter failed writing")
# EFBIG: a file over this process's size limit (ulimit -f) or the filesystem's largest file (FAT32: 4 GiB)
_TOO_LARGE_TEXT = re.compile(r"File too large|os error 27\b|code: 27\b|FileTooLarge")


def disk_error(ex: BaseException, needs: str, elsewhere: str, writable_elsewhere: str | None = None,
               where: Path | str | None = None) -> str | None:
    """One line for a write that the disk refused (anywhere in `ex`'s chain: Hydra wraps the error of creating
    its run directory), naming the path, the free space and what to do; None for any other error. `needs`: what
    the command needs the room for; `elsewhere`: how to point it at another disk (`writable_elsewhere`: at a
    writable directory, when that differs); `where`: the path to name when the error names none (the Rust
    libraries' errors name neither errno nor path), by default the working directory."""
    seen: set[int] = set()
    cause: BaseException | None = ex
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        too_large = (cause.errno == errno.EFBIG if isinstance(cause, OSError)
                     else _TOO_LARGE_TEXT.search(str(cause)) is not None)
        if too_large:
            path = Path(getattr(cause, "filename", None) or where or os.getcwd())
            return (f"cannot write {path}: File too large (over this process's file size limit, `ulimit -f`, or "
                    f"the largest file that filesystem holds); raise the limit, or point it at another disk "
                    f"({elsewhere})")
        if isinstance(cause, OSError) and cause.errno in _READ_ONLY | _FULL:
            path = Path(cause.filename or where or os.getcwd())
            if cause.errno in _READ_ONLY:
                return (f"cannot write {path}: {cause.strerror}; run from a directory you can write to, or "
                        f"point it elsewhere ({writable_elsewhere or elsewhere})")
            return _full_disk(path, cause.strerror, needs, elsewhere)
        if not isinstance(cause, OSError) and _FULL_TEXT.search(str(cause)):
            return _full_disk(Path(where or os.getcwd()), _FULL_TEXT.search(str(cause)).group(0), needs, elsewhere)
        if not isinstance(cause, OSError) and _TORCH_WRITE_TEXT.search(str(cause)):
            path = Path(where or os.getcwd())
            return (f"torch.save could not write under {path} ({free_bytes(path) / 1e9:.1f} GB free; torch does "
                    f"not say why, which is a full disk or a file over `ulimit -f`): free some space there "
                    f"({needs}), or point it at a bigger disk ({elsewhere})")
        cause = cause.__cause__ or cause.__context__
    return None


def _full_disk(path: Path, reason: str, needs: str, elsewhere: str) -> str:
    free = free_bytes(path)
    return (f"the disk holding {path} is full ({free / 1e9:.1f} GB free): {reason}; free some space there "
            f"({needs}), or point it at a bigger disk ({elsewhere})")


def recipes_dir() -> Path:
    """The shipped recipe tree: inside the installed package (a wheel maps the top-level
    recipes/ to finetune/recipes), or the repository's recipes/ in an editable install."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "recipes", package.parent / "recipes"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"the recipe tree is missing: neither {package / 'recipes'} nor {package.parent / 'recipes'}")


def umask() -> int:
    """This process's umask (read without changing it where the OS says it: /proc/self/status on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(root: Path | str) -> None:
    """Files under `root` that a library wrote through a private temporary file (mkstemp: mode 0600; safetensors'
    and torch's atomic saves) or directory (mkdtemp: 0700) get the modes the user's umask gives a plain write,
    as the files beside them have: a shared outputs folder stays readable to the team. Nothing else changes."""
    mask = umask()
    root = Path(root)
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for path in paths:
        try:
            if path.is_symlink():
                continue
            mode = path.stat().st_mode & 0o777
            if path.is_dir() and mode == 0o700:
                path.chmod(0o777 & ~mask)
            elif path.is_file() and mode == 0o600:
                path.chmod(0o666 & ~mask)
        except OSError:
            pass
