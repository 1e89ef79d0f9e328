"""Take the adapter where people run models: one GGUF for llama.cpp / Ollama / LM Studio, and an Ollama Modelfile.

    finetune-export outputs/tiny-demo/<time>/adapter [--quant q8_0 [q4_0 ...]] [--out DIR] [--from-quantized]
    finetune-export models:/tiny-demo/3            (a model registered by a finetune run; or runs:/<run id>)

The adapter is merged into its base as ``finetune-merge`` does (the original weights, or with --from-quantized
the dequantized 4-bit base that was trained; it says which), then written as one GGUF per quant with the
tokenizer, its special tokens and the chat template of training (finetune/export/gguf_file.py), and a
``Modelfile`` beside it (finetune/export/modelfile.py). Everything is written under temporary names and renamed
at the end: a failure leaves nothing half-written under the output names. The files and their sizes are logged
to the MLflow run that trained the adapter.
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


def _check_quants(quants: list[str]) -> list[str]:
    from finetune.export.gguf_file import QUANTS

    bad = [q for q in quants if q not in QUANTS]
    if bad:
        raise ConfigError(f"--quant {bad[0]}: no such GGUF quant (choose from {', '.join(QUANTS)})")
    return list(dict.fromkeys(quants))


def _base_config(run) -> dict[str, Any]:
    from finetune.models.loader import base_model_dir

    path = Path(base_model_dir(run.model_cfg)) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EnvError(f"{path}: cannot read the base model's config ({e})") from e


def _stops(tokenizer) -> list[str]:
    from data_prep.templates import BUILTIN, end_of_turn_token

    name = next((n for n, t in BUILTIN.items() if t.jinja == tokenizer.chat_template), "tokenizer")
    return list(dict.fromkeys([end_of_turn_token(name, tokenizer), tokenizer.eos_token]))


def export(adapter: str, out: str | Path | None = None, quants: list[str] | tuple[str, ...] = ("q8_0",),
           from_quantized: bool = False, name: str | None = None, tracking_uri: str = "sqlite:///mlflow.db",
           log_to_mlflow: bool = True, trust_remote_code: bool = False, progress: bool = True) -> dict[str, Any]:
    """Merge and write the GGUF files and the Modelfile; returns the export.json record."""
    from finetune.export import gguf_file
    from finetune.models.adapters import adapter_dir
    from finetune.models.merge import find_run
    from finetune.paths import free_bytes

    quants = _check_quants(list(quants))
    run = find_run(_run_dir(adapter, tracking_uri), trust_remote_code=trust_remote_code)
    adapter_dir(run.adapter_dir, key="finetune-export")  # its weights are there too (not an incomplete copy)
    config = _base_config(run)
    gguf_file.check_supported(config)  # before anything is loaded: a refusal costs nothing
    recipe = _recipe(run.run_dir)
    name = name or recipe.get("name") or run.run_dir.name
    out = Path(out).expanduser().absolute() if out else run.run_dir / "export"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)

    from transformers import AutoTokenizer

    from finetune.export.modelfile import modelfile
    from finetune.models.merge import merged_model

    merged, which, dtype = merged_model(run, from_quantized)
    state = merged.state_dict()
    names = gguf_file.tensor_names(config, state)
    needed = sum(gguf_file.estimated_bytes(state, q, names) for q in quants) + _HEADROOM
    free = free_bytes(out)
    if free < needed:
        raise EnvError(f"{out}: the GGUF file{'s' if len(quants) > 1 else ''} need about {needed / 2**20:,.0f} MiB "
                       f"and only {free / 2**20:,.0f} MiB are free there; free some space or pass --out on a bigger "
                       "disk")
    tokenizer = AutoTokenizer.from_pretrained(run.adapter_dir, trust_remote_code=run.model_cfg.trust_remote_code)
    files: dict[str, Path] = {}
    sizes: dict[str, int] = {}
    pending: list[tuple[Path, Path]] = []
    try:
        with tempfile.TemporaryDirectory(prefix=".tokenizer-", dir=out) as tok_dir:
            tokenizer.save_pretrained(tok_dir)  # with the chat template of training
            merged.config.save_pretrained(tok_dir)  # gguf's SpecialVocab reads the special ids from both
            for quant in quants:
                target = out / f"{name}-{quant}.gguf"
                tmp = out / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
                pending.append((tmp, target))
                with _progress(f"GGUF {quant}", progress) as step:
                    gguf_file.write(tmp, config, state, Path(tok_dir), quant, name, progress=step,
                                    eot_id=tokenizer.convert_tokens_to_ids(_stops(tokenizer)[0]))
                files[quant], sizes[quant] = target, tmp.stat().st_size
        eval_cfg, data_cfg = recipe.get("eval") or {}, recipe.get("dataset") or {}
        first = quants[0]
        text, templated = modelfile(files[first].name, tokenizer, _stops(tokenizer),
                                    max_new_tokens=int(eval_cfg.get("max_new_tokens", 128)),
                                    context=int(data_cfg.get("max_seq_len", config.get("max_position_embeddings", 2048))))
        tmp = out / f".Modelfile.{uuid.uuid4().hex[:8]}.tmp"
        tmp.write_text(text)
        pending.append((tmp, out / "Modelfile"))
        record = {"adapter": str(run.adapter_dir), "base": which, "base_model": run.model_cfg.name_or_path,
                  "merged_dtype": str(dtype).removeprefix("torch."), "architecture": config.get("model_type"),
                  "files": {q: p.name for q, p in files.items()}, "modelfile": "Modelfile",
                  "modelfile_template": templated, "run_dir": str(run.run_dir), "sizes": sizes}
        tmp = out / f".{RECORD}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        pending.append((tmp, out / RECORD))
        for tmp, target in pending:  # all written: now put them in place
            os.replace(tmp, target)
    finally:
        for tmp, _ in pending:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    if log_to_mlflow:
        from finetune.tracking.artifacts import log_export

        params: dict[str, Any] = {f"export.gguf.{q}.bytes": record["sizes"][q] for q in quants}
        params.update({f"export.gguf.{q}.file": files[q].name for q in quants})
        record["mlflow_run_id"] = log_export(run.run_dir, [*files.values(), out / "Modelfile", out / RECORD], params,
                                             None if tracking_uri == "sqlite:///mlflow.db" else tracking_uri)
    record["out"] = str(out)
    return record


@contextlib.contextmanager
def _progress(label: str, show: bool):
    if not show:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def main(argv: list[str] | None = None) -> None:
    from finetune.export.gguf_file import QUANTS

    parser = argparse.ArgumentParser(prog="finetune-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter", help="the adapter directory, its run directory, or an MLflow URI (models:/NAME/N, "
                                        "runs:/RUN_ID)")
    parser.add_argument("--format", default="gguf", help="gguf (the only one so far)")
    parser.add_argument("--quant", nargs="+", default=["q8_0"], metavar="Q",
                        help=f"one or more of {', '.join(QUANTS)} (default q8_0): one GGUF file each")
    parser.add_argument("--out", help="the directory to write into (default: <run dir>/export)")
    parser.add_argument("--name", help="the model's name in the file names and the GGUF (default: the recipe's)")
    parser.add_argument("--from-quantized", action="store_true",
                        help="merge into the dequantized 4-bit base the adapter was trained on")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"),
                        help="the MLflow store of an MLflow URI, and where the export is logged (default: the "
                             "run's own, or ./mlflow.db)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the export to the adapter's MLflow run")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let code from the base model's repository run (never taken from the run directory)")
    args = parser.parse_args(argv)
    from finetune.quiet import quiet_libraries

    quiet_libraries()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        if args.format != "gguf":
            raise ConfigError(f"--format {args.format}: not supported (gguf)")
        record = export(args.adapter, args.out, args.quant, from_quantized=args.from_quantized, name=args.name,
                        tracking_uri=args.tracking_uri, log_to_mlflow=not args.no_mlflow,
                        trust_remote_code=args.trust_remote_code)
    except FinetuneError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(e.exit_code)
    out = Path(record["out"])
    print(f"merged {record['adapter']} into {record['base']}")
    for quant, file in record["files"].items():
        print(f"wrote {out / file} ({quant}, {record['sizes'][quant] / 2**20:,.1f} MiB)")
    print(f"wrote {out / 'Modelfile'}{'' if record['modelfile_template'] else ' (no TEMPLATE: see the warning)'}")
    print(f"  ollama create {record['files'][next(iter(record['files']))].rsplit('.gguf', 1)[0]} -f {out / 'Modelfile'}")
    print(f"  llama-cli -m {out / next(iter(record['files'].values()))} -cnv")
    if record.get("mlflow_run_id"):
        print(f"logged to MLflow run {record['mlflow_run_id']} (artifacts export/)")


if __name__ == "__main__":
    main()
