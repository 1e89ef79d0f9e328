"""Trainer callbacks: step metrics into MLflow, a rich progress bar, checkpoint completion
markers, and stopping cleanly on a signal.

MetricsCallback is our own small callback rather than transformers' MLFlowCallback: that one logs every
TrainingArguments field and the model config as params on each `train()` call,
which collides with a run's existing params when a run is resumed (MLflow refuses
to change a logged param) and floods the compare view with ~150 params nobody set.
Here the recipe is logged once, under stable names, by the pipeline.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from transformers import TrainerCallback

from finetune.runs import mark_complete
from finetune.signals import GracefulStop

# Trainer's end-of-run summary: logged once, without a step, under names of their own
# ("train_loss" is the mean over the run, not a step's loss).
_SUMMARY = {"train_runtime": "train/runtime_s", "train_samples_per_second": "train/samples_per_s",
            "train_steps_per_second": "train/steps_per_s", "total_flos": "train/total_flos",
            "train_loss": "train/mean_loss"}


class MetricsCallback(TrainerCallback):
    """Step metrics to MLflow, buffered: one write every FLUSH_SECONDS (and at each checkpoint and
    at the end) instead of one per step. A write costs a few milliseconds of CPU, which on a small
    model or a busy CPU is several percent of a step; the MLflow UI is at most that much behind."""

    FLUSH_SECONDS = 5.0

    def __init__(self, tracker) -> None:
        self.tracker = tracker
        self._pending: list[tuple[str, float, int, int]] = []
        self._last_flush = time.monotonic()

    def flush(self) -> None:
        if self._pending and self.tracker is not None:
            self.tracker.log_metric_history(self._pending)
        self._pending = []
        self._last_flush = time.monotonic()

    def on_save(self, args, state, control, **kwargs):
        self.flush()

    def on_train_end(self, args, state, control, **kwargs):
        self.flush()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        metrics: dict[str, float] = {}
        summary: dict[str, float] = {}
        for key, value in logs.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                continue
            if key in _SUMMARY:
                summary[_SUMMARY[key]] = value
            elif key.startswith("eval_"):
                metrics[f"eval/{key.removeprefix('eval_')}"] = value
            else:
                metrics[f"train/{key}"] = value
        now_ms = int(time.time() * 1000)
        self._pending.extend((key, value, state.global_step, now_ms) for key, value in metrics.items())
        self._pending.extend((key, value, 0, now_ms) for key, value in summary.items())
        if time.monotonic() - self._last_flush >= self.FLUSH_SECONDS:
            self.flush()


class RichProgressCallback(TrainerCallback):
    """One progress bar for the run: step, loss, learning rate, time left.

    Replaces the Trainer's tqdm bar and its printing of every log dict (with
    logging_steps=1 that is a line per step); the numbers go to MLflow instead.
    """

    def __init__(self) -> None:
        self.progress = None
        self.task = None
        self.last: dict[str, float] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]train[/bold]"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, info="")

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is None or not logs:
            return
        for key in ("loss", "learning_rate", "eval_loss"):
            if isinstance(logs.get(key), (int, float)):
                self.last[key] = float(logs[key])
        parts = []
        if "loss" in self.last:
            parts.append(f"loss {self.last['loss']:.4f}")
        if "eval_loss" in self.last:
            parts.append(f"eval {self.last['eval_loss']:.4f}")
        if "learning_rate" in self.last:
            parts.append(f"lr {self.last['learning_rate']:.2e}")
        self.progress.update(self.task, info="  ".join(parts))

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            # Stopped early (early stopping, a signal): end the bar where training ended.
            self.progress.update(self.task, completed=state.global_step, total=state.global_step)
            self.progress.stop()
            self.progress = None

    def close(self) -> None:
        """Stop the bar of a training that ended without on_train_end (an out-of-memory error)."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class StopOnSignalCallback(TrainerCallback):
    """After a step, if a signal arrived: save a checkpoint and stop training."""

    def __init__(self, stop: GracefulStop) -> None:
        self.stop = stop

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop.signum is not None:
            control.should_save = True
            control.should_training_stop = True
        return control


class CheckpointMarkerCallback(TrainerCallback):
    """Mark checkpoint-N complete once the Trainer has finished writing it (see finetune/runs.py)."""

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:  # the process that writes checkpoints (rank 0)
            from finetune.paths import apply_umask

            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            apply_umask(checkpoint)  # the weights come 0600 from safetensors' atomic save
            mark_complete(checkpoint)
        return control
