"""The data stage: read -> validate -> canonical form -> de-duplicate -> split -> template -> tokens -> pack.

Nothing is dropped without being counted: every row read is kept, rejected with a
reason and a location, counted as a duplicate, or (for a source weighted below 1)
counted as left out by its weight. We hand TRL finished ``input_ids`` / ``labels``
(its own preparation truncates and filters rows without counting them), with
``-100`` on every token the loss must ignore.

The result is stored as Arrow files in a cache directory named by a fingerprint of
the sources' content, the tokenizer, the template and the settings
(data_prep.store); a later run with nothing changed loads it instead of preparing
again. The whole stage streams: rows are read, tokenized in batches and written
a record batch at a time, so a corpus larger than memory can be prepared.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from array import array
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_prep import encode, formats, readers, store, templates
from data_prep.encode import ChatEncoder, TextEncoder, control_token_pattern
from data_prep.packing import best_fit_decreasing, decide
from data_prep.report import DataReport, PackingStats, SourceStats, TokenStats, percentile
from data_prep.store import Example, ExampleSplit
from finetune.errors import ConfigError, DataError

log = logging.getLogger(__name__)

__all__ = ["Example", "PreparedData", "RejectedRowsError", "fingerprint", "in_eval_split", "prepare"]

# Bump when the processing changes what it produces (part of the fingerprint).
PREP_VERSION = 5
MAX_REJECTED_EXAMPLES = 20
REJECTED_EXAMPLES_PER_REASON = 3
CHAT_BATCH = 1024  # conversations rendered and tokenized together
TEXT_BATCH_CHARS = 1 << 20  # documents tokenized together
PADDED_BATCH = 8  # the micro-batch for which padded_efficiency is reported


class RejectedRowsError(DataError):
    """Too many rows were rejected; carries the report, so the run can still write data_report.json."""

    def __init__(self, message: str, report: DataReport):
        super().__init__(message)
        self.report = report


@dataclass
class PreparedData:
    train: ExampleSplit  # the training examples (a packed store is seen as its examples)
    eval: ExampleSplit
    report: DataReport
    template_name: str
    template: str
    store_dir: Path
    packed: bool = False  # training rows are packed: train with TRL's padding-free collator
    _lengths: np.ndarray | None = field(default=None, repr=False)

    @property
    def padding_free(self) -> bool:
        return self.packed

    @property
    def lengths(self) -> np.ndarray:
        """Every kept example's length in tokens (train + eval, each once)."""
        if self._lengths is None:
            self._lengths = np.load(self.store_dir / "lengths.npy")
        return self._lengths

    @property
    def eval_messages(self) -> list[list[dict[str, str]]]:
        """The held-out conversations (chat formats), for generation evals; [] for text."""
        if not len(self.eval):
            return []
        return [json.loads(m) for m in self.eval.column("messages") if m]

    def as_columns(self, split: str) -> dict[str, list[Any]]:
        """input_ids / labels per example (unpacked), as plain lists."""
        rows = self.train if split == "train" else self.eval
        out: dict[str, list[Any]] = {"input_ids": [], "labels": []}
        for ex in rows:
            out["input_ids"].append(ex.input_ids)
            out["labels"].append(ex.labels)
        return out

    def to_dataset(self, split: str):
        """The split as a memory-mapped ``datasets.Dataset`` for the trainer: packed rows (with
        ``seq_lengths``, for TRL's padding-free collator) when ``packed``, else one example per row."""
        from datasets import Dataset

        part = self.train if split == "train" else self.eval
        return Dataset.from_file(str(part.path))


@dataclass
class SourceSpec:
    path: str
    format: str
    weight: float
    text_column: str


def source_specs(cfg) -> list[SourceSpec]:
    if cfg.sources:
        return [SourceSpec(s.path, (s.format or cfg.format).value, float(s.weight), s.text_column or cfg.text_column)
                for s in cfg.sources]
    return [SourceSpec(cfg.path, cfg.format.value, 1.0, cfg.text_column)]


# ---- content keys: de-duplication, split and weights ---------------------------------------------

def _chat_key(messages: list[dict], tools: list | None = None) -> str:
    """Roles and texts, lowercased, whitespace runs as one space: what de-duplication and the split compare
    (with a turn's reasoning and tool calls, and the row's tools, where it has them)."""
    def turn(m: dict) -> str:
        key = m["role"] + "\x1f" + " ".join(m["content"].lower().split())
        extra = {k: m[k] for k in ("reasoning_content", "tool_calls", "tool_call_id", "name") if k in m}
        return key + ("\x1f" + json.dumps(extra, sort_keys=True, ensure_ascii=False) if extra else "")

    key = "\x1e".join(map(turn, messages))
    return key + ("\x1d" + json.dumps(tools, sort_keys=True, ensure_ascii=False) if tools else "")


def _unit(digest: bytes, start: int) -> float:
    return int.from_bytes(digest[start:start + 8], "big") / 2**64


def in_eval_split(key: str, eval_fraction: float) -> bool:
    """Deterministic by content: a row's side does not change when rows are reordered or appended."""
    return _unit(hashlib.sha256(key.encode("utf-8")).digest(), 0) < eval_fraction


def _copies(weight: float, digest: bytes) -> int:
    """How many times a training row of a source with this weight is used (0, 1, 2, ...), by content."""
    whole = int(weight)
    return whole + (1 if _unit(digest, 8) < weight - whole else 0)


class _TextKey:
    """sha256 of a document's normalized text (" ".join(text.split()).lower()), fed in pieces."""

    def __init__(self) -> None:
        self._h = hashlib.sha256(b"text\0")
        self._pending = ""
        self._any = False

    def feed(self, piece: str) -> None:
        s = self._pending + piece
        words = s.split()
        self._pending = words.pop() if words and not s[-1].isspace() else ""
        if words:
            chunk = " ".join(words).lower()
            self._h.update(((" " if self._any else "") + chunk).encode("utf-8", "surrogatepass"))
            self._any = True

    def digest(self) -> tuple[bytes, bool]:
        """(digest, whether the text held anything but whitespace)."""
        if self._pending:
            self._h.update(((" " if self._any else "") + self._pending.lower()).encode("utf-8", "surrogatepass"))
            self._any = True
            self._pending = ""
        return self._h.digest(), self._any


# ---- fingerprint ----------------------------------------------------------------------------------

def _tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    text += json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _listing_digest(listing: readers.Listing) -> str:
    h = hashlib.sha256()
    if listing.hub_id is not None:
        h.update(f"hub:{listing.hub_id}:{readers.hub_fingerprint(listing.hub_id)}".encode())
    for f in listing.files:
        h.update(str(f).encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def fingerprint(dataset_cfg, tokenizer, template: templates.Resolved, specs: list[SourceSpec],
                listings: list[readers.Listing], packed: bool) -> str:
    parts = {
        "version": PREP_VERSION,
        "sources": [{"content": _listing_digest(li), "format": s.format, "weight": s.weight,
                     "text_column": s.text_column} for s, li in zip(specs, listings, strict=True)],
        "tokenizer": _tokenizer_digest(tokenizer),
        "template": hashlib.sha256(template.jinja.encode()).hexdigest(),
        "masking": template.masking,
        "settings": [dataset_cfg.max_seq_len, dataset_cfg.eval_fraction, dataset_cfg.train_on_inputs,
                     dataset_cfg.length_policy.value, dataset_cfg.dedup, packed, dataset_cfg.multi_turn.value,
                     dataset_cfg.template_kwargs],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


# ---- the build ------------------------------------------------------------------------------------

class _Rejections:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: list[dict[str, str]] = []

    def add(self, location: str, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        if self.counts[reason] <= REJECTED_EXAMPLES_PER_REASON and len(self.examples) < MAX_REJECTED_EXAMPLES:
            self.examples.append({"location": location, "reason": reason, "detail": detail})


PROGRESS_MIN_BYTES = 32 << 20  # smaller sources are prepared in seconds: no bar


def _progress_console():
    from rich.console import Console

    return Console(stderr=True)


class _Progress:
    """A rich progress bar over the bytes of the sources (and the rows read), shown on a terminal only."""

    def __init__(self, total_bytes: int, enabled: bool):
        self._progress = None
        if enabled and total_bytes > PROGRESS_MIN_BYTES:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            console = _progress_console()
            if console.is_terminal:
                self._progress = Progress(TextColumn("data"), BarColumn(), DownloadColumn(),
                                          TextColumn("{task.fields[rows]} rows"), TimeElapsedColumn(),
                                          TimeRemainingColumn(), console=console, transient=True)
                self._task = self._progress.add_task("data", total=total_bytes, rows=0)
                self._progress.start()
        self.rows = 0

    def bytes(self, n: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=n, rows=self.rows)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


class _Build:
    def __init__(self, cfg, tokenizer, template: templates.Resolved, specs: list[SourceSpec],
                 listings: list[readers.Listing], packed: bool, out: Path):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.template = template
        self.specs = specs
        self.listings = listings
        self.packed = packed
        self.max_len = cfg.max_seq_len
        self.truncate = cfg.length_policy.value == "truncate"
        self._chat: ChatEncoder | None = None
        self.template_error: Exception | None = None
        self._text: TextEncoder | None = None
        self.control = control_token_pattern(tokenizer)
        # A reserved token chosen as pad (finetune.models.loader.ensure_pad_token) must be one no example holds.
        self.unused_pad = getattr(tokenizer, "finetune_pad_unused", None)
        # Only text corpora: every label equals its input id, so the store keeps no labels column.
        labels = any(s.format != "text" for s in specs)
        self.train_w = store.PackedWriter(out / "train.arrow", self.max_len, with_labels=labels) if packed \
            else store.SplitWriter(out / "train.arrow", with_labels=labels)
        self.eval_w = store.SplitWriter(out / "eval.arrow", with_messages=True, with_labels=labels)
        self.rejections = _Rejections()
        self.sources = [SourceStats(path=s.path, format=s.format, weight=s.weight) for s in specs]
        self.seen: set[bytes] = set()
        self.lengths = array("i")  # every kept example, once
        self.train_lengths = array("i")  # every training example, after weights
        self.trained = 0
        self.truncated = 0
        self.documents = 0
        self.detected = False
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self.inflight: tuple[list, list, Future] | None = None
        self.chat_batch: list[tuple[int, str, list[dict], bool, int, list | None]] = []
        self.policies: Counter[str] = Counter()  # dataset.multi_turn: the policy each kept conversation got
        self.split_examples = 0  # examples made by splitting conversations
        self.repeated_tokens = 0  # tokens those examples repeat (each answer's prefix again)
        self.text_batch: list[tuple[int, str, str, bool, int]] = []
        self.text_chars = 0

    @property
    def chat(self) -> ChatEncoder:
        if self._chat is None:
            if self.template_error is not None:
                raise self.template_error
            self._chat = ChatEncoder(self.tokenizer, self.template, self.cfg.train_on_inputs,
                                     multi_turn=self.cfg.multi_turn.value,
                                     template_kwargs=dict(self.cfg.template_kwargs or {}))
        return self._chat

    @property
    def text(self) -> TextEncoder:
        if self._text is None:
            self._text = TextEncoder(self.tokenizer, self.max_len)
        return self._text

    def reject(self, src: int, location: str, reason: str, detail: str) -> None:
        self.rejections.add(location, reason, detail)
        self.sources[src].rows_rejected += 1

    # -- reading and validating

    def run(self, progress: _Progress) -> None:
        try:
            for src, (spec, listing) in enumerate(zip(self.specs, self.listings, strict=True)):
                self._read_source(src, spec, listing, progress)
            self._flush_text()
            self._flush_chat()
            self._drain()
        finally:
            self.pool.shutdown(wait=True)
            self.train_w.close()
            self.eval_w.close()

    def _read_source(self, src: int, spec: SourceSpec, listing: readers.Listing, progress: _Progress) -> None:
        fmt = spec.format
        stats = self.sources[src]
        dedup = self.cfg.dedup
        eval_fraction = self.cfg.eval_fraction
        for raw in readers.read_rows(listing, progress.bytes):
            stats.rows_read += 1
            progress.rows += 1
            if raw.error:
                self.reject(src, raw.location, raw.error, raw.detail)
                continue
            if fmt == "auto":
                fmt = self._detect(raw, spec)
                stats.format = fmt
            if fmt == "text":
                self._document(src, raw, spec)
                continue
            try:
                if isinstance(raw.data, (str, readers.TextFile)):
                    raise formats.RowError("not_an_object", f"a text file in a {fmt} dataset (set dataset.format "
                                                            "to text, or move the file out of the dataset)")
                messages = formats.CONVERTERS[fmt](raw.data)
                tools = formats.row_tools(raw.data) if fmt == "messages" else None
                if self.control is not None:
                    for m in messages:
                        hit = self.control.search(m["content"]) or self.control.search(m.get("reasoning_content", ""))
                        if hit:
                            raise formats.RowError(
                                "control_token", f"a {m['role']} turn holds the text '{hit.group()}', which the "
                                "tokenizer would read as its control token (it would end or restart the turn)")
            except formats.RowError as e:
                self.reject(src, raw.location, e.reason, e.detail)
                continue
            digest = hashlib.sha256(_chat_key(messages, tools).encode("utf-8")).digest()
            if dedup:
                if digest[:16] in self.seen:
                    stats.duplicates += 1
                    continue
                self.seen.add(digest[:16])
            is_eval = _unit(digest, 0) < eval_fraction
            copies = 1 if is_eval else _copies(spec.weight, digest)
            if copies == 0:
                stats.weight_dropped += 1
                continue
            self.chat_batch.append((src, raw.location, messages, is_eval, copies, tools))
            if len(self.chat_batch) >= CHAT_BATCH:
                self._flush_chat()

    def _detect(self, raw: readers.RawRow, spec: SourceSpec) -> str:
        if isinstance(raw.data, (str, readers.TextFile)):
            guess = "text"
        else:
            guess = formats.detect(raw.data, spec.text_column)
        if guess is None:
            keys = sorted(raw.data) if isinstance(raw.data, dict) else type(raw.data).__name__
            raise DataError(f"{raw.location}: cannot tell the dataset format from the row's keys ({keys}); "
                            "set dataset.format to alpaca, sharegpt, messages or text (with dataset.text_column)")
        self.detected = True
        log.info("dataset.format=auto: detected %s from %s", guess, raw.location)
        return guess

    # -- chat rows

    def _flush_chat(self) -> None:
        if not self.chat_batch:
            return
        batch, self.chat_batch = self.chat_batch, []
        rendered = self.chat.render([row[2] for row in batch], [row[5] for row in batch])
        texts = [text for r in rendered if not isinstance(r, str) for text, _ in r.examples]
        future = self.pool.submit(self.chat.tokenize, texts)  # tokenizes while we render the next batch
        self._drain()
        self.inflight = (batch, rendered, future)

    def _drain(self) -> None:
        if self.inflight is None:
            return
        batch, rendered, future = self.inflight
        self.inflight = None
        encodings = iter(future.result())
        for (src, location, messages, is_eval, copies, _), r in zip(batch, rendered, strict=True):
            if isinstance(r, str):
                reason = r.split(":", 1)[0]
                self.reject(src, location, reason if reason.isidentifier() and reason.islower() else "template_error",
                            r)
                continue
            examples = []
            n = len(r.examples)
            for i, ((text, spans), enc) in enumerate(zip(r.examples, encodings, strict=False)):
                ids, labels = self.chat.labels(text, spans, enc)
                examples.append((f"{location} answer {i + 1}/{n}" if n > 1 else location, ids, labels))
            self._emit_conversation(src, location, examples, is_eval, copies, messages, r.policy)

    def _fit(self, ids, labels):
        """(ids, labels) within max_seq_len, or the rejection (reason, detail)."""
        n = len(ids)
        if n > self.max_len:
            if not self.truncate:
                return "too_long", (f"{n} tokens > dataset.max_seq_len={self.max_len} "
                                    "(dataset.length_policy=truncate keeps the start instead)")
            ids, labels = ids[:self.max_len], labels[:self.max_len]
            if labels.count(-100) == self.max_len:
                return "too_long", f"nothing to learn is left after truncating to dataset.max_seq_len={self.max_len} " \
                                   "tokens"
        if len(ids) - labels.count(-100) == 0:
            return "no_answer_tokens", "the template left no assistant tokens to train on"
        return ids, labels

    def _emit_conversation(self, src, location, examples, is_eval, copies, messages, policy: str) -> None:
        """A conversation's examples (one, or one per answer under multi_turn split): all kept, or the row rejected."""
        fitted = []
        truncated = False
        for where, ids, labels in examples:
            self._check_pad(where, ids)
            fit = self._fit(ids, labels)
            if isinstance(fit[0], str):
                self.reject(src, location, fit[0], fit[1] if len(examples) == 1 else f"{where}: {fit[1]}")
                return
            truncated |= len(fit[0]) < len(ids)
            fitted.append((where, *fit))
        self.truncated += truncated
        self.policies[policy] += 1
        if len(fitted) > 1:
            self.split_examples += len(fitted)
            self.repeated_tokens += sum(len(ids) for _, ids, _ in fitted) - max(len(ids) for _, ids, _ in fitted)
        stats = self.sources[src]
        stats.rows_kept += 1
        if is_eval:
            stats.eval_rows += 1
        else:
            stats.train_rows += 1
        last = len(fitted) - 1
        for i, (where, ids, labels) in enumerate(fitted):
            n = len(ids)
            self.lengths.append(n)
            self.trained += n - labels.count(-100)
            if is_eval:
                # the conversation (for generation evals) once, with its last example
                self.eval_w.add(ids, labels, where, json.dumps(messages, ensure_ascii=False) if i == last else "")
                continue
            for _ in range(copies):
                stats.train_examples += 1
                self.train_lengths.append(n)
                self.train_w.add(ids, labels, where)

    def _check_pad(self, location: str, ids: list[int]) -> None:
        if self.unused_pad is not None and self.unused_pad in ids:
            token = self.tokenizer.convert_ids_to_tokens(self.unused_pad)
            raise DataError(f"{location}: the prepared example holds {token!r} (id {self.unused_pad}), the reserved "
                            "token chosen as pad because the tokenizer has none; set pad_token in the model's "
                            "tokenizer_config.json to a token the data never holds")

    # -- text documents

    def _document(self, src: int, raw: readers.RawRow, spec: SourceSpec) -> None:
        stats = self.sources[src]
        key = _TextKey()
        data = raw.data
        if isinstance(data, readers.TextFile):
            problem = data.scan(key.feed)
            if problem is not None:
                self.reject(src, raw.location, *problem)
                return
            text = None
        else:
            try:
                text = data if isinstance(data, str) else formats.text_row(data, spec.text_column)
                formats.check_text(text, "the text")
            except formats.RowError as e:
                self.reject(src, raw.location, e.reason, e.detail)
                return
            key.feed(text)
        digest, nonempty = key.digest()
        if not nonempty:
            self.reject(src, raw.location, "empty_text", "the document holds only whitespace")
            return
        if self.cfg.dedup:
            if digest[:16] in self.seen:
                stats.duplicates += 1
                return
            self.seen.add(digest[:16])
        is_eval = _unit(digest, 0) < self.cfg.eval_fraction
        copies = 1 if is_eval else _copies(spec.weight, digest)
        if copies == 0:
            stats.weight_dropped += 1
            return
        stats.rows_kept += 1
        self.documents += 1
        if is_eval:
            stats.eval_rows += 1
        else:
            stats.train_rows += 1
        if text is None or len(text) > encode.LONG_DOC_CHARS:  # a long document: tokenized window by window
            self._flush_text()
            pieces = data.pieces() if text is None else self.text.pieces(text)
            buffer: list[int] = []
            for ids in self.text.encode_stream(pieces):
                buffer.extend(ids)
                if len(buffer) >= self.max_len:
                    cut = len(buffer) - len(buffer) % self.max_len
                    for start in range(0, cut, self.max_len):
                        self._emit_block(src, raw.location, buffer[start:start + self.max_len], is_eval, copies)
                    del buffer[:cut]
            if buffer:
                self._emit_block(src, raw.location, buffer, is_eval, copies)
            return
        self.text_batch.append((src, raw.location, text, is_eval, copies))
        self.text_chars += len(text)
        if self.text_chars >= TEXT_BATCH_CHARS:
            self._flush_text()

    def _flush_text(self) -> None:
        if not self.text_batch:
            return
        batch, self.text_batch, self.text_chars = self.text_batch, [], 0
        encoded = self.text.encode_batch([text for _, _, text, _, _ in batch])
        for (src, location, _, is_eval, copies), ids in zip(batch, encoded, strict=True):
            for block in self.text.blocks(ids):
                self._emit_block(src, location, block, is_eval, copies)

    def _emit_block(self, src: int, location: str, ids: list[int], is_eval: bool, copies: int) -> None:
        self._check_pad(location, ids)
        n = len(ids)
        self.lengths.append(n)
        self.trained += n
        stats = self.sources[src]
        if is_eval:
            self.eval_w.add(ids, ids, location)
            return
        for _ in range(copies):
            stats.train_examples += 1
            self.train_lengths.append(n)
            self.train_w.add(ids, ids, location)

    # -- the report

    def report(self, template_name: str) -> DataReport:
        lengths = np.frombuffer(self.lengths, dtype=np.int32) if len(self.lengths) else np.zeros(0, np.int32)
        ordered = np.sort(lengths)
        train_lengths = list(self.train_lengths)
        formats_used = sorted({s.format for s in self.sources})
        tokens = TokenStats(total=int(lengths.sum()), trained=self.trained, p50=percentile(ordered, 50),
                            p95=percentile(ordered, 95), p99=percentile(ordered, 99),
                            max=int(ordered[-1]) if len(ordered) else 0,
                            mean=round(float(lengths.mean()), 2) if len(lengths) else 0.0,
                            train_total=int(sum(train_lengths)))
        report = DataReport(
            source=" + ".join(s.path for s in self.specs),
            format=formats_used[0] if len(formats_used) == 1 else "mixed",
            format_detected=self.detected,
            chat_template=template_name if formats_used != ["text"] else "none (text)",
            masking=self.template.masking if formats_used != ["text"] else "none",
            multi_turn={"setting": self.cfg.multi_turn.value, "applied": dict(sorted(self.policies.items())),
                        "split_examples": self.split_examples, "repeated_prefix_tokens": self.repeated_tokens}
            if self.policies else {},
            rows_read=sum(s.rows_read for s in self.sources),
            rows_kept=sum(s.rows_kept for s in self.sources),
            rejected=dict(sorted(self.rejections.counts.items())),
            rejected_examples=self.rejections.examples,
            duplicates=sum(s.duplicates for s in self.sources),
            truncated=self.truncated,
            train_rows=self.train_w.examples if self.packed else self.train_w.rows,
            eval_rows=self.eval_w.rows,
            max_seq_len=self.max_len,
            length_policy=self.cfg.length_policy.value,
            tokens=tokens,
            sources=self.sources,
            documents=self.documents,
            files_skipped=[s for li in self.listings for s in li.skipped],
        )
        report.packing = _packing_stats(train_lengths, self.max_len, self.train_w if self.packed else None)
        return report


def _packing_stats(train_lengths: list[int], capacity: int, packed_writer) -> PackingStats:
    stats = PackingStats()
    if not train_lengths:
        return stats
    if packed_writer is not None:
        stats.rows = packed_writer.rows
        stats.row_tokens_max = packed_writer.longest
        stats.efficiency = round(packed_writer.tokens / (packed_writer.rows * capacity), 4)
    else:
        stats.row_tokens_max = max(train_lengths)
        bins = best_fit_decreasing(train_lengths, capacity)
        stats.efficiency = round(sum(train_lengths) / (len(bins) * capacity), 4)
    shuffled = np.random.default_rng(0).permutation(np.asarray(train_lengths, dtype=np.int64))
    pad = (-len(shuffled)) % PADDED_BATCH
    groups = np.concatenate([shuffled, np.zeros(pad, dtype=np.int64)]).reshape(-1, PADDED_BATCH)
    counts = np.full(len(groups), PADDED_BATCH)
    counts[-1] -= pad
    stats.padded_efficiency = round(float(groups.sum() / (groups.max(axis=1) * counts).sum()), 4)
    return stats


# ---- the stage ------------------------------------------------------------------------------------

def _load(path: Path) -> PreparedData:
    meta = store.read_meta(path)
    report = DataReport.from_dict(json.loads((path / "report.json").read_text()))
    return PreparedData(train=ExampleSplit(path / "train.arrow"), eval=ExampleSplit(path / "eval.arrow"),
                        report=report, template_name=meta["template_name"], template=meta["template"],
                        store_dir=path, packed=bool(meta["packed"]))


def reuse(final: Path, load, dataset_cfg, fixes: list[str], started: float, what: str):
    """The complete store at `final` loaded with `load` (SFT's or preference data's), marked a cache hit and held
    to the recipe's limits, when dataset.cache allows; None when there is none to reuse."""
    if not (dataset_cfg.cache and store.is_complete(final)):
        return None
    data = load(final)
    data.report.tokenizer_fixes = fixes
    data.report.cache_hit = True
    data.report.seconds = round(time.perf_counter() - started, 3)
    log.info("data: reusing the %s %s (nothing changed since it was made)", what, final)
    _check(data.report, dataset_cfg)
    return data


def _check(report: DataReport, cfg) -> None:
    rejected, read = report.rows_rejected, report.rows_read
    if read and rejected / read > cfg.max_rejected_fraction:
        first = report.rejected_examples[0] if report.rejected_examples else None
        example = f"; first: {first['location']} ({first['detail']})" if first else ""
        raise RejectedRowsError(
            f"{rejected} of {read} rows rejected ({rejected / read:.1%} > "
            f"dataset.max_rejected_fraction={cfg.max_rejected_fraction:g}) - {report.summary()}{example}", report)
    if not report.train_rows:
        raise RejectedRowsError(f"no training rows left from {report.source} ({report.rows_kept} kept, "
                                f"{report.eval_rows} held out); lower dataset.eval_fraction or add rows", report)


def prepare(dataset_cfg, tokenizer, chat_template: str | None, model_type: str | None = None,
            progress: bool = True, model_config: dict | None = None, packing_probe=None) -> PreparedData:
    """Run the data stage for `dataset_cfg` with `tokenizer` (whose chat_template is set here).

    `model_type` (the model's config.json ``model_type``; `model_config`, the whole config.json, when
    known) and `packing_probe` (the pipeline's finetune.probes.packing.padding_free_packing, which measures
    it on the installed transformers) decide whether dataset.packing can pack exactly; without them, packing
    falls back to padded batches.
    """
    from finetune.paths import cache_dir

    started = time.perf_counter()
    try:
        template = templates.resolve(chat_template, tokenizer)
        tokenizer.chat_template = template.jinja
        template_error = None
    except ConfigError as e:  # fine for text corpora; raised when the first conversation needs a template
        template, template_error = templates.Resolved("none", "", "none"), e
    specs = source_specs(dataset_cfg)
    listings = [readers.list_source(s.path, s.format) for s in specs]
    packed, why = decide(dataset_cfg.packing, model_type, model_config, packing_probe)
    fp = fingerprint(dataset_cfg, tokenizer, template, specs, listings, packed)
    final = cache_dir() / "datasets" / fp

    fixes = list(getattr(tokenizer, "finetune_fixes", []))
    reused = reuse(final, _load, dataset_cfg, fixes, started, "prepared dataset")
    if reused is not None:
        return reused

    tmp = store.new_build_dir(final)
    bar = _Progress(sum(li.total_bytes for li in listings), progress)
    try:
        build = _Build(dataset_cfg, tokenizer, template, specs, listings, packed, tmp)
        build.template_error = template_error
        build.run(bar)
        report = build.report(template.name)
        if report.rows_read == 0:
            raise DataError(f"dataset.path: {report.source} holds no rows")
        report.packing.requested = dataset_cfg.packing
        report.packing.enabled = packed
        report.packing.reason = why
        report.packing.architecture = model_type
        report.tokenizer_fixes = fixes
        report.fingerprint = fp
        report.seconds = round(time.perf_counter() - started, 3)
        np.save(tmp / "lengths.npy", np.frombuffer(build.lengths, dtype=np.int32) if len(build.lengths)
                else np.zeros(0, np.int32))
        report.write(tmp / "report.json")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    store.commit(tmp, final, {"prep_version": PREP_VERSION, "template_name": template.name,
                              "template": template.jinja, "masking": template.masking, "packed": packed},
                 replace=not dataset_cfg.cache)
    data = _load(final)
    _check(data.report, dataset_cfg)
    return data
