"""A small domain text corpus (clinical notes and reference pages), written by the project itself.

For ``dataset.format: text``: a directory of ``.txt`` and ``.md`` documents about the
conditions of the medical sample set, in prose rather than question/answer form, the
kind of text a user continues pretraining on. Deterministic; written atomically (into
a temporary directory renamed into place) with a ``meta.json`` record beside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

from data_prep.samples.medical import CONDITIONS, _cap, _join

VERSION = 1


def documents(seed: int = 0) -> dict[str, str]:
    """file name -> text, in a fixed order."""
    rng = random.Random(seed)
    docs: dict[str, str] = {}
    for i, c in enumerate(CONDITIONS):
        slug = c.name.replace(" ", "-").lower()
        page = [f"# {_cap(c.name)}", "", f"{_cap(c.name)} is {c.what}.", "",
                "## Symptoms", "", f"Typical signs are {_join(c.symptoms)}.", "",
                "## Causes", "", f"It is usually caused by {_join(c.causes)}.", "",
                "## Treatment", "", f"Care may include {_join(c.treatment)}.", "",
                "## Prevention", "", f"The risk falls with {_join(c.prevention)}.", "",
                "## When to seek care", "", f"Urgent care is needed for {_join(c.see_doctor, 'or')}.", ""]
        docs[f"reference/{i:02d}-{slug}.md"] = "\n".join(page)
        notes = []
        for visit in range(rng.randint(2, 4)):
            age = rng.randint(6, 85)
            seen = rng.sample(c.symptoms, k=min(len(c.symptoms), rng.randint(1, 3)))
            plan = rng.sample(c.treatment, k=min(len(c.treatment), rng.randint(1, 2)))
            notes.append(f"Visit {visit + 1}. A {age}-year-old patient presented with {_join(tuple(seen))}. "
                         f"The findings were consistent with {c.name}. Plan: {_join(tuple(plan))}. "
                         f"Advised to return for {rng.choice(c.see_doctor)}.")
        docs[f"notes/{i:02d}-{slug}.txt"] = "\n\n".join(notes) + "\n"
    return docs


def write(target: Path, seed: int = 0) -> Path:
    docs = documents(seed)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    digest = hashlib.sha256()
    for name, text in docs.items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        digest.update(name.encode() + b"\0" + text.encode())
    meta = {"documents": len(docs), "format": "text", "sha256": digest.hexdigest(),
            "generator": "data_prep.samples.corpus", "seed": seed}
    (tmp / ".meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    try:
        tmp.rename(target)
    except OSError:
        if not target.is_dir():  # another process wrote it first: keep theirs
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
