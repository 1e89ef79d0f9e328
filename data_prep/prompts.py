"""Prompt data for GRPO (dataset.format: prompts): prompts to sample completions of, with reference columns for the
reward functions (finetune/rewards.py).

A row is one of:
- ``{"prompt": "text"}`` or ``{"prompt": [messages]}``, with any other columns kept as references (``answer``, ...);
- ``{"messages": [...]}`` (or ``conversations``, ShareGPT's roles too): the conversation up to its last user turn is
  the prompt; a final assistant turn, where there is one, is the reference ``answer``;
- Alpaca (``instruction``, optional ``input`` / ``system``): the prompt; ``output`` is the reference ``answer``;
- GSM8K (``question``, ``answer``): the question is the prompt; the text after ``####`` in the answer is the
  reference ``answer`` (what numeric_match compares), the worked solution before it is kept as ``solution``.

Each prompt is rendered as training and evaluation will render it (the chat template with the generation prompt,
dataset.template_kwargs included) to count its tokens: a prompt longer than dataset.max_seq_len is rejected as
too_long and counted (never cut), so the plan's prompt length (finetune/preflight) is the longest one kept. Rows
are de-duplicated and split by the prompt's content hash, as the other formats are; a bad row is rejected with its
file:line and counted, and the share rejected is held to dataset.max_rejected_fraction.

Nothing is tokenized for the trainer: TRL's GRPOTrainer renders the prompts itself with the same tokenizer,
template and template_kwargs (finetune/methods.py passes them), so there is no Arrow store; the fingerprint still
names the data, which is what resume checks.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from data_prep.formats import RowError, aliased_turns, check_text

Messages = list[dict[str, Any]]

PROMPTS_VERSION = 1
# Keyword arguments TRL hands every reward function itself: a data column of one of these names would be shadowed
RESERVED = ("prompt", "prompts", "completion", "completions", "completion_ids", "trainer_state", "log_extra",
            "log_metric", "environments")
_CONSUMED = ("prompt", "messages", "conversations", "instruction", "input", "output", "system", "question")


@dataclass
class PromptRow:
    prompt: Messages
    references: dict[str, Any] = field(default_factory=dict)


def _text(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise RowError("not_a_string", f"field '{key}' is {type(value).__name__}, not a string")
    return check_text(value, f"field '{key}'")


def _turns(turns: Any, key: str) -> Messages:
    """The turns as messages (ShareGPT's or OpenAI's names), as the chat formats read them."""
    if not isinstance(turns, list) or not turns:
        raise RowError("not_a_list", f"field '{key}' must be a non-empty list of turns")
    return aliased_turns(key, turns)


def _prompt_of(messages: Messages, key: str) -> tuple[Messages, str | None]:
    """(the conversation up to its last user turn, the final assistant answer if the row ends with one)."""
    answer = None
    if messages[-1]["role"] == "assistant":
        answer, messages = messages[-1]["content"], messages[:-1]
    if not messages or messages[-1]["role"] != "user":
        raise RowError("no_user_turn", f"field '{key}' has no user turn to answer"
                       + (" before its final assistant turn" if answer is not None else " at its end"))
    if not messages[-1]["content"].strip():
        raise RowError("empty_prompt", f"the last user turn of '{key}' is empty")
    return messages, answer


def _references(row: dict, consumed: tuple[str, ...]) -> dict[str, Any]:
    refs = {}
    for key, value in row.items():
        if key in consumed:
            continue
        if key in RESERVED:
            raise RowError("reserved_column", f"column '{key}' is a name TRL gives reward functions itself: "
                                              "rename it")
        if isinstance(value, str):
            check_text(value, f"field '{key}'")
        refs[key] = value
    return refs


def convert(row: Any) -> PromptRow:
    """One row -> its prompt (chat messages ending with a user turn) and reference columns; RowError if it is none
    of the shapes in the module docstring."""
    if not isinstance(row, dict):
        raise RowError("not_an_object", f"row is {type(row).__name__}, not an object")
    if row.get("prompt") is not None:
        value = row["prompt"]
        if isinstance(value, str):
            if not value.strip():
                raise RowError("empty_prompt", "empty 'prompt'")
            prompt, answer = [{"role": "user", "content": _text(value, "prompt")}], None
        else:
            prompt, answer = _prompt_of(_turns(value, "prompt"), "prompt")
        refs = _references(row, ("prompt",))
    elif row.get("messages") is not None or row.get("conversations") is not None:
        key = "messages" if row.get("messages") is not None else "conversations"
        prompt, answer = _prompt_of(_turns(row[key], key), key)
        refs = _references(row, (key,))
    elif row.get("instruction") is not None:
        user = _text(row["instruction"], "instruction").strip()
        extra = _text(row.get("input") or "", "input").strip()
        user = f"{user}\n\n{extra}" if user and extra else user or extra
        if not user:
            raise RowError("empty_prompt", "empty 'instruction' and 'input'")
        system = _text(row.get("system") or "", "system").strip()
        prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        answer = _text(row["output"], "output").strip() if row.get("output") is not None else None
        refs = _references(row, ("instruction", "input", "output", "system"))
    elif row.get("question") is not None:
        question = _text(row["question"], "question").strip()
        if not question:
            raise RowError("empty_prompt", "empty 'question'")
        prompt, answer = [{"role": "user", "content": question}], None
        refs = _references(row, ("question",))
        if isinstance(refs.get("answer"), str) and "####" in refs["answer"]:
            solution, _, final = refs["answer"].rpartition("####")
            refs.setdefault("solution", solution.strip())
            refs["answer"] = final.strip().replace(",", "") if _numeric(final) else final.strip()
    else:
        raise RowError("missing_field", "no 'prompt', 'messages', 'instruction' or 'question' field")
    if answer is not None and "answer" not in refs:
        refs["answer"] = answer
    return PromptRow(prompt, refs)


def _numeric(text: str) -> bool:
    stripped = text.strip().replace(",", "")
    try:
        float(stripped)
    except ValueError:
        return False
    return True


@dataclass
class PromptData:
    """Kept prompts in TRL's conversational shape ({"prompt": messages, <reference columns>}), split by the prompt's
    content hash, with the report."""

    report: Any  # data_prep.report.DataReport
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    train_locations: list[str]
    eval_locations: list[str]
    columns: list[str]  # the reference columns the rows have (every row has each; None where a row had none)
    lengths: Any = None  # every kept prompt's token count (numpy), for the histogram
    template_name: str = "tokenizer"
    kind = "prompts"
    packed = False

    @property
    def eval_messages(self) -> list[list[dict[str, str]]]:
        """Held-out prompts with their reference answer where they have one as text (heldout.jsonl: the export's
        check in llama.cpp answers them)."""
        return [row["prompt"] + [{"role": "assistant", "content": row["answer"]}] for row in self.eval
                if isinstance(row.get("answer"), str) and row["answer"].strip()]

    def to_dataset(self, split: str):
        from datasets import Dataset

        rows = self.train if split == "train" else self.eval
        return Dataset.from_list(rows)


def render(tokenizer, prompt: Messages, template_kwargs: dict | None = None) -> list[int]:
    """The prompt's token ids as GRPOTrainer renders it for generation (the chat template, the generation prompt)."""
    return list(tokenizer.apply_chat_template(prompt, tokenize=True, return_dict=True, add_generation_prompt=True,
                                              **(template_kwargs or {}))["input_ids"])


def prepare(dataset_cfg, tokenizer, chat_template: str | None) -> PromptData:
    """Read, validate, de-duplicate, split and measure prompt rows (dataset.format: prompts)."""
    import numpy as np

    from data_prep import readers, templates
    from data_prep.prepare import _chat_key, _check, _Rejections, fingerprint, in_eval_split, source_specs
    from data_prep.report import DataReport, SourceStats, TokenStats, percentile
    from finetune.errors import DataError

    started = time.perf_counter()
    template = templates.resolve(chat_template, tokenizer)
    tokenizer.chat_template = template.jinja
    specs = source_specs(dataset_cfg)
    listings = [readers.list_source(spec.path, "prompts") for spec in specs]
    fp = f"prompts{PROMPTS_VERSION}-" + fingerprint(dataset_cfg, tokenizer, template, specs, listings, packed=False)
    kwargs = dict(dataset_cfg.template_kwargs or {})
    max_len = dataset_cfg.max_seq_len
    report = DataReport(source=", ".join(s.path for s in specs), format="prompts",
                        format_detected=any(s.format == "auto" for s in specs), chat_template=template.name,
                        masking="none", max_seq_len=max_len, length_policy="drop")
    report.fingerprint = fp
    report.tokenizer_fixes = list(getattr(tokenizer, "finetune_fixes", []))
    rejections = _Rejections()
    seen: set[str] = set()
    out: dict[str, list] = {"train": [], "eval": [], "train_loc": [], "eval_loc": []}
    lengths: list[int] = []
    train_total = 0
    columns: dict[str, None] = {}
    for spec, listing in zip(specs, listings, strict=True):
        stats = SourceStats(path=spec.path, format="prompts", weight=spec.weight)
        report.sources.append(stats)
        report.files_skipped += listing.skipped
        for raw in readers.read_rows(listing):
            stats.rows_read += 1
            report.rows_read += 1
            try:
                if raw.error:
                    raise RowError(raw.error, raw.detail)
                item = convert(raw.data)
                n = len(render(tokenizer, item.prompt, kwargs))
                if n > max_len:  # counted here, never cut: a cut prompt asks another question
                    raise RowError("too_long", f"the prompt is {n} tokens after the template > dataset.max_seq_len="
                                               f"{max_len}")
            except RowError as e:
                rejections.add(raw.location, e.reason, e.detail)
                stats.rows_rejected += 1
                continue
            key = _chat_key(item.prompt)
            if dataset_cfg.dedup and key in seen:
                report.duplicates += 1
                stats.duplicates += 1
                continue
            seen.add(key)
            report.rows_kept += 1
            stats.rows_kept += 1
            lengths.append(n)
            columns.update(dict.fromkeys(item.references))
            side = "eval" if in_eval_split(key, dataset_cfg.eval_fraction) else "train"
            out[side].append({"prompt": item.prompt, **item.references})
            out[f"{side}_loc"].append(raw.location)
            if side == "eval":
                stats.eval_rows += 1
            else:
                stats.train_rows += 1
                stats.train_examples += 1
                train_total += n
    for split in ("train", "eval"):  # every row has every column (datasets needs one schema): None where missing
        out[split] = [{"prompt": row["prompt"], **{c: row.get(c) for c in columns}} for row in out[split]]
    report.rejected = dict(sorted(rejections.counts.items()))
    report.rejected_examples = rejections.examples
    report.train_rows, report.eval_rows = len(out["train"]), len(out["eval"])
    ordered = sorted(lengths)
    if ordered:
        report.tokens = TokenStats(total=sum(ordered), trained=0, p50=percentile(ordered, 50),
                                   p95=percentile(ordered, 95), p99=percentile(ordered, 99), max=ordered[-1],
                                   mean=round(sum(ordered) / len(ordered), 2), train_total=train_total)
    report.packing.reason = "prompts are not packed (GRPO generates their completions)"
    if report.rows_read == 0:
        raise DataError(f"dataset.path: {report.source} holds no rows")
    report.seconds = round(time.perf_counter() - started, 3)
    _check(report, dataset_cfg)
    return PromptData(report, out["train"], out["eval"], out["train_loc"], out["eval_loc"], list(columns),
                      lengths=np.asarray(lengths, dtype=np.int32), template_name=template.name)


def show(data: PromptData, tokenizer, count: int, console) -> None:
    """Print the first `count` training prompts as generation sees them (rendered with the generation prompt), with
    their reference columns."""
    from rich.panel import Panel
    from rich.text import Text

    from data_prep.preview import IGNORED

    r = data.report
    console.print(f"preview: {min(count, len(data.train))} of {r.train_rows} training prompts, template "
                  f"{r.chat_template}; GRPO samples the answers itself")
    for row, location in list(zip(data.train, data.train_locations, strict=True))[:count]:
        text = Text(tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True),
                    style=IGNORED)
        refs = {k: v for k, v in row.items() if k != "prompt" and v is not None}
        if refs:
            text.append("\n" + json.dumps(refs, ensure_ascii=False)[:500])
        console.print(Panel(text, title=location, title_align="left"))
