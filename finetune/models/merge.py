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
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
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


def find_run(path: str | Path) -> TrainedRun:
    """The run behind an adapter directory (or a run directory holding adapter/)."""
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
    model_cfg = ModelConfig(**recipe["model"])
    return TrainedRun(adapter, run_dir, model_cfg, json.loads(plan_path.read_text())["choices"])


def _is_prequantized(base_dir: str) -> bool:
    cfg = Path(base_dir) / "config.json"
    return cfg.is_file() and "quantization_config" in json.loads(cfg.read_text())


def merge(adapter: str | Path, out: str | Path, from_quantized: bool = False) -> dict[str, Any]:
    """Merge and save; returns the merge.json record."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.models.loader import base_model_dir, load_model

    run = find_run(adapter)
    out = Path(out)
    base_dir = base_model_dir(run.model_cfg)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[run.choices["compute_dtype"]]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # A run on an unquantized base was trained on the original weights: nothing to dequantize.
    use_quantized = (from_quantized or _is_prequantized(base_dir)) and run.choices["quantization"] != "none"
    if use_quantized:
        base = load_model(run.model_cfg, run.choices, device)
        base = base.dequantize()  # bitsandbytes layers -> plain Linear in the compute dtype
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
    merged = merged.to(dtype)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(run.adapter_dir).save_pretrained(tmp)  # with the chat template of training
    record = {"adapter": str(run.adapter_dir), "base": which, "base_model": run.model_cfg.name_or_path,
              "dtype": str(dtype).removeprefix("torch."), "run_dir": str(run.run_dir)}
    (tmp / "merge.json").write_text(json.dumps(record, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="finetune-merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter", help="the adapter directory (outputs/<recipe>/<time>/adapter) or its run directory")
    parser.add_argument("--out", help="where to write the merged model (default: <run dir>/merged)")
    parser.add_argument("--from-quantized", action="store_true",
                        help="merge into the dequantized 4-bit base the adapter was trained on")
    args = parser.parse_args(argv)
    from finetune.quiet import quiet_libraries

    quiet_libraries()
    try:
        run = find_run(args.adapter)
        out = Path(args.out) if args.out else run.run_dir / "merged"
        record = merge(args.adapter, out, from_quantized=args.from_quantized)
    except FinetuneError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(e.exit_code)
    print(f"merged {record['adapter']} into {record['base']}")
    print(f"saved {out} ({record['dtype']}, safetensors): AutoModelForCausalLM.from_pretrained('{out}')")


if __name__ == "__main__":
    main()
