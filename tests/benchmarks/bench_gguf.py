"""The exported GGUF against the merged model: logits through transformers' GGUF loader for every quant, and
greedy answers through llama.cpp (llama-cpp-python) when it is installed.

    python tests/benchmarks/bench_gguf.py [ADAPTER]          (or: make bench)

Without ADAPTER, trains the tiny demo for 60 steps in a temporary directory first. For each quant (f16, bf16,
q8_0, q4_0): file size, max |logit difference| to the merged model on held-out prompts and the share of
positions with the same argmax. With llama-cpp-python: the greedy answer to each held-out prompt from
llama.cpp and from transformers (the merged model, same prompt tokens, same stop token), and how many agree
exactly, per quant. Writes tests/benchmarks/results/gguf_cpu.json. Exits non-zero when f16's logits differ
by more than the test's tolerance (0.02).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
RESULTS = Path(__file__).resolve().parent / "results"
QUANTS = ["f16", "bf16", "q8_0", "q4_0"]
PROMPTS, NEW_TOKENS = 8, 32


def _train(root: Path) -> Path:
    from finetune.config import compose
    from finetune.pipeline import run_pipeline

    cfg = compose(["+recipe=tiny-demo", "train.max_steps=60", "stages=[data,preflight,train]",
                   f"tracking.uri=sqlite:///{root}/mlflow.db", "tracking.register_model=false",
                   "tracking.system_metrics=false"])
    return run_pipeline(cfg, root / "run")["work_dir"]


def _prompts(run_dir: Path, tokenizer) -> list[str]:
    from data_prep.prepare import prepare
    from finetune.config import compose

    cfg = compose(["+recipe=tiny-demo"])
    data = prepare(cfg.dataset, tokenizer, cfg.model.chat_template)
    return [tokenizer.apply_chat_template(m[:-1], tokenize=False, add_generation_prompt=True)
            for m in data.eval_messages[:PROMPTS]]


def main() -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.export import export
    from finetune.models.merge import find_run, merged_model

    with contextlib.ExitStack() as stack:
        if len(sys.argv) > 1:
            run_dir = Path(sys.argv[1])
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            os.environ.setdefault("FINETUNE_CACHE", str(root / "cache"))
            run_dir = _train(root)
        out = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        record = export(str(run_dir), out=out, quants=QUANTS, log_to_mlflow=False, progress=False)
        run = find_run(run_dir)
        merged, which, _ = merged_model(run)
        tokenizer = AutoTokenizer.from_pretrained(run.adapter_dir)
        prompts = _prompts(run_dir, tokenizer)
        eos = tokenizer.eos_token_id
        reference = []
        for p in prompts:
            ids = tokenizer(p, return_tensors="pt").input_ids
            with torch.no_grad():
                gen = merged.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos,
                                      pad_token_id=tokenizer.pad_token_id)
            reference.append(gen[0, ids.shape[1]:].tolist())
        llama_cpp = importlib.util.find_spec("llama_cpp") is not None
        rows = {}
        for quant in QUANTS:
            name = record["files"][quant]
            model = AutoModelForCausalLM.from_pretrained(out, gguf_file=name)
            worst, same, total = 0.0, 0, 0
            for p in prompts:
                ids = tokenizer(p, return_tensors="pt").input_ids
                with torch.no_grad():
                    a, b = merged(ids).logits.float(), model(ids).logits.float()
                worst = max(worst, float((a - b).abs().max()))
                same += int((a.argmax(-1) == b.argmax(-1)).sum())
                total += a.shape[1]
            row = {"bytes": (out / name).stat().st_size, "max_abs_logit_diff": worst,
                   "argmax_agreement": same / total}
            if llama_cpp:
                from llama_cpp import Llama

                llm = Llama(model_path=str(out / name), n_ctx=512, verbose=False, logits_all=False)
                agree = 0
                for p, ref in zip(prompts, reference, strict=True):
                    ids = tokenizer(p).input_ids
                    answer = []
                    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
                        if token == eos or len(answer) == NEW_TOKENS:
                            break
                        answer.append(token)
                    agree += answer == [t for t in ref if t != eos][:NEW_TOKENS]
                row["llama_cpp_greedy_agreement"] = agree / len(prompts)
            rows[quant] = row
            print(f"{quant:5s} {row['bytes'] / 1024:8.1f} KiB  max|dlogit| {worst:.4f}  argmax {same / total:.3f}"
                  + (f"  llama.cpp greedy {row['llama_cpp_greedy_agreement']:.2f}" if llama_cpp else ""))
    if not llama_cpp:
        print("llama-cpp-python is not installed: the llama.cpp comparison was skipped (pip install llama-cpp-python)")
    result = {"machine": platform.machine(), "merged_from": which, "prompts": len(prompts),
              "new_tokens": NEW_TOKENS, "llama_cpp": llama_cpp, "quants": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gguf_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0 if rows["f16"]["max_abs_logit_diff"] < 0.02 else 1


if __name__ == "__main__":
    sys.exit(main())
