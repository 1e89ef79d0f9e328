"""llama.cpp's own toolchain, at the version of the installed llama-cpp-python (the `gguf` extra).

* **The converter**: llama.cpp's ``convert_hf_to_gguf.py`` with its ``conversion`` package and its ``gguf-py``,
  taken from the llama-cpp-python sdist of the installed version (fetched once through pip from the package
  index, unpacked into the cache): the converter of exactly the llama.cpp that loads and quantizes the files.
  It runs in its own process (finetune/export/convert_main.py).
* **The quantizer**: ``llama_model_quantize`` of the installed llama-cpp-python (llama.cpp's C library), every
  ``LLAMA_FTYPE_MOSTLY_*`` type it has.
* **The importance matrix**: llama.cpp's ``llama-imatrix`` and ``llama-quantize`` tools, compiled on first use
  from the same sdist against the installed package's own libraries (two source files, seconds; the package has
  no executables).

Nothing else is downloaded: the sdist comes from the same package index pip installed llama-cpp-python from.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
from pathlib import Path

from finetune.errors import ConfigError, EnvError

log = logging.getLogger(__name__)

PACKAGE = "llama-cpp-python"
INSTALL_HINT = "pip install 'finetune-recipes[gguf]' (or make export, which installs it)"
# written by the converter itself; every other type is made from one of them by the quantizer
CONVERTER_TYPES = ("f32", "f16", "bf16")
# llama.cpp refuses these without an importance matrix (src/llama-quant.cpp: tensor_requires_imatrix)
NEED_IMATRIX = ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "q2_k_s")
# the sdist's parts the toolchain uses (under vendor/llama.cpp/)
_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE", "include/", "ggml/include/", "common/",
          "vendor/", "tools/imatrix/", "tools/quantize/")


def version() -> str:
    """The installed llama-cpp-python's version, or EnvError saying what to install."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise EnvError(f"GGUF export runs llama.cpp's own converter and quantizer: {INSTALL_HINT}") from None


def library():
    """The llama_cpp module (llama.cpp's C library loaded), or EnvError."""
    version()
    try:
        import llama_cpp
    except (ImportError, OSError) as e:
        raise EnvError(f"llama-cpp-python is installed but does not load ({e}); reinstall it: {INSTALL_HINT}") from e
    return llama_cpp


def quant_types() -> dict[str, int]:
    """Every GGUF type `--quant` accepts -> its llama_ftype: the converter's float types and each type llama.cpp's
    quantizer makes."""
    llama_cpp = library()
    types = {"f32": llama_cpp.LLAMA_FTYPE_ALL_F32}
    for attr in dir(llama_cpp):
        if attr.startswith("LLAMA_FTYPE_MOSTLY_"):
            types[attr.removeprefix("LLAMA_FTYPE_MOSTLY_").lower()] = getattr(llama_cpp, attr)
    return types


def check_quants(quants: list[str], imatrix: bool) -> list[str]:
    types = quant_types()
    for q in quants:
        if q not in types:
            raise ConfigError(f"--quant {q}: no such GGUF type in llama.cpp {version_text()} (choose from "
                              f"{', '.join(sorted(types))})")
        if q in NEED_IMATRIX and not imatrix:
            raise ConfigError(f"--quant {q}: llama.cpp makes {q} only with an importance matrix; add --imatrix")
    return list(dict.fromkeys(quants))


def versions() -> dict[str, str]:
    """What made the files: the llama-cpp-python release, its ggml library's version (from the library's file
    name: the sdist carries no llama.cpp commit) and the converter's gguf-py."""
    import re

    record = {"package": f"{PACKAGE} {version()}"}
    for d in _lib_dirs():
        for lib in d.glob("libggml.so.*.*.*"):
            record["ggml"] = re.sub(r"^libggml\.so\.", "", lib.name)
    with contextlib.suppress(OSError):
        text = (tree() / "gguf-py" / "pyproject.toml").read_text()
        found = re.search(r'^version = "([^"]+)"', text, re.M)
        if found:
            record["gguf_py"] = found.group(1)
    return record


def version_text() -> str:
    return f"(llama-cpp-python {version()})"


def tree(progress: bool = True) -> Path:
    """llama.cpp's source parts the toolchain uses, from the installed version's sdist, unpacked once."""
    from finetune.paths import cache_dir

    ver = version()
    root = cache_dir() / "llama.cpp" / f"{PACKAGE}-{ver}"
    if (root / "convert_hf_to_gguf.py").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=root.parent) as tmp:
        if progress:
            print(f"fetching llama.cpp's converter: the {PACKAGE} {ver} sdist from the package index (once)",
                  file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               f"{PACKAGE}=={ver}", "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if done.returncode or not sdists:
            last = (done.stderr.strip().splitlines() or ["no sdist"])[-1]
            raise EnvError(f"cannot fetch the {PACKAGE} {ver} sdist (llama.cpp's converter) from the package index: "
                           f"{last}")
        unpacked = Path(tmp) / "tree"
        with tarfile.open(sdists[0]) as tar:
            prefix = f"{sdists[0].name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                       and m.name[len(prefix):].startswith(_PARTS) and (m.isfile() or m.isdir())]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(unpacked, members=members, filter="data")
        if not (unpacked / "convert_hf_to_gguf.py").is_file():
            raise EnvError(f"the {PACKAGE} {ver} sdist has no vendor/llama.cpp/convert_hf_to_gguf.py")
        with contextlib.suppress(FileExistsError, OSError):
            os.rename(unpacked, root)  # another process may have unpacked it meanwhile: theirs is the same
    return root


def architectures() -> set[str]:
    """The checkpoint architectures (config.json's ``architectures``) llama.cpp's converter converts: the keys of
    its TEXT_MODEL_MAP, read from its source without running it."""
    import ast

    source = (tree() / "conversion" / "__init__.py").read_text()
    for node in ast.walk(ast.parse(source)):
        target = getattr(node, "target", None) or (getattr(node, "targets", None) or [None])[0]
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and getattr(target, "id", "") == "TEXT_MODEL_MAP":
            return {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
    return set()


def check_architecture(config: dict) -> None:
    """ConfigError naming the family when llama.cpp's converter has no class for it (the converter's source is
    fetched here, once, so that a failure to fetch it comes before any work too)."""
    names = config.get("architectures") or []
    known = architectures()
    if known and names and not any(n in known for n in names):
        raise ConfigError(f"GGUF export: llama.cpp {version_text()} cannot convert {config.get('model_type')!r} "
                          f"models ({', '.join(names)} is not among its converter's architectures); finetune-merge "
                          "writes a safetensors model of any architecture")


def convert(model_dir: Path, out: Path, outtype: str) -> None:
    """llama.cpp's converter: the merged model directory -> one GGUF of `outtype` (f32 / f16 / bf16)."""
    src = tree()
    cmd = [sys.executable, "-m", "finetune.export.convert_main", str(src), str(model_dir), "--outfile", str(out),
           "--outtype", outtype]
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)  # the converter then takes its own gguf-py, not whatever gguf is installed
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
        reason = next((ln for ln in reversed(lines) if "error" in ln.lower()), lines[-1] if lines else "")
        family = ""
        with contextlib.suppress(OSError, ValueError):
            family = json.loads((model_dir / "config.json").read_text()).get("model_type") or ""
        raise ConfigError(f"GGUF export: llama.cpp {version_text()} cannot convert this {family} model: "
                          f"{reason.strip()}")
    if not out.is_file():
        raise EnvError(f"llama.cpp's converter wrote no {out.name}")


def quantize(src: Path, dst: Path, quant: str, imatrix: Path | None = None, threads: int | None = None) -> None:
    """llama.cpp's quantizer: `src` (f16 / bf16 / f32 GGUF) -> `dst` in `quant`; with the importance matrix
    through llama.cpp's llama-quantize tool."""
    if imatrix is not None:
        _tool_run("llama-quantize", ["--imatrix", str(imatrix), str(src), str(dst), quant.upper(),
                                     str(threads or os.cpu_count() or 1)])
        return
    llama_cpp = library()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = quant_types()[quant]
    params.nthread = threads or os.cpu_count() or 1
    with _c_stderr() as captured:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        dst.unlink(missing_ok=True)
        lines = [ln for ln in captured.read_text(errors="replace").splitlines() if ln.strip()]
        reason = next((ln for ln in reversed(lines) if "error" in ln.lower()), f"return code {rc}")
        raise ConfigError(f"llama.cpp {version_text()} could not quantize to {quant}: {reason.strip()}")


def compute_imatrix(model: Path, text_file: Path, out: Path, ctx: int, threads: int | None = None) -> str:
    """llama.cpp's llama-imatrix over `text_file` (the run's own evaluation texts); returns its last line."""
    return _tool_run("llama-imatrix", ["-m", str(model), "-f", str(text_file), "-o", str(out), "-c", str(ctx),
                                       "-b", str(ctx), "--no-ppl", "-t", str(threads or os.cpu_count() or 1)])


def _lib_dirs() -> list[Path]:
    import llama_cpp

    pkg = Path(llama_cpp.__file__).parent
    return [d for d in (pkg / "lib", pkg.parent / "lib") if d.is_dir()]


def tool(name: str) -> Path:
    """A llama.cpp tool (llama-imatrix, llama-quantize) compiled from the sdist against the installed libraries."""
    library()
    src = tree()
    exe = src / "bin" / name
    if exe.is_file():
        return exe
    sources = {"llama-imatrix": ["tools/imatrix/imatrix.cpp"],
               "llama-quantize": ["tools/quantize/main.cpp", "tools/quantize/quantize.cpp"]}[name]
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not compiler:
        raise EnvError(f"--imatrix needs llama.cpp's {name}, compiled here from llama.cpp's source: install a C++ "
                       "compiler (g++ or clang++)")
    libs = _lib_dirs()
    exe.parent.mkdir(exist_ok=True)
    tmp = exe.with_name(f".{name}.{uuid.uuid4().hex[:8]}")
    cmd = [compiler, "-std=c++17", "-O2", *(f"-I{src / d}" for d in ("include", "ggml/include", "common", "vendor",
                                                                       "tools/quantize")),
           *(str(src / s) for s in sources), *(f"-L{d}" for d in libs),
           "-lllama-common", "-lllama", "-lggml", "-lggml-base", "-pthread",
           "-Wl,--disable-new-dtags,-rpath," + ":".join(str(d) for d in libs), "-o", str(tmp)]
    print(f"compiling llama.cpp's {name} (once)", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        tmp.unlink(missing_ok=True)
        first = next((ln for ln in done.stderr.splitlines() if "error" in ln), done.stderr.strip()[-300:])
        raise EnvError(f"cannot compile llama.cpp's {name} against {PACKAGE} {version()}: {first}")
    os.replace(tmp, exe)
    return exe


def _tool_run(name: str, args: list[str]) -> str:
    done = subprocess.run([str(tool(name)), *args], capture_output=True, text=True)
    lines = [ln for ln in (done.stdout + done.stderr).splitlines() if ln.strip()]
    if done.returncode:
        reason = next((ln for ln in reversed(lines) if "error" in ln.lower()), lines[-1] if lines else "")
        raise ConfigError(f"llama.cpp's {name} {version_text()} failed: {reason.strip()}")
    return lines[-1] if lines else ""


@contextlib.contextmanager
def _c_stderr():
    """llama.cpp's quantizer writes a line per tensor to the process's stderr (C level): into a file while it
    runs, read back for the error when it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stderr.txt"
        sys.stderr.flush()
        saved = os.dup(2)
        with open(path, "w") as sink, contextlib.redirect_stderr(sink):  # llama-cpp-python's log callback too
            os.dup2(sink.fileno(), 2)
            try:
                yield path
            finally:
                os.dup2(saved, 2)
                os.close(saved)
