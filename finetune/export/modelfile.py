"""An Ollama Modelfile for an exported GGUF: FROM, the chat template in Ollama's (Go) template syntax, the stop
tokens, and the generation defaults of our evaluation (greedy, eval.max_new_tokens).

A Jinja chat template cannot be translated in general. What can be done exactly is to read the *shape* of the
template off its own renderings: render conversations whose contents are sentinels with the adapter's template,
cut the output at the sentinels, and recover what comes before and after each role's content (and whether a
system prompt goes before the first user turn, as ChatML's and Alpaca's do, or inside it, as Llama 2's does;
Alpaca's default system prompt included). From that :class:`Shape` come both the Go template and a Python
rendering of it, and the shape is accepted only if that rendering equals the Jinja template's on conversations
it was not read from (with and without a system prompt, one and several turns). A template that does not pass
(one that changes with the turn number, say) gets no TEMPLATE line and a warning: Ollama then falls back to its
own detection from the chat template the GGUF carries.

The leading BOS text is left out of the template: llama.cpp adds the BOS token itself (the GGUF's add_bos).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

_S, _U1, _A1, _U2, _A2, _U3 = "\x02SYS\x03", "\x02U1\x03", "\x02A1\x03", "\x02U2\x03", "\x02A2\x03", "\x02U3\x03"


@dataclass(frozen=True)
class Shape:
    """What a template writes around each role's content. The rendering starts without the BOS text (llama.cpp
    adds the token): `head_no_system`, `first_user_prefix` and `system_prefix` are the pieces that can come first,
    with it left out."""

    head_no_system: str  # before the first user turn when there is no system prompt (Alpaca: its default one)
    first_user_prefix: str  # the first user turn's prefix when there is no system prompt
    system_prefix: str  # with a system prompt, the rendering starts here
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    generation_prompt: str
    system_in_first_user: bool  # Llama 2: [INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST]

    def render(self, messages: list[dict[str, str]]) -> str:
        """What the Go template renders for `messages` (the prompt to answer: add_generation_prompt)."""
        system = next((m["content"] for m in messages if m["role"] == "system"), None)
        out = "" if system else self.head_no_system
        if system and not self.system_in_first_user:
            out += self.system_prefix + system + self.system_suffix
        first = True
        for m in messages:
            if m["role"] == "user":
                if first and system and self.system_in_first_user:
                    out += self.system_prefix + system + self.system_suffix
                elif first and not system:
                    out += self.first_user_prefix
                else:
                    out += self.user_prefix
                out += m["content"] + self.user_suffix
                first = False
            elif m["role"] == "assistant":
                out += self.assistant_prefix + m["content"] + self.assistant_suffix
        return out + self.generation_prompt

    def go_template(self) -> str:
        """The same rendering in Ollama's template language (Go text/template over .Messages)."""
        q = _go_string
        text = ('{{- $system := "" }}{{- range .Messages }}{{- if eq .Role "system" }}{{- $system = .Content }}'
                '{{- end }}{{- end }}')
        if self.system_in_first_user:
            text += '{{- if not $system }}' + q(self.head_no_system) + '{{- end }}'
            first_with_system = q(self.system_prefix) + '{{ $system }}' + q(self.system_suffix)
        else:
            text += ('{{- if $system }}' + q(self.system_prefix) + '{{ $system }}' + q(self.system_suffix)
                     + '{{- else }}' + q(self.head_no_system) + '{{- end }}')
            first_with_system = q(self.user_prefix)
        text += ('{{- $first := true }}{{- range .Messages }}{{- if eq .Role "user" }}'
                 '{{- if and $first $system }}' + first_with_system
                 + '{{- else if $first }}' + q(self.first_user_prefix)
                 + '{{- else }}' + q(self.user_prefix) + '{{- end }}'
                 '{{ .Content }}' + q(self.user_suffix) + '{{- $first = false }}'
                 '{{- else if eq .Role "assistant" }}' + q(self.assistant_prefix) + '{{ .Content }}'
                 + q(self.assistant_suffix) + '{{- end }}{{- end }}' + q(self.generation_prompt))
        return text


def _go_string(text: str) -> str:
    """Literal text inside a Go template, as a quoted string action, so that whitespace and braces survive
    (Go's {{- trims the whitespace around actions, never inside a string)."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def _between(text: str, a: str | None, b: str | None) -> str | None:
    start = 0
    if a is not None:
        start = text.find(a)
        if start < 0:
            return None
        start += len(a)
    end = len(text) if b is None else text.find(b, start)
    return None if end < 0 else text[start:end]


def _strip(text: str, bos: str | None) -> str:
    return text[len(bos):] if bos and text.startswith(bos) else text


def read_shape(render, bos: str | None) -> Shape | None:
    """The Shape of a chat template, from `render(messages, add_generation_prompt)`, or None when its renderings
    do not fit one (or it refuses the conversations)."""
    u = lambda c: {"role": "user", "content": c}  # noqa: E731
    a = lambda c: {"role": "assistant", "content": c}  # noqa: E731
    s = {"role": "system", "content": _S}
    try:
        full = render([s, u(_U1), a(_A1), u(_U2)], True)
        plain = render([u(_U1), a(_A1), u(_U2)], True)
        one = render([u(_U1)], False)
        turn = render([u(_U1), a(_A1)], False)
    except Exception:  # the template refuses (a system prompt, say)
        return None
    head_ns_user = _between(plain, None, _U1)
    user_suffix = _between(one, _U1, None)
    user_then_assistant = _between(turn, _U1, _A1)
    assistant_suffix = _between(turn, _A1, None)
    between_turns = _between(plain, _A1, _U2)
    last = _between(plain, _U2, None)
    before_system, after_system = _between(full, None, _S), _between(full, _S, _U1)
    if None in (head_ns_user, user_suffix, user_then_assistant, assistant_suffix, between_turns, last,
                before_system, after_system):
        return None
    if not (user_then_assistant.startswith(user_suffix) and between_turns.startswith(assistant_suffix)
            and last.startswith(user_suffix)):
        return None
    user_prefix = between_turns[len(assistant_suffix):]
    if not head_ns_user.endswith(user_prefix):
        return None
    head_no_system = head_ns_user[: len(head_ns_user) - len(user_prefix)]
    # the BOS text comes off whichever piece starts the rendering
    first_user_prefix = user_prefix if head_no_system else _strip(user_prefix, bos)
    in_user = not after_system.endswith(user_prefix)
    shape = Shape(
        head_no_system=_strip(head_no_system, bos), first_user_prefix=first_user_prefix,
        system_prefix=_strip(before_system, bos),
        system_suffix=after_system if in_user else after_system[: len(after_system) - len(user_prefix)],
        user_prefix=user_prefix, user_suffix=user_suffix, assistant_prefix=user_then_assistant[len(user_suffix):],
        assistant_suffix=assistant_suffix, generation_prompt=last[len(user_suffix):], system_in_first_user=in_user)
    checks = [[u(_U1)], [u(_U1), a(_A1), u(_U2), a(_A2), u(_U3)], [s, u(_U1)],
              [s, u(_U1), a(_A1), u(_U2), a(_A2), u(_U3)]]
    try:
        if all(shape.render(m) == _strip(render(m, True), bos) for m in checks):
            return shape
    except Exception:
        return None
    return None


def modelfile(gguf_name: str, tokenizer, stops: list[str], max_new_tokens: int, context: int) -> tuple[str, bool]:
    """(the Modelfile's text, whether it carries a TEMPLATE) for the GGUF `gguf_name` beside it."""
    def render(messages, gen):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    shape = read_shape(render, tokenizer.bos_token) if getattr(tokenizer, "chat_template", None) else None
    lines = ["# Ollama: ollama create NAME -f Modelfile; then ollama run NAME", f"FROM ./{gguf_name}", ""]
    if shape is not None:
        lines += [f'TEMPLATE """{shape.go_template()}"""', ""]
    else:
        log.warning("the chat template does not reduce to per-role wrappers: the Modelfile has no TEMPLATE, and "
                    "Ollama uses its own detection from the chat template in the GGUF")
    for stop in dict.fromkeys(s for s in stops if s):
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    # our evaluation's decoding: greedy, at most eval.max_new_tokens, in the context the adapter was trained with
    lines += ["PARAMETER temperature 0", f"PARAMETER num_predict {max_new_tokens}", f"PARAMETER num_ctx {context}"]
    return "\n".join(lines) + "\n", shape is not None
