"""Conversations and documents -> token ids and labels: exact, and several times faster than per-row preparation.

Conversations are rendered by transformers' own Jinja renderer (the code
``apply_chat_template`` runs, so the text is identical), many at a time, and tokenized
in batches by the Rust tokenizer. That is where the speed comes from: TRL's
preparation calls ``apply_chat_template`` once per row through ``datasets.map`` and so
pays the Python overhead of every layer per row, and tokenizes one string at a time.

The loss mask comes from the character spans of the assistant's turns:

* ``{% generation %}`` spans, recorded by transformers' renderer, turned into token
  indices with the same rule as ``apply_chat_template(return_assistant_tokens_mask=True)``
  (the token holding a span's first character through the token holding its last);
* for a tokenizer's own template without markers, spans found from prefix renderings
  (:func:`prefix_spans`), verified per row.

For byte-level BPE tokenizers (GPT-2 style: Llama 3, Qwen2, GPT-NeoX, Falcon, BLOOM, Phi,
and the tiny test model) token boundaries follow from each token's byte length, so the
tokenizer's offset tracking (about 40% of its time) is skipped; every row is checked
(the token bytes must add up to the text's bytes) and falls back to offsets if not.
Other tokenizers (SentencePiece-style Llama 2, Mistral) use offsets throughout.

Documents (``dataset.format: text``) are tokenized with the tokenizer's own BOS/EOS
around them and cut into ``max_seq_len`` blocks. A long document is tokenized in
overlapping windows joined where both tokenized alike, so the ids equal a single
pass's while memory stays bounded (:class:`TextEncoder`).
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import accumulate

from data_prep.templates import Resolved
from finetune.errors import DataError

IGNORE = -100
# A document's window seams: tokens are committed up to this many characters before a window's end,
# and this much committed text is re-tokenized as left context at the start of the next window.
SEAM_MARGIN_CHARS = 2048
SEAM_CONTEXT_CHARS = 1024
SEAM_CHECK_TOKENS = 8
# Long documents: tokenized in sub-windows of this many characters (in parallel), a buffer of
# STREAM_CHARS at a time; documents longer than LONG_DOC_CHARS take that path.
SPAN_WINDOW_CHARS = 1 << 16
STREAM_CHARS = 1 << 20
LONG_DOC_CHARS = 1 << 16


def _private_backend(tokenizer):
    """A copy of the Rust tokenizer with no padding or truncation set, for our own batch calls."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_padding()
    backend.no_truncation()
    return backend


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte <-> printable-character table, as tokenizers' ByteLevel uses it.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _components(node: dict | None) -> list[dict]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        inner = node.get("pretokenizers") or node.get("processors") or node.get("normalizers") or []
        return [c for n in inner for c in _components(n)]
    return [node]


def byte_lengths(backend) -> list[int] | None:
    """Each token id's length in bytes of text, when the tokenizer is byte-level BPE with nothing that
    changes the text (no normalizer, no prefix space, no stripping added tokens); else None."""
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or spec.get("normalizer") is not None:
        return None
    pre = _components(spec.get("pre_tokenizer"))
    byte_level = [p for p in pre if p.get("type") == "ByteLevel"]
    if not byte_level or any(p.get("add_prefix_space") for p in byte_level):
        return None
    if any(p.get("type") not in ("ByteLevel", "Split", "Digits", "Punctuation", "Whitespace", "WhitespaceSplit")
           for p in pre):
        return None
    alphabet = set(_bytes_to_unicode().values())
    vocab = model.get("vocab") or {}
    size = max([*vocab.values(), *(t["id"] for t in spec.get("added_tokens", []))], default=-1) + 1
    lengths = [0] * size
    for token, index in vocab.items():
        if any(ch not in alphabet for ch in token):
            return None
        lengths[index] = len(token)
    for added in spec.get("added_tokens", []):
        if added.get("lstrip") or added.get("rstrip") or added.get("single_word"):
            return None
        lengths[added["id"]] = len(added["content"].encode("utf-8"))
    return lengths


def control_token_pattern(tokenizer) -> re.Pattern | None:
    """The tokenizer's added tokens (<s>, </s>, <|im_end|>, ...): text that holds one would be read as that token."""
    tokens = sorted((t for t in tokenizer.added_tokens_encoder if t.strip()), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None


def _span_tokens(starts_or_ends, lo: int, hi: int) -> tuple[int, int]:
    """Token index range [a, b) holding character (or byte) positions lo..hi-1, given token end positions."""
    a = bisect.bisect_right(starts_or_ends, lo)
    b = bisect.bisect_right(starts_or_ends, hi - 1) + 1
    return a, b


PROBE_CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Two\nlines "},
     {"role": "assistant", "content": "One answer."}, {"role": "user", "content": "More?"},
     {"role": "assistant", "content": "  Another, with unicode: \u00e9\u00e8 \u2713 "}],
]


def _trusted_renderer(jinja_source: str, kwargs: dict):
    """Our built-in templates compiled outside Jinja's sandbox, which costs about half the rendering time.

    The sandbox guards against templates from the Hub; the built-in ones are this project's own code.
    Same environment settings, extensions (transformers' {% generation %} tracker), filters and
    globals as transformers' renderer, and checked against it on probe conversations before use;
    None (use transformers' renderer) if anything differs or its internals are not what we expect.
    """
    try:
        import jinja2
        from transformers.utils.chat_template_utils import _compile_jinja_template, render_jinja_template

        sandboxed = _compile_jinja_template(jinja_source)
        senv = sandboxed.environment
        env = jinja2.Environment(trim_blocks=senv.trim_blocks, lstrip_blocks=senv.lstrip_blocks,
                                 keep_trailing_newline=senv.keep_trailing_newline,
                                 extensions=[type(e) for e in senv.extensions.values()])
        env.filters.update(senv.filters)
        env.globals.update(senv.globals)
        compiled = env.from_string(jinja_source)

        def render(conversation: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
            blocks: list[str] = []
            indices: list[tuple[int, int]] = []
            with env.activate_tracker(blocks, indices):
                for block in compiled.generate(messages=conversation, tools=None, documents=None,
                                               add_generation_prompt=False, **kwargs):
                    blocks.append(block)
                return "".join(blocks), indices

        texts, spans = render_jinja_template(conversations=PROBE_CONVERSATIONS, chat_template=jinja_source,
                                             return_assistant_tokens_mask=True, **kwargs)
        for conv, text, span in zip(PROBE_CONVERSATIONS, texts, spans, strict=True):
            if render(conv) != (text, span):
                return None
        return render
    except Exception:
        return None


@dataclass
class Rendered:
    """A conversation's training examples: (text, assistant character spans) each, and the policy that made them
    (``whole``: one example, every answer; ``split``: one per answer; ``last``; ``full``)."""

    examples: list[tuple[str, list[tuple[int, int]]]]
    policy: str


def _failure(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


class ChatEncoder:
    """Render conversations with a chat template and tokenize them with assistant-only labels.

    `multi_turn` (dataset.multi_turn) decides what a conversation with several answers becomes, for templates
    that render earlier turns differently once later ones follow (Qwen3 drops reasoning from history and gives
    the last answer a reasoning block): ``auto`` one example where the template preserves prefixes and ``split``
    where it does not; ``split`` one example per answer, rendered as inference renders the conversation up to
    it; ``last`` only the final answer; ``full`` one render with every answer trained as it appears in it.
    """

    def __init__(self, tokenizer, template: Resolved, train_on_inputs: bool = False, multi_turn: str = "auto",
                 template_kwargs: dict | None = None):
        from data_prep.templates import BUILTIN, rendered_end_of_turn

        self.tokenizer = tokenizer
        self.template = template
        self.train_on_inputs = train_on_inputs
        self.multi_turn = multi_turn
        # What apply_chat_template hands the template: the special tokens (bos_token, eos_token, ...).
        self.kwargs = {**tokenizer.special_tokens_map, **(template_kwargs or {})}
        self.backend = _private_backend(tokenizer)
        self.nbytes = byte_lengths(self.backend)
        builtin = BUILTIN.get(template.name)
        self.fast_render = _trusted_renderer(template.jinja, self.kwargs) \
            if builtin is not None and builtin.jinja == template.jinja and template.masking == "markers" else None
        self.end_of_turn = rendered_end_of_turn(tokenizer) or tokenizer.eos_token

    # ---- rendering --------------------------------------------------------------------------

    def _render(self, conversations: list, add_generation_prompt: bool = False, spans: bool = False,
                tools: list | None = None):
        from transformers.utils.chat_template_utils import render_jinja_template

        return render_jinja_template(conversations=conversations, chat_template=self.template.jinja,
                                     return_assistant_tokens_mask=spans, tools=tools,
                                     add_generation_prompt=add_generation_prompt, **self.kwargs)

    def _one(self, conv: list, tools: list | None, add_generation_prompt: bool = False, spans: bool = False):
        texts, indices = self._render([conv], add_generation_prompt, spans, tools)
        return texts[0], (indices[0] if spans else [])

    def render(self, conversations: list[list[dict]], tools: list[list | None] | None = None
               ) -> list[Rendered | str]:
        """The examples of each conversation (`tools`: each one's tool definitions, or None), or why the template
        failed on it."""
        tools = tools if tools is not None else [None] * len(conversations)
        if self.template.masking == "prefixes":
            return [self._checked(conv, t, self.prefix_render) for conv, t in zip(conversations, tools, strict=True)]
        if self.multi_turn == "split":
            return [self._checked(conv, t, self._marker_split) for conv, t in zip(conversations, tools, strict=True)]
        policy = "last" if self.multi_turn == "last" else "whole"
        out: list[Rendered | str] = []
        for r in self._marker_whole(conversations, tools):
            if isinstance(r, str):
                out.append(r)
                continue
            text, spans = r
            out.append(Rendered([(text, spans[-1:] if policy == "last" else spans)], policy))
        return [r if isinstance(r, str) else self._check_tools(conv, t, r)
                for conv, t, r in zip(conversations, tools, out, strict=True)]

    def _checked(self, conv, tools, how) -> Rendered | str:
        try:
            r = how(conv, tools)
        except Exception as e:  # jinja's raise_exception and friends
            return _failure(e)
        return r if isinstance(r, str) else self._check_tools(conv, tools, r)

    def _check_tools(self, conv, tools, r: Rendered) -> Rendered | str:
        """A row with tools or tool calls: the template must render them (else a row error, not a silent loss)."""
        if "reasoning_content" not in self.template.jinja and any(m.get("reasoning_content") for m in conv):
            return ("template_no_reasoning: the chat template does not render reasoning_content, so the reasoning "
                    "would be lost; put it in the answer's content as <think>...</think> if the model writes it so, "
                    "or drop it from the row")
        if not tools and not any(m.get("tool_calls") for m in conv):
            return r
        whole = r.examples[-1][0]
        if tools:
            plain = self._one(conv, None)[0]
            if plain == whole:
                return ("template_no_tools: the chat template ignores the row's tools (it renders no tool "
                        "definitions); use a model whose template supports tool calling, or set model.chat_template")
        for m in conv:
            for call in m.get("tool_calls") or []:
                name = (call.get("function") or call).get("name")
                if name and not any(name in text for text, _ in r.examples):
                    return (f"template_no_tool_calls: the chat template does not render the assistant's tool call "
                            f"{name!r}; use a model whose template supports tool calling")
        return r

    def _marker_whole(self, conversations, tools) -> list[tuple[str, list[tuple[int, int]]] | str]:
        if any(t for t in tools):  # tool definitions differ per row: one render each
            out = []
            for conv, t in zip(conversations, tools, strict=True):
                try:
                    out.append(self._one(conv, t, spans=True))
                except Exception as e:
                    out.append(_failure(e))
            return out
        if self.fast_render is not None:
            out = []
            for conv in conversations:
                try:
                    out.append(self.fast_render(conv))
                except Exception as e:  # raise_exception in the template (roles out of order, ...)
                    out.append(_failure(e))
            return out
        try:
            texts, indices = self._render(conversations, spans=True)
        except Exception:
            # One bad conversation fails the whole batch: find it by rendering them one at a time.
            out = []
            for conv in conversations:
                try:
                    out.append(self._one(conv, None, spans=True))
                except Exception as e:
                    out.append(_failure(e))
            return out
        return list(zip(texts, indices, strict=True))

    def _marker_split(self, conv, tools) -> Rendered:
        examples = []
        for k, m in enumerate(conv):
            if m["role"] == "assistant":
                text, spans = self._one(conv[:k + 1], tools, spans=True)
                examples.append((text, spans[-1:]))
        return Rendered(examples, "split")

    def _span(self, prompt: str, upto: str) -> tuple[int, int]:
        """The answer in `upto` after `prompt`, through its end-of-turn token: what follows it (the newline
        ChatML writes, or the next header that Llama 3's template always appends) is not the answer's."""
        eot = self.end_of_turn
        stop = upto.find(eot, len(prompt)) if eot else -1
        end = stop + len(eot) if stop >= 0 else len(upto.rstrip())
        return len(prompt), max(end, len(prompt) + 1)

    def prefix_render(self, conv: list[dict], tools: list | None = None) -> Rendered | str:
        """Assistant spans of a template without markers, from prefix renderings.

        For assistant turn k: P = the conversation before it, rendered with the generation prompt;
        Q = the conversation up to and including it, as inference renders it. Q starts with P, and the
        answer is Q[len(P):] through its end-of-turn token (:meth:`_span`). When every P and Q, up to the
        answer's end, is a prefix of the whole rendering (the template renders earlier turns the same whatever follows),
        one example trains them all; otherwise `multi_turn` decides (see the class).
        """
        whole = self._one(conv, tools)[0]
        turns = []
        for k, message in enumerate(conv):
            if message["role"] != "assistant":
                continue
            prompt = self._one(conv[:k], tools, add_generation_prompt=True)[0] if k else ""
            upto = whole if k == len(conv) - 1 else self._one(conv[:k + 1], tools)[0]
            if not upto.startswith(prompt) or len(upto) <= len(prompt):
                return ("template_error: the chat template's rendering of a conversation ending with an answer "
                        "does not start with its rendering of the prompt for that answer (add_generation_prompt), "
                        "so the answer's tokens cannot be located; set model.chat_template to a built-in template")
            turns.append((k, prompt, upto))
        # the template renders each answer the same whatever follows (up to the answer's end)
        preserved = all(whole.startswith(u[:self._span(p, u)[1]]) for _, p, u in turns)
        policy = self.multi_turn
        if policy == "auto" or (policy == "full" and preserved):
            policy = "whole" if preserved else "split"
        if policy == "whole":
            return Rendered([(whole, [self._span(p, u) for _, p, u in turns])], "whole")
        if policy == "split":
            return Rendered([(u, [self._span(p, u)]) for _, p, u in turns], "split")
        if policy == "last":
            _, p, u = turns[-1]
            return Rendered([(u, [self._span(p, u)])], "last")
        spans, cursor = [], 0
        for k, p, u in turns:
            span = self._span(p, u)
            if not whole.startswith(u[:span[1]]):
                span = self._locate(whole, u[len(p):span[1]], conv[k], cursor)
            if span is None or span[0] < cursor:
                return ("answer_not_found: dataset.multi_turn=full: an answer is not in the conversation's whole "
                        "rendering as it was given (the template rewrites it); use multi_turn split or last")
            spans.append(span)
            cursor = span[1]
        return Rendered([(whole, spans)], "full")

    def _locate(self, whole: str, answer: str, message: dict, cursor: int) -> tuple[int, int] | None:
        """Where an answer that the template rewrites in history (a reasoning block dropped) lies in `whole`:
        its rendering as the last answer, that rendering after its reasoning block, or its content, each up to
        and including the end-of-turn token that follows."""
        candidates = [answer]
        for marker in ("</think>", "</thinking>"):
            if marker in answer:
                candidates.append(answer.rsplit(marker, 1)[1].lstrip())
        content = message.get("content") or ""
        if content.strip():
            candidates.append(content.strip())
        for c in candidates:
            if not c:
                continue
            at = whole.find(c, cursor)
            if at < 0:
                continue
            end = at + len(c)
            eot = self.end_of_turn
            if eot and not c.endswith(eot):
                stop = whole.find(eot, end)
                if stop >= 0:
                    end = stop + len(eot)
            return at, end
        return None

    # ---- tokenizing -------------------------------------------------------------------------

    def tokenize(self, texts: list[str]) -> list:
        """The Rust tokenizer's encodings (GIL released: callable from a worker thread)."""
        if self.nbytes is not None:
            return self.backend.encode_batch_fast(texts, add_special_tokens=False)
        return self.backend.encode_batch(texts, add_special_tokens=False)

    def labels(self, text: str, spans: list[tuple[int, int]], encoding) -> tuple[list[int], list[int]]:
        """(input_ids, labels): labels are the ids inside the assistant spans and -100 elsewhere."""
        ids = encoding.ids
        if self.train_on_inputs:
            return ids, ids
        labels = [IGNORE] * len(ids)
        if not spans:
            return ids, labels
        ranges = self._token_ranges(text, spans, encoding) if self.nbytes is None else self._byte_ranges(text, spans, ids)
        for a, b in ranges:
            labels[a:b] = ids[a:b]
        return ids, labels

    def _byte_ranges(self, text: str, spans, ids) -> list[tuple[int, int]]:
        nbytes = self.nbytes
        ends = list(accumulate(map(nbytes.__getitem__, ids)))
        ascii_text = text.isascii()
        total = len(text) if ascii_text else len(text.encode("utf-8"))
        if not ends or ends[-1] != total:
            # The token bytes do not add up to the text: not the byte-level tokenizer we took it for.
            enc = self.backend.encode(text, add_special_tokens=False)
            if enc.ids != ids:
                raise DataError("internal error: the tokenizer gave different ids for the same text")
            return self._token_ranges(text, spans, enc)
        out = []
        for lo, hi in spans:
            if not ascii_text:
                lo, hi = len(text[:lo].encode("utf-8")), len(text[:hi].encode("utf-8"))
            out.append(_span_tokens(ends, lo, hi))
        return out

    @staticmethod
    def _token_ranges(text: str, spans, encoding) -> list[tuple[int, int]]:
        # apply_chat_template's rule: from the token holding a span's first character to the token holding
        # its last; a span whose first character belongs to no token stops the masking there.
        out = []
        n = len(encoding.ids)
        for lo, hi in spans:
            a = encoding.char_to_token(lo)
            if a is None:
                break
            b = encoding.char_to_token(hi - 1)
            out.append((a, (b + 1) if b is not None else n))
        return out


class TextEncoder:
    """Documents -> token ids with the tokenizer's BOS/EOS, cut into blocks of at most max_seq_len.

    Short documents are tokenized many at a time. A long one is tokenized in sub-windows of
    SPAN_WINDOW_CHARS that overlap by SEAM_CONTEXT_CHARS on each side, all in one parallel batch
    call; consecutive windows are joined at a token boundary where both tokenized the text alike
    (the same tokens at the same positions, SEAM_CHECK_TOKENS on each side), so the result equals
    a single pass. Why not one call per document: the Rust tokenizer needs ~100 bytes of memory
    per character of a single input (its alignment tables), so a 10 MB document would need 1 GB.
    """

    def __init__(self, tokenizer, max_seq_len: int):
        self.max_seq_len = max_seq_len
        self.backend = _private_backend(tokenizer)
        # Text in a document that looks like a control token (</s> in a web page) is text, not the token.
        self.backend.encode_special_tokens = True
        lengths = byte_lengths(self.backend)
        if lengths is not None:
            import numpy as np

            self.nbytes = np.asarray(lengths, dtype=np.int64)
        else:
            self.nbytes = None
        plain = tokenizer("a", add_special_tokens=False).input_ids
        full = tokenizer("a").input_ids
        at = next((i for i in range(len(full)) if full[i:i + len(plain)] == plain), 0)
        self.prefix = full[:at]
        self.suffix = full[at + len(plain):]
        eos = tokenizer.eos_token_id
        if eos is not None and eos not in self.suffix:
            self.suffix = [*self.suffix, eos]  # the model learns where a document ends

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Whole short documents, with BOS/EOS."""
        encs = self.backend.encode_batch_fast(texts, add_special_tokens=False)
        return [self.prefix + e.ids + self.suffix for e in encs]

    def blocks(self, ids: list[int]) -> Iterator[list[int]]:
        n = self.max_seq_len
        for start in range(0, len(ids), n):
            yield ids[start:start + n]

    def _encode_span(self, text: str) -> tuple[list[int], list[int], list[int]]:
        """(ids, start offsets, end offsets) of `text`, equal to one encode() call, in parallel sub-windows."""
        n, w, c = len(text), SPAN_WINDOW_CHARS, SEAM_CONTEXT_CHARS
        if n <= w + c:
            return self._encode_windows([text], [0])[0]
        cuts = list(range(0, n, w)) + [n]
        bases = [max(0, cuts[k] - c) for k in range(len(cuts) - 1)]
        windows = [text[bases[k]:min(n, cuts[k + 1] + c)] for k in range(len(cuts) - 1)]
        parts = self._encode_windows(windows, bases)
        ids: list[int] = []
        starts: list[int] = []
        ends: list[int] = []
        begin = 0  # index in the current window's tokens where its contribution starts
        for k in range(len(parts)):
            a_ids, a_starts, a_ends = parts[k]
            if k == len(parts) - 1:
                stop = len(a_ids)
                seam_next = None
            else:
                seam_next = self._seam(parts[k], parts[k + 1], cuts[k + 1])
                if seam_next is None:  # no agreement (never seen in practice): one call over the span
                    return self._encode_windows([text], [0])[0]
                stop = seam_next[0]
            ids += a_ids[begin:stop]
            starts += a_starts[begin:stop]
            ends += a_ends[begin:stop]
            if seam_next is not None:
                begin = seam_next[1]
        return ids, starts, ends

    def _encode_windows(self, windows: list[str], bases: list[int]) -> list[tuple[list[int], list[int], list[int]]]:
        """(ids, character starts, character ends) per window, positions shifted by the window's base.

        Byte-level BPE: ids from the fast call (no offset tracking), positions from each token's byte
        length, mapped to characters through the window's UTF-8 bytes (a token holding part of a
        character gets that character, as the tokenizer's own offsets do); checked to add up, else
        the tokenizer's offsets.
        """
        import numpy as np

        out = []
        if self.nbytes is not None:
            encs = self.backend.encode_batch_fast(windows, add_special_tokens=False)
            for window, base, enc in zip(windows, bases, encs, strict=True):
                ids = enc.ids
                sizes = self.nbytes[np.asarray(ids, dtype=np.int64)] if ids else np.zeros(0, np.int64)
                ends_b = np.cumsum(sizes)
                raw = np.frombuffer(window.encode("utf-8", "surrogatepass"), dtype=np.uint8)
                if not len(ids) or int(ends_b[-1]) != len(raw):
                    out.append(self._with_offsets(window, base))
                    continue
                if window.isascii():
                    starts, ends = ends_b - sizes, ends_b
                else:
                    char_of_byte = np.cumsum((raw & 0xC0) != 0x80) - 1
                    starts, ends = char_of_byte[ends_b - sizes], char_of_byte[ends_b - 1] + 1
                out.append((ids, (starts + base).tolist(), (ends + base).tolist()))
            return out
        encs = self.backend.encode_batch(windows, add_special_tokens=False)
        return [(e.ids, [o[0] + base for o in e.offsets], [o[1] + base for o in e.offsets])
                for base, e in zip(bases, encs, strict=True)]

    def _with_offsets(self, window: str, base: int) -> tuple[list[int], list[int], list[int]]:
        enc = self.backend.encode(window, add_special_tokens=False)
        return enc.ids, [o[0] + base for o in enc.offsets], [o[1] + base for o in enc.offsets]

    @staticmethod
    def _seam(a, b, cut: int) -> tuple[int, int] | None:
        """Indices (in a, in b) of a token start near `cut` where both windows tokenized alike."""
        a_ids, a_starts, _ = a
        b_ids, b_starts, _ = b
        m = SEAM_CHECK_TOKENS
        lo = bisect.bisect_left(a_starts, cut - SEAM_CONTEXT_CHARS // 2)
        hi = bisect.bisect_right(a_starts, cut + SEAM_CONTEXT_CHARS // 2)
        for i in sorted(range(lo, hi), key=lambda i: abs(a_starts[i] - cut))[:64]:
            j = bisect.bisect_left(b_starts, a_starts[i])
            if j < m or i < m or j >= len(b_starts) or b_starts[j] != a_starts[i]:
                continue
            if (a_ids[i - m:i + m] == b_ids[j - m:j + m] and a_starts[i - m:i + m] == b_starts[j - m:j + m]
                    and len(a_ids[i - m:i + m]) == 2 * m):
                return i, j
        return None

    def pieces(self, text: str) -> Iterator[str]:
        """A long in-memory document in pieces for encode_stream."""
        for start in range(0, len(text), STREAM_CHARS):
            yield text[start:start + STREAM_CHARS]

    def encode_stream(self, pieces: Iterable[str]) -> Iterator[list[int]]:
        """A long document's ids, a few MB of text at a time, equal to tokenizing it in one pass.

        Each buffer is tokenized with the last ~SEAM_CONTEXT_CHARS of committed text in front
        of it; the tokens of that context must come out as they did before, ending exactly at
        the seam, or the tokenizer is not local enough to stream and we stop with an error.
        """
        context, context_ids, carry = "", [], ""
        first = True
        it = iter(pieces)
        piece = next(it, None)
        while piece is not None:
            following = next(it, None)
            last = following is None
            buf = context + carry + piece
            if not last and len(buf) < STREAM_CHARS:
                carry += piece
                piece = following
                continue
            ids, starts, ends = self._encode_span(buf)
            j = 0
            if context:
                j = bisect.bisect_left(starts, len(context))
                check = min(SEAM_CHECK_TOKENS, len(context_ids), j)
                if j >= len(starts) or starts[j] != len(context) or ids[j - check:j] != context_ids[-check:]:
                    raise DataError("a large text file cannot be tokenized in windows with this tokenizer (its "
                                    "tokens at a window seam differ from a single pass); split the file into "
                                    "smaller files")
            if last:
                out = ids[j:]
                yield (self.prefix + out + self.suffix) if first else (out + self.suffix)
                return
            limit = len(buf) - SEAM_MARGIN_CHARS
            k = bisect.bisect_right(ends, limit, lo=j)
            while k > j and starts[k] < ends[k - 1]:  # token k begins inside a character: commit before it
                k -= 1
            if k <= j + SEAM_CHECK_TOKENS:  # too short to commit anything: read more first
                carry += piece
                piece = following
                continue
            k0 = max(j, bisect.bisect_left(starts, starts[k] - SEAM_CONTEXT_CHARS, lo=j, hi=k))
            k0 = min(k0, k - SEAM_CHECK_TOKENS)
            out = ids[j:k]
            yield (self.prefix + out) if first else out
            first = False
            context, context_ids, carry = buf[starts[k0]:starts[k]], ids[k0:k], buf[starts[k]:]
            piece = following
