"""Dataset formats -> canonical records: chat messages, or a document's text.

Each converter validates one row and either returns its canonical form or raises
:class:`RowError` with a reason (a short, countable key) and a detail for the user.
Chat formats return ``[{"role": ..., "content": ...}, ...]``; the text format
returns the document's text.
"""

from __future__ import annotations

import json
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


def _check_turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """After an optional system prompt: user, assistant, user, ...; an assistant turn that calls tools is
    followed by their results (tool turns) and then the assistant again; the last turn is the assistant's."""
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not turns:
        raise RowError("empty_conversation", "no user or assistant turns")
    previous = None
    for i, m in enumerate(turns):
        role = m["role"]
        if previous is None or previous == "user_done":
            expected = ("user",)
        elif previous == "user":
            expected = ("assistant",)
        elif previous == "calls":
            expected = ("tool",)
        else:  # after a tool result: more results, or the assistant
            expected = ("tool", "assistant")
        if role not in expected:
            where = "starts with" if i == 0 else f"turn {i + 1} is"
            want = " or ".join(f"'{e}'" for e in expected)
            raise RowError("bad_role_order",
                           f"conversation {where} '{role}' where {want} was expected "
                           "(turns must alternate user/assistant, after an optional system prompt; an assistant's "
                           "tool calls are followed by tool results)")
        if role == "assistant":
            previous = "calls" if m.get("tool_calls") else "user_done"
        elif role == "tool":
            previous = "tool"
        else:
            previous = "user"
    if turns[-1]["role"] != "assistant":
        raise RowError("bad_role_order", f"conversation ends with a {turns[-1]['role']} turn (nothing to learn from)")
    for m in turns:
        if m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls") \
                and not (m.get("reasoning_content") or "").strip():
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


def _tool_names(tools: Any) -> list[str]:
    """The names of a row's tool definitions (OpenAI's {type: function, function: {name, parameters}} or a bare
    {name, parameters}); a RowError when the list is malformed."""
    if not isinstance(tools, list):
        raise RowError("bad_tools", f"field 'tools' is {type(tools).__name__}, not a list of tool definitions")
    names = []
    for i, tool in enumerate(tools):
        spec = tool.get("function", tool) if isinstance(tool, dict) else None
        name = spec.get("name") if isinstance(spec, dict) else None
        if not isinstance(name, str) or not name:
            raise RowError("bad_tools", f"tools[{i}] has no function name (expected {{type: function, function: "
                                        "{name, description, parameters}})")
        names.append(name)
    return names


def row_tools(row: Any) -> list | None:
    """A messages row's tool definitions (its `tools` list, handed to the chat template as tools=), or None."""
    tools = row.get("tools") if isinstance(row, dict) else None
    if tools is None or tools == []:
        return None
    _tool_names(tools)
    return tools


def _tool_calls(calls: Any, where: str, declared: list[str]) -> list[dict]:
    """An assistant's tool calls, checked: each names a declared tool, its arguments an object or a JSON string
    of one (kept as given: templates differ in which they expect)."""
    if not isinstance(calls, list) or not calls:
        raise RowError("bad_tool_call", f"{where}.tool_calls is not a non-empty list")
    out = []
    for j, call in enumerate(calls):
        spec = call.get("function", call) if isinstance(call, dict) else None
        name = spec.get("name") if isinstance(spec, dict) else None
        if not isinstance(name, str) or not name:
            raise RowError("bad_tool_call", f"{where}.tool_calls[{j}] has no function name")
        if name not in declared:
            have = f"the row's tools are {', '.join(declared)}" if declared else "the row declares no tools"
            raise RowError("undeclared_tool", f"{where}.tool_calls[{j}] calls {name!r}, which is not a declared tool "
                                              f"({have}); add it to the row's 'tools'")
        arguments = spec.get("arguments", {})
        parsed = arguments
        if isinstance(arguments, str):
            try:
                parsed = json.loads(arguments)
            except ValueError as e:
                raise RowError("bad_tool_call", f"{where}.tool_calls[{j}] ({name}) arguments are not valid JSON: "
                                                f"{e}") from None
        if not isinstance(parsed, dict):
            raise RowError("bad_tool_call", f"{where}.tool_calls[{j}] ({name}) arguments are "
                                            f"{type(parsed).__name__}, not an object")
        function = {"name": name, "arguments": arguments}
        entry = {"type": "function", "function": function}
        if isinstance(call, dict) and isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        out.append(entry)
    return out


def messages_format(row: Any) -> list[dict[str, Any]]:
    """OpenAI-style messages: [{role: system|user|assistant|tool, content: ...}], with tool use and reasoning.

    An assistant turn may carry ``reasoning_content`` (or open its content with a ``<think>...</think>``
    block, which templates such as Qwen3's read as the reasoning) and ``tool_calls`` ([{type: function, function: {name,
    arguments}}], arguments an object or a JSON string; content may then be empty); a ``tool`` turn holds a
    tool's result. The row's ``tools`` (JSON schemas) go to the template as tools=; each call must name one.
    """
    key, turns = _turn_list(row, ("messages",))
    declared = _tool_names(row["tools"]) if isinstance(row, dict) and row.get("tools") else []
    messages: list[dict[str, Any]] = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise RowError("not_an_object", f"{where} is {type(turn).__name__}, not an object")
        role, content = turn.get("role"), turn.get("content")
        if role not in ("system", "user", "assistant", "tool"):
            raise RowError("unknown_role", f"{where} has role {role!r} (expected system, user, assistant or tool)")
        calls = turn.get("tool_calls") if role == "assistant" else None
        if content is None and not calls:
            raise RowError("missing_field", f"{where} has no 'content'")
        if content is not None and not isinstance(content, str):
            raise RowError("not_a_string", f"{where} content is {type(content).__name__}, not a string")
        message: dict[str, Any] = {"role": role, "content": check_text(content or "", where)}
        if role == "assistant":
            reasoning = turn.get("reasoning_content")
            if reasoning is not None and not isinstance(reasoning, str):
                raise RowError("not_a_string", f"{where}.reasoning_content is {type(reasoning).__name__}, not a "
                                               "string")
            if reasoning is not None:
                message["reasoning_content"] = check_text(reasoning, f"{where}.reasoning_content")
            if calls:
                message["tool_calls"] = _tool_calls(calls, where, declared)
        if role == "tool":
            for k in ("tool_call_id", "name"):
                if isinstance(turn.get(k), str):
                    message[k] = turn[k]
        messages.append(message)
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
