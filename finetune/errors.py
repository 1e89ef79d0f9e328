"""Expected errors and the exit codes they map to (contract: docs/DESIGN.md).

Every error a user can fix is one of these. The CLI prints ``error: <message>`` on
one line, without a traceback, and exits with the class's code.
"""

from __future__ import annotations


class FinetuneError(Exception):
    """An expected failure: the message says what is wrong and what to do about it."""

    exit_code = 1


class ConfigError(FinetuneError):
    """The recipe or an override is wrong (unknown key, bad value, inconsistent settings)."""

    exit_code = 2


class DataError(FinetuneError):
    """The dataset cannot be read, or too many of its rows are unusable."""

    exit_code = 3


class DoesNotFitError(FinetuneError):
    """No plan fits the VRAM target, or training ran out of memory with no smaller plan left."""

    exit_code = 4


class EnvError(FinetuneError):
    """The environment is missing something: a GPU, disk space, a reachable tracking server."""

    exit_code = 5


class Interrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM arrived (during training: raised after a checkpoint was saved).

    A KeyboardInterrupt, not an Exception, so that no ``except Exception`` on the way up
    swallows it; exits 128 + the signal number (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
