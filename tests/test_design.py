"""docs/DESIGN.md keeps up with the code: every make target and every recipe key is in it.

Fast (no torch, no model, no Hydra composition): the Makefile is parsed as text, and the recipe
schema is walked from the dataclass Hydra composes recipes against (the ConfigStore's
``finetune_schema``, which ``recipes/config.yaml`` extends).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DESIGN = REPO / "docs" / "DESIGN.md"
MAKEFILE = REPO / "Makefile"

# `name:` at the start of a line; not `NAME :=` / `NAME ::=` / `NAME ?=` (variables), not `$(STAMP):`,
# `%.o:`, `.PHONY:` or `dir/file:` (internal, stamp and pattern rules).
_RULE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.+-]*)\s*:(?![:=])", re.MULTILINE)


def _code_spans(text: str) -> set[str]:
    """The inline code spans of a Markdown text (`...`), fenced blocks left out."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    return {span.strip() for span in re.findall(r"`([^`\n]+)`", text)}


def _mentioned(key: str, spans: set[str]) -> bool:
    """`key` on its own, or followed by arguments or a value: `make train RECIPE=NAME`, `train.beta=0.1`."""
    return any(s == key or s.startswith((key + " ", key + "=")) for s in spans)


def make_targets() -> list[str]:
    targets = []
    for name in _RULE.findall(MAKEFILE.read_text()):
        if "/" in name or "%" in name or name.startswith("."):
            continue
        if name not in targets:
            targets.append(name)
    return targets


def _top_level_schema() -> type:
    """The dataclass recipes are composed against: the ConfigStore's finetune_schema (finetune/config.py)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from finetune.config import register_configs

    register_configs()
    node = ConfigStore.instance().load("finetune_schema.yaml").node
    schema = OmegaConf.get_type(node)
    assert schema is not None and dataclasses.is_dataclass(schema), f"finetune_schema is not a dataclass: {schema!r}"
    return schema


def _dataclass_in(hint: typing.Any) -> type | None:
    """The dataclass a type hint is (or holds: Optional[X]), not looking inside containers (list[X])."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (list, tuple, dict, set):
        return None
    for arg in typing.get_args(hint):
        found = _dataclass_in(arg)
        if found is not None:
            return found
    return None


def recipe_keys(schema: type | None = None, prefix: str = "") -> list[str]:
    """Every recipe key as a dotted name: nested dataclasses recursed into; a list of dataclasses
    (dataset.sources) is one key."""
    schema = schema or _top_level_schema()
    hints = typing.get_type_hints(schema)
    keys: list[str] = []
    for f in dataclasses.fields(schema):
        name = f"{prefix}{f.name}"
        sub = _dataclass_in(hints[f.name])
        if sub is not None:
            keys += recipe_keys(sub, f"{name}.")
        else:
            keys.append(name)
    return keys


def test_the_walk_finds_the_schema():
    keys = recipe_keys()
    for key in ("name", "stages", "dataset.multi_turn", "dataset.sources", "train.method", "train.beta",
                "preflight.pin.quantization", "tracking.uri"):
        assert key in keys, f"the schema walk missed {key} (found {len(keys)} keys)"
    targets = make_targets()
    for target in ("install", "test", "demo", "lint"):
        assert target in targets, f"the Makefile parse missed {target} (found {targets})"
    assert not [t for t in targets if t in ("STAMP", "PHONY", "BIN", "CACHE_DIR")], targets


def test_design_names_every_make_target():
    spans = _code_spans(DESIGN.read_text())
    missing = [t for t in make_targets() if not _mentioned(f"make {t}", spans)]
    assert not missing, ("docs/DESIGN.md does not mention make targets: "
                         + ", ".join(f"`make {t}`" for t in missing))


def test_design_names_every_recipe_key():
    spans = _code_spans(DESIGN.read_text())
    missing = [k for k in recipe_keys() if not _mentioned(k, spans)]
    assert not missing, "docs/DESIGN.md does not mention recipe keys: " + ", ".join(f"`{k}`" for k in missing)
