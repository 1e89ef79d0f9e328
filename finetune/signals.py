"""SIGINT / SIGTERM: never lose the work done so far. (No torch here: the CLI installs these.)

Outside training, SIGTERM behaves like Ctrl-C (an :class:`~finetune.errors.Interrupted`
is raised, so the MLflow run is marked KILLED instead of being left RUNNING), and the
process exits 143 (130 for SIGINT).

During training, the first signal asks the Trainer to finish the current optimizer
step, save a checkpoint and stop (finetune.train.callbacks.StopOnSignalCallback); the run then ends
KILLED and the command exits 128 + the signal number, telling the user how to resume.
A second signal aborts at once (after kill -9 or a second Ctrl-C, resume loses at most
the steps since the last complete checkpoint).
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from finetune.errors import Interrupted

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(f"interrupted by {signal.Signals(signum).name}", signum)


def install_process_handlers() -> None:
    """SIGTERM raises Interrupted (like SIGINT raises KeyboardInterrupt), so cleanup code runs."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, raise_interrupted)


class GracefulStop:
    """While active, the first SIGINT/SIGTERM only sets `signum`; the training loop polls it."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise_interrupted(signum, frame)  # second signal: stop now
        self.signum = signum
        log.warning("%s received: finishing this step and saving a checkpoint (send it again to abort now)",
                    signal.Signals(signum).name)

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
