"""Check an exported GGUF in llama.cpp itself (llama-cpp-python) against the merged model in transformers.

On a few held-out conversations of the run (its ``heldout.jsonl``) each file is loaded by llama.cpp and compared
with the merged model:

* **tokenization**: the chat prompt through llama.cpp's own chat path (the GGUF's chat template rendered as
  llama-cpp-python's chat handler renders it, tokenized as it tokenizes it, special tokens parsed) gives
  transformers' ``apply_chat_template`` ids; so does plain text holding every special and added token;
* **special ids**: llama.cpp's BOS, EOS and pad are the tokenizer's;
* **token types**: every special token is CONTROL in llama.cpp (else it reads ``<s>`` in a prompt as text), and
  every added non-special token is written out as its text (user-defined; else ``<tool_call>`` is dropped from
  the output);
* **logits**: the largest difference to the merged model over the prompt's positions, and top-1 agreement;
* **greedy generation**: llama.cpp's greedy tokens equal transformers' and it stops where the merged model ends
  its turn (the chat template's end-of-turn token is end-of-generation in llama.cpp).

Thresholds (:data:`LIMITS`) turn a figure into a warning; the figures go into export.json and MLflow.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# beyond these a file gets a warning (the tiny models' logits span about +-10; real models' more)
LIMITS = {"max_logit_diff": {"f32": 0.01, "f16": 0.05, "bf16": 0.5}, "top1_agreement": 0.8}
GREEDY_TOKENS = 32
# two tokens whose logits differ by less than this are a tie that rounding may break either way: greedy outputs
# that part there count as agreeing (and are counted apart, as near-ties)
TIE = 0.05


@dataclass
class FileCheck:
    quant: str
    prompts: int = 0
    prompt_ids_equal: int = 0  # chat prompts llama.cpp's chat path tokenizes as transformers does
    text_ids_equal: bool = True  # a text holding every special / added token
    control_tokens_wrong: list[str] = field(default_factory=list)  # special tokens not CONTROL in llama.cpp
    user_defined_wrong: list[str] = field(default_factory=list)  # added non-special tokens llama.cpp drops from text
    end_of_turn_is_eog: bool = True
    special_ids_differ: list[str] = field(default_factory=list)  # bos / eos / pad llama.cpp reads otherwise
    max_logit_diff: float = 0.0
    top1_agreement: float = 0.0
    greedy_equal: int = 0  # prompts whose greedy continuation is transformers' (or parts from it at a near-tie)
    greedy_near_ties: int = 0
    stops_at_end_of_turn: int = 0  # of those where the merged model ends its turn, llama.cpp stops there too
    ends_turn: int = 0
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def _stderr_to_null():
    """llama.cpp prints its loading log to the C stderr even when asked not to: kept off the console."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(fd, 2)
            os.close(fd)


def load(path: Path, n_ctx: int):
    from finetune.export.llama_cpp import library

    library()
    from llama_cpp import Llama

    with _stderr_to_null():
        return Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False,
                     n_threads=max(1, min(os.cpu_count() or 1, 8)), n_batch=n_ctx, seed=0)


def _looks_special(text: str) -> bool:
    """<|...|>, <｜...｜>: llama.cpp's converter types such added tokens control by design (does_token_look_special;
    Qwen's <|fim_prefix|>), so llama.cpp leaves them out of output text whatever transformers calls them."""
    return (text.startswith("<|") and text.endswith("|>")) or (text.startswith("<｜") and text.endswith("｜>"))


def check_file(path: Path, quant: str, merged, tokenizer, conversations: list[list[dict[str, Any]]],
               end_of_turn: list[str], float_type: bool) -> FileCheck:
    import llama_cpp
    import numpy as np
    import torch
    from llama_cpp import llama_chat_format

    result = FileCheck(quant=quant)
    prompts = []
    for messages in conversations:
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        if hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        prompts.append((messages, list(ids)))
    n_ctx = max([len(ids) for _, ids in prompts] + [64]) + GREEDY_TOKENS + 8
    llm = load(path, n_ctx)
    try:
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        # token types, as llama.cpp reads them
        added = tokenizer.added_tokens_decoder
        for tid, tok in added.items():
            if tid >= llm.n_vocab():
                continue
            attr = llama_cpp.llama_vocab_get_attr(vocab, tid)
            if tok.special and not attr & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL:
                result.control_tokens_wrong.append(tok.content)
            elif not tok.special and not _looks_special(tok.content) and \
                    llm.detokenize([tid]).decode(errors="replace") != tok.content:
                result.user_defined_wrong.append(tok.content)
        eot_ids = [tokenizer.convert_tokens_to_ids(t) for t in end_of_turn if t]
        for kind, ours, theirs in (("bos", tokenizer.bos_token_id, llama_cpp.llama_vocab_bos(vocab)),
                                   ("eos", tokenizer.eos_token_id, llama_cpp.llama_vocab_eos(vocab)),
                                   ("pad", tokenizer.pad_token_id, llama_cpp.llama_vocab_pad(vocab))):
            if ours is not None and ours != theirs:
                result.special_ids_differ.append(f"{kind} {ours} (llama.cpp: {theirs})")
        result.end_of_turn_is_eog = all(llama_cpp.llama_vocab_is_eog(vocab, i) for i in eot_ids if i is not None)
        # a text with every added token between words: special tokens parsed as llama.cpp parses a prompt
        text = "Hello " + " x ".join(t.content for t in added.values()) + " world"
        ours = tokenizer(text, add_special_tokens=False).input_ids
        theirs = llm.tokenize(text.encode(), add_bos=False, special=True)
        result.text_ids_equal = list(ours) == list(theirs)

        meta = llm.metadata
        template = meta.get("tokenizer.chat_template")
        bos = llm._model.token_get_text(llm.token_bos()) if llm.token_bos() != -1 else ""
        eos = llm._model.token_get_text(llm.token_eos()) if llm.token_eos() != -1 else ""
        formatter = llama_chat_format.Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos) \
            if template else None
        diffs, agree, total = [], 0, 0
        for messages, ids in prompts:
            result.prompts += 1
            if formatter is not None:  # llama-cpp-python's create_chat_completion, up to the tokens it evaluates
                rendered = formatter(messages=messages)
                chat_ids = llm.tokenize(rendered.prompt.encode(), add_bos=not rendered.added_special, special=True)
                result.prompt_ids_equal += list(chat_ids) == ids
            llm.reset()
            llm.eval(ids)
            theirs = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
            with torch.no_grad():
                ours = merged(torch.tensor([ids], device=merged.device)).logits[0].float().cpu().numpy()
            diffs.append(float(np.abs(ours - theirs).max()))
            agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
            total += len(ids)
            # greedy continuation in both, stopping at end-of-generation
            with torch.no_grad():
                out = merged.generate(torch.tensor([ids], device=merged.device), max_new_tokens=GREEDY_TOKENS,
                                      do_sample=False, eos_token_id=eot_ids or None, output_scores=True,
                                      return_dict_in_generate=True,
                                      pad_token_id=eot_ids[0] if eot_ids else tokenizer.pad_token_id)
            want = out.sequences[0, len(ids):].tolist()
            got = []
            llm.reset()
            for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0):
                got.append(int(token))
                if llama_cpp.llama_vocab_is_eog(vocab, token) or len(got) >= GREEDY_TOKENS:
                    break
            if got == want:
                result.greedy_equal += 1
            else:  # equal up to where they part: a near-tie of the merged model's two best tokens?
                step = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                            min(len(got), len(want)))
                if step < len(out.scores):
                    top2 = torch.topk(out.scores[step][0].float(), 2).values
                    if float(top2[0] - top2[1]) < TIE:
                        result.greedy_equal += 1
                        result.greedy_near_ties += 1
            if want and want[-1] in eot_ids and got[: len(want) - 1] == want[:-1]:
                # the merged model ends its turn, and llama.cpp has come that far with it: it must stop there (a
                # run that parted from it earlier, at a near-tie, says nothing about stopping)
                result.ends_turn += 1
                result.stops_at_end_of_turn += got == want
        result.max_logit_diff = round(max(diffs, default=0.0), 5)
        result.top1_agreement = round(agree / max(total, 1), 4)
    finally:
        with _stderr_to_null():
            llm.close()
    _warn(result, float_type, tokenizer)
    return result


def _warn(r: FileCheck, float_type: bool, tokenizer) -> None:
    w = r.warnings
    if r.control_tokens_wrong:
        w.append(f"special tokens not control-type in llama.cpp: {', '.join(r.control_tokens_wrong[:5])}")
    if r.user_defined_wrong:
        w.append(f"added tokens llama.cpp leaves out of output text: {', '.join(r.user_defined_wrong[:5])}")
    if r.special_ids_differ:
        w.append(f"llama.cpp reads other special token ids: {', '.join(r.special_ids_differ)}")
    if not r.end_of_turn_is_eog:
        w.append("llama.cpp does not stop at the chat template's end-of-turn token")
    if not r.text_ids_equal:
        w.append("llama.cpp tokenizes text with special / added tokens differently from transformers")
    if r.prompt_ids_equal < r.prompts:
        w.append(f"llama.cpp's chat path tokenizes {r.prompts - r.prompt_ids_equal} of {r.prompts} chat prompts "
                 "differently from transformers")
    limit = LIMITS["max_logit_diff"].get(r.quant)
    if float_type and limit is not None and r.max_logit_diff > limit:
        w.append(f"largest logit difference to the merged model {r.max_logit_diff:.3f} (above {limit})")
    if r.top1_agreement < LIMITS["top1_agreement"]:
        w.append(f"top-1 agreement with the merged model {r.top1_agreement:.0%} (below "
                 f"{LIMITS['top1_agreement']:.0%})")
    if r.stops_at_end_of_turn < r.ends_turn and float_type:
        w.append(f"llama.cpp did not stop at the end of the turn in {r.ends_turn - r.stops_at_end_of_turn} of "
                 f"{r.ends_turn} answers")
