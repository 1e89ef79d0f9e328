"""An existing adapter to start from (train.init_adapter): SFT, then DPO on the SFT adapter.

The adapter is a local directory here (an MLflow URI is downloaded first, by finetune/tracking/artifacts.py):
an adapter directory (adapter_config.json + weights), or the run directory that holds it as adapter/. What it
says about itself:

* its LoRA shape (rank, alpha, targets, rsLoRA / DoRA), which the new run keeps: training continues those
  weights, so the recipe's ``adapter.*`` give way to it (and the plan counts it);
* the base model it was trained on (the run's config.yaml, else adapter_config.json), which must be the recipe's;
* the MLflow run that trained it (the run's run.json), for the new run's lineage.

No torch here: the preflight reads the shape before planning. ``attached`` (torch, peft) puts a second saved
adapter beside the trained one for the eval stage's comparison.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from finetune.errors import ConfigError

WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
LINEAGE_FILE = "lineage.json"  # in a run directory: the MLflow run ids its init adapter descends from


@dataclass
class InitAdapter:
    spec: str  # as the recipe gave it (a path or an MLflow URI)
    path: Path  # the local adapter directory
    config: dict[str, Any]  # its adapter_config.json
    base_model: str | None = None  # what it was trained on: the run's model.name_or_path, else peft's record
    run_id: str | None = None  # the MLflow run that trained it, when known
    tracking_uri: str | None = None  # where that run is
    lineage: list[str] = field(default_factory=list)  # run ids it descends from, oldest first, itself last

    def adapter_settings(self) -> dict[str, Any]:
        """The recipe's adapter.* keys that reproduce this adapter's shape."""
        c = self.config
        targets = c.get("target_modules") or []
        targets = [targets] if isinstance(targets, str) else sorted(targets)
        # peft saves target_parameters with their module path (mlp.experts.gate_up_proj); adapter.targets
        # names the parameter as the architecture table does (its last part)
        targets += sorted({p.rsplit(".", 1)[-1] for p in c.get("target_parameters") or []})
        return {"rank": int(c["r"]), "alpha": float(c.get("lora_alpha", c["r"])),
                "dropout": float(c.get("lora_dropout") or 0.0), "targets": targets or ["all-linear"],
                "use_rslora": bool(c.get("use_rslora")), "use_dora": bool(c.get("use_dora"))}


def adapter_dir(path: str | Path, key: str = "train.init_adapter") -> Path:
    """The adapter directory at `path`: itself, or a run directory's adapter/; ConfigError (naming `key`, the
    setting or command that gave the path) says what is missing."""
    p = Path(path).expanduser()
    if (p / "adapter" / "adapter_config.json").is_file():
        p = p / "adapter"
    if not p.is_dir():
        raise ConfigError(f"{key}: {path} does not exist (give an adapter directory, the run directory "
                          "that holds adapter/, or an MLflow runs:/ or models:/ URI)")
    if not (p / "adapter_config.json").is_file():
        raise ConfigError(f"{key}: {path} holds no adapter (no adapter_config.json here or in "
                          "adapter/); give the adapter directory of a finished run")
    if not any((p / w).is_file() for w in WEIGHTS):
        raise ConfigError(f"{key}: {p} has adapter_config.json but no weights ({' or '.join(WEIGHTS)}): an "
                          "incomplete adapter; give the adapter/ of a finished run")
    return p.resolve()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def from_directory(path: str | Path, spec: str | None = None) -> InitAdapter:
    """The adapter at `path` with what its run directory (if it is in one) says about it."""
    where = adapter_dir(path)
    config = _read_json(where / "adapter_config.json")
    if config is None or config.get("peft_type") != "LORA" or "r" not in config:
        raise ConfigError(f"train.init_adapter: {where / 'adapter_config.json'} is not a LoRA adapter's config "
                          f"(peft_type {None if config is None else config.get('peft_type')!r}); finetune trains LoRA")
    init = InitAdapter(spec=spec or str(path), path=where, config=config,
                       base_model=config.get("base_model_name_or_path"))
    run_dir = where.parent
    recipe = None
    with contextlib.suppress(OSError, yaml.YAMLError):
        recipe = yaml.safe_load((run_dir / "config.yaml").read_text())
    if isinstance(recipe, dict) and isinstance(recipe.get("model"), dict):
        init.base_model = recipe["model"].get("name_or_path") or init.base_model
    record = _read_json(run_dir / "run.json") or {}
    init.run_id, init.tracking_uri = record.get("run_id"), record.get("tracking_uri")
    ancestors = _read_json(run_dir / LINEAGE_FILE) or {}
    init.lineage = [*ancestors.get("lineage", [])] + ([init.run_id] if init.run_id else [])
    return init


def same_model(init: InitAdapter, model_cfg) -> bool:
    """Was the adapter trained on the recipe's base model? Hub ids compare as given, local paths resolved."""
    if not init.base_model:
        return True  # nothing recorded: peft's load checks the shapes
    from finetune.models.loader import resolve_path

    theirs, ours = init.base_model, model_cfg.name_or_path
    cfg_path = ours
    if theirs == ours:
        return True
    with contextlib.suppress(Exception):
        cfg_path = resolve_path(model_cfg)

    def norm(p: str) -> str:
        q = Path(p).expanduser()
        return str(q.resolve()) if q.exists() else p.rstrip("/")

    return norm(theirs) in {norm(ours), norm(cfg_path)}


@contextlib.contextmanager
def attached(model, path: Path, name: str, quantized: bool):
    """`model` (a PeftModel) computing with the saved adapter at `path` instead of its own, for as long as the
    block lasts; the trained adapter is active again (and its parameters as trainable as before) afterwards."""
    from finetune.models.loader import lora_to_bf16

    active = model.active_adapter
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    model.load_adapter(str(path), adapter_name=name, is_trainable=False, autocast_adapter_dtype=False)
    if quantized:  # computes as it trained (loader.load_with_adapter)
        lora_to_bf16(model, name)
    try:
        model.set_adapter(name)
        yield model
    finally:
        model.set_adapter(active)
        model.delete_adapter(name)
        for n, p in model.named_parameters():
            p.requires_grad_(n in trainable)
