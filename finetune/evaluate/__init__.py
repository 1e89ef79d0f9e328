"""The eval stage: loss and perplexity of the base model and of the adapter on the held-out split.

The loss is averaged over the tokens that carry a label (the answers and their end
token), summed over the whole split before dividing, so the perplexity does not
depend on how examples fall into batches (the Trainer's eval_loss averages batch
means, which weighs short batches up).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finetune.evaluate.generation import GenerationReport, generation_eval

log = logging.getLogger(__name__)


@dataclass
class LossReport:
    loss: float
    perplexity: float
    tokens: int
    examples: int


@dataclass
class EvalReport:
    adapter: LossReport
    base: LossReport | None = None
    improvement: float | None = None  # base loss - adapter loss (positive: the adapter is better)
    init: LossReport | None = None  # the adapter training started from (train.init_adapter)
    generation: GenerationReport | None = None
    # lm-evaluation-harness: {"adapter": {task: {metric: value}}, "base": {...}}
    lm_eval: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def metrics(self) -> dict[str, float]:
        out = {"eval/adapter_loss": self.adapter.loss, "eval/adapter_perplexity": self.adapter.perplexity}
        if self.base is not None:
            out.update({"eval/base_loss": self.base.loss, "eval/base_perplexity": self.base.perplexity,
                        "eval/loss_improvement": self.improvement or 0.0})
        if self.init is not None:
            out.update({"eval/init_loss": self.init.loss, "eval/init_perplexity": self.init.perplexity})
        if self.generation is not None:
            out.update(self.generation.adapter.metrics("eval/adapter"))
            if self.generation.base is not None:
                out.update(self.generation.base.metrics("eval/base"))
        for which, tasks in self.lm_eval.items():
            for task, metrics in tasks.items():
                out.update({f"eval/lm_eval/{task}/{name}_{which}": value for name, value in metrics.items()})
        return out


def token_loss(model, examples, pad_token_id: int, batch_size: int, label: str = "eval") -> LossReport:
    """Mean next-token loss over labelled tokens, and its perplexity."""
    import torch
    import torch.nn.functional as F
    from rich.progress import track

    device = next(model.parameters()).device
    total_nll = 0.0
    total_tokens = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            starts = range(0, len(examples), batch_size)
            for start in track(starts, description=label, total=len(starts), transient=True):
                batch = examples[start:start + batch_size]
                width = max(len(e.input_ids) for e in batch)
                ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
                labels = torch.full((len(batch), width), -100, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for i, e in enumerate(batch):
                    n = len(e.input_ids)
                    ids[i, :n] = torch.tensor(e.input_ids)
                    labels[i, :n] = torch.tensor(e.labels)
                    mask[i, :n] = 1
                ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
                shift_logits = logits[:, :-1].reshape(-1, logits.size(-1))
                shift_labels = labels[:, 1:].reshape(-1)
                total_nll += F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum").item()
                total_tokens += int((shift_labels != -100).sum())
    finally:
        model.train(was_training)
    loss = total_nll / max(total_tokens, 1)
    return LossReport(loss=loss, perplexity=math.exp(min(loss, 50.0)), tokens=total_tokens, examples=len(examples))


def held_out(cfg, data) -> tuple[list, list[str]]:
    """The examples to evaluate on (the eval split, at most eval.max_examples; the training split when the eval
    split is empty) and the notes that say so."""
    examples, notes = list(data.eval), []
    if not examples:
        notes.append("the eval split is empty (dataset.eval_fraction too small for this dataset); "
                     "evaluated on the training split instead, which overstates the adapter")
        examples = list(data.train)
    if cfg.eval.max_examples is not None:
        examples = examples[: cfg.eval.max_examples]
    return examples, notes


def generations(cfg, data, model, tokenizer) -> GenerationReport | None:
    """Greedy answers to the first eval.generate_examples held-out prompts, by the adapter and the base, scored
    against the held-out answers (a preference pair's chosen one); None when there are none to make."""
    conversations = list(data.eval_messages)[: cfg.eval.generate_examples]
    if not conversations:
        return None
    from data_prep.templates import stop_token_ids

    generation = generation_eval(model, tokenizer, conversations, max_new_tokens=cfg.eval.max_new_tokens,
                                 batch_size=cfg.eval.batch_size, stop_ids=stop_token_ids(tokenizer, data.template_name),
                                 compare_base=cfg.eval.compare_base)
    g = generation
    log.info("eval: %d generated answers: adapter ROUGE-L %.3f, token F1 %.3f, chrF %.1f%s", g.examples,
             g.adapter.rougeL, g.adapter.token_f1, g.adapter.chrf,
             f" vs base ROUGE-L {g.base.rougeL:.3f}, token F1 {g.base.token_f1:.3f}, chrF {g.base.chrf:.1f}"
             if g.base else "")
    return generation


def evaluate(cfg, data, model, tokenizer, init_adapter: Path | None = None, quantized: bool = True) -> EvalReport:
    """Evaluate `model` (a peft model: base + adapter) on the eval split; the base with the adapter off; with
    `init_adapter`, the adapter training started from."""
    examples, notes = held_out(cfg, data)
    pad = tokenizer.pad_token_id
    adapter = token_loss(model, examples, pad, cfg.eval.batch_size, "eval adapter")
    base = None
    if cfg.eval.compare_base:
        with model.disable_adapter():
            base = token_loss(model, examples, pad, cfg.eval.batch_size, "eval base")
    init = None
    if init_adapter is not None:
        from finetune.models.adapters import attached

        with attached(model, init_adapter, "init", quantized):
            init = token_loss(model, examples, pad, cfg.eval.batch_size, "eval init adapter")
    generation = generations(cfg, data, model, tokenizer)
    lm_eval_scores = {}
    if cfg.eval.lm_eval_tasks:
        from finetune.evaluate import harness

        lm_eval_scores = harness.run(cfg, model, tokenizer)
    report = EvalReport(adapter=adapter, base=base,
                        improvement=(base.loss - adapter.loss) if base is not None else None,
                        generation=generation, lm_eval=lm_eval_scores, notes=notes, init=init)
    figures = (adapter.loss, adapter.perplexity, f" vs base {base.loss:.4f} (ppl {base.perplexity:.2f})" if base
               else "", adapter.examples)
    if not list(data.eval):  # said where the user reads it, not only in eval.json's notes
        log.warning("eval: adapter loss %.4f (ppl %.2f)%s on %d TRAINING examples: the eval split is empty "
                    "(too few distinct rows for dataset.eval_fraction), so these figures overstate the adapter; "
                    "add rows or raise dataset.eval_fraction for a held-out score", *figures)
    else:
        log.info("eval: adapter loss %.4f (ppl %.2f)%s on %d held-out examples", *figures)
    return report
