"""Credentials are masked in everything a run writes: by value, not only by key name.

The schema has no key for a secret, but values can carry one: a tracking server's URI with a
password (``http://user:password@host``), a URL with ``?token=`` / ``&access_token=`` /
``api_key=``, or any string equal to the value of an environment variable whose name says it
is a secret (``HF_TOKEN``, ``*_TOKEN``, ``*_KEY``, ``*_SECRET``, ``*PASSWORD*``). :func:`mask`
replaces the secret part with ``***`` and keeps the rest, so ``http://user:***@host:5000``
still says where the run logged. Masking is idempotent (masking a masked text changes nothing).

Only what is written or shown is masked: the run still connects with the real values.
Where it is applied: the run directory's config.yaml (``finetune.config.to_plain_dict``),
Hydra's own ``.hydra/*.yaml`` and ``multirun.yaml`` (rewritten by the CLI at the start of each
job, right after Hydra wrote them), run.json, MLflow params, tags and the dataset input
(``finetune.tracking``), and, for the ``finetune`` command, every log record (console and the
run's log file) and everything printed to stdout / stderr (:func:`install`).

Light on purpose (the CLI imports it before anything heavy): re and os only.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any

MASK = "***"
# An environment value shorter than this is not treated as a secret: masking "true" or "1"
# everywhere would garble the recipe, and a credential that short protects nothing anyway.
MIN_SECRET_LENGTH = 8

_SECRET_ENV_NAME = re.compile(r"^HF_TOKEN$|_TOKEN$|_KEY$|_SECRET$|PASSWORD|PASSWD", re.IGNORECASE)
# scheme://user:PASSWORD@host: the password (the user name stays, it says whose credentials).
# Also as Hydra prints overrides, with its colons escaped (http\://user\:PASSWORD@host).
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*\\?://[^:/?#@\s\\]*\\?:)(?P<secret>[^@/?#\s]+)(?=@)")
# name=VALUE where the name's last word says credential, as a URL's query parameter (?token=...,
# &access_token=..., X-Amz-Signature=..., sig=...) or on its own (api_key=..., hf_token=...); not
# eval.max_new_tokens=... (the word must end the name).
_PARAM = re.compile(r"(?<![A-Za-z0-9_.\-])(?P<name>(?:[A-Za-z0-9_.\-]*[._\-])?"
                    r"(?:token|secret|password|passwd|pwd|key|apikey|auth|sig|signature|credentials?)"
                    r"|[A-Za-z0-9_.\-]*(?:apikey|accesstoken|secret|password))"
                    r"=(?P<value>[^&\s#'\",;)\]}]+)", re.IGNORECASE)


def is_secret_env_name(name: str) -> bool:
    return bool(_SECRET_ENV_NAME.search(name))


def secret_env_values() -> list[str]:
    """Values of the environment variables named like secrets, longest first."""
    values = {value for name, value in os.environ.items()
              if is_secret_env_name(name) and len(value) >= MIN_SECRET_LENGTH and value != MASK}
    return sorted(values, key=len, reverse=True)


def mask(text: str) -> str:
    """`text` with every credential it holds replaced by ***."""
    if not isinstance(text, str) or not text:
        return text
    for value in secret_env_values():
        if value in text:
            text = text.replace(value, MASK)
    if "://" in text:
        text = _USERINFO.sub(lambda m: m["head"] + MASK, text)
    if "=" in text:
        text = _PARAM.sub(lambda m: f"{m['name']}={MASK}", text)
    return text


def mask_data(value: Any) -> Any:
    """Every string in a tree of dicts / lists masked (keys are left alone: the schema names them)."""
    if isinstance(value, str):
        return mask(value)
    if isinstance(value, dict):
        return {k: mask_data(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(mask_data(v) for v in value)
    return value


def mask_file(path: os.PathLike | str) -> bool:
    """Mask a text file in place (Hydra's .hydra/*.yaml); True if it changed."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError):
        return False
    masked = mask(text)
    if masked == text:
        return False
    tmp = f"{path}.masking"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(masked)
    os.replace(tmp, path)
    return True


class MaskingStream:
    """A text stream that masks what is written to it before passing it on (stdout / stderr).
    Everything else (isatty, fileno, encoding, buffer, ...) is the wrapped stream's."""

    def __init__(self, stream: Any):
        self._stream = stream

    def write(self, s: str) -> int:
        self._stream.write(mask(s))
        return len(s)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


_installed = False


def install() -> None:
    """For the `finetune` command: mask every log record (whichever handler writes it: console, the
    run's log file) and everything written to stdout / stderr (rich's console, tracebacks, Hydra's
    --cfg output). Handlers Hydra creates later still see masked records: the mask is applied where
    records are made, not in a handler."""
    global _installed
    if _installed:
        return
    _installed = True
    make_record = logging.getLogRecordFactory()

    def masked_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: let the handler report it as it would
            return record
        masked = mask(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            if mask(text) != text:
                record.exc_text = mask(text)
        return record

    logging.setLogRecordFactory(masked_record)
    if not isinstance(sys.stdout, MaskingStream) and sys.stdout is not None:
        sys.stdout = MaskingStream(sys.stdout)
    if not isinstance(sys.stderr, MaskingStream) and sys.stderr is not None:
        sys.stderr = MaskingStream(sys.stderr)
