"""Take the adapter where people run models: GGUF files for llama.cpp / Ollama / LM Studio, and Ollama Modelfiles.

    finetune-export outputs/tiny-demo/<time>/adapter [--quant q4_k_m [q8_0 f16 ...]] [--imatrix] [--out DIR]
    finetune-export models:/tiny-demo/3            (a model registered by a finetune run; or runs:/<run id>)

The adapter is merged into its base as ``finetune-merge`` does (the original weights, or with --from-quantized
the dequantized 4-bit base that was trained; it says which) and written with the tokenizer and the chat template
of training; llama.cpp's own converter makes the 16-bit GGUF and llama.cpp's quantizer every other type
(finetune/export/llama_cpp.py: the llama.cpp of the installed llama-cpp-python, the `gguf` extra), optionally
with an importance matrix over the run's held-out split. Each file is then loaded in llama.cpp and compared with
the merged model (finetune/export/check.py); the figures go into export.json and the MLflow run. A ``Modelfile``
per quant (finetune/export/modelfile.py) names it. Everything is written under temporary names and renamed at
the end: a failure leaves nothing half-written under the output names.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import yaml

from finetune.errors import ConfigError, EnvError, FinetuneError

log = logging.getLogger(__name__)

RECORD = "export.json"
_HEADROOM = 64 << 20  # metadata, the tokenizer and the filesystem's own slack


def _run_dir(adapter: str, tracking_uri: str) -> Path:
    """A local run directory for ADAPTER: as given, or downloaded from MLflow."""
    from finetune.tracking.artifacts import is_mlflow_uri

    if not is_mlflow_uri(adapter):
        return Path(adapter)
    from finetune.paths import cache_dir
    from finetune.tracking import absolute_uri
    from finetune.tracking.artifacts import download_run

    return download_run(adapter, absolute_uri(tracking_uri), cache_dir())


def _recipe(run_dir: Path) -> dict[str, Any]:
    try:
        recipe = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return recipe if isinstance(recipe, dict) else {}


def _base_config(run) -> tuple[Path, dict[str, Any]]:
    from finetune.models.loader import base_model_dir

    base = Path(base_model_dir(run.model_cfg))
    try:
        return base, json.loads((base / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise EnvError(f"{base / 'config.json'}: cannot read the base model's config ({e})") from e


def _stops(tokenizer) -> list[str]:
    from data_prep.templates import BUILTIN, end_of_turn_token

    name = next((n for n, t in BUILTIN.items() if t.jinja == tokenizer.chat_template), "tokenizer")
    return list(dict.fromkeys(s for s in [end_of_turn_token(name, tokenizer), tokenizer.eos_token] if s))


# Bits per weight of each type's files, for the disk check (llama.cpp's own table, rounded up; others 8.5)
_BPW = {"f32": 32, "f16": 16, "bf16": 16, "q8_0": 8.5, "q6_k": 6.6, "q5_k_m": 5.7, "q5_k_s": 5.6, "q5_0": 5.5,
        "q5_1": 6, "q4_k_m": 4.9, "q4_k_s": 4.6, "q4_0": 4.5, "q4_1": 5, "q3_k_l": 4.3, "q3_k_m": 3.9,
        "q3_k_s": 3.5, "q2_k": 3.4, "iq4_xs": 4.3, "iq4_nl": 4.5}


def _check_export_space(out: Path, params: int, itemsize: int, quants: list[str]) -> None:
    """The merged model, its 16-bit GGUF and every file asked for must fit where they are written: one line
    (needed vs free, exit 5) before anything is, not a full disk halfway through."""
    from finetune.models.merge import check_space

    needed = params * (itemsize + 2 + sum(_BPW.get(q, 8.5) / 8 for q in quants)) + _HEADROOM
    check_space(out, needed, f"the export (the merged model, its 16-bit GGUF and the "
                             f"file{'s' if len(quants) > 1 else ''} asked for)")


def _write_merged(merged, tokenizer, base_dir: Path, base_config: dict[str, Any], target: Path) -> None:
    """The merged model as llama.cpp's converter reads a checkpoint: finetune-merge's (save_merged), with the
    config fields and the tokenizer.model the converter still reads."""
    import shutil

    from finetune.models.merge import save_merged

    save_merged(merged, tokenizer, target)
    # transformers 5 leaves out config fields the converter (written against the checkpoints as published)
    # still reads, GPT-2's n_ctx among them: the base's own config.json supplies them
    config = json.loads((target / "config.json").read_text())
    config.update({k: v for k, v in base_config.items() if k not in config and k != "quantization_config"})
    if config.get("model_type") == "gpt2":  # every published GPT-2 config has n_ctx = n_positions; v5 drops it
        config.setdefault("n_ctx", config.get("n_positions"))
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # Gemma's and Llama 2's converters read the SentencePiece model; transformers 5 saves only tokenizer.json
    if (base_dir / "tokenizer.model").is_file() and not (target / "tokenizer.model").exists():
        shutil.copyfile(base_dir / "tokenizer.model", target / "tokenizer.model")


def _prompts(heldout: list[list[dict[str, Any]]], n: int = 4) -> tuple[list[list[dict[str, Any]]], str]:
    """The conversations the check runs on, up to their last user turn: the run's held-out ones, or a few fixed
    ones for a run that has none; and where they came from."""
    conversations = [m[:-1] if m[-1].get("role") == "assistant" else m for m in heldout]
    conversations = [m for m in conversations if m][:n]
    if conversations:
        return conversations, "heldout.jsonl"
    return [[{"role": "user", "content": q}] for q in ("What is a fever?", "Name three fruits.",
                                                     "Explain what a GGUF file is.", "Say hello.")][:n], "built-in"


def export(adapter: str, out: str | Path | None = None, quants: list[str] | tuple[str, ...] = ("q4_k_m",),
           from_quantized: bool = False, name: str | None = None, tracking_uri: str = "sqlite:///mlflow.db",
           log_to_mlflow: bool = True, trust_remote_code: bool = False, progress: bool = True,
           imatrix: bool = False, num_ctx: int | None = None, check: bool = True) -> dict[str, Any]:
    """Merge, convert with llama.cpp's converter, quantize with its quantizer, check each file in llama.cpp, write
    the Modelfiles; returns the export.json record."""
    import shutil

    from finetune.export import llama_cpp
    from finetune.models.adapters import adapter_dir
    from finetune.models.merge import find_run

    quants = llama_cpp.check_quants(list(quants), imatrix)  # the extra is there, the types exist: costs nothing
    run = find_run(_run_dir(adapter, tracking_uri), trust_remote_code=trust_remote_code)
    adapter_dir(run.adapter_dir, key="finetune-export")  # its weights are there too (not an incomplete copy)
    base_dir, config = _base_config(run)
    llama_cpp.check_architecture(config)  # a family llama.cpp cannot convert: refused before anything is loaded
    recipe = _recipe(run.run_dir)
    name = name or recipe.get("name") or run.run_dir.name
    out = Path(out).expanduser().absolute() if out else run.run_dir / "export"
    previous = _previous_export(out)

    from transformers import AutoTokenizer

    from finetune.export import check as checks
    from finetune.export.modelfile import modelfile
    from finetune.models.merge import merged_model, merged_size

    # The disk it needs, from the base's safetensors headers before minutes of loading and merging (and again
    # from the merged model itself where the headers could not tell)
    params, itemsize = merged_size(run, from_quantized)
    if params:
        _check_export_space(out, params, itemsize, quants)
    with _step("merging the adapter into its base", progress):
        merged, which, dtype = merged_model(run, from_quantized)
    merged.eval()
    if not params:
        _check_export_space(out, sum(p.numel() for p in merged.parameters()), merged.dtype.itemsize, quants)
    tokenizer = AutoTokenizer.from_pretrained(run.adapter_dir, trust_remote_code=run.model_cfg.trust_remote_code)
    stops = _stops(tokenizer)
    files: dict[str, Path] = {}
    sizes: dict[str, int] = {}
    figures: dict[str, dict[str, Any]] = {}
    pending: list[tuple[Path, Path]] = []
    context = int(num_ctx or config.get("max_position_embeddings") or config.get("n_positions")
                  or config.get("n_ctx") or 4096)
    from data_prep import heldout

    held_out = heldout.read(run.run_dir)
    prompts, prompts_from = _prompts(held_out)
    created = not out.exists()  # a directory this export made is removed again if it fails
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    floats = [q for q in quants if q in llama_cpp.CONVERTER_TYPES]
    quantized = [q for q in quants if q not in llama_cpp.CONVERTER_TYPES]
    intermediate = "bf16" if "bfloat16" in str(dtype) else "f16"
    conversions = list(dict.fromkeys(floats + ([intermediate] if quantized else [])))
    try:
        merged_dir = work / "merged"
        with _step("writing the merged model for llama.cpp's converter", progress):
            _write_merged(merged, tokenizer, base_dir, config, merged_dir)
        for outtype in conversions:
            with _step(f"converting to GGUF {outtype} (llama.cpp's convert_hf_to_gguf.py)", progress):
                llama_cpp.convert(merged_dir, work / f"{outtype}.gguf", outtype)
        shutil.rmtree(merged_dir)  # the GGUFs hold it now: the disk it took is free for the quantized files
        matrix = None
        if imatrix and quantized:
            matrix = work / "imatrix.gguf"
            texts, n_tokens = _imatrix_text(held_out or prompts, tokenizer)
            (work / "imatrix.txt").write_text(texts)
            chunk = max(32, min(512, n_tokens // 2))
            with _step("computing the importance matrix (llama.cpp's llama-imatrix, on the held-out split)",
                       progress):
                llama_cpp.compute_imatrix(work / f"{intermediate}.gguf", work / "imatrix.txt", matrix, ctx=chunk)
        for quant in quants:
            target = out / f"{name}-{quant}.gguf"
            tmp = out / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
            pending.append((tmp, target))
            if quant in llama_cpp.CONVERTER_TYPES:
                if quant == intermediate and quantized:
                    shutil.copyfile(work / f"{quant}.gguf", tmp)
                else:
                    os.replace(work / f"{quant}.gguf", tmp)
            else:
                with _step(f"quantizing to {quant} (llama.cpp's quantizer"
                           f"{', with the importance matrix' if matrix else ''})", progress):
                    llama_cpp.quantize(work / f"{intermediate}.gguf", tmp, quant, imatrix=matrix)
            files[quant], sizes[quant] = target, tmp.stat().st_size
            if check:
                with _step(f"checking {quant} in llama.cpp against the merged model", progress):
                    result = checks.check_file(tmp, quant, merged, tokenizer, prompts, stops,
                                               float_type=quant in llama_cpp.CONVERTER_TYPES)
                figures[quant] = result.as_dict()
                for warning in result.warnings:
                    log.warning("%s: %s", target.name, warning)
        eval_cfg = recipe.get("eval") or {}
        modelfiles: dict[str, str] = {}
        templated = False
        for i, quant in enumerate(quants):
            text, templated = modelfile(files[quant].name, tokenizer, stops,
                                        max_new_tokens=int(eval_cfg.get("max_new_tokens", 128)), context=context)
            mf = "Modelfile" if i == 0 else f"Modelfile.{quant}"
            modelfiles[quant] = mf
            tmp = out / f".{mf}.{uuid.uuid4().hex[:8]}.tmp"
            tmp.write_text(text)
            pending.append((tmp, out / mf))
        record = {"adapter": str(run.adapter_dir), "base": which, "base_model": run.model_cfg.name_or_path,
                  "merged_dtype": str(dtype).removeprefix("torch."), "architecture": config.get("model_type"),
                  "llama_cpp": {**llama_cpp.versions(),
                                "converter": "convert_hf_to_gguf.py (from that version's sdist)",
                                "intermediate": intermediate},
                  "quants": quants, "files": {q: p.name for q, p in files.items()}, "sizes": sizes,
                  "imatrix": bool(matrix), "num_ctx": context, "modelfiles": modelfiles,
                  "modelfile": "Modelfile", "modelfile_template": templated, "run_dir": str(run.run_dir),
                  "check": {"prompts_from": prompts_from, "prompts": len(prompts), "limits": checks.LIMITS,
                            "files": figures} if check else None}
        tmp = out / f".{RECORD}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        pending.append((tmp, out / RECORD))
        for tmp, target in pending:  # all written: now put them in place
            os.replace(tmp, target)
        # what an earlier export here wrote and this one did not: gone, so the directory is what export.json says
        written = {target.name for _, target in pending}
        for stale in previous - written:
            with contextlib.suppress(FileNotFoundError):
                (out / stale).unlink()
    finally:
        for tmp, _ in pending:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        shutil.rmtree(work, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()
    if log_to_mlflow:
        from finetune.tracking.artifacts import log_export

        logged: dict[str, Any] = {f"export.gguf.{q}.bytes": record["sizes"][q] for q in quants}
        logged.update({f"export.gguf.{q}.file": files[q].name for q in quants})
        logged["export.llama_cpp"] = record["llama_cpp"]["package"]
        metrics = {}
        for q, f in figures.items():
            metrics[f"export/{q}/top1_agreement"] = f["top1_agreement"]
            metrics[f"export/{q}/max_logit_diff"] = f["max_logit_diff"]
            metrics[f"export/{q}/prompt_ids_equal"] = f["prompt_ids_equal"] / max(f["prompts"], 1)
            metrics[f"export/{q}/greedy_equal"] = f["greedy_equal"] / max(f["prompts"], 1)
        record["mlflow_run_id"] = log_export(
            run.run_dir, [*files.values(), *(out / m for m in modelfiles.values()), out / RECORD], logged,
            None if tracking_uri == "sqlite:///mlflow.db" else tracking_uri, metrics=metrics)
    record["out"] = str(out)
    return record


def _previous_export(out: Path) -> set[str]:
    """The files an earlier export wrote into `out` (its export.json lists them); ConfigError when `out` holds
    anything else, which the export would overwrite or mix with."""
    if not out.exists():
        return set()
    if not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    entries = [p for p in out.iterdir() if not p.name.startswith(".")]
    if not entries:
        return set()
    try:
        record = json.loads((out / RECORD).read_text())
        names = {*record["files"].values(), *(record.get("modelfiles") or {"": "Modelfile"}).values(), RECORD}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError(f"--out {out}: holds other files and no {RECORD} of an earlier export; choose a new or "
                          "empty directory") from None
    return {n for n in names if isinstance(n, str) and "/" not in n}


def _imatrix_text(conversations: list[list[dict[str, Any]]], tokenizer) -> tuple[str, int]:
    """The text llama-imatrix runs over: the run's held-out conversations, answers included, in the chat template
    of training (the check's prompts for a run without them); and its length in tokens."""
    text = "\n".join(tokenizer.apply_chat_template(m, tokenize=False) for m in conversations)
    return text, len(tokenizer(text, add_special_tokens=False).input_ids)


@contextlib.contextmanager
def _step(label: str, show: bool):
    """One line per step of the export, with its time (the first conversion of a big model takes minutes)."""
    import time

    if not show:
        yield
        return
    from rich.console import Console

    console = Console(stderr=True)
    start = time.monotonic()
    with console.status(label):
        yield
    console.print(f"{label}: done in {time.monotonic() - start:,.1f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="finetune-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter", help="the adapter directory, its run directory, or an MLflow URI (models:/NAME/N, "
                                        "runs:/RUN_ID)")
    parser.add_argument("--format", default="gguf", help="gguf (the only one so far)")
    parser.add_argument("--quant", nargs="+", default=["q4_k_m"], metavar="Q",
                        help="one or more GGUF types llama.cpp makes (default q4_k_m): f16 bf16 f32 q8_0 q6_k q5_k_m "
                             "q5_k_s q4_k_m q4_k_s q4_0 q3_k_m q2_k iq4_xs ... (iq1/iq2 and q2_k_s need --imatrix); "
                             "one file each, the first one the Modelfile's")
    parser.add_argument("--imatrix", action="store_true",
                        help="quantize with an importance matrix computed by llama.cpp over the run's held-out "
                             "split (better low-bit files)")
    parser.add_argument("--num-ctx", type=int, help="the Modelfile's num_ctx (default: the model's context length)")
    parser.add_argument("--out", help="the directory to write into (default: <run dir>/export)")
    parser.add_argument("--name", help="the model's name in the file names and the GGUF (default: the recipe's)")
    parser.add_argument("--from-quantized", action="store_true",
                        help="merge into the dequantized 4-bit base the adapter was trained on")
    parser.add_argument("--no-check", action="store_true",
                        help="skip loading each file in llama.cpp and comparing it with the merged model")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"),
                        help="the MLflow store of an MLflow URI, and where the export is logged (default: the "
                             "run's own, or ./mlflow.db)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the export to the adapter's MLflow run")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let code from the base model's repository run (never taken from the run directory)")
    args = parser.parse_args(argv)
    from finetune.quiet import quiet_libraries, quiet_loading

    quiet_libraries()
    quiet_loading()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        if args.format != "gguf":
            raise ConfigError(f"--format {args.format}: not supported (gguf)")
        if args.num_ctx is not None and args.num_ctx < 1:
            raise ConfigError(f"--num-ctx {args.num_ctx}: must be a positive number of tokens")
        record = export(args.adapter, args.out, args.quant, from_quantized=args.from_quantized, name=args.name,
                        tracking_uri=args.tracking_uri, log_to_mlflow=not args.no_mlflow,
                        trust_remote_code=args.trust_remote_code, imatrix=args.imatrix, num_ctx=args.num_ctx,
                        check=not args.no_check)
    except FinetuneError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(e.exit_code)
    except Exception as e:
        from finetune.paths import disk_error

        # a disk that filled (or turned read-only) while the files were written: one line; export() removed its
        # temporary files, so --out holds what it held before
        line = disk_error(e, needs="the merged model, its 16-bit GGUF and the quantized files",
                          elsewhere="--out DIR", where=args.out)
        if line is None:
            raise
        sys.stderr.write(f"error: {line}\n")
        sys.exit(EnvError.exit_code)
    out = Path(record["out"])
    print(f"merged {record['adapter']} into {record['base']}; converted and quantized by "
          f"{record['llama_cpp']['package']}")
    checked = (record.get("check") or {}).get("files", {})
    for quant, file in record["files"].items():
        figures = checked.get(quant)
        note = ""
        if figures:
            note = (f"; in llama.cpp: top-1 {figures['top1_agreement']:.0%}, max |logit diff| "
                    f"{figures['max_logit_diff']:.3f}, chat prompts {figures['prompt_ids_equal']}/{figures['prompts']}"
                    f" tokenized alike{', ' + str(len(figures['warnings'])) + ' warning(s)' if figures['warnings'] else ''}")
        print(f"wrote {out / file} ({quant}, {record['sizes'][quant] / 2**20:,.1f} MiB{note})")
    for quant, mf in record["modelfiles"].items():
        print(f"wrote {out / mf} (FROM the {quant} file)"
              f"{'' if record['modelfile_template'] else ' (no TEMPLATE: see the warning)'}")
    first = next(iter(record["files"]))
    print(f"  ollama create {record['files'][first].rsplit('.gguf', 1)[0]} -f {out / 'Modelfile'}")
    print(f"  llama-cli -m {out / record['files'][first]} -cnv")
    if record.get("mlflow_run_id"):
        print(f"logged to MLflow run {record['mlflow_run_id']} (artifacts export/)")


if __name__ == "__main__":
    main()
