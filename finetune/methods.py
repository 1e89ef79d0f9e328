"""The training methods beside SFT (train.method: dpo | orpo | kto | simpo) on TRL's own trainers: each one's
TRL config and trainer class, and its own config fields; the train and evaluate stages both use it.

The train stage is the same as for SFT (finetune/train/__init__.py: the plan's batch and precision, complete-only
checkpoints, resume, signals, out-of-memory re-planning); only the TRL config and trainer class differ, chosen
here. The data stage (data_prep/preference.py) validates the rows and tokenizes them exactly as TRL does, into an
Arrow cache: DPO trains on those ids (prompt_ids / chosen_ids / rejected_ids) and does not tokenize again
(:func:`trainer_base`). ORPO, SimPO (CPO) and KTO get the rows in TRL's conversational shape and tokenize them
themselves: ORPO's and CPO's __init__ map their own tokenize_row (prompt and answers tokenized apart, BOS/EOS
added, truncation) over every row unconditionally, with nothing a small override could skip; KTO's
_prepare_dataset also builds the KL completions from the training batch size, a train-time setting the data
stage's store cannot hold. Their over-long rows are dropped and counted by the data stage all the same. With peft,
DPO's and KTO's reference model is the base with the adapter switched off (TRL's own handling: no second copy
of the weights); ORPO and SimPO need none.
"""

from __future__ import annotations

import importlib
from typing import Any

# method -> (module, TRL config class, TRL trainer class); ORPO and CPO (SimPO's trainer) live in
# trl.experimental in TRL 1.16
TRAINERS = {
    "dpo": ("trl", "DPOConfig", "DPOTrainer"),
    "kto": ("trl", "KTOConfig", "KTOTrainer"),
    "orpo": ("trl.experimental.orpo", "ORPOConfig", "ORPOTrainer"),
    "simpo": ("trl.experimental.cpo", "CPOConfig", "CPOTrainer"),
}


def _classes(method: str):
    module, config, trainer = TRAINERS[method]
    mod = importlib.import_module(module)
    return getattr(mod, config), getattr(mod, trainer)


TOKENIZED = ("prompt_ids", "chosen_ids", "rejected_ids")


def _pretokenized(base):
    class PretokenizedDPOTrainer(base):
        """TRL's DPOTrainer that takes the data stage's token ids as they are.

        DPOTrainer._prepare_dataset tokenizes the conversational rows itself and then silently drops the rows
        whose prompt fills max_length. The data stage (data_prep.preference) already tokenized them the same way
        (a test compares the ids with TRL's own on real tokenizers), cached them in its Arrow store, and dropped
        and counted the over-long rows: a dataset that holds the tokenized columns (and no conversational ones)
        passes through, anything else goes to TRL's own preparation."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            from datasets import Dataset

            if isinstance(dataset, Dataset) and set(dataset.column_names) == set(TOKENIZED):
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    PretokenizedDPOTrainer.__qualname__ = PretokenizedDPOTrainer.__name__
    return PretokenizedDPOTrainer


def trainer_base(method: str):
    base = _classes(method)[1]
    return _pretokenized(base) if method == "dpo" else base


def method_args(cfg) -> dict[str, Any]:
    """The method's own TRL config fields from the recipe (train.beta, train.loss_type)."""
    t = cfg.train
    method = t.method.value
    args: dict[str, Any] = {"max_length": cfg.dataset.max_seq_len}  # the data stage dropped (and counted) longer
    if t.beta is not None:
        args["beta"] = t.beta
    if method == "dpo" and t.loss_type:
        args["loss_type"] = [t.loss_type]
    if method == "simpo":
        args.update(loss_type="simpo", cpo_alpha=0.0)  # SimPO is CPO's simpo loss without its NLL term
        args.setdefault("beta", 2.0)  # the SimPO paper's scale (CPO's own default, 0.1, is DPO's)
    return args


def training_args(cfg, common: dict[str, Any]):
    """The method's TRL config: `common`, the arguments every method shares (finetune.train.common_args: the
    plan's batch, precision, checkpoints), and the method's own fields."""
    config_class, _ = _classes(cfg.train.method.value)
    return config_class(**common, **method_args(cfg))


def datasets(cfg, data):
    """(train, eval) datasets.Dataset for the method: for DPO, the data stage's token ids (memory-mapped from
    its Arrow store); for the others, the rows in TRL's conversational shape. KTO trains on unpaired
    completions, so pairs are split into a desirable (chosen) and an undesirable (rejected) row each (TRL's
    unpair_preference_dataset)."""
    if cfg.train.method.value == "dpo" and data.kind == "paired":
        return data.tokenized("train"), data.tokenized("eval") if len(data.eval) else None
    train = data.to_dataset("train")
    evaluation = data.to_dataset("eval") if len(data.eval) else None
    if cfg.train.method.value == "kto" and data.kind == "paired":
        from trl.data_utils import unpair_preference_dataset

        train = unpair_preference_dataset(train)
        evaluation = unpair_preference_dataset(evaluation) if evaluation is not None else None
    return train, evaluation
