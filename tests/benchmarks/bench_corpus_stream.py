"""A text corpus larger than memory streams: prepare a generated 2 GB corpus with peak RSS under 2 GB.

    make bench                                           (every benchmark)
    python tests/benchmarks/bench_corpus_stream.py       (this one; --gib 2, --keep to keep the corpus)

Writes a corpus of prose (``.txt`` and ``.md`` files of 0.2-3 MB, and a few files above
the whole-file limit, which are validated and tokenized window by window) under a
temporary directory, prepares it with ``dataset.format: text`` and packing (the tiny
Llama's tokenizer, max_seq_len 1024) in a child process, and reads the child's peak
resident memory from the kernel (``wait4``'s ``ru_maxrss``). The corpus and the
prepared store are deleted afterwards. Writes tests/benchmarks/results/corpus_stream.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

RESULT = REPO / "tests" / "benchmarks" / "results" / "corpus_stream.json"
LIMIT_BYTES = 2 << 30

CHILD = r"""
import json, os, sys, time
sys.path.insert(0, {repo!r})
from data_prep.prepare import prepare
from finetune.config import DatasetConfig, DatasetFormat, ModelConfig
from finetune.models.loader import load_tokenizer
from finetune.probes.packing import padding_free_packing
tokenizer = load_tokenizer(ModelConfig(name_or_path="tiny:llama"), 2048)
cfg = DatasetConfig(path={corpus!r}, format=DatasetFormat.text, max_seq_len=1024, eval_fraction=0.01, packing=True)
t = time.perf_counter()
data = prepare(cfg, tokenizer, None, packing_probe=padding_free_packing, model_type="llama", progress=False)
r = data.report
print(json.dumps({{"seconds": time.perf_counter() - t, "report": {{
    "rows_read": r.rows_read, "documents": r.documents, "rejected": r.rejected, "duplicates": r.duplicates,
    "train_rows": r.train_rows, "eval_rows": r.eval_rows, "tokens_total": r.tokens.total,
    "packed_rows": r.packing.rows, "packing_efficiency": r.packing.efficiency}},
    "store_bytes": sum(f.stat().st_size for f in data.store_dir.iterdir())}}))
"""


def write_corpus(root: Path, total_bytes: int, seed: int = 0) -> dict:
    """Prose files from the medical sample's vocabulary; a few above the whole-file limit."""
    from data_prep import readers
    from data_prep.samples.medical import encyclopedia, generate_rows

    words = " ".join(encyclopedia() + [r["output"] for r in generate_rows()]).split()
    rng = random.Random(seed)
    paragraphs = []
    for _ in range(4000):
        sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(8, 24))).capitalize() + "."
                     for _ in range(rng.randint(3, 8))]
        paragraphs.append(" ".join(sentences))
    written, files, large = 0, 0, 0
    big = readers.WHOLE_TEXT_BYTES + (8 << 20)
    while written < total_bytes:
        size = big if files % 400 == 7 else rng.randint(200_000, 3_000_000)
        parts, n = [f"Document {files}.\n\n"], 0
        while n < size:
            p = rng.choice(paragraphs)
            parts.append(p)
            parts.append("\n\n")
            n += len(p) + 2
        text = "".join(parts)
        sub = root / f"part-{files // 500:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"doc-{files:05d}.{'md' if files % 5 == 0 else 'txt'}").write_text(text)
        written += len(text)
        files += 1
        large += size == big
    return {"bytes": written, "files": files, "large_files": large}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--keep", action="store_true", help="keep the generated corpus")
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument("--note", default="")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-corpus-"))
    cache = work / "cache"
    env = dict(os.environ, FINETUNE_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    os.environ["FINETUNE_CACHE"] = str(cache)
    try:
        from finetune.models.tiny import ensure_built

        ensure_built("tiny:llama")
        print(f"writing a {args.gib:g} GiB corpus under {work} ...", flush=True)
        t = time.perf_counter()
        corpus = write_corpus(work / "corpus", int(args.gib * (1 << 30)))
        print(f"  {corpus['files']} files in {time.perf_counter() - t:.0f} s; preparing ...", flush=True)

        code = CHILD.format(repo=str(REPO), corpus=str(work / "corpus"))
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        out, err = proc.stdout.read(), proc.stderr.read()
        if os.waitstatus_to_exitcode(status) != 0:
            print(err[-3000:], file=sys.stderr)
            return 1
        child = json.loads(out.strip().splitlines()[-1])
        peak = usage.ru_maxrss * 1024  # KiB on Linux
        result = {
            "benchmark": "corpus_stream: prepare a generated text corpus larger than the memory budget",
            "corpus_bytes": corpus["bytes"],
            "corpus_files": corpus["files"],
            "large_files_streamed_in_windows": corpus["large_files"],
            "peak_rss_bytes": peak,
            "peak_rss_gib": round(peak / (1 << 30), 3),
            "limit_bytes": LIMIT_BYTES,
            "under_limit": peak < LIMIT_BYTES,
            "prepare_seconds": round(child["seconds"], 1),
            "process_seconds": round(wall, 1),
            "mb_per_s": round(corpus["bytes"] / 1e6 / child["seconds"], 2),
            "store_bytes": child["store_bytes"],
            "report": child["report"],
            "settings": "dataset.format=text, max_seq_len=1024, eval_fraction=0.01, packing=true (llama), "
                        "tiny:llama tokenizer",
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
            "note": args.note,
        }
        print(json.dumps(result, indent=2))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
        return 0 if result["under_limit"] else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
