"""Use the result: fold the adapter into the base weights and save a plain transformers model.

    finetune-merge outputs/llama2-7b-medical/<time>/adapter [--out DIR] [--from-quantized]

Two bases to merge into:

* the original weights (bf16/fp16, as the checkpoint stores them): the default when the base
  checkpoint is a full-precision one. The merged model is the best model to ship; it differs
  from what was trained only by the quantization error of the 4-bit base the adapter saw;
* the dequantized 4-bit base (``--from-quantized``, or when the base checkpoint is itself
  pre-quantized, so no original weights exist): exactly the model that was trained and
  evaluated, in a plain dtype.

It says which it used, on the console and in ``merge.json`` beside the weights. The result
is safetensors plus the tokenizer with the chat template of training, loadable with
``AutoModelForCausalLM.from_pretrained`` (no peft, no bitsandbytes).

Nothing is destroyed by surprise: ``--out DIR`` is written only when DIR is missing, empty, or
an earlier merge output (it holds our ``merge.json``); any other DIR is refused unless
``--force``. The model is written into a hidden sibling of DIR and renamed into place at the
end, so a failed merge leaves DIR as it was. Code from the model's repository never runs
unless ``--trust-remote-code`` is given on this command line: a run directory's config.yaml
(which may be someone else's) cannot switch it on.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from finetune.errors import ConfigError, FinetuneError

log = logging.getLogger(__name__)


@dataclass
class TrainedRun:
    """What a saved adapter needs to be used again: its run's model settings and plan."""

    adapter_dir: Path
    run_dir: Path
    model_cfg: Any
    choices: dict[str, Any]


def find_run(path: str | Path, trust_remote_code: bool = False) -> TrainedRun:
    """The run behind an adapter directory (or a run directory holding adapter/).

    `trust_remote_code` is the caller's own command-line flag, never the run's: a run whose recipe
    set model.trust_remote_code is refused without it (running its code is the user's decision).
    """
    from finetune.config import ModelConfig

    p = Path(path).expanduser().resolve()
    adapter = p / "adapter" if (p / "adapter" / "adapter_config.json").is_file() else p
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"{path}: no adapter here (expected adapter_config.json, or a run directory with adapter/)")
    run_dir = adapter.parent
    config_path, plan_path = run_dir / "config.yaml", run_dir / "plan.json"
    if not config_path.is_file() or not plan_path.is_file():
        raise ConfigError(f"{run_dir}: not a finetune run directory (config.yaml and plan.json are missing)")
    recipe = yaml.safe_load(config_path.read_text())
    model = dict(recipe["model"])
    if model.get("trust_remote_code") and not trust_remote_code:
        raise ConfigError(f"{config_path}: the run's recipe sets model.trust_remote_code, which runs code from the "
                          f"repository of {model.get('name_or_path')}; pass --trust-remote-code if you trust it "
                          "(it is never taken from a run directory)")
    model["trust_remote_code"] = bool(trust_remote_code)
    model_cfg = ModelConfig(**model)
    return TrainedRun(adapter, run_dir, model_cfg, json.loads(plan_path.read_text())["choices"])


MERGE_RECORD = "merge.json"


def is_merge_output(path: Path) -> bool:
    """A directory an earlier merge wrote: it holds our merge.json record."""
    try:
        record = json.loads((path / MERGE_RECORD).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and {"adapter", "base", "run_dir"} <= set(record)


def check_out(out: Path, run: TrainedRun, force: bool = False) -> None:
    """Refuse an --out that would destroy something we did not write (unless `force`)."""
    where = out.expanduser().absolute()
    resolved = where.resolve()
    if resolved == run.adapter_dir or resolved in run.adapter_dir.parents:
        raise ConfigError(f"--out {out}: that directory holds the adapter being merged; pick another one")
    if not where.exists() and not where.is_symlink():
        return
    if force:
        return
    if where.is_symlink() or not where.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory; pick another path, or pass --force to "
                          "replace it")
    if any(where.iterdir()) and not is_merge_output(where):
        raise ConfigError(f"--out {out}: the directory is not empty and is not an earlier finetune-merge output "
                          f"(no {MERGE_RECORD}); pick another directory, or pass --force to replace all it holds")


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _replace(tmp: Path, out: Path) -> None:
    """Put the finished `tmp` where `out` is; the old `out` (if any) is moved aside first and removed last."""
    if not out.exists() and not out.is_symlink():
        tmp.rename(out)
        return
    old = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.old")
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    _remove(old)


def _is_prequantized(base_dir: str) -> bool:
    cfg = Path(base_dir) / "config.json"
    return cfg.is_file() and "quantization_config" in json.loads(cfg.read_text())


def _uses_quantized(run: TrainedRun, base_dir: str, from_quantized: bool) -> bool:
    """Merge into the dequantized quantized base (asked for, or the checkpoint has no original weights)? A run on
    an unquantized base was trained on the original weights: nothing to dequantize."""
    return (from_quantized or _is_prequantized(base_dir)) and run.choices["quantization"] != "none"


_ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
# Beside the weights: config, generation config, merge.json and the filesystem's own slack (the tokenizer counted)
_MERGE_HEADROOM = 16 << 20


def merged_size(run: TrainedRun, from_quantized: bool = False) -> tuple[int, int]:
    """(parameters, bytes per parameter) of the model merged_model() makes, from the base's safetensors headers
    alone (nothing loaded): the disk a merge and an export need is known before minutes of loading. (0, 0) for a
    base without safetensors headers."""
    from finetune.models.loader import base_model_dir
    from finetune.models.weights import tensor_totals, weight_files

    base_dir = base_model_dir(run.model_cfg)
    elements, stored = tensor_totals(weight_files(Path(base_dir)))
    if not elements:
        return 0, 0
    if _uses_quantized(run, base_dir, from_quantized):
        return elements, _ITEMSIZE[run.choices["compute_dtype"]]
    return elements, max(1, round(stored / elements))


def _count(params: int) -> str:
    return f"{params / 1e9:.1f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"


def check_space(out: Path, needed: int, what: str) -> None:
    """EnvError (exit 5) in one line when the disk that will hold `out` has less than `needed` bytes free."""
    from finetune.errors import EnvError
    from finetune.paths import free_bytes

    free = free_bytes(out)
    if free < needed:
        raise EnvError(f"{out}: {what} needs about {needed / 2**20:,.0f} MiB and only {free / 2**20:,.0f} MiB are "
                       "free there; free some space or pass --out on a bigger disk")


def merged_model(run: TrainedRun, from_quantized: bool = False):
    """(the base with the adapter folded in, which base that was in words, its dtype): the original weights, or
    the dequantized quantized base with `from_quantized` or when the checkpoint itself is pre-quantized."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.models import experts
    from finetune.models.loader import base_model_dir, load_model

    base_dir = base_model_dir(run.model_cfg)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[run.choices["compute_dtype"]]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    use_quantized = _uses_quantized(run, base_dir, from_quantized)
    if use_quantized:
        base = load_model(run.model_cfg, run.choices, device)
        base = base.dequantize()  # bitsandbytes layers -> plain Linear in the compute dtype
        experts.dequantize(base)  # and 4-bit / 8-bit MoE experts -> 3-D parameters
        which = f"the dequantized {run.choices['quantization']} base (exactly the model that was trained)"
    else:
        base = AutoModelForCausalLM.from_pretrained(
            base_dir, dtype="auto", trust_remote_code=run.model_cfg.trust_remote_code,
            use_safetensors=True, device_map={"": 0} if device == "cuda" else None)
        stored = base.dtype
        which = f"the original {str(stored).removeprefix('torch.')} weights of {run.model_cfg.name_or_path}"
        dtype = stored
    model = PeftModel.from_pretrained(base, str(run.adapter_dir))
    merged = model.merge_and_unload()
    return merged.to(dtype), which, dtype


def save_merged(merged, tokenizer, target: Path) -> None:
    """The merged model as a plain checkpoint in `target`: safetensors, the adapter's tokenizer with the chat
    template of training, and a generation_config.json whose eos_token_id lists the template's end-of-turn token
    (Llama 3's <|eot_id|> where its config names only <|end_of_text|>)."""
    from data_prep.templates import write_generation_config
    from finetune.paths import apply_umask

    merged.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    write_generation_config(tokenizer, target, getattr(merged, "generation_config", None))
    apply_umask(target)  # safetensors' atomic save writes the weights 0600: the user's umask instead


def merge(adapter: str | Path, out: str | Path, from_quantized: bool = False, force: bool = False,
          trust_remote_code: bool = False) -> dict[str, Any]:
    """Merge and save; returns the merge.json record.

    `out` must be missing, empty or an earlier merge output unless `force` (then whatever it holds
    is replaced); it is replaced only once the new model is completely written beside it.
    """
    run = find_run(adapter, trust_remote_code=trust_remote_code)
    out = Path(out).expanduser().absolute()
    check_out(out, run, force)  # before anything is loaded: a refusal costs nothing
    params, itemsize = merged_size(run, from_quantized)
    tokenizer_bytes = sum(f.stat().st_size for f in run.adapter_dir.glob("*token*") if f.is_file())
    check_space(out, params * itemsize + tokenizer_bytes + _MERGE_HEADROOM,
                f"the merged model ({_count(params)} parameters, {itemsize} bytes each)")

    from transformers import AutoTokenizer

    merged, which, dtype = merged_model(run, from_quantized)
    out.parent.mkdir(parents=True, exist_ok=True)
    # A fresh hidden sibling (same filesystem, so the final rename is atomic); removed on any failure.
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        tokenizer = AutoTokenizer.from_pretrained(run.adapter_dir, trust_remote_code=run.model_cfg.trust_remote_code)
        save_merged(merged, tokenizer, tmp)
        record = {"adapter": str(run.adapter_dir), "base": which, "base_model": run.model_cfg.name_or_path,
                  "dtype": str(dtype).removeprefix("torch."), "run_dir": str(run.run_dir)}
        (tmp / MERGE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        check_out(out, run, force)  # again: the directory may have changed while the model was written
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="finetune-merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter", help="the adapter directory (outputs/<recipe>/<time>/adapter) or its run directory")
    parser.add_argument("--out", help="where to write the merged model (default: <run dir>/merged)")
    parser.add_argument("--from-quantized", action="store_true",
                        help="merge into the dequantized 4-bit base the adapter was trained on")
    parser.add_argument("--force", action="store_true",
                        help="replace --out even if it is a directory holding something else than an earlier merge")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let code from the base model's repository run (needed when the run's recipe set "
                             "model.trust_remote_code; never taken from the run directory)")
    args = parser.parse_args(argv)
    from finetune.quiet import quiet_libraries, quiet_loading

    quiet_libraries()
    quiet_loading()
    out = Path(args.out) if args.out else None
    try:
        run = find_run(args.adapter, trust_remote_code=args.trust_remote_code)
        out = out or run.run_dir / "merged"
        record = merge(args.adapter, out, from_quantized=args.from_quantized, force=args.force,
                       trust_remote_code=args.trust_remote_code)
    except FinetuneError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(e.exit_code)
    except Exception as e:
        from finetune.errors import EnvError
        from finetune.paths import disk_error

        # a disk that filled (or turned read-only) while the model was written: one line; merge() removed its
        # temporary directory, so --out is as it was
        line = disk_error(e, needs="the merged model", elsewhere="--out DIR", where=out)
        if line is None:
            raise
        sys.stderr.write(f"error: {line}\n")
        sys.exit(EnvError.exit_code)
    print(f"merged {record['adapter']} into {record['base']}")
    print(f"saved {out} ({record['dtype']}, safetensors): AutoModelForCausalLM.from_pretrained('{out}')")


if __name__ == "__main__":
    main()
