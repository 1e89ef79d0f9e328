"""The eval stage for GRPO: the recipe's reward functions on held-out prompts, the adapter against the base.

The first eval.generate_examples held-out prompts (at most eval.max_examples) are answered greedily, up to
train.max_completion_length tokens (the budget training sampled with), by the adapter and by the base (the adapter
off), rendered as training rendered them (the chat template, dataset.template_kwargs) and stopped at the template's
end-of-turn token. Each completion is scored by every reward function (finetune/rewards.py) against the prompt's
reference columns:

* ``eval/adapter_reward`` / ``eval/base_reward``: the mean weighted total, what GRPO maximizes;
* ``eval/adapter_reward/<function>`` / ``eval/base_reward/<function>``: each function's mean;
* ``eval/reward_improvement``: adapter minus base.
Greedy decoding makes the comparison repeatable; the training curves (``train/reward``, ``train/rewards/<function>/
mean``) are over sampled completions, so their level differs. The table of prompts, completions and rewards is
logged as an MLflow table by the pipeline.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class RewardEvalReport:
    prompts: int
    max_new_tokens: int
    adapter: dict[str, float]  # "reward" (the weighted total) and each function's mean, by name
    base: dict[str, float] | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)  # per prompt: prompt, completions, rewards
    notes: list[str] = field(default_factory=list)
    generation = None  # no reference-answer scores: the rewards are the scores

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("rows")
        return d

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for which, scores in (("adapter", self.adapter), ("base", self.base)):
            for name, value in (scores or {}).items():
                out[f"eval/{which}_reward" if name == "reward" else f"eval/{which}_reward/{name}"] = value
        if self.base is not None:
            out["eval/reward_improvement"] = self.adapter["reward"] - self.base["reward"]
        return out


def _means(scores: dict[str, list[float]]) -> dict[str, float]:
    return {name: sum(values) / len(values) if values else 0.0 for name, values in scores.items()}


def evaluate(cfg, data, model, tokenizer) -> RewardEvalReport:
    """Answer held-out prompts with the adapter and the base, score both with the reward functions."""
    from data_prep.templates import stop_token_ids
    from finetune import rewards as reward_functions
    from finetune.evaluate import held_out
    from finetune.evaluate.generation import generate

    rows, notes = held_out(cfg, data)
    rows = rows[: cfg.eval.generate_examples]
    functions = reward_functions.build(cfg.reward, tokenizer)
    n_tokens = cfg.train.max_completion_length
    if not rows:
        notes.append("eval.generate_examples=0: no held-out prompts answered, so no rewards to compare")
        return RewardEvalReport(0, n_tokens, {}, None, notes=notes)
    prompts = [row["prompt"] for row in rows]
    columns = {c: [row.get(c) for row in rows] for c in data.columns}
    texts = [p[-1]["content"] for p in prompts]
    kwargs = dict(cfg.dataset.template_kwargs or {})
    stops = stop_token_ids(tokenizer, data.template_name)

    def answer(label: str) -> list[str]:
        return generate(model, tokenizer, prompts, max_new_tokens=n_tokens, batch_size=cfg.eval.batch_size,
                        stop_ids=stops, label=label, template_kwargs=kwargs)

    adapter_out = answer("generate adapter")
    adapter = reward_functions.score(functions, adapter_out, prompts=texts, **columns)
    base = base_out = None
    if cfg.eval.compare_base:
        with model.disable_adapter():
            base_out = answer("generate base")
        base = reward_functions.score(functions, base_out, prompts=texts, **columns)
    table = []
    locations = data.eval_locations if list(data.eval) else data.train_locations
    for i, text in enumerate(texts):
        entry = {"location": locations[i] if i < len(locations) else "", "prompt": text[:500],
                 "adapter": adapter_out[i], **{f"adapter_{k}": v[i] for k, v in adapter.items()}}
        if base is not None:
            entry.update({"base": base_out[i], **{f"base_{k}": v[i] for k, v in base.items()}})
        table.append(entry)
    report = RewardEvalReport(len(rows), n_tokens, _means(adapter), _means(base) if base is not None else None,
                              rows=table, notes=notes)
    where = "TRAINING prompts (the eval split is empty)" if not list(data.eval) else "held-out prompts"
    log.info("eval: mean reward on %d %s: adapter %.3f%s (%s)", len(rows), where, report.adapter["reward"],
             f" vs base {report.base['reward']:.3f}" if report.base else "",
             ", ".join(f"{k} {v:.3f}" for k, v in report.adapter.items() if k != "reward"))
    return report
