"""Which process am I, and where does my model go? Rank and world size from the launcher
(torchrun / accelerate launch), and each rank's placement of the base model.

One process per GPU: every rank prepares the data and trains; only rank 0 writes the
run directory's reports, talks to MLflow, saves the adapter and evaluates.

Pure (no torch import): the CLI and the preflight import this module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when not launched for several processes."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_leader() -> bool:
    return world()[0] == 0


# What `accelerate launch` with an FSDP config sets (accelerate/utils/launch.py) and what
# accelerate.utils.enable_fsdp_ram_efficient_loading sets: transformers' is_fsdp_enabled()
# (transformers/distributed/fsdp.py) reads both while from_pretrained runs. The Trainer's
# Accelerator sets ACCELERATE_USE_FSDP itself only later, when it is built after the model:
# setting both before loading makes a torchrun launch load as an accelerate launch does, and
# every load of the run (the first and any after an out-of-memory re-plan) load the same way.
FSDP_LOAD_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}


@dataclass(frozen=True)
class Placement:
    """Where one process puts its base model: from_pretrained's ``device_map`` (None: none is
    passed) and the environment variables set before from_pretrained runs."""

    device_map: dict[str, int] | None
    env: dict[str, str] = field(default_factory=dict)


def placement(distributed: str, device: str, local_rank: int = 0, device_count: int = 1) -> Placement:
    """The placement of one rank's base model, for a plan's ``choices.distributed`` ("none", "ddp",
    "fsdp") on `device` ("cuda" or "cpu").

    `local_rank` is the rank's index on its machine (accelerate's ``PartialState().local_process_index``,
    not the global rank: on the second node rank 8 is local rank 0) and `device_count` the CUDA devices
    this process sees. Only meaningful once the process group exists, i.e. after the training
    arguments are built (finetune.train.rank_placement enforces that).

    * CPU: no device_map (bitsandbytes' quantizer keeps the model on the CPU; unquantized loads do).
    * One process, or a DDP rank: the whole (quantized) model on the rank's own GPU,
      ``local_rank % device_count``: the index accelerate's PartialState.set_device gives the rank,
      which is what Accelerator.prepare_model requires of a 4-bit or 8-bit model (it refuses one
      on another device: "loaded in 8-bit or 4-bit precision on a different device").
    * FSDP: no device_map, and the FSDP loading environment (transformers' documented FSDP-QLoRA
      recipe; FSDP then shards the model over the ranks). An unquantized model loads on the CPU
      and FSDP moves its shards to each GPU; a 4-bit model goes where bitsandbytes' quantizer puts
      it (``{"": torch.cuda.current_device()}``), the rank's own GPU once PartialState has set it.
    """
    if device != "cuda":
        return Placement(None)
    if distributed == "fsdp":
        return Placement(None, dict(FSDP_LOAD_ENV))
    if distributed not in ("none", "ddp"):
        raise ValueError(f"unknown choices.distributed {distributed!r}: none, ddp or fsdp")
    if device_count < 1:
        raise ValueError("no CUDA device to place the model on")
    if local_rank < 0:
        raise ValueError(f"local rank {local_rank}: the launcher did not set LOCAL_RANK")
    return Placement({"": local_rank % device_count})


def expected_device(distributed: str, device: str, quantized: bool, local_rank: int = 0,
                    device_count: int = 1) -> str | None:
    """Where a rank's freshly loaded base must be (a device string as ``str(tensor.device)`` prints it), for
    the placement above; None where nothing is checked (Apple's MPS).

    The CPU: there. DDP and one process: the rank's own GPU. FSDP: a quantized base on the rank's own GPU
    (bitsandbytes' quantizer puts it on the current device, which accelerate's PartialState set); an
    unquantized one on the CPU (FSDP moves each rank's shards to its GPU when it wraps the model).
    """
    if device == "cpu":
        return "cpu"
    if device != "cuda":
        return None
    if distributed == "fsdp" and not quantized:
        return "cpu"
    return f"cuda:{local_rank % max(1, device_count)}"


def _is_shard(param) -> bool:
    """An FSDP2 shard: a DTensor (torch.distributed.tensor), told apart without importing torch."""
    return hasattr(param, "device_mesh") and hasattr(param, "placements")


def parameter_devices(model) -> dict[str, int]:
    """Parameter count per device string (a shard counts on its local device)."""
    counts: dict[str, int] = {}
    for _, p in model.named_parameters():
        local = p.to_local() if _is_shard(p) else p
        key = str(local.device)
        counts[key] = counts.get(key, 0) + int(local.numel())
    return counts


def placement_mismatch(model, expected: str, sharded: bool = False) -> str | None:
    """What is wrong with where `model`'s parameters are, in one phrase, or None when every parameter is on
    `expected` (and, with `sharded`, FSDP has sharded the model: after it wraps the model, its parameters are
    shards. Parameters FSDP leaves whole on purpose (accelerate's ignored_params) are allowed; a model with no
    shard at all did not go through FSDP).

    Pure (duck-typed: anything with ``named_parameters()`` whose parameters have ``device`` and ``numel()``), so
    the CPU tests check it with a tiny torch module.
    """
    devices = parameter_devices(model)
    if not devices:
        return "the model has no parameters"
    elsewhere = {d: n for d, n in devices.items() if d != expected}
    if elsewhere:
        where = ", ".join(f"{n:,} on {d}" for d, n in sorted(elsewhere.items()))
        return f"parameters are not on {expected}: {where}"
    if sharded and not any(_is_shard(p) for _, p in model.named_parameters()):
        return "no parameter is an FSDP shard: the model was not sharded, each rank holds all of it"
    return None


def placement_line(rank: int, world_size: int, model, sharded: bool = False) -> str:
    """`rank R/W: device cuda:1, N parameters (...)`: the one line each rank logs once its model is placed."""
    devices = parameter_devices(model)
    total = sum(devices.values())
    where = ", ".join(sorted(devices)) or "none"
    if sharded:
        params = [p for _, p in model.named_parameters()]
        shards = sum(1 for p in params if _is_shard(p))
        what = f"(this rank's FSDP shards: {shards} of {len(params)} tensors sharded)"
    else:
        what = "(the whole model on this rank)"
    return f"rank {rank}/{world_size}: device {where}, {total:,} parameters {what}"
