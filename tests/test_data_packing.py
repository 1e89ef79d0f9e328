"""Packing: exact where position ids separate the examples, padded batches elsewhere.

Whether packing is exact is measured on the installed transformers
(finetune.probes.packing): a tiny random-weight model of each family runs several
sequences packed into one row exactly as TRL's padding-free collator hands them to the
model during training, and the same sequences alone. These tests hold that probe to
what the verified release does (finetune.versions.VERIFIED); on a newer release
(`make test-latest`) a failure here names the architecture whose rule drifted.
"""

from __future__ import annotations

import json
import math

import pytest

from data_prep.packing import best_fit_decreasing, decide
from data_prep.prepare import prepare
from finetune import versions
from finetune.config import DatasetConfig, DatasetFormat, ModelConfig
from finetune.models.loader import load_tokenizer
from finetune.probes import packing as capabilities
from finetune.probes.packing import padding_free_packing

VOCAB = 256
LAYERS = dict(num_hidden_layers=2)

# What the probe finds on the verified transformers release: exact, except BLOOM, whose ALiBi biases and
# mask come from the attention mask. (Falcon became exact in 5.24: 5.23 built its mask without the
# position ids.)
EXACT_ON_VERIFIED = {"llama": True, "mistral": True, "mixtral": True, "gptj": True, "gpt_neox": True,
                     "phi": True, "phi3": True, "gemma": True, "gemma2": True, "qwen2": True, "falcon": True,
                     "falcon-alibi": True, "bloom": False}


def _config(model_type: str):
    import transformers as T

    small = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, vocab_size=VOCAB, **LAYERS)
    return {
        "llama": lambda: T.LlamaConfig(num_key_value_heads=2, **small),
        "mistral": lambda: T.MistralConfig(num_key_value_heads=2, sliding_window=16, **small),
        "mixtral": lambda: T.MixtralConfig(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                           **dict(small, intermediate_size=64)),
        "gptj": lambda: T.GPTJConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=128,
                                     vocab_size=VOCAB, bos_token_id=0, eos_token_id=0),
        "gpt_neox": lambda: T.GPTNeoXConfig(max_position_embeddings=128, **small),
        "phi": lambda: T.PhiConfig(**small),
        "phi3": lambda: T.Phi3Config(pad_token_id=0, bos_token_id=1, eos_token_id=2, **small),
        "gemma": lambda: T.GemmaConfig(num_key_value_heads=2, head_dim=16, **small),
        "gemma2": lambda: T.Gemma2Config(num_key_value_heads=2, head_dim=16, sliding_window=16, **small),
        "qwen2": lambda: T.Qwen2Config(num_key_value_heads=2, **small),
        "falcon": lambda: T.FalconConfig(hidden_size=64, num_attention_heads=4, vocab_size=VOCAB, **LAYERS),
        "falcon-alibi": lambda: T.FalconConfig(hidden_size=64, num_attention_heads=4, vocab_size=VOCAB,
                                               alibi=True, **LAYERS),
        "bloom": lambda: T.BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=VOCAB),
    }[model_type]()


@pytest.fixture(autouse=True)
def _own_capability_cache(tmp_path, monkeypatch):
    # an absolute name: the table lands in tmp_path, the tiny models stay in the session's cache
    monkeypatch.setattr(capabilities, "CACHE_FILE", str(tmp_path / "capabilities.json"))


@pytest.mark.parametrize("family", sorted(EXACT_ON_VERIFIED))
def test_padding_free_exactness_per_architecture_is_measured(family):
    diff = capabilities.packed_vs_separate(_config(family).to_dict())
    exact = diff < capabilities.EXACT_TOLERANCE
    verified = EXACT_ON_VERIFIED[family]
    assert exact == verified, (
        f"rule drifted: padding-free packing for {family} was {'exact' if verified else 'leaking'} on "
        f"transformers {versions.VERIFIED['transformers']}, and is {'exact' if exact else 'leaking'} "
        f"(max logit difference {diff:.2g}) on transformers {versions.installed('transformers')}; "
        f"update EXACT_ON_VERIFIED and the README's packing paragraph")
    if not exact:
        assert diff > 1e-3  # a real leak, not rounding near the tolerance


def test_packing_decision_per_architecture():
    assert decide(True, "llama", probe=padding_free_packing)[0] and decide(True, "qwen2", probe=padding_free_packing)[0] and decide(True, "falcon", probe=padding_free_packing)[0]
    packs, why = decide(True, "bloom", probe=padding_free_packing)
    assert not packs and "attends to the ones before it" in why and "padded batches" in why
    for model_type in ("some_new_arch", None):
        packs, why = decide(True, model_type, probe=padding_free_packing)
        assert not packs and "padded batches" in why
    assert not decide(False, "llama")[0]


def test_packing_decision_uses_the_models_own_config():
    """Structural flags of the real config.json reach the probe (a Falcon with ALiBi takes another path)."""
    config = {"model_type": "falcon", "hidden_size": 4544, "num_attention_heads": 71, "alibi": True,
              "num_hidden_layers": 32, "vocab_size": 65024, "architectures": ["FalconForCausalLM"]}
    small = capabilities.shrink(config)
    assert small["alibi"] is True and small["hidden_size"] == 64 and small["num_hidden_layers"] == 2
    assert "architectures" not in small and small["vocab_size"] == capabilities.VOCAB
    assert decide(True, "falcon", config, padding_free_packing)[0] == EXACT_ON_VERIFIED["falcon-alibi"]


def test_probe_is_cached_per_transformers_release(monkeypatch):
    config = _config("llama").to_dict()
    first = capabilities.padding_free_packing(config)
    assert first.exact and "measured on transformers" in first.detail

    runs = []
    monkeypatch.setattr(capabilities, "packed_vs_separate", lambda small: runs.append(small) or 0.0)
    assert capabilities.padding_free_packing(config) == first and runs == []  # cached: nothing built
    real = versions.installed
    monkeypatch.setattr(versions, "installed", lambda name: "99.0.0" if name == "transformers" else real(name))
    again = capabilities.padding_free_packing(config)
    assert len(runs) == 1 and "transformers 99.0.0" in again.detail  # another release: measured anew


def test_a_probe_that_cannot_run_is_not_exact_and_not_cached(monkeypatch, tmp_path):
    def broken(_small):
        raise RuntimeError("no kernel")

    monkeypatch.setattr(capabilities, "packed_vs_separate", broken)
    probe = capabilities.padding_free_packing(_config("llama").to_dict())
    assert not probe.exact and math.isnan(probe.max_diff) and "RuntimeError: no kernel" in probe.detail
    assert not (tmp_path / "capabilities.json").exists()  # the cause may go away: measured again next time


def test_best_fit_decreasing_packs_every_example_once_within_capacity():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(1, 256) for _ in range(3000)]
    bins = best_fit_decreasing(lengths, 256)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 256 for b in bins)
    lower_bound = -(-sum(lengths) // 256)
    assert len(bins) <= lower_bound * 1.02  # near the optimum
    assert best_fit_decreasing(lengths, 256) == bins  # deterministic


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(ModelConfig(name_or_path="tiny:llama", chat_template="llama-2"), model_vocab_size=2048)


def test_packed_rows_hold_the_same_examples(tokenizer):
    cfg = dict(path="sample:medical-qa", format=DatasetFormat.alpaca, max_seq_len=256, eval_fraction=0.15)
    plain = prepare(DatasetConfig(**cfg), tokenizer, "llama-2")
    packed = prepare(DatasetConfig(packing=True, **cfg), tokenizer, "llama-2", packing_probe=padding_free_packing, model_type="llama")
    assert packed.packed and not plain.packed
    p = packed.report.packing
    assert p.enabled and p.architecture == "llama" and "exact" in p.reason
    rows = packed.to_dataset("train")
    assert set(rows.column_names) >= {"input_ids", "labels", "seq_lengths"}
    assert len(rows) == p.rows < len(plain.train)
    for row in rows:
        assert len(row["input_ids"]) == sum(row["seq_lengths"]) <= 256
    assert p.efficiency == round(sum(len(r["input_ids"]) for r in rows) / (len(rows) * 256), 4)
    assert p.efficiency > 0.9 > p.padded_efficiency  # what packing buys over padded batches
    assert p.row_tokens_max <= 256

    def examples(d):
        return sorted((e.location, tuple(e.input_ids), tuple(e.labels)) for e in d.train)
    assert examples(packed) == examples(plain)  # the packed store seen as its examples: nothing lost or changed
    assert packed.report.train_rows == plain.report.train_rows
    assert [e.input_ids for e in packed.eval] == [e.input_ids for e in plain.eval]  # eval is never packed
    # unpacked: the report still says what packing would give
    assert 0.9 < plain.report.packing.efficiency and not plain.report.packing.enabled


@pytest.mark.parametrize("model_type", ["bloom", "some_new_arch", None])
def test_packing_falls_back_to_padded_batches(tokenizer, model_type):
    data = prepare(DatasetConfig(path="sample:medical-qa", format=DatasetFormat.alpaca, max_seq_len=256,
                                 packing=True), tokenizer, "llama-2", packing_probe=padding_free_packing, model_type=model_type)
    assert not data.packed and "seq_lengths" not in data.to_dataset("train").column_names
    p = data.report.packing
    assert p.requested and not p.enabled and "padded batches" in p.reason and p.rows == 0


def test_the_trainer_gets_padding_free_batches_from_packed_rows(tokenizer, tmp_path):
    """The train stage's SFTConfig with packed data: TRL's collator flattens each micro-batch into one row with
    position ids that restart at every example and no attention mask, and never trains across a seam."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    from trl import SFTTrainer

    from finetune.config import compose
    from finetune.train import sft_config

    data = prepare(DatasetConfig(path="sample:medical-qa", format=DatasetFormat.alpaca, max_seq_len=256,
                                 packing=True), tokenizer, "llama-2", packing_probe=padding_free_packing, model_type="llama")
    from finetune.preflight import run_preflight

    cfg = compose(["+recipe=tiny-demo", "preflight.pin.micro_batch_size=2"])
    choices = dict(run_preflight(cfg, data.report).choices)
    assert choices["micro_batch_size"] == 2
    args = sft_config(cfg, choices, tmp_path, "cpu", has_eval=False, packed=data.packed)
    model = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                                         num_attention_heads=4, vocab_size=2048))
    trainer = SFTTrainer(model=model, args=args, train_dataset=data.to_dataset("train"), processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    positions = batch["position_ids"][0]
    starts = (positions == 0).nonzero().flatten().tolist()
    assert len(starts) > 2 * 2  # two packed rows of several examples each
    assert all(batch["labels"][0, s] == -100 for s in starts)  # no token is predicted across a seam
    assert torch.equal(batch["cu_seq_lens_q"][:-1], torch.tensor(starts, dtype=torch.int32))


def test_report_and_store_survive_json(tokenizer):
    data = prepare(DatasetConfig(path="sample:medical-qa", format=DatasetFormat.alpaca, max_seq_len=256,
                                 packing=True), tokenizer, "llama-2", packing_probe=padding_free_packing, model_type="llama")
    on_disk = json.loads((data.store_dir / "report.json").read_text())
    assert on_disk["packing"]["enabled"] is True and on_disk["fingerprint"] == data.report.fingerprint
    assert len(data.lengths) == data.report.rows_kept
