"""4-bit MoE experts (finetune/models/experts.py) against bf16 experts: bytes, step time, loss.

    python tests/benchmarks/bench_experts.py          (or: make bench)

A Mixtral-style model sized for the machine (random weights from a config: 4 layers, hidden 256,
8 experts of 512, top-2) is saved once and loaded the way training loads it: 4-bit NF4 + double
quantization for the attention, the experts either 4-bit too (ours) or left in bf16 by bitsandbytes
(the baseline, in the same run). Both train LoRA r16 on attention and experts (all-linear) on the same
batches; the script reports the experts' storage bytes (torch storage sizes), the mean step time after
a warm-up, the loss curves' largest relative gap and, on CUDA, peak allocated memory. Writes
tests/benchmarks/results/experts_<device>.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
RESULTS = Path(__file__).resolve().parent / "results"

CONFIG = dict(model_type="mixtral", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
              vocab_size=4096, max_position_embeddings=1024, tie_word_embeddings=False)
BATCH, SEQ, WARMUP, STEPS = 4, 256, 2, 8


def _run(path: str, quantized_experts: bool, device: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from finetune.architectures.targets import resolve
    from finetune.models import experts
    from finetune.probes import spec_of

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with experts.loading() if quantized_experts else contextlib.nullcontext():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=bnb,
                                                     device_map={"": 0} if device == "cuda" else None)
    if quantized_experts:
        stored, bf16 = experts.quantized_bytes(model)
    else:
        stored = bf16 = sum(p.untyped_storage().nbytes() for _, m in experts.experts_modules(model)
                            for p in m.parameters(recurse=False) if p.dim() == 3)
    targets = resolve(spec_of(CONFIG), ["all-linear"])
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=list(targets.modules),
                      target_parameters=list(targets.parameters))
    experts.register_lora(lora, model)
    torch.manual_seed(0)
    model = get_peft_model(model, lora)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ), generator=gen).to(device)
               for _ in range(WARMUP + STEPS)]
    losses, times = [], []
    for i, ids in enumerate(batches):
        started = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= WARMUP:
            times.append(time.perf_counter() - started)
        losses.append(loss.item())
    row = {"experts": "nf4+dq (finetune)" if quantized_experts else "bf16 (bitsandbytes leaves them)",
           "expert_bytes": stored, "expert_bytes_bf16": bf16, "step_s": round(sum(times) / len(times), 4),
           "tokens_per_s": round(BATCH * SEQ * len(times) / sum(times), 1), "losses": [round(x, 4) for x in losses]}
    if device == "cuda":
        row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return row


def main() -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        config = AutoConfig.for_model(**CONFIG)
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp)
        ours = _run(tmp, True, device)
        base = _run(tmp, False, device)
    gap = max(abs(a - b) / b for a, b in zip(ours["losses"], base["losses"], strict=True))
    result = {
        "machine": {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    "platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "model": CONFIG, "batch": BATCH, "seq_len": SEQ, "steps_timed": STEPS, "lora": "r16 all-linear",
        "runs": [ours, base],
        "expert_storage_ratio": round(ours["expert_bytes"] / base["expert_bytes"], 4),
        "step_time_ratio": round(ours["step_s"] / base["step_s"], 3),
        "loss_max_relative_gap": round(gap, 5),
    }
    name = "cpu" if device == "cpu" else torch.cuda.get_device_name().lower().replace(" ", "-")
    out = RESULTS / f"experts_{name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"experts storage {result['expert_storage_ratio']:.3f}x bf16; step time {ours['step_s']:.3f} s vs "
          f"{base['step_s']:.3f} s ({result['step_time_ratio']:.2f}x); loss gap {gap:.2%}  -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
