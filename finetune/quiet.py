"""Silence library chatter that users cannot act on (and keep every real warning)."""

from __future__ import annotations

import logging
import warnings


def quiet_libraries() -> None:
    # bitsandbytes warns on every CPU run that an optional kernel package is missing, then falls back
    # to its own CPU kernel, which is what we want; its other warnings stay.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score says "Using default tokenizer" per call
    # transformers deprecates the name TRL 1.16 still calls; nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning)


def quiet_loading() -> None:
    """No per-file progress bars from transformers ("Loading weights", "Writing model shards") on the commands
    that load a model the user already has (merge, export, chat): a tiny model prints ten lines of them around
    the command's own output, and an error would no longer be the one line on stderr. Downloads are the train
    command's, which keeps its bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
