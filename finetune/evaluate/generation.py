"""Generation evals: answer held-out prompts with the base model and with the adapter, score both.

The prompt is the held-out conversation up to its last answer, rendered with the chat
template the adapter was trained with (so the base model gets the same prompt format),
decoded greedily, and stopped at the template's end-of-turn token. Scores against the
reference answer:

* ROUGE-L F1 (rouge-score: longest common subsequence of words),
* token F1 and exact match (SQuAD-style: lower-cased, punctuation and articles removed),
* chrF (sacrebleu; character n-grams, robust on short answers) per example,
* BLEU (sacrebleu, corpus level: sentence BLEU of short answers is mostly zero),
* answer length in words.
All offline: both libraries are pure Python and need no downloads.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


@dataclass
class GenerationScores:
    rougeL: float
    token_f1: float
    exact_match: float
    chrf: float
    bleu: float
    answer_words: float

    def metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}_{k}": float(v) for k, v in asdict(self).items()}


@dataclass
class GenerationReport:
    examples: int
    max_new_tokens: int
    adapter: GenerationScores
    base: GenerationScores | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)  # per example: prompt, reference, answers, scores

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def score(predictions: list[str], references: list[str]) -> tuple[GenerationScores, list[dict[str, float]]]:
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    per = []
    for pred, ref in zip(predictions, references, strict=True):
        per.append({
            "rougeL": scorer.score(ref, pred)["rougeL"].fmeasure,
            "token_f1": token_f1(pred, ref),
            "exact_match": exact_match(pred, ref),
            "chrf": sacrebleu.sentence_chrf(pred, [ref]).score,
        })

    def mean(key: str) -> float:
        return sum(p[key] for p in per) / max(len(per), 1)

    bleu = sacrebleu.corpus_bleu(predictions, [references]).score if predictions else 0.0
    words = sum(len(p.split()) for p in predictions) / max(len(predictions), 1)
    return GenerationScores(rougeL=mean("rougeL"), token_f1=mean("token_f1"), exact_match=mean("exact_match"),
                            chrf=mean("chrf"), bleu=bleu, answer_words=words), per


def prompts_and_references(conversations: list[list[dict[str, str]]]) -> tuple[list[list[dict]], list[str]]:
    """Each conversation up to its last assistant turn, and that turn's text."""
    prompts, refs = [], []
    for conv in conversations:
        last = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
        prompts.append(conv[:last])
        refs.append(conv[last]["content"])
    return prompts, refs


def generate(model, tokenizer, prompts: list[list[dict]], *, max_new_tokens: int, batch_size: int,
             stop_ids: list[int], label: str = "generate", template_kwargs: dict | None = None) -> list[str]:
    """Greedy answers to chat prompts, rendered with the tokenizer's (the adapter's) chat template
    (`template_kwargs`: dataset.template_kwargs, as training rendered them)."""
    import torch
    from rich.progress import track

    device = next(model.parameters()).device
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False, **(template_kwargs or {}))
             for p in prompts]
    answers: list[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues the end of every row
    was_training = model.training
    model.eval()
    try:
        starts = range(0, len(texts), batch_size)
        for start in track(starts, description=label, total=len(starts), transient=True):
            batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(device)
            with torch.no_grad():
                out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
            for row in out[:, batch["input_ids"].shape[1]:]:
                ids = row.tolist()
                cut = next((i for i, t in enumerate(ids) if t in stop_ids), len(ids))
                answers.append(tokenizer.decode(ids[:cut], skip_special_tokens=True).strip())
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def generation_eval(model, tokenizer, conversations, *, max_new_tokens: int, batch_size: int,
                    stop_ids: list[int], compare_base: bool) -> GenerationReport:
    prompts, refs = prompts_and_references(conversations)
    adapter_answers = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               stop_ids=stop_ids, label="generate adapter")
    adapter_scores, adapter_per = score(adapter_answers, refs)
    base_scores = base_answers = base_per = None
    if compare_base:
        with model.disable_adapter():
            base_answers = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                    batch_size=batch_size, stop_ids=stop_ids, label="generate base")
        base_scores, base_per = score(base_answers, refs)
    rows = []
    for i, (prompt, ref) in enumerate(zip(prompts, refs, strict=True)):
        row = {"prompt": prompt[-1]["content"], "reference": ref, "adapter": adapter_answers[i],
               "adapter_rougeL": adapter_per[i]["rougeL"], "adapter_token_f1": adapter_per[i]["token_f1"]}
        if base_answers is not None:
            row.update({"base": base_answers[i], "base_rougeL": base_per[i]["rougeL"],
                        "base_token_f1": base_per[i]["token_f1"]})
        rows.append(row)
    return GenerationReport(examples=len(prompts), max_new_tokens=max_new_tokens, adapter=adapter_scores,
                            base=base_scores, rows=rows)
