"""Which process am I? Rank and world size from the launcher (torchrun / accelerate launch).

One process per GPU: every rank prepares the data and trains; only rank 0 writes the
run directory's reports, talks to MLflow, saves the adapter and evaluates.
"""

from __future__ import annotations

import os


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when not launched for several processes."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_leader() -> bool:
    return world()[0] == 0
