"""Preference data (dataset.format: preference): pairs and unpaired completions, validated row by row.

The shapes people have (each auto-detected per row):

* ``prompt`` / ``chosen`` / ``rejected`` strings (the common DPO JSONL);
* TRL's conversational shape: ``prompt`` a message list, ``chosen`` / ``rejected`` the answer's messages;
* UltraFeedback: ``chosen`` / ``rejected`` full message lists that share everything but the last answer
  (an optional ``prompt`` string must be the first user turn);
* Anthropic HH: ``chosen`` / ``rejected`` full transcripts (``\\n\\nHuman: ... \\n\\nAssistant: ...``) that
  share a prefix up to the last ``Assistant:`` turn;
* KTO's unpaired shape: ``prompt`` + ``completion`` + ``label`` (true: desirable).

Every row becomes a canonical :class:`Pair` (prompt messages, chosen and rejected answers) or
:class:`Unpaired`, or a counted rejection with its location (``file.jsonl:12``) and reason: a missing or
non-string field, an empty or identical chosen and rejected, a prompt that differs between the two
transcripts, roles out of order, or (:func:`prepare`) longer than dataset.max_seq_len after the chat template.
:func:`prepare` then de-duplicates, splits by the prompt's content hash (pairs answering one prompt stay on one
side), tokenizes every row exactly as TRL's trainer would (:func:`tokenize`) and stores the ids in an Arrow
cache like the SFT data (data_prep.store), with the same report fields.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.formats import RowError, aliased_turns, check_text

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Pair:
    prompt: Messages  # system / user / assistant turns, ending with a user turn
    chosen: str
    rejected: str


@dataclass(frozen=True)
class Unpaired:
    prompt: Messages
    completion: str
    label: bool  # desirable (KTO)


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def convert(row: Any) -> Pair | Unpaired:
    if not isinstance(row, dict):
        raise RowError("not_an_object", f"row is {type(row).__name__}, not an object")
    if "completion" in row and "label" in row and "chosen" not in row:
        return _unpaired(row)
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise RowError("missing_field", f"missing field '{key}'")
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, list) and isinstance(rejected, list):
        if row.get("prompt") is not None and isinstance(row["prompt"], list):
            return _pair(_messages(row["prompt"], "prompt"), _answer(chosen, "chosen"), _answer(rejected, "rejected"))
        return _from_transcripts(_messages(chosen, "chosen"), _messages(rejected, "rejected"), row.get("prompt"))
    if isinstance(chosen, str) and isinstance(rejected, str):
        prompt = row.get("prompt")
        if prompt is None:
            if _HH_TURN.search(chosen):  # Anthropic HH: whole transcripts
                return _from_transcripts(_hh(chosen, "chosen"), _hh(rejected, "rejected"), None)
            raise RowError("missing_field", "missing field 'prompt' (and 'chosen' is not a Human:/Assistant: "
                                            "transcript)")
        prompt_msgs = _messages(prompt, "prompt") if isinstance(prompt, list) else [
            {"role": "user", "content": _string(prompt, "prompt")}]
        return _pair(prompt_msgs, check_text(chosen, "field 'chosen'"), check_text(rejected, "field 'rejected'"))
    raise RowError("not_a_string", f"'chosen' and 'rejected' must both be strings or both message lists, got "
                                   f"{type(chosen).__name__} and {type(rejected).__name__}")


def _string(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise RowError("not_a_string", f"field '{key}' is {type(value).__name__}, not a string")
    return check_text(value, f"field '{key}'")


def _messages(turns: Any, key: str) -> Messages:
    if isinstance(turns, str):
        return [{"role": "user", "content": check_text(turns, f"field '{key}'")}]
    if not isinstance(turns, list):
        raise RowError("not_a_list", f"field '{key}' is {type(turns).__name__}, not a list of messages")
    return aliased_turns(key, turns)


def _answer(turns: Any, key: str) -> str:
    """The answer of TRL's conversational shape: one assistant message (or a string)."""
    if isinstance(turns, str):
        return check_text(turns, f"field '{key}'")
    msgs = _messages(turns, key)
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise RowError("bad_role_order", f"'{key}' must be one assistant message after a 'prompt' list, got "
                                         f"{[m['role'] for m in msgs]}")
    return msgs[0]["content"]


def _check_prompt(prompt: Messages) -> Messages:
    turns = prompt[1:] if prompt and prompt[0]["role"] == "system" else prompt
    if not turns or not any(m["content"].strip() for m in turns):
        raise RowError("empty_prompt", "the prompt is empty")
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise RowError("bad_role_order", f"prompt turn {i + 1} is '{m['role']}' where '{expected}' was expected "
                                             "(turns alternate user/assistant after an optional system prompt)")
    if turns[-1]["role"] != "user":
        raise RowError("bad_role_order", "the prompt must end with a user turn (the answers follow it)")
    return prompt


def _pair(prompt: Messages, chosen: str, rejected: str) -> Pair:
    _check_prompt(prompt)
    if not chosen.strip():
        raise RowError("empty_answer", "'chosen' is empty")
    if not rejected.strip():
        raise RowError("empty_answer", "'rejected' is empty")
    if " ".join(chosen.split()) == " ".join(rejected.split()):
        raise RowError("identical_pair", "'chosen' and 'rejected' are the same answer (nothing to prefer)")
    return Pair(prompt, chosen.strip(), rejected.strip())


def _from_transcripts(chosen: Messages, rejected: Messages, prompt: Any) -> Pair:
    for key, msgs in (("chosen", chosen), ("rejected", rejected)):
        if not msgs or msgs[-1]["role"] != "assistant":
            raise RowError("bad_role_order", f"'{key}' must end with the assistant's answer")
    head_c, head_r = chosen[:-1], rejected[:-1]
    if head_c != head_r:
        turn = next((i for i, (a, b) in enumerate(zip(head_c, head_r, strict=False)) if a != b),
                    min(len(head_c), len(head_r)))
        raise RowError("prompt_mismatch", f"'chosen' and 'rejected' differ before their last answer (turn "
                                          f"{turn + 1}): a pair must answer the same prompt")
    if isinstance(prompt, str) and prompt.strip():
        first_user = next((m["content"] for m in head_c if m["role"] == "user"), "")
        if " ".join(prompt.split()) != " ".join(first_user.split()):
            raise RowError("prompt_mismatch", "field 'prompt' is not the transcripts' first user turn")
    return _pair(head_c, chosen[-1]["content"], rejected[-1]["content"])


def _hh(text: str, key: str) -> Messages:
    check_text(text, f"field '{key}'")
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise RowError("bad_role_order", f"'{key}' has text before its first 'Human:' turn")
    return [{"role": "user" if who == "Human" else "assistant", "content": body.strip()}
            for who, body in zip(parts[1::2], parts[2::2], strict=True)]


def _unpaired(row: dict) -> Unpaired:
    prompt = row.get("prompt")
    if prompt is None:
        raise RowError("missing_field", "missing field 'prompt'")
    prompt_msgs = _check_prompt(_messages(prompt, "prompt"))
    completion = _answer(row["completion"], "completion")
    if not completion.strip():
        raise RowError("empty_answer", "'completion' is empty")
    label = row["label"]
    if isinstance(label, bool):
        desirable = label
    elif isinstance(label, int) and label in (0, 1):
        desirable = bool(label)
    elif isinstance(label, str) and label.strip().lower() in ("true", "false"):
        desirable = label.strip().lower() == "true"
    else:
        raise RowError("bad_label", f"'label' is {label!r}; KTO's label is true (desirable) or false")
    return Unpaired(prompt_msgs, completion.strip(), desirable)


# ---- the data stage for preference data ----------------------------------------------------------------

# Bump when what the preference store holds changes (part of the fingerprint).
PREF_VERSION = 1


@dataclass
class PreferenceData:
    """Kept rows in TRL's conversational shape, split by the prompt's content hash, with the report; their
    token ids (TRL's own tokenization, :func:`tokenize`) are in the Arrow store at `store_dir`."""
    report: Any  # data_prep.report.DataReport
    kind: str  # "paired" (DPO, ORPO, SimPO) | "unpaired" (KTO)
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    train_locations: list[str]
    eval_locations: list[str]
    lengths: Any = None  # every rendered sequence's token count (numpy), for the histogram
    template_name: str = "tokenizer"  # the chat template's name (data_prep.templates), as for SFT data
    store_dir: Any = None  # Path of the Arrow store (<cache>/datasets/<fingerprint>/)
    packed = False  # preference rows are never packed

    @property
    def eval_messages(self) -> list[list[dict[str, str]]]:
        """The held-out prompts with their preferred answer (the chosen one; KTO: the desirable completions),
        as conversations for the generation evals."""
        return [row["prompt"] + row["chosen"] if "chosen" in row else row["prompt"] + row["completion"]
                for row in self.eval if "chosen" in row or row.get("label")]

    def to_dataset(self, split: str):
        """A datasets.Dataset of the split in TRL's conversational shape (for the trainers that tokenize
        themselves: they render it with the tokenizer's chat template, which the data stage set)."""
        from datasets import Dataset

        return Dataset.from_list(self.train if split == "train" else self.eval)

    def tokenized(self, split: str):
        """The split's token ids as a memory-mapped datasets.Dataset from the store: prompt_ids / chosen_ids /
        rejected_ids for pairs (what DPOTrainer._prepare_dataset makes), prompt_ids / completion_ids / label
        for unpaired rows."""
        from datasets import Dataset

        columns = ["prompt_ids", "chosen_ids", "rejected_ids"] if self.kind == "paired" else [
            "prompt_ids", "completion_ids", "label"]
        return Dataset.from_file(str(Path(self.store_dir) / f"{split}.arrow")).select_columns(columns)


def _row(item: Pair | Unpaired) -> dict[str, Any]:
    if isinstance(item, Pair):
        return {"prompt": item.prompt, "chosen": [{"role": "assistant", "content": item.chosen}],
                "rejected": [{"role": "assistant", "content": item.rejected}]}
    return {"prompt": item.prompt, "completion": [{"role": "assistant", "content": item.completion}],
            "label": item.label}


def _key(messages: Messages, *answers: str) -> str:
    from data_prep.prepare import _chat_key

    return _chat_key(messages) + "".join("\x1d" + " ".join(a.lower().split()) for a in answers)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def tokenize(tokenizer, prompt: Messages, answers: list[str]) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, each answer's ids) exactly as TRL 1.16 tokenizes a conversational row
    (DPOTrainer._prepare_dataset; KTOTrainer's for one answer): the prompt rendered with the generation
    prompt, prompt + answer rendered whole, and the answers begin where all of them and the prompt stop
    sharing a prefix (some templates render the prompt alone differently). tests/test_data_preference.py
    compares these ids with TRL's own on the tiny model's and real tokenizers."""
    def ids(messages: Messages, **kw) -> list[int]:
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, tools=None,
                                                  **kw)["input_ids"])

    head = ids(prompt, add_generation_prompt=True)
    full = [ids(prompt + [{"role": "assistant", "content": a}]) for a in answers]
    cut = min(_common_prefix(head, f) for f in full)
    return head[:cut], [f[cut:] for f in full]


def _ids_array(rows: list[list[int]]):
    from data_prep.store import _list_array

    return _list_array(rows, sum(len(r) for r in rows))


def _write_split(path: Path, kind: str, rows: list[dict], locations: list[str], ids: list[tuple]) -> None:
    """One split's Arrow stream file (read with datasets.Dataset.from_file, as the SFT store): the token
    columns the trainer takes, the location, and the conversational row as JSON (the evals and the preview)."""
    import pyarrow as pa

    columns: dict[str, Any] = {"prompt_ids": _ids_array([i[0] for i in ids])}
    if kind == "paired":
        columns["chosen_ids"] = _ids_array([i[1][0] for i in ids])
        columns["rejected_ids"] = _ids_array([i[1][1] for i in ids])
    else:
        columns["completion_ids"] = _ids_array([i[1][0] for i in ids])
        columns["label"] = pa.array([bool(r["label"]) for r in rows], type=pa.bool_())
    columns["location"] = pa.array(locations, type=pa.string())
    columns["row"] = pa.array([json.dumps(r, ensure_ascii=False) for r in rows], type=pa.string())
    table = pa.table(columns)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def _load(path: Path) -> PreferenceData:
    import numpy as np

    from data_prep import store
    from data_prep.report import DataReport

    meta = store.read_meta(path)
    report = DataReport.from_dict(json.loads((path / "report.json").read_text()))
    splits = {}
    for split in ("train", "eval"):
        table = store.open_table(path / f"{split}.arrow")
        splits[split] = ([json.loads(r) for r in table.column("row").to_pylist()],
                         table.column("location").to_pylist())
    return PreferenceData(report, meta["kind"], splits["train"][0], splits["eval"][0], splits["train"][1],
                          splits["eval"][1], lengths=np.load(path / "lengths.npy"),
                          template_name=meta["template_name"], store_dir=path)


def prepare(dataset_cfg, tokenizer, chat_template: str | None) -> PreferenceData:
    """Read, validate, de-duplicate, split and tokenize preference rows (dataset.format: preference).

    As for SFT data (data_prep.prepare), the result is an Arrow store in the cache named by a fingerprint of
    the sources' content, the tokenizer, the template and the settings; a later run with nothing changed loads
    it (report.cache_hit). The ids are TRL's own (:func:`tokenize`): the DPO trainer takes them as they are
    (finetune.methods), and a row longer than dataset.max_seq_len (the prompt and its longer answer) is
    rejected here as too_long and counted, so TRL's own silent filter of over-long prompts has nothing left."""
    import time

    import numpy as np

    from data_prep import readers, store, templates
    from data_prep.prepare import (
        _check,
        _packing_stats,
        _Rejections,
        fingerprint,
        in_eval_split,
        reuse,
        source_specs,
    )
    from data_prep.report import DataReport, SourceStats, TokenStats, percentile
    from finetune.errors import DataError
    from finetune.paths import cache_dir

    started = time.perf_counter()
    template = templates.resolve(chat_template, tokenizer)
    tokenizer.chat_template = template.jinja
    specs = source_specs(dataset_cfg)
    listings = [readers.list_source(spec.path, "preference") for spec in specs]
    # what the data is (contents, tokenizer, template, settings): the store's name; a resumed run refuses
    # changed data by it
    fp = f"pref{PREF_VERSION}-" + fingerprint(dataset_cfg, tokenizer, template, specs, listings, packed=False)
    final = cache_dir() / "datasets" / fp
    fixes = list(getattr(tokenizer, "finetune_fixes", []))
    reused = reuse(final, _load, dataset_cfg, fixes, started, "prepared preference dataset")
    if reused is not None:
        return reused

    rejections = _Rejections()
    seen: set[str] = set()
    kinds: dict[str, int] = {}
    out: dict[str, list] = {"train": [], "eval": [], "train_loc": [], "eval_loc": [], "train_ids": [],
                            "eval_ids": []}
    lengths: list[int] = []
    train_lengths: list[int] = []
    trained = train_tokens = 0
    max_len = dataset_cfg.max_seq_len
    report = DataReport(source=", ".join(s.path for s in specs), format="preference",
                        format_detected=any(s.format == "auto" for s in specs), chat_template=template.name,
                        masking="prefixes", max_seq_len=max_len, length_policy="drop")
    report.fingerprint = fp
    for spec, listing in zip(specs, listings, strict=True):
        stats = SourceStats(path=spec.path, format="preference", weight=spec.weight)
        report.sources.append(stats)
        report.files_skipped += listing.skipped
        for raw in readers.read_rows(listing):
            stats.rows_read += 1
            report.rows_read += 1
            try:
                if raw.error:
                    raise RowError(raw.error, raw.detail)
                item = convert(raw.data)
                kind = "paired" if isinstance(item, Pair) else "unpaired"
                first = next(iter(kinds), kind)
                if kind != first:
                    raise RowError("mixed_shapes", f"a {kind} row among {first} ones (pairs for DPO / ORPO / SimPO, "
                                                   "or completion + label rows for KTO, not both)")
                answers = [item.chosen, item.rejected] if kind == "paired" else [item.completion]
                prompt_ids, answer_ids = tokenize(tokenizer, item.prompt, answers)
                full = [len(prompt_ids) + len(a) for a in answer_ids]
                if max(full) > max_len:  # counted here, never cut or dropped silently by the trainer
                    raise RowError("too_long", f"{max(full)} tokens after the template > dataset.max_seq_len="
                                               f"{max_len}")
            except RowError as e:
                rejections.add(raw.location, e.reason, e.detail)
                stats.rows_rejected += 1
                continue
            kinds[kind] = kinds.get(kind, 0) + 1
            key = _key(item.prompt, *answers, *(["+" if item.label else "-"] if kind == "unpaired" else []))
            if dataset_cfg.dedup and key in seen:
                report.duplicates += 1
                stats.duplicates += 1
                continue
            seen.add(key)
            report.rows_kept += 1
            stats.rows_kept += 1
            lengths += full
            trained += sum(len(a) for a in answer_ids)
            # the prompt decides the side: pairs that answer one prompt never straddle train and eval
            side = "eval" if in_eval_split(_key(item.prompt), dataset_cfg.eval_fraction) else "train"
            out[side].append(_row(item))
            out[f"{side}_loc"].append(raw.location)
            out[f"{side}_ids"].append((prompt_ids, answer_ids))
            if side == "eval":
                stats.eval_rows += 1
            else:
                stats.train_rows += 1
                stats.train_examples += 1
                train_tokens += sum(full)
                train_lengths += full
    report.rejected = dict(sorted(rejections.counts.items()))
    report.rejected_examples = rejections.examples
    report.train_rows, report.eval_rows = len(out["train"]), len(out["eval"])
    ordered = sorted(lengths)
    if ordered:
        report.tokens = TokenStats(total=sum(ordered), trained=trained, p50=percentile(ordered, 50),
                                   p95=percentile(ordered, 95), p99=percentile(ordered, 99), max=ordered[-1],
                                   mean=round(sum(ordered) / len(ordered), 2), train_total=train_tokens)
    # what packing would give and what padded batches of the sequences fill (as for unpacked SFT data)
    report.packing = _packing_stats(train_lengths, max_len, None)
    report.packing.reason = "preference rows are never packed (chosen and rejected share one batch)"
    report.tokenizer_fixes = fixes
    if report.rows_read == 0:
        raise DataError(f"dataset.path: {report.source} holds no rows")
    kind = next(iter(kinds), "paired")
    tmp = store.new_build_dir(final)
    try:
        for split in ("train", "eval"):
            _write_split(tmp / f"{split}.arrow", kind, out[split], out[f"{split}_loc"], out[f"{split}_ids"])
        np.save(tmp / "lengths.npy", np.asarray(lengths, dtype=np.int32))
        report.seconds = round(time.perf_counter() - started, 3)
        report.write(tmp / "report.json")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    store.commit(tmp, final, {"pref_version": PREF_VERSION, "kind": kind, "template_name": template.name,
                              "template": template.jinja, "masking": "prefixes", "packed": False},
                 replace=not dataset_cfg.cache)
    data = _load(final)
    _check(data.report, dataset_cfg)  # the SFT data stage's limits: rejected share, no training rows left
    return data


def show(data: PreferenceData, tokenizer, count: int, console) -> None:
    """Print the first `count` training pairs: the rendered prompt, then chosen and rejected side by side
    (the answers are what the loss is computed on, highlighted as in data_prep.preview)."""
    from rich.columns import Columns
    from rich.panel import Panel
    from rich.text import Text

    from data_prep.preview import IGNORED, TRAINED

    r = data.report
    console.print(Text.assemble(f"preview: {min(count, len(data.train))} of {r.train_rows} training rows, template ",
                                (r.chat_template, "bold"), ": ", ("trained", TRAINED), " (the answers)  ",
                                ("not trained", IGNORED)))
    for row, location in list(zip(data.train, data.train_locations, strict=True))[:count]:
        head = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        answers = [("chosen", row["chosen"])] if "chosen" in row else [
            ("desirable" if row["label"] else "undesirable", row["completion"])]
        if "rejected" in row:
            answers.append(("rejected", row["rejected"]))
        panels = []
        for name, answer in answers:
            full = tokenizer.apply_chat_template(row["prompt"] + answer, tokenize=False)
            text = Text(head, style=IGNORED)
            text.append(full[len(head):], style=TRAINED)
            panels.append(Panel(text, title=name, title_align="left", expand=True))
        console.print(Panel(Columns(panels, equal=True, expand=True), title=location, title_align="left"))
