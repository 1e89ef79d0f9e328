"""Dataset formats -> canonical records: chat messages, or a document's text.

Each converter validates one row and either returns its canonical form or raises
:class:`RowError` with a reason (a short, countable key) and a detail for the user.
Chat formats return ``[{"role": ..., "content": ...}, ...]``; the text format
returns the document's text.
"""

from __future__ import annotations

from typing import Any

ROLE_ALIASES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
    "model": "assistant", "system": "system",
}
CHAT_FORMATS = ("alpaca", "sharegpt", "messages")


class RowError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _has_surrogates(text: str) -> bool:
    # Lone surrogates come from bytes that are not UTF-8 (read with surrogateescape) or from JSON
    # escapes like "\udc80"; no tokenizer can encode them.
    return not text.isascii() and any("\ud800" <= ch <= "\udfff" for ch in text)


def check_text(text: str, where: str) -> str:
    if _has_surrogates(text):
        raise RowError("undecodable", f"{where} holds bytes that are not UTF-8 text")
    return text


def _field(row: dict, key: str, required: bool = True) -> str:
    if key not in row or row[key] is None:
        if required:
            raise RowError("missing_field", f"missing field '{key}'")
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise RowError("not_a_string", f"field '{key}' is {type(value).__name__}, not a string")
    return check_text(value, f"field '{key}'")


def alpaca(row: Any) -> list[dict[str, str]]:
    """instruction / input (optional) / output, and an optional system prompt."""
    if not isinstance(row, dict):
        raise RowError("not_an_object", f"row is {type(row).__name__}, not an object")
    instruction = _field(row, "instruction").strip()
    extra = _field(row, "input", required=False).strip()
    output = _field(row, "output").strip()
    system = _field(row, "system", required=False).strip()
    if not instruction and not extra:
        raise RowError("empty_prompt", "empty 'instruction' and 'input'")
    if not output:
        raise RowError("empty_answer", "empty 'output'")
    user = instruction
    if extra:
        user = f"{user}\n\n{extra}" if user else extra
    if system:
        return [{"role": "system", "content": system}, {"role": "user", "content": user},
                {"role": "assistant", "content": output}]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _check_turns(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not turns:
        raise RowError("empty_conversation", "no user or assistant turns")
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            where = "starts with" if i == 0 else f"turn {i + 1} is"
            raise RowError("bad_role_order",
                           f"conversation {where} '{m['role']}' where '{expected}' was expected "
                           "(turns must alternate user/assistant, after an optional system prompt)")
    if turns[-1]["role"] != "assistant":
        raise RowError("bad_role_order", "conversation ends with a user turn (nothing to learn from)")
    for m in turns:
        if m["role"] == "assistant" and not m["content"].strip():
            raise RowError("empty_answer", "an assistant turn is empty")
    return messages


def _turn_list(row: Any, keys: tuple[str, ...]) -> tuple[str, list]:
    if not isinstance(row, dict):
        raise RowError("not_an_object", f"row is {type(row).__name__}, not an object")
    for key in keys:
        if key in row and row[key] is not None:
            turns = row[key]
            if not isinstance(turns, list):
                raise RowError("not_a_list", f"field '{key}' is {type(turns).__name__}, not a list of turns")
            return key, turns
    raise RowError("missing_field", f"missing field '{keys[0]}'")


def sharegpt(row: Any) -> list[dict[str, str]]:
    """conversations: [{from: human|gpt|system, value: ...}]; also user/assistant roles and a `messages` key."""
    key, turns = _turn_list(row, ("conversations", "messages"))
    return _check_turns(aliased_turns(key, turns))


def aliased_turns(key: str, turns: list) -> list[dict[str, str]]:
    """Turns with ShareGPT's or OpenAI's names (from/value or role/content, human/gpt or user/assistant) as
    messages, each checked; the order of the roles is the caller's to check."""
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowError("not_an_object", f"{key}[{i}] is {type(turn).__name__}, not an object")
        role = turn.get("from", turn.get("role"))
        content = turn.get("value", turn.get("content"))
        if not isinstance(role, str) or role.lower() not in ROLE_ALIASES:
            raise RowError("unknown_role", f"{key}[{i}] has role {role!r} (expected human/gpt/system or user/assistant)")
        if content is None:
            raise RowError("missing_field", f"{key}[{i}] has no 'value' (or 'content')")
        if not isinstance(content, str):
            raise RowError("not_a_string", f"{key}[{i}] content is {type(content).__name__}, not a string")
        messages.append({"role": ROLE_ALIASES[role.lower()], "content": check_text(content, f"{key}[{i}]")})
    return messages


def messages_format(row: Any) -> list[dict[str, str]]:
    """OpenAI-style messages: [{role: system|user|assistant, content: ...}]."""
    key, turns = _turn_list(row, ("messages",))
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowError("not_an_object", f"{key}[{i}] is {type(turn).__name__}, not an object")
        role, content = turn.get("role"), turn.get("content")
        if role not in ("system", "user", "assistant"):
            raise RowError("unknown_role", f"{key}[{i}] has role {role!r} (expected system, user or assistant)")
        if content is None:
            raise RowError("missing_field", f"{key}[{i}] has no 'content'")
        if not isinstance(content, str):
            raise RowError("not_a_string", f"{key}[{i}] content is {type(content).__name__}, not a string")
        messages.append({"role": role, "content": check_text(content, f"{key}[{i}]")})
    return _check_turns(messages)


def text_row(row: Any, column: str) -> str:
    """One document from a row file (JSONL/CSV/Parquet): the text in `column`."""
    if not isinstance(row, dict):
        raise RowError("not_an_object", f"row is {type(row).__name__}, not an object")
    text = _field(row, column)
    if not text.strip():
        raise RowError("empty_text", f"field '{column}' is empty")
    return text


CONVERTERS = {"alpaca": alpaca, "sharegpt": sharegpt, "messages": messages_format}


def detect(row: Any, text_column: str = "text") -> str | None:
    """The format a row looks like, or None."""
    if not isinstance(row, dict):
        return None
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "conversations" in row:
        return "sharegpt"
    if isinstance(row.get("messages"), list):
        first = next((t for t in row["messages"] if isinstance(t, dict)), {})
        return "sharegpt" if "from" in first else "messages"
    if isinstance(row.get(text_column), str):
        return "text"
    return None
