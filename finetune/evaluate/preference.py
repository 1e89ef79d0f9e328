"""The eval stage for preference methods: on the held-out pairs, does the adapter prefer the chosen answer?

For each held-out pair, the summed log-probability of the chosen and of the rejected answer (its tokens only,
after the prompt as the chat template renders it), under the adapter and under the base (the adapter off):

* ``preference_accuracy``: the share of pairs whose chosen answer the model finds the more likely one (summed
  log-probability of its tokens, the quantity DPO's reward is made of), per model;
* ``logp_margin``: the mean over pairs of log p(chosen) - log p(rejected), per model; the per-token means are in
  the table too (``*_token_margin``: a length-neutral view);
* ``reward_accuracy`` / ``reward_margin``: DPO's implicit reward, beta x (log p_adapter - log p_reference), of
  chosen against rejected -- the quantity the preference loss moves. The reference is the one training used:
  the base, or the adapter training started from (train.init_adapter, e.g. the SFT adapter), which is then
  scored as a third model (``init``).

KTO's unpaired rows are scored by the mean log-probability of the desirable and of the undesirable completions.
The per-pair table (both models' margins) is logged as an MLflow table by the pipeline.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class PreferenceScores:
    preference_accuracy: float
    logp_margin: float


@dataclass
class PreferenceEvalReport:
    method: str
    pairs: int
    adapter: PreferenceScores
    base: PreferenceScores
    reward_accuracy: float
    reward_margin: float
    beta: float
    init: PreferenceScores | None = None  # the adapter training started from (train.init_adapter)
    reference: str = "base"  # what the implicit reward is measured against: base | init
    generation: Any = None  # finetune.evaluate.generation.GenerationReport: answers scored against the chosen ones
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("rows")
        return d

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def metrics(self) -> dict[str, float]:
        return {"eval/adapter_preference_accuracy": self.adapter.preference_accuracy,
                "eval/base_preference_accuracy": self.base.preference_accuracy,
                "eval/adapter_logp_margin": self.adapter.logp_margin,
                "eval/base_logp_margin": self.base.logp_margin,
                "eval/reward_accuracy": self.reward_accuracy, "eval/reward_margin": self.reward_margin,
                **({"eval/init_preference_accuracy": self.init.preference_accuracy,
                    "eval/init_logp_margin": self.init.logp_margin} if self.init is not None else {}),
                **self._generation_metrics()}

    def _generation_metrics(self) -> dict[str, float]:
        g = self.generation
        if g is None:
            return {}
        return {**g.adapter.metrics("eval/adapter"), **(g.base.metrics("eval/base") if g.base is not None else {})}


def _answer_logps(model, tokenizer, prompt, answers: list[list[dict]], batch_size: int) -> list[tuple[float, float]]:
    """(summed, per-token mean) log-probability of each answer after the prompt."""
    import torch

    head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    n_head = len(tokenizer(head, add_special_tokens=False)["input_ids"])
    seqs = [tokenizer(tokenizer.apply_chat_template(prompt + a, tokenize=False), add_special_tokens=False)["input_ids"]
            for a in answers]
    out = []
    device = next(model.parameters()).device
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        width = max(len(s) for s in chunk)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in chunk], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk], device=device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        for row, s in zip(logps, chunk, strict=True):
            answer = row[n_head - 1:len(s) - 1]  # the answer's tokens, each predicted from its prefix
            out.append((float(answer.sum()), float(answer.mean())))
    return out


def _scores(model, tokenizer, rows, batch_size: int) -> list[tuple[float, float]]:
    out = []
    for row in rows:
        answers = [row["chosen"], row["rejected"]] if "chosen" in row else [row["completion"]]
        out.append(tuple(_answer_logps(model, tokenizer, row["prompt"], answers, batch_size)))
    return out


def _summary(table: list[dict[str, Any]], key: str) -> PreferenceScores:
    n = len(table)
    return PreferenceScores(sum(t[key] > 0 for t in table) / n, sum(t[key] for t in table) / n)


def evaluate(cfg, data, model, tokenizer, init_adapter: Path | None = None,
             quantized: bool = True) -> PreferenceEvalReport:
    """Score `model` (base + adapter), the base (adapter off) and, with `init_adapter`, the adapter training
    started from, on the held-out pairs."""
    from finetune.evaluate import held_out
    from finetune.methods import method_args

    rows, notes = held_out(cfg, data)
    beta = float(method_args(cfg).get("beta", 0.1))
    model.eval()
    adapter = _scores(model, tokenizer, rows, cfg.eval.batch_size)
    with model.disable_adapter():
        base = _scores(model, tokenizer, rows, cfg.eval.batch_size)
    init = None
    if init_adapter is not None:
        from finetune.models.adapters import attached

        with attached(model, init_adapter, "init", quantized):
            init = _scores(model, tokenizer, rows, cfg.eval.batch_size)
    # DPO's implicit reward is measured against the reference training used: the init adapter if there was one
    ref, reference = (init, "init") if init is not None else (base, "base")
    if data.kind == "unpaired":  # KTO: desirable vs undesirable completions, as two groups
        def group(scores):
            def mean(desirable):
                vals = [s[0][0] for s, r in zip(scores, rows, strict=True) if r["label"] == desirable]
                return sum(vals) / len(vals) if vals else 0.0

            margin = mean(True) - mean(False)
            return PreferenceScores(float(margin > 0), margin)

        rewards = [beta * ((a[0][0] - b[0][0]) if r["label"] else -(a[0][0] - b[0][0]))
                   for a, b, r in zip(adapter, ref, rows, strict=True)]
        report = PreferenceEvalReport(
            cfg.train.method.value, len(rows), group(adapter), group(base),
            sum(r > 0 for r in rewards) / len(rows), sum(rewards) / len(rows), beta,
            init=group(init) if init is not None else None, reference=reference, notes=notes)
    else:
        table = []
        locations = data.eval_locations or [""] * len(rows)
        for i, (row, a, b, r) in enumerate(zip(rows, adapter, base, ref, strict=True)):
            # a / b / r: ((sum, mean) chosen, (sum, mean) rejected) under the adapter / the base / the reference
            entry = {"location": locations[i] if i < len(locations) else "",
                     "prompt": row["prompt"][-1]["content"][:200], "chosen": row["chosen"][0]["content"][:200],
                     "rejected": row["rejected"][0]["content"][:200],
                     "adapter_margin": a[0][0] - a[1][0], "base_margin": b[0][0] - b[1][0],
                     "adapter_token_margin": a[0][1] - a[1][1], "base_token_margin": b[0][1] - b[1][1],
                     # DPO's implicit reward margin: summed log-probs against the reference
                     "reward_margin": beta * ((a[0][0] - r[0][0]) - (a[1][0] - r[1][0]))}
            if init is not None:
                c = init[i]
                entry.update(init_margin=c[0][0] - c[1][0], init_token_margin=c[0][1] - c[1][1])
            table.append(entry)
        report = PreferenceEvalReport(
            cfg.train.method.value, len(table), _summary(table, "adapter_margin"), _summary(table, "base_margin"),
            _summary(table, "reward_margin").preference_accuracy, _summary(table, "reward_margin").logp_margin, beta,
            init=_summary(table, "init_margin") if init is not None else None, reference=reference,
            rows=table, notes=notes)
    log.info("eval: %s on %d held-out rows: preference accuracy adapter %.3f vs base %.3f, log-prob margin %.3f vs "
             "%.3f", report.method, report.pairs, report.adapter.preference_accuracy, report.base.preference_accuracy,
             report.adapter.logp_margin, report.base.logp_margin)
    from finetune.evaluate import generations

    report.generation = generations(cfg, data, model, tokenizer)  # as for SFT, against the chosen answers
    if report.init is not None:
        log.info("eval: the adapter training started from: preference accuracy %.3f, log-prob margin %.3f",
                 report.init.preference_accuracy, report.init.logp_margin)
    return report
