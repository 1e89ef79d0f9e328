"""The data stage: read -> validate -> chat messages -> de-duplicate -> split -> template -> tokens.

Nothing is dropped without being counted: every row is kept, rejected with a
reason and a location, or counted as a duplicate. We hand TRL finished
``input_ids`` / ``labels`` (its own preparation truncates and filters rows without
counting them), with ``-100`` on every token the loss must ignore.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from data_prep import formats, readers, templates
from data_prep.report import DataReport, TokenStats, percentile
from finetune.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# Bump when the processing changes what it produces (part of the fingerprint).
PREP_VERSION = 1
MAX_REJECTED_EXAMPLES = 10
TOKENIZE_BATCH = 512


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    location: str


@dataclass
class PreparedData:
    train: list[Example]
    eval: list[Example]
    report: DataReport
    template_name: str
    template: str
    eval_messages: list[list[dict[str, str]]] = field(default_factory=list)

    def as_columns(self, split: str) -> dict[str, list[Any]]:
        rows = self.train if split == "train" else self.eval
        return {"input_ids": [r.input_ids for r in rows], "labels": [r.labels for r in rows]}


def _normalize(messages: list[dict[str, str]]) -> str:
    return json.dumps([[m["role"], " ".join(m["content"].split()).lower()] for m in messages], ensure_ascii=False)


def in_eval_split(key: str, eval_fraction: float) -> bool:
    """Deterministic by content: a row's side does not change when rows are reordered or appended."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < eval_fraction


def _tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _source_digest(path: str) -> str:
    h = hashlib.sha256()
    files = readers.source_files(path)
    if not files:
        h.update(f"hub:{path}".encode())
    for f in files:
        h.update(str(f).encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def fingerprint(dataset_cfg, tokenizer, template: str) -> str:
    parts = {
        "version": PREP_VERSION,
        "source": _source_digest(dataset_cfg.path),
        "tokenizer": _tokenizer_digest(tokenizer),
        "template": hashlib.sha256(template.encode()).hexdigest(),
        "settings": [dataset_cfg.format.value, dataset_cfg.max_seq_len, dataset_cfg.eval_fraction,
                     dataset_cfg.train_on_inputs],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


class _Rejections:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: list[dict[str, str]] = []

    def add(self, location: str, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        if len(self.examples) < MAX_REJECTED_EXAMPLES:
            self.examples.append({"location": location, "reason": reason, "detail": detail})


def _tokenize(tokenizer, conversations: list[list[dict[str, str]]]) -> list[tuple[list[int], list[int]] | str]:
    """(input_ids, assistant_mask) per conversation, or the template's error message for that one."""
    out: list[tuple[list[int], list[int]] | str] = []
    for start in range(0, len(conversations), TOKENIZE_BATCH):
        batch = conversations[start:start + TOKENIZE_BATCH]
        try:
            enc = tokenizer.apply_chat_template(batch, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
            out.extend(zip(enc["input_ids"], enc["assistant_masks"], strict=True))
        except Exception:
            # One bad conversation fails the whole batch: find it by doing them one at a time.
            for conv in batch:
                try:
                    enc = tokenizer.apply_chat_template(conv, tokenize=True, return_dict=True,
                                                        return_assistant_tokens_mask=True)
                    out.append((enc["input_ids"], enc["assistant_masks"]))
                except Exception as e:  # jinja raise_exception and friends
                    out.append(f"{type(e).__name__}: {e}")
    return out


def prepare(dataset_cfg, tokenizer, chat_template: str | None) -> PreparedData:
    """Run the data stage for `dataset_cfg` with `tokenizer` (whose chat_template is set here)."""
    template_name, template = templates.resolve(chat_template, tokenizer)
    tokenizer.chat_template = template
    fmt = dataset_cfg.format.value
    if fmt == "text":
        raise ConfigError("dataset.format: 'text' (raw domain corpora) is not supported yet; "
                          "use alpaca, sharegpt or messages")

    rejections = _Rejections()
    rows_read = 0
    detected = False
    convert = formats.CONVERTERS.get(fmt)
    seen: set[str] = set()
    duplicates = 0
    kept: list[tuple[str, list[dict[str, str]], bool]] = []  # location, messages, in eval split

    for raw in readers.read_rows(dataset_cfg.path):
        rows_read += 1
        if raw.error:
            rejections.add(raw.location, raw.error, raw.detail)
            continue
        if convert is None:  # auto: decide on the first readable row
            guess = formats.detect(raw.data)
            if guess is None:
                keys = sorted(raw.data) if isinstance(raw.data, dict) else type(raw.data).__name__
                raise DataError(f"{raw.location}: cannot tell the dataset format from the row's keys ({keys}); "
                                "set dataset.format to alpaca, sharegpt or messages")
            fmt, convert, detected = guess, formats.CONVERTERS[guess], True
            log.info("dataset.format=auto: detected %s from %s", fmt, raw.location)
        try:
            messages = convert(raw.data)
        except formats.RowError as e:
            rejections.add(raw.location, e.reason, e.detail)
            continue
        key = _normalize(messages)
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        kept.append((raw.location, messages, in_eval_split(key, dataset_cfg.eval_fraction)))

    if rows_read == 0:
        raise DataError(f"dataset.path: {dataset_cfg.path} holds no rows")

    encoded = _tokenize(tokenizer, [m for _, m, _ in kept])
    train: list[Example] = []
    evals: list[Example] = []
    eval_messages: list[list[dict[str, str]]] = []
    lengths: list[int] = []
    trained_tokens = 0
    for (location, messages, is_eval), enc in zip(kept, encoded, strict=True):
        if isinstance(enc, str):
            rejections.add(location, "template_error", enc)
            continue
        ids, mask = list(enc[0]), list(enc[1])
        if len(ids) > dataset_cfg.max_seq_len:
            rejections.add(location, "too_long",
                           f"{len(ids)} tokens > dataset.max_seq_len={dataset_cfg.max_seq_len}")
            continue
        if not any(mask):
            rejections.add(location, "no_answer_tokens", "the template left no assistant tokens to train on")
            continue
        labels = list(ids) if dataset_cfg.train_on_inputs else [t if m else -100 for t, m in zip(ids, mask, strict=True)]
        example = Example(ids, labels, location)
        lengths.append(len(ids))
        trained_tokens += sum(1 for t in labels if t != -100)
        if is_eval:
            evals.append(example)
            eval_messages.append(messages)
        else:
            train.append(example)

    lengths.sort()
    report = DataReport(
        source=dataset_cfg.path,
        format=fmt,
        format_detected=detected,
        chat_template=template_name,
        rows_read=rows_read,
        rows_kept=len(train) + len(evals),
        rejected=dict(sorted(rejections.counts.items())),
        rejected_examples=rejections.examples,
        duplicates=duplicates,
        train_rows=len(train),
        eval_rows=len(evals),
        max_seq_len=dataset_cfg.max_seq_len,
        tokens=TokenStats(total=sum(lengths), trained=trained_tokens, p50=percentile(lengths, 50),
                          p95=percentile(lengths, 95), p99=percentile(lengths, 99), max=lengths[-1] if lengths else 0),
        fingerprint=fingerprint(dataset_cfg, tokenizer, template),
    )

    rejected = report.rows_rejected
    if rows_read and rejected / rows_read > dataset_cfg.max_rejected_fraction:
        by_reason = ", ".join(f"{reason}: {n}" for reason, n in report.rejected.items())
        first = report.rejected_examples[0] if report.rejected_examples else None
        example = f"; first: {first['location']} ({first['detail']})" if first else ""
        raise DataError(
            f"{rejected} of {rows_read} rows rejected ({rejected / rows_read:.1%} > "
            f"dataset.max_rejected_fraction={dataset_cfg.max_rejected_fraction:g}) - {by_reason}{example}"
        )
    if not train:
        raise DataError(f"no training rows left from {dataset_cfg.path} ({report.rows_kept} kept, all in the "
                        "eval split); lower dataset.eval_fraction or add rows")
    return PreparedData(train=train, eval=evals, report=report, template_name=template_name,
                        template=template, eval_messages=eval_messages)
