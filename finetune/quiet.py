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
