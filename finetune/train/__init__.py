"""The train stage: a 4-bit (or 8-bit, or bf16) frozen base, a peft LoRA adapter, TRL's SFTTrainer.

We hand the trainer finished token ids and labels from the data stage
(``skip_prepare_dataset``), so TRL neither re-tokenizes nor silently drops or
truncates rows. We do not call peft's ``prepare_model_for_kbit_training``: it
upcasts every non-quantized parameter to fp32, which makes the hidden states fp32
and costs gigabytes of activations (see preflight/memory.py); TRL enables input
gradients itself when gradient checkpointing is on.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finetune.errors import EnvError

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
    train_loss: float  # mean over the run, as the Trainer reports it
    loss_history: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) per logged step
    runtime_s: float = 0.0
    trained_tokens_per_s: float = 0.0
    peak_memory: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def lora_config(cfg):
    from peft import LoraConfig

    targets = list(cfg.adapter.targets)
    return LoraConfig(
        r=cfg.adapter.rank,
        lora_alpha=cfg.adapter.alpha,
        lora_dropout=cfg.adapter.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        bias="none",
        task_type="CAUSAL_LM",
    )


def sft_config(cfg, choices: dict[str, Any], output_dir: Path, device: str, has_eval: bool, packed: bool = False):
    from trl import SFTConfig

    t = cfg.train
    on_gpu = device == "cuda"
    eval_every = t.eval_steps if (has_eval and t.eval_steps) else None
    return SFTConfig(
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
        fp16=on_gpu and choices["compute_dtype"] == "fp16",
        use_cpu=not on_gpu,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        eval_strategy="steps" if eval_every else "no",
        eval_steps=eval_every,
        report_to="none",
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,  # the data stage already enforced dataset.max_seq_len (and counted what it dropped)
        # Rows packed by the data stage (with seq_lengths) train padding-free: position ids restart per example,
        # so no example attends to another (data_prep/packing.py lists the architectures where that is exact).
        packing=packed,
        padding_free=packed,
        dataloader_num_workers=0,
        disable_tqdm=True,  # our rich progress bar replaces tqdm and the per-step log printing
    )


def _peak_memory(device: str) -> dict[str, Any]:
    if device == "cuda":
        import torch

        return {"device": torch.cuda.get_device_name(), "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
                "peak_reserved_bytes": torch.cuda.max_memory_reserved()}
    import resource

    # ru_maxrss is in KiB on Linux: the process's peak resident memory, not comparable with a GPU plan.
    return {"device": "cpu", "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def save_adapter(model, tokenizer, target: Path) -> Path:
    """Write the adapter (peft format, safetensors) with the tokenizer and its chat template,
    into a temporary directory renamed into place: a crash never leaves a half-written adapter."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def train(cfg, plan, data, tokenizer, run_dir: Path, tracker=None):
    """Train the adapter; returns (TrainResult, the trained peft model)."""
    import torch
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer

    from finetune.models.loader import load_model
    from finetune.train.callbacks import MetricsCallback, RichProgressCallback

    device = pick_device(cfg)
    choices = plan.choices
    log.info("loading %s (%s) on %s", cfg.model.name_or_path, choices["quantization"], device)
    model = load_model(cfg.model, choices, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    train_ds = data.to_dataset("train")  # memory-mapped Arrow from the data stage (packed rows when data.packed)
    eval_ds = data.to_dataset("eval") if len(data.eval) else None
    args = sft_config(cfg, choices, run_dir / "checkpoints", device, has_eval=eval_ds is not None,
                      packed=data.packed)
    metrics_cb = MetricsCallback(tracker)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds if args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        peft_config=lora_config(cfg),
        callbacks=[metrics_cb, RichProgressCallback()],
    )
    trainer.remove_callback(PrinterCallback)
    started = time.perf_counter()
    output = trainer.train()
    runtime = time.perf_counter() - started

    adapter_dir = save_adapter(trainer.model, tokenizer, run_dir / "adapter")
    trained_tokens = float(trainer.state.num_input_tokens_seen or 0) or sum(
        sum(1 for t in ex.labels if t != -100) for ex in data.train) * output.metrics.get("epoch", 1.0)
    result = TrainResult(
        adapter_dir=str(adapter_dir),
        device=device,
        steps=trainer.state.global_step,
        epochs=float(output.metrics.get("epoch", 0.0)),
        train_loss=float(output.training_loss),
        loss_history=metrics_cb.loss_history,
        runtime_s=runtime,
        trained_tokens_per_s=trained_tokens / runtime if runtime > 0 else 0.0,
        peak_memory=_peak_memory(device),
    )
    return result, trainer.model
