"""Tiny models for the demo and the tests, built locally once and loaded like hub models.

``model.name_or_path: tiny:llama`` names one. On first use :func:`ensure_built`
writes a real model directory into the cache — config.json, model.safetensors and
a byte-level BPE tokenizer trained on local text (the sample medical set and the
chat-template markers) — and every later use reads it with ``from_pretrained``,
exactly the path a hub model takes. No network is ever needed.

The weights are not left random: a few hundred steps of plain language-model
training on short encyclopedia entries about the sample set's conditions
(data_prep.samples.medical.encyclopedia) make it a small *base* model, that has
read about the topic but never seen a question or a chat template. Fine-tuning
then has something real to do (learn the instruction format and answer from what
it knows), like a real base model; a random network with a frozen 64-wide LM head
cannot even express a confident prediction.

The specs are plain dicts (finetune/architectures/tiny.py) so that the preflight can plan a tiny model
without importing torch or building anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from finetune.architectures.tiny import PREFIX, SPECS, TINY_VOCAB, spec

BUILDER_VERSION = 3
PRETRAIN_STEPS = 300
PRETRAIN_BATCH = 8
PRETRAIN_LR = 3e-3

# Pretraining steps per model: the demo's llama gets the most; the others, which only the tests
# train, enough for a language model that fine-tuning visibly improves.
# Mamba's and RWKV's CPU paths scan the sequence in Python (no fused kernels): fewer steps keep their builds
# to seconds, and still leave a model that fine-tuning visibly improves.
PRETRAIN_STEPS_BY_MODEL = {"llama": PRETRAIN_STEPS, "mamba": 40, "rwkv": 100}
PRETRAIN_STEPS_OTHERS = 150

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, as in _COMMON
# ChatML's control tokens (ids 4, 5), so `model.chat_template: chatml` (and its tool calls) works on the tiny models.
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]


def _pretrain_steps(name: str) -> int:
    return PRETRAIN_STEPS_BY_MODEL.get(name, PRETRAIN_STEPS_OTHERS)


def _model_dir(name: str) -> Path:
    from finetune.paths import cache_dir

    key = [SPECS[name], BUILDER_VERSION, _pretrain_steps(name)]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return cache_dir() / "models" / f"tiny-{name}-{digest}"


def _tokenizer_corpus() -> list[str]:
    from data_prep.samples.medical import encyclopedia, generate_rows

    texts = list(encyclopedia())
    for row in generate_rows():
        texts.extend([row["instruction"], row["input"], row["output"]])
    # The function-calling sample's schemas and calls as the templates write them (JSON), so a prompt with
    # tools fits the tiny model's context.
    from data_prep.samples.tools import generate_rows as tool_rows

    for row in tool_rows()[:40]:
        texts.extend(json.dumps(tool) for tool in row["tools"])
        texts.extend(json.dumps(m.get("tool_calls") or m["content"]) for m in row["messages"])
    # Chat-template markers of the built-in templates, so they become single tokens or short runs.
    texts += ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "### Instruction:", "### Input:", "### Response:",
              "<|im_start|>", "<|im_end|>", "user", "assistant", "system", "<tool_call>", "</tool_call>",
              "<tool_response>", "</tool_response>", "<tools>", "</tools>",
              "Below is an instruction that describes a task. Write a response that appropriately completes the request."]
    return [t for t in texts if t]


def _build_tokenizer(out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=SPECIAL_TOKENS + CHATML_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer)
    # Like Llama's tokenizer: plain encoding starts with BOS. Chat templates write their own
    # BOS and are tokenized without special tokens.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                 unk_token="<unk>", pad_token="<pad>", model_max_length=1024)
    hf.add_special_tokens({"additional_special_tokens": CHATML_TOKENS})
    hf.save_pretrained(out_dir)


def _json_documents(n: int = 12) -> list[str]:
    """Tool schemas, calls and results as plain JSON lines: a real base model has read JSON before anyone
    teaches it to call tools (the function-calling demo needs a base that can write it)."""
    from data_prep.samples.tools import generate_rows as tool_rows

    docs = []
    for row in tool_rows(seed=1)[:n]:
        lines = [json.dumps(tool) for tool in row["tools"]]
        for m in row["messages"]:
            lines.extend(json.dumps(call["function"]) for call in m.get("tool_calls") or [])
            if m["role"] == "tool":
                lines.append(m["content"])
        docs.append("\n".join(lines))
    return docs


def _pretrain(model, tokenizer, steps: int) -> float:
    """Plain causal-LM training on the encyclopedia entries and a few JSON documents; returns the last loss."""
    import random

    import torch

    from data_prep.samples.medical import encyclopedia

    docs = [tokenizer(d).input_ids + [tokenizer.eos_token_id] for d in encyclopedia() + _json_documents()]
    rng = random.Random(0)
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        batch = rng.sample(docs, k=min(PRETRAIN_BATCH, len(docs)))
        width = max(len(d) for d in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, d in enumerate(batch):
            ids[i, : len(d)] = torch.tensor(d)
            labels[i, : len(d)] = torch.tensor(d)
            mask[i, : len(d)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return float(loss.detach())


def ensure_built(name_or_path: str) -> Path:
    """The tiny model's directory, built on first use (atomically: a crash leaves no half-built model)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config_dict = spec(name_or_path)
    name = name_or_path[len(PREFIX):]
    target = _model_dir(name)
    if (target / "config.json").is_file():
        return target
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _build_tokenizer(tmp)
        model_type = config_dict.pop("model_type")
        config_dict.pop("architectures", None)
        config = AutoConfig.for_model(model_type, **config_dict)
        state = torch.random.get_rng_state()
        torch.manual_seed(0)
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            loss = _pretrain(model, AutoTokenizer.from_pretrained(tmp), _pretrain_steps(name))
        finally:
            torch.random.set_rng_state(state)
        model.save_pretrained(tmp)
        (tmp / "build.json").write_text(json.dumps({"builder_version": BUILDER_VERSION, "pretrain_steps":
                                                    _pretrain_steps(name), "pretrain_final_loss": loss}, indent=2))
        try:
            tmp.rename(target)
        except OSError:
            # Another process built it first: keep theirs.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
