"""The library versions the memory model and the training rules were verified against, in one place.

The preflight's memory model and several training rules are read off the code of
particular releases of transformers, peft, bitsandbytes and TRL (what each layer keeps
for backward, which modules bitsandbytes quantizes, TRL's chunked LM head, which
architectures pack exactly). ``requirements.lock`` installs exactly these; a newer
minor release may change any of them, so the preflight says when the installed
versions differ from the verified ones (one line, and ``plan.json``'s ``versions``).

Rules that differ by version are decided here, from the installed version or a
capability of the installed library, never from a frozen list elsewhere:

* :func:`trl_fused_lm_head`: TRL's SFTTrainer projects only the labelled positions
  through the LM head in tiles (``add_fused_lm_head``, since TRL 1.16); older TRL
  materializes the logits.
* :func:`quantizes_linear_subclasses`: transformers' bitsandbytes integration replaces
  only modules whose type *is* nn.Linear through the verified release, so Falcon's
  ``FalconLinear`` stays bf16 under ``load_in_4bit``.
* padding-free packing exactness per architecture is measured on the installed
  transformers itself (``finetune.probes.packing``) and cached per version.

``tests/test_versions.py`` and the tests that hold each rule against the real library
(tests/test_preflight_arch.py, tests/test_data_packing.py) name the rule that drifted
when ``make test-latest`` runs them on newer releases.

No torch, transformers or TRL import here: versions come from the installed
distributions' metadata (the preflight must stay arithmetic).
"""

from __future__ import annotations

import functools
import re
import sys
from importlib import metadata
from pathlib import Path

# The releases the memory model and the rules below were verified against (major.minor);
# requirements.lock pins patch releases of exactly these. Raise them together with the lock
# (`make lock`), after `make test-latest` passes on the new releases.
VERIFIED: dict[str, str] = {
    "transformers": "5.24",
    "peft": "0.21",
    "bitsandbytes": "0.50",
    "trl": "1.16",
}

# The first transformers release verified to quantize nn.Linear subclasses (FalconLinear) under
# load_in_4bit/8bit. None: no verified release does (5.24 still replaces only exact nn.Linear).
QUANTIZES_LINEAR_SUBCLASSES_SINCE: str | None = None
# The first TRL release whose SFTTrainer adds the chunked, labelled-positions-only LM head.
TRL_FUSED_LM_HEAD_SINCE = "1.16"


def parse(version: str) -> tuple[int, ...]:
    """'5.24.0' -> (5, 24, 0); '1.16.0.dev0' -> (1, 16, 0); '2.13.0+cpu' -> (2, 13, 0)."""
    parts = []
    for piece in version.split("+")[0].split("."):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
    return tuple(parts)


@functools.cache
def installed(name: str) -> str | None:
    """The installed version of distribution `name`, or None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def release(name: str) -> str:
    """The installed version of `name`, or the verified major.minor when it is not installed."""
    return installed(name) or VERIFIED[name]


def _at_least(name: str, since: str | None) -> bool | None:
    """Whether the installed `name` is `since` or newer (None: `name` is not installed)."""
    version = installed(name)
    if version is None:
        return None
    return since is not None and parse(version) >= parse(since)


def drift() -> dict[str, dict[str, str]]:
    """{library: {"installed": "5.26.0", "verified": "5.24"}} for each library whose installed
    major.minor differs from the verified one (libraries not installed are not listed)."""
    out = {}
    for name, verified in VERIFIED.items():
        version = installed(name)
        if version is not None and parse(version)[:2] != parse(verified)[:2]:
            out[name] = {"installed": version, "verified": verified}
    return out


def drift_line() -> str | None:
    """One line for the user when the installed libraries differ from the verified ones, else None."""
    d = drift()
    if not d:
        return None
    found = ", ".join(f"{name} {v['installed']} (verified {v['verified']})" for name, v in d.items())
    return (f"library versions differ from the ones the memory model and training rules were verified on: "
            f"{found}; predictions may be off - install the lock (make install) or run make test-latest")


def record() -> dict:
    """What plan.json records: the verified versions, the installed ones, and which differ."""
    return {"verified": dict(VERIFIED), "installed": {name: installed(name) for name in VERIFIED},
            "drift": sorted(drift())}


def trl_fused_lm_head() -> bool:
    """TRL trains with its chunked LM head over labelled positions (installed TRL, else the verified one)."""
    at_least = _at_least("trl", TRL_FUSED_LM_HEAD_SINCE)
    return True if at_least is None else at_least


def quantizes_linear_subclasses() -> bool:
    """transformers' load_in_4bit/8bit replaces nn.Linear subclasses too (installed release, else verified)."""
    at_least = _at_least("transformers", QUANTIZES_LINEAR_SUBCLASSES_SINCE)
    return QUANTIZES_LINEAR_SUBCLASSES_SINCE is not None if at_least is None else at_least


# Not pinned by the lock: torch has its own per-platform pin (CPU wheel here, CUDA build on a GPU machine),
# and these come with the CUDA build at the exact versions torch itself requires.
_PLATFORM = ("torch", "triton", "nvidia-", "cuda-")
_SELF = "finetune-recipes"
_OURS = {"nvidia-ml-py"}  # our own dependency (GPU system metrics), despite its prefix


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _environment() -> dict[str, str]:
    """{normalized name: version} of every distribution installed in this environment, but ours and the
    platform's (torch and what its CUDA build brings)."""
    out = {}
    # only what is installed in site-packages: importing setuptools puts its _vendor directory (with the
    # .dist-info of its vendored copies of jaraco.*, more-itertools, importlib-metadata, ...) on sys.path
    paths = [p for p in sys.path if "_vendor" not in Path(p).parts]
    for dist in metadata.distributions(path=paths):
        name = _norm(dist.metadata["Name"] or "")
        if name and name != _SELF and (name in _OURS or not name.startswith(_PLATFORM)):
            out[name] = dist.version
    return out


def read_lock(path: str) -> dict[str, str]:
    """{normalized name: version} from a lock file of ``name==version`` lines."""
    pins = {}
    for line in open(path, encoding="utf-8"):
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[_norm(name)] = version.strip()
    return pins


def write_lock(path: str, torch_pin: str) -> None:
    import platform
    import sys

    env = _environment()
    lines = [
        "# Exact versions of every Python dependency of finetune-recipes (dev tools included), installed by",
        "# `make install` as pip constraints, the same in CI. Regenerate with `make lock` (which resolves the",
        "# newest versions pyproject.toml's bounds allow), then run `make test` before committing it.",
        f"# torch is not pinned here but by the Makefile ({torch_pin}): pip takes the build for the machine",
        "# (CPU here, CUDA on a GPU machine, whose nvidia-* packages torch itself pins).",
        f"# Resolved on Python {platform.python_version()}, {sys.platform} {platform.machine()}.",
    ]
    lines += [f"{name}=={version}" for name, version in sorted(env.items())]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def check_lock(path: str) -> list[str]:
    """What in this environment differs from the lock: a package at another version, or one the lock lacks."""
    pins = read_lock(path)
    problems = []
    for name, version in sorted(_environment().items()):
        if name not in pins:
            problems.append(f"{name} {version} is installed but not in {path} (a new dependency? run make lock)")
        elif pins[name] != version:
            problems.append(f"{name} {version} is installed, {path} pins {pins[name]}")
    return problems


def main(argv: list[str] | None = None) -> int:
    """`python -m finetune.versions`: the verified and installed versions of the libraries the memory model
    and the training rules depend on; with --check-lock / --against-lock / --write-lock, the lock."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m finetune.versions", description=main.__doc__)
    ap.add_argument("--check-lock", metavar="LOCK", help="exit 1 unless this environment is exactly LOCK")
    ap.add_argument("--against-lock", metavar="LOCK", help="list what differs from LOCK (exit 0)")
    ap.add_argument("--write-lock", metavar="LOCK", help="write this environment as LOCK")
    ap.add_argument("--torch", default="torch", help="the torch pin, for the lock's header")
    args = ap.parse_args(argv)
    if args.write_lock:
        write_lock(args.write_lock, args.torch)
        return 0
    if args.check_lock:
        problems = check_lock(args.check_lock)
        for line in problems:
            print(f"error: {line}")
        return 1 if problems else 0
    if args.against_lock:
        moved = check_lock(args.against_lock)
        print(f"{len(moved)} package(s) differ from {args.against_lock}" + (":" if moved else ""))
        for line in moved:
            print(f"  {line}")
    d = drift()
    for name, verified in VERIFIED.items():
        version = installed(name) or "not installed"
        mark = "  <- differs: the tests that hold its rules say which rule drifted" if name in d else ""
        print(f"{name:14} installed {version:14} verified {verified}{mark}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
