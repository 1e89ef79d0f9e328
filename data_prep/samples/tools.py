"""Function-calling conversations in OpenAI's messages format, written by the project itself.

For the tool-calling demo (recipe tiny-tools-demo) and the tests: each row declares one or two tools
(JSON schemas, in the row's ``tools``) from a small clinic-assistant set. Most rows ask something a tool
answers: the assistant calls it (``tool_calls``, arguments as an object), the ``tool`` turn returns its
result, and the assistant answers from that result. The rest ask a general question that no declared
tool answers, and the assistant answers directly, so the model learns when not to call. Deterministic
for a seed; general health information for a demo, not medical advice.
"""

from __future__ import annotations

import random
from pathlib import Path

from data_prep.samples.medical import CONDITIONS, _write_jsonl


def _tool(tool_name: str, description: str, **properties: str) -> dict:
    """An OpenAI-style function tool: every parameter a required string (kept short: the tiny model's
    context is small, and the schemas are part of every prompt)."""
    return {"type": "function", "function": {
        "name": tool_name, "description": description,
        "parameters": {"type": "object", "properties": {k: {"type": v} for k, v in properties.items()},
                       "required": list(properties)}}}


TOOLS = {
    "lookup_condition": _tool("lookup_condition", "Look up a condition in the handbook", name="string"),
    "find_clinic": _tool("find_clinic", "Find an open clinic in a city", city="string"),
    "book_appointment": _tool("book_appointment", "Book a doctor on a date", date="string", reason="string"),
}
CITIES = ("Paris", "Lyon", "Nice", "Lille", "Nantes", "Bordeaux", "Toulouse", "Rennes")
CLINICS = ("Saint-Louis", "Pasteur", "Les Tilleuls", "Central", "Du Parc", "La Roseraie")


def _call(name: str, arguments: dict) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def generate_rows(seed: int = 0, n: int = 240) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = i % 4
        needed = ("lookup_condition", "find_clinic", "book_appointment", None)[kind]
        others = sorted(name for name in TOOLS if name != needed)
        # The tool the question needs (none for the direct answers), and sometimes one it does not.
        declared = ([needed] if needed else []) + rng.sample(others, k=1 if (needed is None or rng.random() < 0.5) else 0)
        tools = [TOOLS[name] for name in sorted(declared)]
        cond = CONDITIONS[i % len(CONDITIONS)]
        if kind == 0:
            user = f"What does the handbook say about {cond.name}? (case {i})"
            call = _call("lookup_condition", {"name": cond.name})
            result = f'{{"name": "{cond.name}", "summary": "{cond.what}"}}'
            answer = f"The handbook describes {cond.name} as {cond.what}."
        elif kind == 1:
            city = CITIES[i % len(CITIES)]
            clinic = CLINICS[i % len(CLINICS)]
            user = f"Is there a clinic open near me in {city}? (case {i})"
            call = _call("find_clinic", {"city": city})
            result = f'{{"clinic": "{clinic}", "city": "{city}", "open": true}}'
            answer = f"Yes: the {clinic} clinic in {city} is open now."
        elif kind == 2:
            date = f"2026-{1 + i % 12:02d}-{1 + i % 28:02d}"
            user = f"Please book me a doctor's appointment on {date} about {cond.name}. (case {i})"
            call = _call("book_appointment", {"date": date, "reason": cond.name})
            result = f'{{"booked": true, "date": "{date}"}}'
            answer = f"Done: your appointment on {date} about {cond.name} is booked."
        else:  # nothing to call: answered directly
            user = f"Which symptoms are common with {cond.name}? (case {i})"
            rows.append({"tools": tools, "messages": [
                {"role": "user", "content": user},
                {"role": "assistant", "content": f"Common symptoms of {cond.name} include "
                                                 f"{', '.join(cond.symptoms[:3])}."}]})
            continue
        rows.append({"tools": tools, "messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": result},
            {"role": "assistant", "content": answer},
        ]})
    return rows


def write(path: Path, seed: int = 0) -> Path:
    """Write the set as JSON Lines at `path` (atomically) with a `.meta.json` record beside it."""
    return _write_jsonl(path, generate_rows(seed), "messages", "data_prep.samples.tools", seed)
