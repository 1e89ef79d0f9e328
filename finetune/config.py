"""The recipe schema: typed settings groups, registered in Hydra's ConfigStore.

``recipes/config.yaml`` extends this schema through its defaults list, so every
YAML file and every command-line override is checked against these dataclasses at
composition: a misspelled key or a value of the wrong type fails before anything
runs (exit 2), instead of being silently ignored.

Cross-field checks live in ``__post_init__`` next to the fields they check; they
run when :func:`to_run_config` turns the composed config into these objects.

This module must stay light: the CLI's ``--help`` and the preflight import it, and
neither may pull in torch, transformers or mlflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from finetune.errors import ConfigError


class Stage(Enum):
    data = "data"
    preflight = "preflight"
    train = "train"
    eval = "eval"


class DatasetFormat(Enum):
    alpaca = "alpaca"
    sharegpt = "sharegpt"
    messages = "messages"
    text = "text"
    preference = "preference"  # pairs (prompt / chosen / rejected) or KTO's completion + label: data_prep/preference.py
    prompts = "prompts"  # prompts with optional reference columns (answer, ...) for GRPO: data_prep/prompts.py
    auto = "auto"


class TrainMethod(Enum):
    sft = "sft"  # supervised fine-tuning on the answers
    dpo = "dpo"  # direct preference optimization (TRL DPOTrainer; the reference is the base, adapter off)
    orpo = "orpo"  # odds-ratio preference optimization: SFT + preference in one loss, no reference model
    kto = "kto"  # Kahneman-Tversky optimization on unpaired completions labelled desirable or not
    simpo = "simpo"  # simple preference optimization: length-normalized, no reference model (TRL's CPO)
    grpo = "grpo"  # group relative policy optimization on prompts and reward functions (TRL GRPOTrainer)


PREFERENCE_METHODS = ("dpo", "orpo", "kto", "simpo")


class Generation(Enum):
    """How GRPO samples its completions."""

    transformers = "transformers"  # the policy's own generate() (LoRA on the quantized base), any device
    vllm = "vllm"  # a colocated vLLM engine on the same GPU (CUDA only; pip install -e .[vllm])


class LengthPolicy(Enum):
    drop = "drop"
    truncate = "truncate"


class MultiTurn(Enum):
    """How a conversation with several answers becomes training examples (data_prep.encode.ChatEncoder)."""

    auto = "auto"  # one example per conversation where the template preserves prefixes, split where it does not
    split = "split"  # one example per answer, rendered as inference renders the conversation up to it
    last = "last"  # only each conversation's final answer is trained
    full = "full"  # one render of the whole conversation, every answer trained as it appears in it


class Quantization(Enum):
    nf4 = "nf4"
    int8 = "int8"
    none = "none"


class Optimizer(Enum):
    adamw = "adamw"
    adamw_8bit = "adamw_8bit"
    paged_adamw_8bit = "paged_adamw_8bit"
    paged_adamw_32bit = "paged_adamw_32bit"


class Device(Enum):
    cuda = "cuda"
    cpu = "cpu"
    mps = "mps"


class Distributed(Enum):
    none = "none"
    ddp = "ddp"
    fsdp = "fsdp"


class LRScheduler(Enum):
    linear = "linear"
    cosine = "cosine"
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


@dataclass
class ModelConfig:
    """The base model. Nothing is downloaded until training starts."""

    # Hub id (meta-llama/Llama-2-7b-hf), a local directory, or a built-in tiny model (tiny:llama).
    name_or_path: str = MISSING
    # A hub revision (branch, tag or commit) to pin; null takes the default branch.
    revision: str | None = None
    # Runs code from the model's repository: only for models you trust.
    trust_remote_code: bool = False
    # null uses the tokenizer's own chat template; a built-in name (llama-2, alpaca, chatml)
    # for base models that have none (Llama-2 base has none).
    chat_template: str | None = None


@dataclass
class SourceConfig:
    """One of several datasets mixed in one recipe (dataset.sources)."""

    # A file, directory, glob, hub id or sample, as dataset.path.
    path: str = MISSING
    # null: dataset.format.
    format: DatasetFormat | None = None
    # This source's training rows are repeated (2.0: twice) or thinned (0.5: half, picked by content
    # hash, so the same half every run); held-out rows are never weighted.
    weight: float = 1.0
    # The text column of a text source in JSONL/CSV/Parquet; null: dataset.text_column.
    text_column: str | None = None

    def __post_init__(self) -> None:
        _check(self.weight > 0, "dataset.sources", f"weight must be positive, got {self.weight} for {self.path}")


@dataclass
class DatasetConfig:
    """Where the training data comes from and how it becomes tokens."""

    format: DatasetFormat = DatasetFormat.auto
    # A file, directory or glob; a hub dataset id; or a built-in sample (sample:medical-qa,
    # sample:medical-notes). Or leave it null and list several in `sources`.
    path: str | None = None
    # Several datasets mixed, each with its own format and weight; instead of `path`.
    sources: list[SourceConfig] = field(default_factory=list)
    # Longest tokenized example kept (the packed row length with packing; text is cut into blocks of it).
    max_seq_len: int = 1024
    # Longer examples: drop (rejected as too_long, counted) or truncate (cut to max_seq_len, counted).
    length_policy: LengthPolicy = LengthPolicy.drop
    # Share of rows held out for evaluation (split by content hash, stable under reordering).
    eval_fraction: float = 0.1
    # Train on the prompt tokens too, not only on the answers.
    train_on_inputs: bool = False
    # The run fails (exit 3) when more than this share of rows is rejected.
    max_rejected_fraction: float = 0.05
    # The column holding the text, for dataset.format: text in JSONL/CSV/Parquet files.
    text_column: str = "text"
    # Drop exact duplicates (same roles and text, ignoring case and whitespace); counted.
    dedup: bool = True
    # Pack several examples into each max_seq_len row (padding-free: faster, same loss) where the
    # architecture supports it exactly; others train on padded batches (the report says which).
    packing: bool = False
    # Reuse the processed dataset when sources, tokenizer, template and settings are unchanged.
    cache: bool = True
    # Print this many rendered examples with the trained tokens highlighted (stages=[data] to only look).
    preview: int = 0
    # Conversations with several answers, for templates that render earlier turns differently once later
    # ones follow (Qwen3, QwQ and DeepSeek-R1 drop reasoning from history): auto, split, last or full.
    multi_turn: MultiTurn = MultiTurn.auto
    # Extra variables handed to the chat template, e.g. {enable_thinking: false} for Qwen3.
    template_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(not (self.path and self.sources), "dataset.sources",
               "set either dataset.path or dataset.sources, not both")
        _check(self.max_seq_len >= 8, "dataset.max_seq_len", f"must be at least 8, got {self.max_seq_len}")
        _check(0.0 <= self.eval_fraction < 1.0, "dataset.eval_fraction",
               f"must be in [0, 1), got {self.eval_fraction}")
        _check(0.0 <= self.max_rejected_fraction <= 1.0, "dataset.max_rejected_fraction",
               f"must be in [0, 1], got {self.max_rejected_fraction}")
        _check(bool(self.text_column), "dataset.text_column", "must name a column")
        _check(self.preview >= 0, "dataset.preview", f"must be 0 or more examples, got {self.preview}")
        if not isinstance(self.multi_turn, MultiTurn):
            _check(self.multi_turn in MultiTurn._value2member_map_, "dataset.multi_turn",
                   f"must be one of {', '.join(m.value for m in MultiTurn)}, got {self.multi_turn!r}")
            self.multi_turn = MultiTurn(self.multi_turn)
        taken = sorted(set(self.template_kwargs or {}) & {"messages", "tools", "documents", "add_generation_prompt",
                                                          "bos_token", "eos_token", "pad_token", "unk_token"})
        _check(not taken, "dataset.template_kwargs",
               f"{', '.join(taken)} {'is' if len(taken) == 1 else 'are'} set by the data stage itself; remove "
               f"{'it' if len(taken) == 1 else 'them'}")

    def check_source(self) -> None:
        """A composed recipe names its data (run by RunConfig: the schema's own default has none)."""
        _check(bool(self.path) or bool(self.sources), "dataset.path",
               "missing a value: set dataset.path (a file, directory, glob, hub id or sample) or dataset.sources "
               "(pick a recipe: finetune +recipe=NAME)")


@dataclass
class AdapterConfig:
    """The LoRA adapter trained on top of the frozen base."""

    rank: int = 16  # higher: more capacity, more memory and optimizer state
    alpha: float = 32.0  # scaling is alpha / rank
    dropout: float = 0.05
    # Module names, or presets: all-linear (every linear layer of the decoder blocks, MoE experts
    # included), attention, mlp. One name as a bare string (adapter.targets=all-linear) or a list
    # (adapter.targets=[q_proj,v_proj]). Typed Any because OmegaConf has no str-or-list type; checked below.
    targets: Any = field(default_factory=lambda: ["all-linear"])
    # rsLoRA: scale updates by alpha / sqrt(rank) instead of alpha / rank (stabler at high rank).
    use_rslora: bool = False
    # DoRA: learn a magnitude vector besides the LoRA direction (better at low rank; slower, more memory).
    use_dora: bool = False

    def __post_init__(self) -> None:
        _check(self.rank >= 1, "adapter.rank", f"must be a positive integer, got {self.rank}")
        _check(self.alpha > 0, "adapter.alpha", f"must be positive, got {self.alpha}")
        _check(0.0 <= self.dropout < 1.0, "adapter.dropout", f"must be in [0, 1), got {self.dropout}")
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        _check(isinstance(self.targets, list | tuple) and all(isinstance(t, str) and t for t in self.targets),
               "adapter.targets", f"must be a module name or preset, or a list of them, got {self.targets!r}")
        self.targets = list(self.targets)
        _check(len(self.targets) > 0, "adapter.targets", "must name at least one module (or all-linear)")


@dataclass
class HardwareConfig:
    """The machine the plan must fit. recipes/hardware/*.yaml is the catalog of cards (hardware=rtx4070)."""

    name: str = "custom"
    device: Device = Device.cuda
    # The memory the plan must fit, per GPU, in GiB (a "12 GB" RTX 4070 has 12 GiB; datacenter
    # cards: what torch reports, e.g. 79.1 for an H100 80GB; Apple: the GPU's share of system RAM).
    vram_gib: float = 24.0
    # GPUs on this machine, one training process each (with device=cpu: processes, DDP over gloo).
    num_gpus: int = 1
    # False on cards without bfloat16 (T4, V100, 2080 Ti): compute runs in fp16 with loss scaling.
    bf16: bool = True
    # Dense bf16/fp16 tensor-core TFLOP/s (fp32 accumulate, no sparsity), for the wall-time estimate;
    # null: the planner assumes an A10G-class card and says so.
    tflops: float | None = None
    # Memory bandwidth in GB/s (the cost of dequantizing 4-bit weights on every pass).
    memory_bandwidth_gbs: float | None = None
    # GPU-to-GPU bandwidth in GB/s (NVLink on SXM cards, else PCIe): the cost of FSDP's all-gathers.
    interconnect_gbs: float = 25.0
    # Machines training together, num_gpus each (torchrun with c10d rendezvous: make train-multi NODES=N).
    num_nodes: int = 1
    # The network between them, per machine, in Gbit/s (InfiniBand NDR on an HGX H100: 8 x 400; cloud
    # Ethernet: 100; a workstation: 10): what gradient all-reduces and FSDP's all-gathers cost across nodes.
    internode_gbps: float = 100.0
    # Apple silicon: GPU and CPU share system RAM; vram_gib is the GPU's share, there is no CUDA context.
    unified_memory: bool = False
    # CPU RAM per machine, in GiB, that loading the base may use (all num_gpus processes together): a plan whose
    # load needs more is refused (exit 4). Under FSDP an unquantized base is held on the CPU while loading (once
    # per machine, or once per process when the checkpoint's dtype is cast); null: not checked (the plan says
    # what loading needs).
    ram_gib: float | None = None

    def __post_init__(self) -> None:
        _check(self.vram_gib > 0, "hardware.vram_gib", f"must be positive, got {self.vram_gib}")
        _check(self.num_gpus >= 1, "hardware.num_gpus", f"must be at least 1, got {self.num_gpus}")
        for key in ("tflops", "memory_bandwidth_gbs"):
            value = getattr(self, key)
            _check(value is None or value > 0, f"hardware.{key}", f"must be positive or null, got {value}")
        _check(self.interconnect_gbs > 0, "hardware.interconnect_gbs", f"must be positive, got {self.interconnect_gbs}")
        _check(self.num_nodes >= 1, "hardware.num_nodes", f"must be at least 1, got {self.num_nodes}")
        _check(self.internode_gbps > 0, "hardware.internode_gbps", f"must be positive, got {self.internode_gbps}")
        _check(self.ram_gib is None or self.ram_gib > 0, "hardware.ram_gib",
               f"must be positive or null, got {self.ram_gib}")
        # With hardware.device=cpu, num_gpus counts processes: torchrun can run DDP over gloo on the CPU
        # (the tests do), each process with the budget vram_gib.

    @property
    def world_size(self) -> int:
        """Training processes in all: num_gpus on each of num_nodes machines."""
        return self.num_gpus * self.num_nodes


@dataclass
class PinConfig:
    """Choices the planner must respect; null lets it decide."""

    # nf4 (4-bit), int8 (LLM.int8) or none (bf16/fp16 base)
    quantization: Quantization | None = None
    # nf4 only: quantize the 4-bit block constants too (~0.4 GB less on a 7B model, barely slower)
    double_quant: bool | None = None
    # recompute each layer in backward: far less activation memory, ~1.5x the compute
    gradient_checkpointing: bool | None = None
    # sequences per forward pass; must divide the per-GPU share of train.effective_batch_size
    micro_batch_size: int | None = None
    # adamw (torch, exact), adamw_8bit (bitsandbytes), paged_adamw_8bit / paged_adamw_32bit (state in
    # unified memory that can spill to the host)
    optimizer: Optimizer | None = None
    # with hardware.num_gpus > 1: ddp (a full replica per GPU) or fsdp (frozen weights sharded)
    distributed: Distributed | None = None

    def __post_init__(self) -> None:
        if self.micro_batch_size is not None:
            _check(self.micro_batch_size >= 1, "preflight.pin.micro_batch_size",
                   f"must be at least 1, got {self.micro_batch_size}")


@dataclass
class PreflightConfig:
    """The memory plan: what must fit, and the choices the planner may not change."""

    # Share of hardware.vram_gib kept free for what the estimate cannot see (other processes, the
    # display on a desktop card, estimate error: the calibration rows are within ~13%).
    margin: float = 0.1
    # Largest micro-batch the planner tries (it also divides the per-GPU share of the effective batch).
    max_micro_batch_size: int = 64
    pin: PinConfig = field(default_factory=PinConfig)

    def __post_init__(self) -> None:
        _check(0.0 <= self.margin < 1.0, "preflight.margin", f"must be in [0, 1), got {self.margin}")
        _check(self.max_micro_batch_size >= 1, "preflight.max_micro_batch_size",
               f"must be at least 1, got {self.max_micro_batch_size}")


@dataclass
class TrainConfig:
    seed: int = 42
    # Optimizer steps; -1 trains for `epochs` instead.
    max_steps: int = -1
    epochs: float = 1.0
    learning_rate: float = 2e-4
    # Sequences per optimizer step, kept constant by gradient accumulation whatever micro-batch fits.
    effective_batch_size: int = 16
    lr_scheduler: LRScheduler = LRScheduler.cosine
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 0.3  # the QLoRA paper's clipping
    save_steps: int = 100
    # Evaluate on the held-out split every N steps during training; null: only at the end.
    eval_steps: int | None = None
    # With eval_steps: end with the checkpoint of the best eval loss, not the last one.
    keep_best: bool = True
    # With eval_steps: stop after this many evaluations without improvement; null: never stop early.
    early_stopping_patience: int | None = None
    # NEFTune: noise on the input embeddings during training (5 is the paper's choice); null: off.
    neftune_noise_alpha: float | None = None
    # Checkpoints kept on disk (the oldest are deleted; the best one is kept too with keep_best).
    keep_checkpoints: int = 3
    # auto: continue the newest complete checkpoint of an unfinished run of this recipe (one trained with another
    # recipe or other data is left alone: a new run starts, saying so); never: start fresh; or a checkpoint / run
    # directory path (continued even if the recipe changed).
    resume: str = "auto"
    # A run directory (hydra.run.dir, a multi-node RUN_ID) that holds a finished or interrupted run is refused;
    # true: start this run there anyway, removing the old run's adapter, checkpoints, results, merged/ and export/.
    overwrite: bool = False
    logging_steps: int = 1
    # sft, or a preference method on dataset.format: preference data: dpo, orpo, kto (unpaired completion + label
    # rows), simpo; or grpo on dataset.format: prompts with reward.functions
    method: TrainMethod = TrainMethod.sft
    # Preference methods: the strength of the preference term (DPO / KTO: the KL weight; ORPO: lambda; SimPO:
    # the reward scale); GRPO: the KL weight to the reference (the base, adapter off); null: TRL's default for the
    # method (DPO 0.1, ORPO 0.1, KTO 0.1, SimPO 2.0, GRPO 0: no reference model).
    beta: float | None = None
    # DPO: TRL's loss_type (sigmoid, ipo, hinge, robust, ...); null: sigmoid. GRPO: dapo (null), grpo, dr_grpo, bnpo.
    loss_type: str | None = None
    # Start from an existing adapter instead of a new one: an earlier run's directory (or its adapter/), or an
    # MLflow URI (runs:/<run id>/adapter, models:/<name>/<version>). Its LoRA shape replaces adapter.*; DPO and
    # KTO then train against it as the reference (SFT, then DPO); the run is linked to the one that trained it.
    init_adapter: str | None = None
    # GRPO: completions sampled per prompt, the group whose rewards are compared with each other;
    # train.effective_batch_size counts completions and must be a multiple of it.
    num_generations: int = 8
    # GRPO: the longest completion sampled, in tokens (the prompt's length is the data's, up to dataset.max_seq_len).
    max_completion_length: int = 256
    # GRPO: the sampling temperature of the completions.
    temperature: float = 1.0
    # GRPO: transformers (the policy's own generate, any device) or vllm (a colocated vLLM engine; CUDA only, the
    # vllm extra).
    generation: Generation = Generation.transformers

    def __post_init__(self) -> None:
        _check(self.max_steps == -1 or self.max_steps > 0, "train.max_steps",
               f"must be -1 (use epochs) or positive, got {self.max_steps}")
        _check(self.epochs > 0, "train.epochs", f"must be positive, got {self.epochs}")
        _check(self.learning_rate > 0, "train.learning_rate", f"must be positive, got {self.learning_rate}")
        _check(self.effective_batch_size >= 1, "train.effective_batch_size",
               f"must be at least 1, got {self.effective_batch_size}")
        _check(0.0 <= self.warmup_ratio < 1.0, "train.warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        _check(self.save_steps >= 1, "train.save_steps", f"must be at least 1, got {self.save_steps}")
        _check(self.logging_steps >= 1, "train.logging_steps", f"must be at least 1, got {self.logging_steps}")
        if self.eval_steps is not None:
            _check(self.eval_steps >= 1, "train.eval_steps", f"must be at least 1 or null, got {self.eval_steps}")
            if self.keep_best:
                _check(self.save_steps % self.eval_steps == 0, "train.save_steps",
                       f"must be a multiple of train.eval_steps={self.eval_steps} to keep the best checkpoint "
                       f"(got {self.save_steps}); or set train.keep_best=false")
        if self.early_stopping_patience is not None:
            _check(self.early_stopping_patience >= 1, "train.early_stopping_patience",
                   f"must be at least 1 or null, got {self.early_stopping_patience}")
            _check(self.eval_steps is not None and self.keep_best, "train.early_stopping_patience",
                   "needs train.eval_steps (and train.keep_best=true): early stopping watches the eval loss")
        if self.neftune_noise_alpha is not None:
            _check(self.neftune_noise_alpha > 0, "train.neftune_noise_alpha",
                   f"must be positive or null, got {self.neftune_noise_alpha}")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", f"must be at least 1, got {self.keep_checkpoints}")
        _check(bool(self.resume.strip()), "train.resume", "must be auto, never, or a checkpoint path")
        if self.beta is not None:
            _check(self.beta > 0, "train.beta", f"must be positive or null, got {self.beta}")
        if self.init_adapter is not None:
            _check(bool(str(self.init_adapter).strip()), "train.init_adapter",
                   "must be a run or adapter directory, an MLflow runs:/ or models:/ URI, or null")
        if self.loss_type is not None:
            _check(self.method in (TrainMethod.dpo, TrainMethod.grpo), "train.loss_type",
                   f"is DPO's and GRPO's (TRL's loss_type); train.method={self.method.value} has its own loss")
        _check(self.num_generations >= 2, "train.num_generations",
               f"must be at least 2 (GRPO compares each completion with the others of its prompt), got "
               f"{self.num_generations}")
        _check(self.max_completion_length >= 1, "train.max_completion_length",
               f"must be at least 1 token, got {self.max_completion_length}")
        _check(self.temperature > 0, "train.temperature", f"must be positive, got {self.temperature}")
        if self.method == TrainMethod.grpo:
            _check(self.effective_batch_size % self.num_generations == 0, "train.effective_batch_size",
                   f"is {self.effective_batch_size} completions per step, which must be a multiple of "
                   f"train.num_generations={self.num_generations} (whole groups of one prompt's completions): use "
                   f"{max(self.num_generations, self.effective_batch_size // self.num_generations * self.num_generations)}"
                   f" or {(self.effective_batch_size // self.num_generations + 1) * self.num_generations}")


@dataclass
class RewardFunction:
    """One reward function of GRPO (reward.functions): a built-in by name, or your own as module:function. Each
    built-in takes only its own options (finetune/rewards.py checks which)."""

    # exact_match, numeric_match (a reference column: the math answer), regex (a format check), length (in a range),
    # json (valid JSON, optionally against `schema`), or module:function (your own, from the recipe's directory,
    # the working directory or an installed package)
    name: str = MISSING
    # Its share of the reward: the total is the weighted sum of every function's reward.
    weight: float = 1.0
    # The name its metrics go by (train/rewards/<label>/mean, eval/adapter_reward/<label>); null: the built-in's or
    # the function's name (a second regex: regex_2).
    label: str | None = None
    # exact_match / numeric_match: the reference column of the prompt data (GSM8K's text after ####: answer).
    column: str | None = None
    # regex: what a completion must match (Python re, searched; ^...$ for the whole completion). exact_match /
    # numeric_match: where the answer is in the completion (its first group, e.g. <answer>(.*?)</answer>); null: the
    # whole completion (numeric_match: its last number).
    pattern: str | None = None
    # numeric_match: the largest difference still counted as equal.
    tolerance: float | None = None
    # length: the range rewarded (1.0 inside, less the further outside), in `unit`s; either may be null.
    min: int | None = None
    max: int | None = None
    # length: words, characters or tokens (the model's tokenizer).
    unit: str | None = None
    # json: a JSON schema the completion's JSON must satisfy; null: any valid JSON.
    schema: Any = None
    # module:function: keyword arguments handed to your function with every call.
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class RewardConfig:
    """GRPO's rewards, validated before anything loads (finetune/rewards.py)."""

    # The reward functions, each a `name` plus its own options: [{name: exact_match, column: answer}, ...]
    functions: list[RewardFunction] = field(default_factory=list)


@dataclass
class EvalConfig:
    # Compare the adapter with the base model (the adapter switched off) on the eval split.
    compare_base: bool = True
    batch_size: int = 8
    # Evaluate on at most this many held-out examples; null: all of them.
    max_examples: int | None = None
    # Answer this many held-out prompts (greedy) and score them against the references
    # (ROUGE-L, token F1, exact match, chrF, BLEU); 0: no generation evals.
    generate_examples: int = 32
    max_new_tokens: int = 128
    # lm-evaluation-harness tasks on base and adapter, when `lm-eval` is installed (offline: tasks
    # with local data, such as the built-in finetune_medical_mc); [] : none.
    lm_eval_tasks: list[str] = field(default_factory=list)
    # Examples per task; null: all.
    lm_eval_limit: int | None = None
    # A directory of your own task YAMLs for the harness.
    lm_eval_include_path: str | None = None

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "eval.batch_size", f"must be at least 1, got {self.batch_size}")
        _check(self.generate_examples >= 0, "eval.generate_examples",
               f"must be 0 (off) or more, got {self.generate_examples}")
        _check(self.max_new_tokens >= 1, "eval.max_new_tokens", f"must be at least 1, got {self.max_new_tokens}")


@dataclass
class TrackingConfig:
    # MLflow's own default store, relative to the working directory (the Makefile runs from the repo root),
    # or a tracking server (http://host:5000).
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "finetune"
    # When the server at `uri` does not answer: true logs into ./mlflow.db (and says so loudly);
    # false stops before training with exit 5.
    fallback_local: bool = False
    # CPU/GPU memory and utilization sampled into the run (MLflow system metrics).
    system_metrics: bool = True
    # Log the adapter as an MLflow model and register it under the recipe's name (a version per run).
    register_model: bool = True
    # A sweep's objective: the metric each job hands its sweeper (hydra/sweeper=optuna searches on it) and by
    # which the sweep's parent run names its best job; minimize or maximize (set hydra.sweeper.direction the
    # same for Optuna).
    sweep_metric: str = "eval/adapter_loss"
    sweep_direction: str = "minimize"

    def __post_init__(self) -> None:
        _check(self.sweep_direction in ("minimize", "maximize"), "tracking.sweep_direction",
               f"must be minimize or maximize, got {self.sweep_direction!r}")


@dataclass
class RunConfig:
    """The whole recipe, composed and validated."""

    # The recipe's name: names the run directory (outputs/<name>/<time>/) and the MLflow run.
    name: str = MISSING
    stages: list[Stage] = field(
        default_factory=lambda: [Stage.data, Stage.preflight, Stage.train, Stage.eval]
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    preflight: PreflightConfig = field(default_factory=PreflightConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)

    def __post_init__(self) -> None:
        _check(len(self.stages) > 0, "stages", "must list at least one of data, preflight, train, eval")
        self.dataset.check_source()
        formats = {self.dataset.format} | {s.format for s in self.dataset.sources if s.format is not None}
        method = self.train.method
        if method == TrainMethod.grpo:
            other = sorted(f.value for f in formats - {DatasetFormat.prompts, DatasetFormat.auto})
            _check(not other, "dataset.format",
                   f"is {', '.join(other)}, but train.method=grpo samples its own completions of prompts: set "
                   "dataset.format=prompts (a prompt or messages column, optional reference columns; Alpaca and "
                   "GSM8K rows map onto it)")
            _check(bool(self.reward.functions), "reward.functions",
                   "is empty, but train.method=grpo learns from rewards: list at least one, e.g. "
                   "reward.functions=[{name: exact_match, column: answer}]")
        elif self.reward.functions:
            _check(False, "reward.functions", f"are GRPO's (train.method=grpo); train.method={method.value} "
                   "learns from the data's answers: remove reward.functions, or set train.method=grpo")
        if method != TrainMethod.grpo and DatasetFormat.prompts in formats:
            _check(False, "dataset.format", f"is prompts, which only train.method=grpo trains on (it samples the "
                   f"answers itself); train.method={method.value} needs the answers in the data")
        if method == TrainMethod.sft:
            _check(DatasetFormat.preference not in formats, "train.method",
                   "is sft, but dataset.format is preference: set train.method to dpo, orpo, kto or simpo")
        elif method != TrainMethod.grpo:
            other = sorted(f.value for f in formats - {DatasetFormat.preference, DatasetFormat.auto})
            _check(not other, "dataset.format",
                   f"is {', '.join(other)}, but train.method={self.train.method.value} trains on preference data: "
                   "set dataset.format=preference (prompt / chosen / rejected pairs, or completion + label for kto)")

    @property
    def preference(self) -> bool:
        """The run trains a preference method on preference data (data_prep/preference.py)."""
        return self.train.method.value in PREFERENCE_METHODS

    @property
    def grpo(self) -> bool:
        """The run trains GRPO on prompts and reward functions (data_prep/prompts.py, finetune/rewards.py)."""
        return self.train.method == TrainMethod.grpo


def register_configs() -> None:
    """Register the schema so that recipes/config.yaml can extend it (`- finetune_schema` in its defaults)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="finetune_schema", node=RunConfig)
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("unique_dir"):
        OmegaConf.register_new_resolver("unique_dir", unique_dir)


# unique_dir's answers in this process: Hydra may resolve hydra.run.dir more than once, and it must get one answer
_UNIQUE_DIRS: dict[str, str] = {}


def unique_dir(path: str) -> str:
    """`${unique_dir:outputs/NAME/TIME}` (recipes/config.yaml's hydra.run.dir): that directory, made here, or the
    first `TIME-2`, `TIME-3`, ... that does not exist yet when it does (two runs started in the same second; a
    run that ended within it). Made with an exclusive mkdir, so two processes racing for a name never share
    one, and no existing directory is reused by accident; a name given explicitly (hydra.run.dir=DIR) is not
    passed through this."""
    import itertools
    from pathlib import Path

    if path in _UNIQUE_DIRS:
        return _UNIQUE_DIRS[path]
    base = Path(path)
    for n in itertools.count(1):
        candidate = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            candidate.parent.mkdir(parents=True, exist_ok=True)
            candidate.mkdir()
        except FileExistsError:
            continue
        except OSError:  # cannot write there: Hydra's own mkdir reports it (the CLI's one line names the disk)
            candidate = base
        _UNIQUE_DIRS[path] = str(candidate)
        return str(candidate)
    raise AssertionError("unreachable")


def compose(overrides: list[str]) -> RunConfig:
    """Compose and validate a recipe in-process, as the CLI would: compose(["+recipe=tiny-demo", "adapter.rank=8"]).

    For scripts and tests; the hydra: resolvers (run directory, choices) are not available here.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from finetune.paths import recipes_dir

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(recipes_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    return to_run_config(cfg)


def _schema_class(hint: Any) -> type | None:
    """The dataclass a field's type hint names (SourceConfig for list[SourceConfig] too), or None."""
    from dataclasses import is_dataclass
    from typing import get_args

    if is_dataclass(hint):
        return hint  # type: ignore[return-value]
    for arg in get_args(hint):
        found = _schema_class(arg)
        if found is not None:
            return found
    return None


def unknown_keys(node: Any, schema: type = None, prefix: str = "") -> list[str]:  # type: ignore[assignment]
    """Dotted keys of a composed config that the schema has no field for.

    Hydra's ``+key=`` / ``++key=`` overrides add keys with struct mode off, and
    ``OmegaConf.to_object`` sets such extra keys as plain attributes on the dataclasses
    instead of refusing them: without this check ``+adapter.rnak=8`` would be silently ignored.
    """
    from typing import get_type_hints

    from omegaconf import ListConfig

    schema = schema or RunConfig
    if not isinstance(node, DictConfig) or node._is_none() or node._is_missing() or node._is_interpolation():
        return []
    hints = get_type_hints(schema)
    out: list[str] = []
    for key in node.keys():
        name = f"{prefix}{key}"
        if key not in hints:
            out.append(name)
            continue
        sub = _schema_class(hints[key])
        if sub is None:
            continue  # a plain value, or `Any` (adapter.targets): nothing below it to check
        child = node._get_node(key)
        if isinstance(child, ListConfig) and not (child._is_none() or child._is_missing()
                                                   or child._is_interpolation()):
            for i in range(len(child)):
                out += unknown_keys(child._get_node(i), sub, f"{name}.{i}.")
        else:
            out += unknown_keys(child, sub, f"{name}.")
    return out


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Check every key against the schema, resolve interpolations, build the dataclasses (running
    their cross-field checks)."""
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    unknown = unknown_keys(cfg)
    if unknown:
        keys = ", ".join(f"'{k}'" for k in unknown)
        raise ConfigError(f"unknown recipe key{'s' if len(unknown) > 1 else ''} {keys}: check "
                          f"{'their' if len(unknown) > 1 else 'its'} spelling "
                          "(`finetune +recipe=NAME --cfg job` lists every key)")
    try:
        obj = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as e:
        key = getattr(e, "full_key", None) or "?"
        hint = " (pick a recipe: finetune +recipe=NAME)" if key in ("name", "model.name_or_path", "dataset.path",
                                                                  "dataset.sources") else ""
        raise ConfigError(f"{key}: missing a value{hint}") from e
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"{key}: {str(e).splitlines()[0]}") from e
    assert isinstance(obj, RunConfig)
    return obj


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a (resolved) recipe into stable dotted keys: {"adapter.rank": 16, ...}."""
    from dataclasses import asdict, is_dataclass

    if is_dataclass(cfg):
        cfg = asdict(cfg)
    elif isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, Enum):
            out[name] = value.value
        elif isinstance(value, list):
            out[name] = ",".join(str(v.value if isinstance(v, Enum) else v) for v in value)
        else:
            out[name] = value
    return out


def to_plain_dict(cfg: RunConfig) -> dict[str, Any]:
    """The resolved recipe as plain YAML-able data (enums as their values), for the run directory's
    config.yaml: credentials in values (a tracking URI's password, ?token=...) masked."""
    from dataclasses import asdict

    from finetune.redaction import mask_data

    def plain(value: Any) -> Any:
        if isinstance(value, Enum):
            return value.value
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    return mask_data(plain(asdict(cfg)))
