"""The training methods beside SFT (train.method: dpo | orpo | kto | simpo | grpo) on TRL's own trainers: each
one's TRL config and trainer class, and its own config fields; the train and evaluate stages both use it.

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

GRPO (TRL's GRPOTrainer) trains on prompts (data_prep/prompts.py) and the recipe's reward functions
(finetune/rewards.py): it samples train.num_generations completions per prompt with the policy itself (or a
colocated vLLM engine, train.generation: vllm), scores them, and weighs each by how it compares with the others
of its prompt. The plan's generation_batch_size (finetune/preflight: how many completions are generated at once,
the phase that decides its memory) is passed as planned; with beta 0 (TRL's default) there is no reference model.
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
    "grpo": ("trl", "GRPOConfig", "GRPOTrainer"),
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


def grpo_args(cfg, choices: dict[str, Any] | None = None) -> dict[str, Any]:
    """GRPOConfig's fields from the recipe and the plan's generation choices."""
    t, choices = cfg.train, choices or {}
    args: dict[str, Any] = {
        "num_generations": t.num_generations,
        "max_completion_length": t.max_completion_length,
        "temperature": t.temperature,
        # the reward functions read the data's reference columns (answer, ...): TRL must keep them
        "remove_unused_columns": False,
        # the data stage rendered and measured the prompts with these; TRL renders them again for generation
        "chat_template_kwargs": dict(cfg.dataset.template_kwargs or {}) or None,
        "log_completions": False,  # our eval stage logs its own table of completions and rewards
        # TRL sums the functions' rewards with these weights (finetune.rewards.trl_functions returns them unweighted,
        # so that TRL logs each function's own reward: rewards/<name>/mean)
        "reward_weights": [float(f.weight) for f in cfg.reward.functions],
    }
    if choices.get("generation_batch_size"):
        args["generation_batch_size"] = int(choices["generation_batch_size"])
    if t.beta is not None:
        args["beta"] = t.beta
    if t.loss_type:
        args["loss_type"] = t.loss_type
    if t.generation.value == "vllm":
        args.update(use_vllm=True, vllm_mode="colocate")
        if choices.get("vllm_gpu_memory_utilization"):
            args["vllm_gpu_memory_utilization"] = float(choices["vllm_gpu_memory_utilization"])
    return args


def method_args(cfg, choices: dict[str, Any] | None = None) -> dict[str, Any]:
    """The method's own TRL config fields from the recipe (train.beta, train.loss_type; GRPO's generation)."""
    t = cfg.train
    method = t.method.value
    if method == "grpo":
        return grpo_args(cfg, choices)
    args: dict[str, Any] = {"max_length": cfg.dataset.max_seq_len}  # the data stage dropped (and counted) longer
    if t.beta is not None:
        args["beta"] = t.beta
    if method == "dpo" and t.loss_type:
        args["loss_type"] = [t.loss_type]
    if method == "simpo":
        args.update(loss_type="simpo", cpo_alpha=0.0)  # SimPO is CPO's simpo loss without its NLL term
        args.setdefault("beta", 2.0)  # the SimPO paper's scale (CPO's own default, 0.1, is DPO's)
    return args


def training_args(cfg, common: dict[str, Any], choices: dict[str, Any] | None = None):
    """The method's TRL config: `common`, the arguments every method shares (finetune.train.common_args: the
    plan's batch, precision, checkpoints), and the method's own fields (`choices`: the plan's)."""
    config_class, _ = _classes(cfg.train.method.value)
    return config_class(**common, **method_args(cfg, choices))


def datasets(cfg, data):
    """(train, eval) datasets.Dataset for the method: for DPO, the data stage's token ids (memory-mapped from
    its Arrow store); for the others, the rows in TRL's conversational shape. KTO trains on unpaired
    completions, so pairs are split into a desirable (chosen) and an undesirable (rejected) row each (TRL's
    unpair_preference_dataset). For GRPO, the prompts with their reference columns."""
    if cfg.train.method.value == "grpo":
        return data.to_dataset("train"), None  # the eval stage scores held-out prompts itself (evaluate/rewards.py)
    if cfg.train.method.value == "dpo" and data.kind == "paired":
        return data.tokenized("train"), data.tokenized("eval") if len(data.eval) else None
    train = data.to_dataset("train")
    evaluation = data.to_dataset("eval") if len(data.eval) else None
    if cfg.train.method.value == "kto" and data.kind == "paired":
        from trl.data_utils import unpair_preference_dataset

        train = unpair_preference_dataset(train)
        evaluation = unpair_preference_dataset(evaluation) if evaluation is not None else None
    return train, evaluation
