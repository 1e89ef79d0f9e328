"""The train stage: a 4-bit (or 8-bit, or bf16) frozen base, a peft LoRA adapter, TRL's SFTTrainer.

We hand the trainer finished token ids and labels from the data stage
(``skip_prepare_dataset``), so TRL neither re-tokenizes nor silently drops or
truncates rows. We do not call peft's ``prepare_model_for_kbit_training``: it
upcasts every non-quantized parameter to fp32, which makes the hidden states fp32
and costs gigabytes of activations (see preflight/memory.py); TRL enables input
gradients itself when gradient checkpointing is on.

Never losing work (see resume.py, oom.py, finetune/signals.py): checkpoints count
once complete; a run continues from its newest complete checkpoint; a signal stops
after the current step with a checkpoint; an out-of-memory error continues from the
last checkpoint with a smaller plan.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finetune import runs as resume_mod
from finetune.distributed import world
from finetune.errors import ConfigError, DoesNotFitError, EnvError, Interrupted

log = logging.getLogger(__name__)

OPTIMIZERS = {
    "adamw": "adamw_torch",
    "adamw_8bit": "adamw_bnb_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
    "paged_adamw_32bit": "paged_adamw_32bit",
}
@dataclass
class TrainResult:
    adapter_dir: str
    device: str
    steps: int
    epochs: float
    train_loss: float  # mean over this invocation's steps, as the Trainer reports it
    loss_history: list[tuple[int, float]] = field(default_factory=list)  # (step, loss), the whole run
    eval_history: list[tuple[int, float]] = field(default_factory=list)  # (step, eval loss) during training
    # GRPO: the mean reward of each step's completions, the weighted total ("reward") and each function's, by name
    reward_history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    runtime_s: float = 0.0
    tokens_per_s: float = 0.0  # input tokens per second in this invocation (approximate: mean example length)
    peak_memory: dict[str, Any] = field(default_factory=dict)
    world_size: int = 1
    adapter_digest: str = ""  # sha256 of the trained LoRA weights: equal on every DDP rank
    resumed_from_step: int | None = None
    oom_replans: list[dict[str, Any]] = field(default_factory=list)
    choices: dict[str, Any] = field(default_factory=dict)  # the plan choices training ended with

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_world(cfg) -> None:
    """Before any work and before an MLflow run exists: a GPU plan has a GPU (pick_device: exit 5 without
    one), and the launch matches hardware.num_gpus x hardware.num_nodes (the plan splits the effective batch
    over them)."""
    pick_device(cfg)
    _, world_size = world()
    hw = cfg.hardware
    if world_size != hw.world_size:
        nodes = int(os.environ.get("GROUP_WORLD_SIZE", 0)) or hw.num_nodes  # torchrun's node count, when it set one
        if hw.num_nodes > 1 or nodes > 1:
            raise ConfigError(f"hardware.num_nodes={hw.num_nodes} x hardware.num_gpus={hw.num_gpus} is "
                              f"{hw.world_size} processes, but the launcher started {world_size}: set both to the "
                              "launch's --nnodes and --nproc_per_node (make train-multi NODES=N GPUS=G does)")
        raise ConfigError(f"hardware.num_gpus={hw.num_gpus} but the launcher started {world_size} "
                          f"processes: set hardware.num_gpus={world_size} (make train-multi GPUS=N does)")


def pick_device(cfg) -> str:
    import torch

    if cfg.hardware.device.value == "cpu":
        return "cpu"
    if cfg.hardware.device.value == "cuda" and torch.cuda.is_available():
        return "cuda"
    raise EnvError(
        f"hardware={cfg.hardware.name} plans for a CUDA GPU, and none is available here "
        f"(torch {torch.__version__}, cuda {torch.version.cuda}); run on a GPU machine, or set hardware=cpu "
        "(sensible only for the tiny models)"
    )


# What a checkpoint holds besides the adapter, the optimizer state and the tokenizer: trainer_state.json, the
# scheduler, RNG states, training_args.bin, the COMPLETE marker, adapter_config.json (measured on the tiny demo:
# about 30 KB; allowed 1 MiB), and the run's own files beside the checkpoints (config, plan, reports)
_CHECKPOINT_EXTRAS = 1 << 20
_RUN_FILES = 1 << 20


def tokenizer_bytes(tokenizer) -> int:
    """About what saving `tokenizer` writes (tokenizer.json and its config files): each checkpoint and the
    final adapter hold a copy."""
    try:
        size = len(tokenizer.backend_tokenizer.to_str().encode())
    except Exception:  # a slow tokenizer: its vocabulary files are what the model directory ships
        size = 0
        path = getattr(tokenizer, "vocab_file", None)
        if path:
            with contextlib.suppress(OSError):
                size = Path(path).stat().st_size
    return size + len(str(getattr(tokenizer, "chat_template", "") or "").encode()) + (64 << 10)


def checkpoint_bytes(cfg, plan: dict[str, Any], tokenizer_size: int = 0, keep: int | None = None) -> int:
    """What the checkpoints of a run take on disk at most: each holds the adapter, the optimizer state (the
    plan's per-GPU bytes; sharded over the GPUs under FSDP, whole on rank 0 under DDP), the tokenizer
    (`tokenizer_size` bytes) and the trainer's small files; the trainer writes a new one before it deletes the
    oldest of `keep` (train.keep_checkpoints); plus the final adapter with its tokenizer and the run's files.
    Every part is proportional to what is written: a tiny model's checkpoints ask for little."""
    b = plan["breakdown_bytes"]
    gpus = plan["choices"].get("num_gpus", 1) if plan["choices"].get("distributed") == "fsdp" else 1
    adapter = b.get("lora_params", 0) * gpus  # an unpredicted plan (unknown architecture) has no breakdown
    one = adapter + b.get("optimizer_state", 0) * gpus + tokenizer_size + _CHECKPOINT_EXTRAS
    keep = cfg.train.keep_checkpoints if keep is None else keep
    return one * (keep + 1) + adapter + tokenizer_size + _RUN_FILES


def check_checkpoint_space(cfg, plan: dict[str, Any], run_dir: Path, tokenizer_size: int = 0) -> None:
    """Before training: room on the run directory's disk for its checkpoints (exit 5 naming the path and
    the bytes the plan needs), rather than a failed save hours in."""
    from finetune.paths import free_bytes

    needed = checkpoint_bytes(cfg, plan, tokenizer_size)
    free = free_bytes(run_dir)
    if free < needed:
        fewer = ""
        if cfg.train.keep_checkpoints > 1 and checkpoint_bytes(cfg, plan, tokenizer_size, keep=1) <= free:
            fewer = ", lower train.keep_checkpoints (1 would fit)"
        raise EnvError(f"{run_dir}: the run's checkpoints need about {_size(needed)} "
                       f"(train.keep_checkpoints={cfg.train.keep_checkpoints} of adapter + optimizer state + "
                       f"tokenizer) and only {_size(free)} are free there; free some space{fewer}, or point "
                       "hydra.run.dir at a bigger disk")


def _size(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def lora_config(cfg, model_config: dict[str, Any], resolved=None):
    """peft's LoraConfig for `adapter.*` on the model. `resolved` (finetune.architectures.catalog.ResolvedModel,
    from the pipeline) holds the config the preflight planned with: the same layers, and for a traced
    architecture the same spec, not a second derivation from the loaded model's config (`model_config`, the
    fallback when the config could not be read offline)."""
    from peft import LoraConfig

    from finetune.architectures import catalog
    from finetune.architectures.targets import resolve

    resolved = resolved or catalog.resolve_model(cfg.model.name_or_path)
    planned = resolved.config if resolved.config is not None else model_config
    from finetune.probes import Untraceable, spec_of

    try:
        spec = spec_of(planned)
    except Untraceable:
        spec = None  # no picture of its layers: peft's own all-linear, or the module names given
    targets = resolve(spec, list(cfg.adapter.targets), str(planned.get("model_type")))
    # A multimodal checkpoint (Gemma 3 4B-27B loads as Gemma3ForConditionalGeneration) has q/k/v_proj and fc1/2
    # in its vision tower too: text batches never reach it, so LoRA there would only add untrained weights to
    # the adapter (and parameters the plan does not count). peft matches exclude_modules' regex on full names.
    multimodal = "vision_config" in planned or "_vision_config" in planned
    return LoraConfig(
        exclude_modules=r".*\b(vision_tower|vision_model|multi_modal_projector)\b.*" if multimodal else None,
        r=cfg.adapter.rank,
        lora_alpha=cfg.adapter.alpha,
        lora_dropout=cfg.adapter.dropout,
        # peft's own all-linear for an architecture the preflight cannot describe (targets.resolve)
        target_modules="all-linear" if targets.modules == ("all-linear",) else list(targets.modules),
        target_parameters=list(targets.parameters) or None,
        use_rslora=cfg.adapter.use_rslora,
        use_dora=cfg.adapter.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def common_args(cfg, choices: dict[str, Any], output_dir: Path, device: str, has_eval: bool) -> dict[str, Any]:
    """The training arguments every method shares (transformers' TrainingArguments fields): the plan's batch,
    precision, optimizer and checkpointing, the recipe's schedule, checkpoints and evaluation."""
    t = cfg.train
    on_gpu = device == "cuda"
    eval_every = t.eval_steps if (has_eval and t.eval_steps) else None
    keep_best = bool(eval_every and t.keep_best)
    return dict(
        **_fsdp_args(choices),
        output_dir=str(output_dir),
        seed=t.seed,
        data_seed=t.seed,
        max_steps=t.max_steps,
        num_train_epochs=t.epochs,
        per_device_train_batch_size=choices["micro_batch_size"],
        per_device_eval_batch_size=cfg.eval.batch_size,
        gradient_accumulation_steps=choices["gradient_accumulation_steps"],
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler.value,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a share of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=OPTIMIZERS[choices["optimizer"]],
        activation_checkpointing=choices["gradient_checkpointing"],  # transformers 5's name for it
        bf16=on_gpu and choices["compute_dtype"] == "bf16",
        fp16=on_gpu and choices["compute_dtype"] == "fp16",  # with a GradScaler: loss scaling
        use_cpu=not on_gpu,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.keep_checkpoints,
        eval_strategy="steps" if eval_every else "no",
        eval_steps=eval_every,
        load_best_model_at_end=keep_best,
        metric_for_best_model="eval_loss" if keep_best else None,
        greater_is_better=False if keep_best else None,
        report_to="none",
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient on every step
        disable_tqdm=True,  # our rich progress bar replaces tqdm and the per-step log printing
    )


def sft_config(cfg, choices: dict[str, Any], output_dir: Path, device: str, has_eval: bool, packed: bool = False):
    from trl import SFTConfig

    return SFTConfig(
        **common_args(cfg, choices, output_dir, device, has_eval),
        neftune_noise_alpha=cfg.train.neftune_noise_alpha,
        use_liger_kernel=liger_available(device),
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,  # the data stage already enforced dataset.max_seq_len (and counted what it dropped)
        # Rows packed by the data stage (with seq_lengths) train padding-free: position ids restart per example,
        # so no example attends to another (data_prep/packing.py lists the architectures where that is exact).
        packing=packed,
        padding_free=packed,
    )


def liger_available(device: str) -> bool:
    """Liger's fused kernels (RMSNorm, RoPE, SwiGLU) apply when the package is installed and we train on
    CUDA; TRL keeps its own fused LM head and turns Liger's cross-entropy off."""
    import importlib.util

    return device == "cuda" and importlib.util.find_spec("liger_kernel") is not None


def _fsdp_args(choices: dict[str, Any]) -> dict[str, Any]:
    """FSDP with QLoRA, when the plan shards the frozen weights (a model too big for one card).

    FSDP2 (transformers 5's default; its FSDP1 is deprecated), fully sharded (reshard after
    forward), each decoder layer wrapped (transformers' _no_split_modules), and
    cpu_ram_efficient_loading; the 4-bit weights are stored in the compute dtype
    (models/loader.py) so that FSDP can shard them with the rest, and the model is loaded with no
    device_map under the FSDP loading environment (finetune.distributed.placement).

    What the stack really does (transformers 5.24, accelerate 1.16): every rank still reads the
    checkpoint and quantizes the whole model on its own GPU before FSDP shards it. transformers'
    loader has no rank-0-only path for a quantized model (modeling_utils: is_fsdp_enabled() only
    changes how non-zero ranks initialize missing keys), and accelerate's fsdp2_prepare_model
    skips cpu_ram_efficient_loading for a model with Params4bit ("bypassing the move to meta will
    still cause the VRAM spike"); the setting takes effect for unquantized FSDP plans.
    Not yet verified on GPUs: accelerate enables FSDP only on accelerators, so the CPU tests
    run DDP (see README).
    """
    if choices.get("distributed") != "fsdp":
        return {}
    return {
        "fsdp": True,
        "fsdp_config": {"version": 2, "reshard_after_forward": True, "cpu_ram_efficient_loading": True},
    }


def rank_placement(choices: dict[str, Any], device: str, args):
    """Where this rank's base model goes (finetune.distributed.placement), from the process that the
    training arguments `args` set up: building them starts accelerate's PartialState, which starts
    the process group and sets this rank's CUDA device. Loading the model before that would put
    every rank's model on GPU 0."""
    import torch

    from finetune.distributed import placement

    distributed = choices.get("distributed", "none")
    if distributed != "none" and not torch.distributed.is_initialized():
        raise RuntimeError("the training arguments must be built (which starts the process group) before the "
                           f"model of a {distributed} plan is placed")
    on_gpu = device == "cuda"
    return placement(distributed, device, args.local_process_index, torch.cuda.device_count() if on_gpu else 1)


def check_rank_placement(model, choices: dict[str, Any], device: str, local_rank: int, sharded: bool = False) -> None:
    """Multi-GPU QLoRA never silently runs on one GPU: each rank checks that its model is where its placement put
    it (finetune.distributed.expected_device: DDP on cuda:LOCAL_RANK; FSDP after wrapping, its own shards), logs
    one line, and stops with an EnvError (one line) when it is not (e.g. every rank on cuda:0)."""
    import torch

    from finetune.distributed import expected_device, placement_line, placement_mismatch

    rank, world_size = world()
    count = torch.cuda.device_count() if device == "cuda" else 1
    quantized = choices.get("quantization", "none") != "none"
    expected = expected_device("fsdp" if sharded else choices.get("distributed", "none"), device,
                               quantized or sharded, local_rank, count)
    if expected is None:
        return
    log.info(placement_line(rank, world_size, model, sharded))
    problem = placement_mismatch(model, expected, sharded)
    if problem:
        raise EnvError(f"rank {rank}/{world_size} ({choices.get('distributed', 'none')} plan): {problem}, the "
                       f"device this rank was given; launch one process per GPU with torchrun (make train-multi) "
                       "and do not narrow CUDA_VISIBLE_DEVICES to one GPU for all ranks")


def _placement_callback(choices: dict[str, Any], device: str, local_rank: int):
    """FSDP: the same check once the Trainer has wrapped (sharded) the model, at the start of training."""
    from transformers import TrainerCallback

    class PlacementCheck(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is not None:
                check_rank_placement(model, choices, device, local_rank, sharded=True)

    return PlacementCheck()


def _peak_memory(device: str) -> dict[str, Any]:
    if device == "cuda":
        import torch

        return {"device": torch.cuda.get_device_name(), "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
                "peak_reserved_bytes": torch.cuda.max_memory_reserved()}
    import resource

    # ru_maxrss is in KiB on Linux: the process's peak resident memory, not comparable with a GPU plan.
    return {"device": "cpu", "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def adapter_digest(model) -> str:
    """sha256 over the trainable (LoRA) weights, in name order."""
    h = hashlib.sha256()
    for name, param in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
        h.update(name.encode())
        h.update(param.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def save_adapter(model, tokenizer, target: Path) -> Path:
    """Write the adapter (peft format, safetensors) with the tokenizer and its chat template,
    into a temporary directory renamed into place: a crash never leaves a half-written adapter."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    from data_prep.templates import write_generation_config

    # generation_config.json beside it: every stop (EOS and the template's end-of-turn token) and the pad
    write_generation_config(tokenizer, tmp, getattr(model, "generation_config", None))
    from finetune.paths import apply_umask

    apply_umask(tmp)  # safetensors' atomic save writes the weights 0600: the user's umask instead, like the rest
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def fix_trainable_dtype(model, compute_dtype: str) -> None:
    """fp16 compute (cards without bf16): TRL has cast the LoRA weights to bf16, which those cards
    cannot compute in and which a GradScaler cannot unscale; keep fp32 master weights instead."""
    if compute_dtype != "fp16":
        return
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower() and isinstance(
        exc, RuntimeError)


@contextlib.contextmanager
def _keep_dtypes(model):
    dtypes = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    yield
    for name, param in model.named_parameters():
        if name in dtypes and param.dtype != dtypes[name]:
            param.data = param.data.to(dtypes[name])


def _trainer_class(base=None):
    if base is None:
        from trl import SFTTrainer as base

    class Trainer(base):
        """TRL's trainer (SFTTrainer, or a preference method's) that resumes a checkpoint in the precision it was
        trained in.

        Resuming calls peft's ``load_adapter``, which upcasts the adapter's bf16 weights (TRL's
        choice for a quantized base) to fp32: the resumed run would then compute differently
        from the uninterrupted one (and its optimizer states would change dtype). Keep each
        trainable parameter's dtype across the load. tests/test_train.py checks that a resumed
        run matches an uninterrupted one.
        """

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            with _keep_dtypes(model if model is not None else self.model):
                super()._load_from_checkpoint(resume_from_checkpoint, model)

        def _load_best_model(self):  # train.keep_best: the same load, the same upcast
            with _keep_dtypes(self.model):
                super()._load_best_model()

    return Trainer


def reward_history(logs: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """GRPO's per-step rewards from the Trainer's log history (TRL logs `reward`, the weighted total, and
    `rewards/<function>/mean`): {"reward": [(step, mean)], "<function>": [...]}; {} for the other methods."""
    out: dict[str, list[tuple[int, float]]] = {}
    for entry in logs:
        if "step" not in entry:
            continue
        for key, value in entry.items():
            name = "reward" if key == "reward" else (
                key.removeprefix("rewards/").removesuffix("/mean") if key.startswith("rewards/")
                and key.endswith("/mean") else None)
            if name is not None and isinstance(value, int | float):
                out.setdefault(name, []).append((int(entry["step"]), float(value)))
    return out


def with_init_adapter(cfg, model, path: Path):
    """The base `model` wrapped with the saved adapter at `path`, trainable (train.init_adapter).

    For DPO and KTO, TRL then copies it as a frozen adapter named "ref" and computes the reference with it (the
    model the preference is measured against is the one training started from, not the bare base); the copy
    is dropped before the adapter is saved (train())."""
    from peft import PeftConfig, PeftModel

    from finetune.models import experts

    config = PeftConfig.from_pretrained(str(path))
    experts.register_lora(config, model)
    try:
        return PeftModel.from_pretrained(model, str(path), config=config, is_trainable=True)
    except (RuntimeError, ValueError, KeyError) as e:  # shapes or module names of another architecture
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ConfigError(f"train.init_adapter: {path} does not fit {cfg.model.name_or_path} ({first}); give an "
                          "adapter trained on this base model") from e


def drop_reference_adapter(model) -> None:
    """TRL's frozen "ref" copy of an init adapter (DPO / KTO): not part of what was trained."""
    config = getattr(model, "peft_config", None)
    if isinstance(config, dict) and "ref" in config and len(config) > 1:
        model.delete_adapter("ref")


class _Attempt:
    """One trainer over one plan's choices (rebuilt after an out-of-memory error)."""

    def __init__(self, cfg, choices, data, tokenizer, run_dir: Path, device: str, tracker, stop,
                 init_adapter: Path | None = None, resolved=None, params_total: int | None = None):
        from transformers import EarlyStoppingCallback
        from transformers.trainer_callback import PrinterCallback

        from finetune.models import experts
        from finetune.models.loader import load_model
        from finetune.train.callbacks import (
            CheckpointMarkerCallback,
            MetricsCallback,
            RichProgressCallback,
            StopOnSignalCallback,
        )

        # The training arguments before the model: building them starts the process group and sets this
        # rank's device, which decide where this rank's model goes (rank_placement).
        extra: dict[str, Any] = {}
        if cfg.preference or cfg.grpo:  # DPO / ORPO / KTO / SimPO / GRPO: TRL's trainer for it (finetune/methods.py)
            from finetune import methods

            train_ds, eval_ds = methods.datasets(cfg, data)
            args = methods.training_args(cfg, common_args(cfg, choices, run_dir / resume_mod.CHECKPOINTS, device,
                                                          has_eval=eval_ds is not None), choices)
            trainer_class = _trainer_class(methods.trainer_base(cfg.train.method.value))
            if cfg.grpo:  # the recipe's reward functions, checked before anything loaded (finetune/rewards.py)
                from finetune import rewards

                extra["reward_funcs"] = rewards.trl_functions(rewards.build(cfg.reward, tokenizer))
        else:
            train_ds = data.to_dataset("train")  # memory-mapped Arrow from the data stage (packed rows when packed)
            eval_ds = data.to_dataset("eval") if len(data.eval) else None
            args = sft_config(cfg, choices, run_dir / resume_mod.CHECKPOINTS, device, has_eval=eval_ds is not None,
                              packed=data.packed)
            trainer_class = _trainer_class()
        self.placement = rank_placement(choices, device, args)
        # params_total: the plan's count sizes the disk check before a download (traced families too)
        model = load_model(cfg.model, choices, device, placement=self.placement, params_total=params_total)
        if choices.get("distributed") != "fsdp":  # FSDP: checked once wrapped (a rank may load onto meta first)
            check_rank_placement(model, choices, device, args.local_process_index)
        if init_adapter is not None:  # train.init_adapter: continue those weights (TRL trains a PeftModel as given)
            model, peft_config = with_init_adapter(cfg, model, init_adapter), None
        else:
            peft_config = lora_config(cfg, model.config.to_dict(), resolved)
            experts.register_lora(peft_config, model)  # LoRA on 4-bit / 8-bit experts (finetune/models/experts.py)
        self.metrics = MetricsCallback(tracker)
        self.progress = RichProgressCallback()
        callbacks = [self.metrics, self.progress, CheckpointMarkerCallback(), StopOnSignalCallback(stop)]
        if choices.get("distributed") == "fsdp" and device == "cuda":
            callbacks.append(_placement_callback(choices, device, args.local_process_index))
        if args.load_best_model_at_end and cfg.train.early_stopping_patience:
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.train.early_stopping_patience))
        self.trainer = trainer_class(
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds if args.eval_strategy != "no" else None,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=callbacks,
            **extra,
        )
        self.trainer.remove_callback(PrinterCallback)
        fix_trainable_dtype(self.trainer.model, choices["compute_dtype"])

    def save_after_oom(self) -> Path | None:
        """Checkpoint the last completed optimizer step after an OOM inside the next one.

        The parameters, optimizer and scheduler are still those of step N (only this step's
        partial gradients are lost, and they are not saved), so checkpoint-N is a true
        checkpoint. Trainer._save_checkpoint is private API; tests/test_train.py holds it to
        this behaviour."""
        trainer = self.trainer
        step = trainer.state.global_step
        if step == 0 or not trainer.args.should_save:
            return None
        target = Path(trainer.args.output_dir) / f"checkpoint-{step}"
        if (target / resume_mod.COMPLETE).is_file():
            return target
        trainer.model.zero_grad(set_to_none=True)
        trainer._save_checkpoint(trainer.model, trial=None)
        resume_mod.mark_complete(target)
        return target

    def release(self) -> None:
        """Drop every reference this attempt holds to its model, optimizer and scheduler, so that they
        can be freed before the next plan's model is loaded (the caller drops the attempt itself).

        The Trainer keeps them in itself (model, model_wrapped: the DDP/FSDP wrapper, optimizer,
        lr_scheduler), in its callback handler, and in its Accelerator (_models, _optimizers,
        _schedulers, _dataloaders: cleared by Accelerator.free_memory, which accelerate documents for
        "between two trainings with different models/optimizers")."""
        trainer = self.trainer
        if trainer is None:
            return
        self.trainer = None
        self.progress.close()  # on_train_end never came: stop the live progress bar
        trainer.accelerator.free_memory()
        for holder in (trainer, trainer.callback_handler):
            for name in ("model", "model_wrapped", "deepspeed", "optimizer", "lr_scheduler"):
                if hasattr(holder, name):
                    setattr(holder, name, None)


def _free_device_memory() -> None:
    """gc, then give the CUDA caching allocator's free blocks back (accelerate's release_memory:
    gc.collect and clear_device_cache, torch.cuda.empty_cache where CUDA is the backend)."""
    from accelerate.utils import release_memory

    release_memory()


def _record_replan_in_plan(run_dir: Path, choices: dict[str, Any], step: int) -> None:
    """plan.json follows the plan in use, so that a resumed run starts with the plan that fits."""
    path = run_dir / "plan.json"
    if not path.is_file():
        return
    plan = json.loads(path.read_text())
    plan["choices"] = choices
    plan["explanation"].append(
        f"re-planned after running out of memory at step {step}: micro-batch {choices['micro_batch_size']} x "
        f"{choices['gradient_accumulation_steps']}, checkpointing {'on' if choices['gradient_checkpointing'] else 'off'}"
        " (the prediction above is for the first plan)")
    path.write_text(json.dumps(plan, indent=2) + "\n")


def train(cfg, plan, data, tokenizer, run_dir: Path, tracker=None, resume_point=None,
          init_adapter: Path | None = None, resolved=None):
    """Train the adapter in `run_dir`; returns (TrainResult, the trained peft model).

    `plan` is the Plan (or its dict); `resume_point` (finetune/runs.py) continues a checkpoint; `init_adapter`
    (a local adapter directory: train.init_adapter resolved by the pipeline) is the adapter training starts from;
    `resolved` (finetune.architectures.catalog.ResolvedModel) is the model as the pipeline resolved it.
    """
    import torch

    from finetune.signals import GracefulStop
    from finetune.train.oom import next_plan

    device = pick_device(cfg)
    rank, world_size = world()
    plan_dict = plan if isinstance(plan, dict) else plan.to_dict()
    choices = dict(plan_dict["choices"])
    check_world(cfg)
    if rank == 0:
        check_checkpoint_space(cfg, plan_dict, run_dir, tokenizer_bytes(tokenizer))
    checkpoint = str(resume_point.checkpoint) if resume_point is not None else None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    tried: list[dict[str, Any]] = [choices]
    replans: list[dict[str, Any]] = []
    started = time.perf_counter()
    stop = GracefulStop()
    while True:
        log.info("training %s (%s, micro-batch %d x %d%s) on %s%s", cfg.model.name_or_path,
                 choices["quantization"], choices["micro_batch_size"], choices["gradient_accumulation_steps"],
                 ", checkpointing" if choices["gradient_checkpointing"] else "", device,
                 f", from {checkpoint}" if checkpoint else "")
        attempt = _Attempt(cfg, choices, data, tokenizer, run_dir, device, tracker, stop, init_adapter, resolved,
                           (plan_dict.get("model") or {}).get("params_total"))
        try:
            with stop:  # a signal now stops after the current step, with a checkpoint
                output = attempt.trainer.train(resume_from_checkpoint=checkpoint)
            break
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not _is_oom(exc):
                raise
            # Only the message is kept: the exception's traceback holds the frames of the failed step,
            # and with them the model, the batch and its activations.
            error = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:500]
        finally:
            attempt.metrics.flush()  # whatever happened, MLflow gets the steps that were done
        # Out of memory, handled outside the except block (the exception is gone by now).
        step = attempt.trainer.state.global_step
        saved = attempt.save_after_oom()
        new = next_plan(plan_dict, choices, tried)
        event = {"step": step, "error": error, "failed": choices, "next": new,
                 "checkpoint": str(saved) if saved else None}
        replans.append(event)
        # Free this plan's model, optimizer state and activations before the next plan's base loads
        # (on a GPU, loading it beside them would run out of memory again).
        attempt.release()
        attempt = None
        _free_device_memory()
        if tracker is not None:
            tracker.record_replan(len(replans), event)
        if new is None:
            raise DoesNotFitError(
                f"out of memory at step {step} with the smallest plan left ({choices['quantization']}, "
                f"micro-batch {choices['micro_batch_size']}, checkpointing "
                f"{'on' if choices['gradient_checkpointing'] else 'off'}); lower dataset.max_seq_len or "
                "use a bigger card. Progress is kept: "
                + (f"{saved} holds step {step}" if saved else "no step had completed")
            )
        log.warning("out of memory at step %d: continuing with micro-batch %d x %d%s", step,
                    new["micro_batch_size"], new["gradient_accumulation_steps"],
                    ", checkpointing" if new["gradient_checkpointing"] else "")
        choices = new
        tried.append(new)
        if rank == 0:
            _record_replan_in_plan(run_dir, new, step)
        completed = resume_mod.complete_checkpoints(run_dir)
        checkpoint = str(completed[-1][1]) if completed else None

    trainer = attempt.trainer
    if stop.signum is not None:
        done = resume_mod.complete_checkpoints(run_dir)
        where = f"{done[-1][1]} (step {done[-1][0]})" if done else "no checkpoint"
        raise Interrupted(f"interrupted: saved {where}; run the same command again to continue "
                          "(train.resume=auto)", stop.signum)
    runtime = time.perf_counter() - started

    model = trainer.model
    drop_reference_adapter(model)
    digest = adapter_digest(model)
    adapter_dir = run_dir / "adapter"
    if trainer.args.should_save:
        save_adapter(model, tokenizer, adapter_dir)
    logs = trainer.state.log_history
    history = [(int(e["step"]), float(e["loss"])) for e in logs if "loss" in e and "step" in e]
    evals = [(int(e["step"]), float(e["eval_loss"])) for e in logs if "eval_loss" in e and "step" in e]
    # Tokens this invocation fed through the model (all input tokens, the usual throughput measure),
    # from the data report's statistics (a packed row holds efficiency x max_seq_len tokens).
    report = data.report
    rewards = reward_history(logs)
    if data.packed:
        mean_tokens = report.packing.efficiency * cfg.dataset.max_seq_len
    elif cfg.grpo:  # a prompt and its sampled completion (TRL logs the completions' mean length per step)
        lengths = [float(e["completions/mean_length"]) for e in logs if "completions/mean_length" in e]
        mean_tokens = (report.tokens.mean or 0.0) + (sum(lengths) / len(lengths) if lengths else 0.0)
    else:
        mean_tokens = report.tokens.mean or report.tokens.total / max(report.rows_kept, 1)
    steps_run = trainer.state.global_step - (resume_point.step if resume_point is not None else 0)
    tokens = steps_run * choices["micro_batch_size"] * choices["gradient_accumulation_steps"] * world_size * mean_tokens
    result = TrainResult(
        adapter_dir=str(adapter_dir),
        device=device,
        steps=trainer.state.global_step,
        epochs=float(output.metrics.get("epoch", 0.0)),
        train_loss=float(output.training_loss),
        loss_history=history,
        eval_history=evals,
        reward_history=rewards,
        runtime_s=runtime,
        tokens_per_s=tokens / runtime if runtime > 0 else 0.0,
        peak_memory=_peak_memory(device),
        world_size=world_size,
        adapter_digest=digest,
        resumed_from_step=resume_point.step if resume_point is not None else None,
        oom_replans=replans,
        choices=choices,
    )
    if rank != 0:
        (run_dir / f"train_rank{rank}.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result, model
