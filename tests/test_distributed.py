"""Where each rank of a multi-GPU run puts its base model, checked on the CPU.

The placement is one pure function (finetune.distributed.placement); the train stage asks it only
once the training arguments have started the process group (finetune.train.rank_placement). The
two-process test runs this file under torchrun on gloo, as tests/test_train.py's DDP test runs the
CLI: real accelerate PartialState, real SFTConfig, real bitsandbytes 4-bit loading; only the number
of CUDA devices is faked, since the machine has none.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.distributed import (
    FSDP_LOAD_ENV,
    Placement,
    expected_device,
    placement,
    placement_line,
    placement_mismatch,
)

CHOICES = {"quantization": "nf4", "double_quant": True, "compute_dtype": "bf16", "gradient_checkpointing": True,
           "micro_batch_size": 2, "gradient_accumulation_steps": 2, "max_seq_len": 256, "optimizer": "adamw",
           "attention": "sdpa", "num_gpus": 2, "distributed": "ddp"}


def test_each_rank_gets_its_own_device_or_none_for_fsdp():
    # One process: the current device.
    assert placement("none", "cuda", 0, 1) == Placement({"": 0})
    assert placement("none", "cuda", 3, 4) == Placement({"": 3})
    # DDP: local rank r on GPU r (accelerate's PartialState.set_device: local_process_index % device_count),
    # also when the launcher shows each rank one GPU only (CUDA_VISIBLE_DEVICES per rank).
    assert [placement("ddp", "cuda", r, 4).device_map for r in range(4)] == [{"": r} for r in range(4)]
    assert [placement("ddp", "cuda", r, 1).device_map for r in range(2)] == [{"": 0}, {"": 0}]
    # FSDP: no device_map (transformers' FSDP-QLoRA recipe), loaded under the FSDP loading environment.
    for rank in range(2):
        fsdp = placement("fsdp", "cuda", rank, 2)
        assert fsdp.device_map is None
        assert fsdp.env == {"ACCELERATE_USE_FSDP": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}
    # The CPU: bitsandbytes keeps the model there, whatever the plan.
    assert all(placement(d, "cpu", 1, 1) == Placement(None) for d in ("none", "ddp", "fsdp"))
    with pytest.raises(ValueError):
        placement("zero3", "cuda", 0, 1)
    with pytest.raises(ValueError):
        placement("ddp", "cuda", 0, 0)
    with pytest.raises(ValueError):
        placement("ddp", "cuda", -1, 2)


class _Param:
    """A parameter as the placement check sees it: a device and a size (a CUDA tensor without a GPU)."""

    def __init__(self, device: str, numel: int, shard: bool = False):
        self.device, self._numel = device, numel
        if shard:  # what a DTensor has
            self.device_mesh, self.placements = object(), ("Shard(0)",)

    def numel(self) -> int:
        return self._numel

    def to_local(self):
        return _Param(self.device, self._numel // 2)


class _Model:
    def __init__(self, *params: _Param):
        self.params = params

    def named_parameters(self):
        return ((f"layer{i}.weight", p) for i, p in enumerate(self.params))


def test_each_rank_expects_its_model_on_its_own_device():
    assert [expected_device("ddp", "cuda", True, r, 4) for r in range(4)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert expected_device("ddp", "cuda", True, 1, 1) == "cuda:0"  # one visible GPU per rank
    assert expected_device("fsdp", "cuda", True, 1, 2) == "cuda:1"  # bitsandbytes quantizes on the rank's GPU
    assert expected_device("fsdp", "cuda", False, 1, 2) == "cpu"  # FSDP moves the 16-bit shards later
    assert expected_device("ddp", "cpu", True, 1, 1) == "cpu" and expected_device("none", "mps", False) is None


def test_the_placement_check_finds_a_model_on_the_wrong_device():
    import torch

    tiny = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    n = sum(p.numel() for p in tiny.parameters())
    assert placement_mismatch(tiny, "cpu") is None
    problem = placement_mismatch(tiny, "cuda:1")
    assert problem == f"parameters are not on cuda:1: {n:,} on cpu"
    assert placement_line(1, 2, tiny) == f"rank 1/2: device cpu, {n:,} parameters (the whole model on this rank)"
    with torch.device("meta"):
        lost = torch.nn.Linear(4, 8)
    assert "on meta" in placement_mismatch(lost, "cpu")
    # the failure this guards against: every rank's model on the first GPU
    on_first = _Model(_Param("cuda:0", 100), _Param("cuda:0", 20))
    assert placement_mismatch(on_first, "cuda:0") is None
    assert placement_mismatch(on_first, "cuda:1") == "parameters are not on cuda:1: 120 on cuda:0"
    split = _Model(_Param("cuda:1", 100), _Param("cuda:0", 20))
    assert placement_mismatch(split, "cuda:1") == "parameters are not on cuda:1: 20 on cuda:0"
    # FSDP, after wrapping: shards on the rank's GPU; a model FSDP never sharded is refused
    shards = _Model(_Param("cuda:1", 100, shard=True), _Param("cuda:1", 20, shard=True))
    assert placement_mismatch(shards, "cuda:1", sharded=True) is None
    assert placement_line(1, 2, shards, sharded=True) == ("rank 1/2: device cuda:1, 60 parameters (this rank's FSDP "
                                                          "shards: 2 of 2 tensors sharded)")
    assert "not sharded" in placement_mismatch(on_first, "cuda:0", sharded=True)
    assert placement_mismatch(_Model(), "cpu") == "the model has no parameters"


def test_a_rank_whose_model_is_elsewhere_stops_in_one_line(monkeypatch):
    import torch

    from finetune.errors import EnvError
    from finetune.train import check_rank_placement

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ddp = dict(CHOICES, distributed="ddp")
    check_rank_placement(torch.nn.Linear(4, 4), ddp, "cpu", 1)  # on the CPU the model stays there: fine
    with torch.device("meta"):
        misplaced = torch.nn.Linear(4, 4)
    with pytest.raises(EnvError) as info:
        check_rank_placement(misplaced, ddp, "cpu", 1)
    message = str(info.value)
    assert message.startswith("rank 1/2 (ddp plan): parameters are not on cpu: 20 on meta") and "\n" not in message
    assert info.value.exit_code != 0


def test_an_fsdp_plan_trains_with_fsdp2_loading_on_rank_0(tmp_path, monkeypatch):
    import torch

    from finetune.config import compose
    from finetune.models.loader import quantization_config
    from finetune.train import sft_config

    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")  # restored after the test
    fsdp = dict(CHOICES, distributed="fsdp")
    args = sft_config(compose(["+recipe=tiny-demo", "hardware.num_gpus=2"]), fsdp, tmp_path, "cpu", has_eval=False)
    assert args.fsdp is True
    plugin = args.fsdp_plugin_args
    assert plugin["fsdp_version"] == 2 and plugin["reshard_after_forward"] is True
    assert plugin["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and plugin["cpu_ram_efficient_loading"] is True
    assert os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"
    # The 4-bit weights are stored in the dtype of everything else, so FSDP can shard them with it.
    assert quantization_config(fsdp).bnb_4bit_quant_storage == torch.bfloat16
    assert quantization_config(CHOICES).bnb_4bit_quant_storage == torch.uint8


@pytest.mark.slow
def test_ranks_place_their_models_once_the_process_group_exists(tmp_path):
    """torchrun, 2 gloo processes: what each rank would use for DDP and FSDP plans on 2 GPUs."""
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", __file__, str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, got in enumerate(ranks):
        assert got["before_args"] == "refused", "a distributed plan is never placed before the process group exists"
        assert got["process_group"] == {"backend": "gloo", "world_size": 2, "rank": r, "local_rank": r}
        assert got["ddp"] == {"device_map": {"": r}, "env": {}}, "each DDP rank on its own GPU"
        assert got["ddp_one_visible_gpu"] == {"device_map": {"": 0}, "env": {}}
        assert got["fsdp"] == {"device_map": None, "env": FSDP_LOAD_ENV}
        # Loaded under the FSDP environment, transformers sees an FSDP load, with rank 0 as the local leader.
        assert got["fsdp_load"]["is_fsdp_enabled"] is True
        assert got["fsdp_load"]["is_local_dist_rank_0"] is (r == 0)
    # A non-zero rank's 4-bit model (weights, quantization state, buffers) is rank 0's: the FSDP loading
    # path leaves nothing uninitialized on it.
    assert ranks[0]["fsdp_load"]["digest"] == ranks[1]["fsdp_load"]["digest"]


def _digest(model) -> str:
    import torch

    h = hashlib.sha256()
    tensors = dict(model.state_dict())
    tensors.update({f"buffer:{n}": b for n, b in model.named_buffers()})
    for name in sorted(tensors):
        t = tensors[name]
        if isinstance(t, torch.Tensor):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _as_json(p: Placement) -> dict:
    return {"device_map": p.device_map, "env": p.env}


def _rank_main(out: Path) -> None:
    """One torchrun rank: the placements it would use on 2 GPUs, and a load under the FSDP environment."""
    import torch
    import torch.distributed as dist

    from finetune.config import compose
    from finetune.models.loader import load_model
    from finetune.train import rank_placement, sft_config

    cfg = compose(["+recipe=tiny-demo", "hardware.num_gpus=2"])
    ddp, fsdp = dict(CHOICES, distributed="ddp"), dict(CHOICES, distributed="fsdp")
    got: dict = {}
    try:
        rank_placement(ddp, "cuda", None)
        got["before_args"] = "placed"
    except RuntimeError:
        got["before_args"] = "refused"
    # Building the training arguments starts accelerate's PartialState: on the CPU, gloo.
    args = sft_config(cfg, ddp, out / f"checkpoints{os.environ['RANK']}", "cpu", has_eval=False)
    got["process_group"] = {"backend": dist.get_backend(), "world_size": dist.get_world_size(),
                            "rank": dist.get_rank(), "local_rank": args.local_process_index}
    torch.cuda.device_count = lambda: 2  # a two-GPU machine, as far as the placement can tell
    got["ddp"] = _as_json(rank_placement(ddp, "cuda", args))
    got["fsdp"] = _as_json(rank_placement(fsdp, "cuda", args))
    torch.cuda.device_count = lambda: 1  # the launcher shows each rank one GPU
    got["ddp_one_visible_gpu"] = _as_json(rank_placement(ddp, "cuda", args))

    from transformers.distributed.fsdp import is_fsdp_enabled
    from transformers.distributed.utils import is_local_dist_rank_0

    cpu_fsdp = dict(fsdp, compute_dtype="fp32")  # bf16 4-bit compute is slow on the CPU; the path is the same
    model = load_model(cfg.model, cpu_fsdp, "cpu", placement=placement("fsdp", "cuda", args.local_process_index, 2))
    got["fsdp_load"] = {"is_fsdp_enabled": is_fsdp_enabled(), "is_local_dist_rank_0": is_local_dist_rank_0(),
                        "digest": _digest(model)}
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(got))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _rank_main(Path(sys.argv[1]))
