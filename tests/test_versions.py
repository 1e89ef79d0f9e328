"""Locked installs and version-aware rules (finetune/versions.py).

* `make install` installs exactly requirements.lock: every dependency in pyproject.toml is pinned there
  and this environment matches it (skipped under `make test-latest`, whose point is not to).
* The preflight says, in one line and in plan.json, when transformers / peft / bitsandbytes / TRL differ
  in minor version from the ones the memory model was verified on.
* The rules that differ by release are held against the installed libraries here; on a newer release
  the failure names the rule that drifted.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import tomllib

import pytest

from finetune import versions
from finetune.config import compose
from finetune.paths import recipes_dir

REPO = recipes_dir().parent
LOCK = REPO / "requirements.lock"
LATEST = os.environ.get("FINETUNE_TEST_LATEST") == "1"


def _requirement_names() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + project["optional-dependencies"]["dev"]
    return {versions._norm(re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]) for r in reqs}


def test_every_dependency_is_pinned_exactly_in_the_lock():
    pins = versions.read_lock(str(LOCK))
    missing = _requirement_names() - set(pins) - {"torch"}
    assert not missing, f"not in requirements.lock: {sorted(missing)}; run make lock"
    assert "torch" not in pins, "torch has its own per-platform pin in the Makefile"
    assert all(re.fullmatch(r"\d[\w.+]*", v) for v in pins.values()), "every pin is one exact version"


def test_the_lock_pins_the_verified_minor_releases():
    pins = versions.read_lock(str(LOCK))
    for name, verified in versions.VERIFIED.items():
        assert versions.parse(pins[name])[:2] == versions.parse(verified)[:2], (
            f"requirements.lock pins {name} {pins[name]} but finetune/versions.py verified {verified}: raise "
            "VERIFIED together with the lock, once the suite passes on the new release")


@pytest.mark.skipif(LATEST, reason="make test-latest runs on the newest releases, not the lock")
def test_this_environment_is_the_lock():
    problems = versions.check_lock(str(LOCK))
    assert not problems, "\n".join(problems)


def test_lock_check_names_what_differs(tmp_path):
    lock = tmp_path / "requirements.lock"
    versions.write_lock(str(lock), "torch==2.13.0")
    assert versions.check_lock(str(lock)) == []
    text = lock.read_text()
    pins = versions.read_lock(str(lock))
    assert "torch" not in pins and "finetune-recipes" not in pins and pins["transformers"]
    changed = text.replace(f"peft=={pins['peft']}", "peft==0.0.1").replace(f"\nrich=={pins['rich']}", "")
    lock.write_text(changed)
    problems = versions.check_lock(str(lock))
    assert any(p.startswith(f"peft {pins['peft']} is installed") and "pins 0.0.1" in p for p in problems)
    assert any(p.startswith("rich ") and "not in" in p and "make lock" in p for p in problems)
    proc = subprocess.run([sys.executable, "-m", "finetune.versions", "--check-lock", str(lock)],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "error: peft" in proc.stdout


def test_drift_is_one_line_and_recorded_in_the_plan(monkeypatch):
    from finetune.preflight import run_preflight

    real = versions.installed

    def newer(name):
        return "5.99.0" if name == "transformers" else real(name)

    monkeypatch.setattr(versions, "installed", newer)
    assert list(versions.drift()) == ["transformers"]
    line = versions.drift_line()
    assert "\n" not in line and "transformers 5.99.0 (verified 5.24)" in line and "make install" in line
    plan = run_preflight(compose(["+recipe=llama2-7b-medical", "stages=[preflight]"]))
    assert plan.explanation[0] == line
    assert plan.to_dict()["versions"] == {"verified": versions.VERIFIED,
                                          "installed": {n: newer(n) for n in versions.VERIFIED},
                                          "drift": ["transformers"]}


def test_no_drift_line_on_the_verified_releases(monkeypatch):
    monkeypatch.setattr(versions, "installed", lambda name: versions.VERIFIED.get(name, "1.0") + ".3")
    assert versions.drift() == {} and versions.drift_line() is None


def test_versions_parse():
    assert versions.parse("5.24.0") == (5, 24, 0)
    assert versions.parse("2.13.0+cpu") == (2, 13, 0)
    assert versions.parse("1.17.0.dev0") == (1, 17, 0)


def test_rule_trl_fused_lm_head_holds_on_the_installed_trl():
    """The memory model charges the LM head as TRL's chunked head over labelled positions when
    versions.trl_fused_lm_head() says so: TRL's SFTTrainer must really add it."""
    from trl.trainer import sft_trainer

    calls = "add_fused_lm_head(" in inspect.getsource(sft_trainer.SFTTrainer)
    assert calls == versions.trl_fused_lm_head(), (
        f"rule drifted: finetune/versions.py says TRL {versions.installed('trl')} "
        f"{'has' if versions.trl_fused_lm_head() else 'lacks'} the fused LM head, but SFTTrainer "
        f"{'calls' if calls else 'no longer calls'} add_fused_lm_head (verified on TRL {versions.VERIFIED['trl']})")


def test_rule_fused_lm_head_picks_the_memory_model(monkeypatch):
    from finetune.preflight.planner import settings_for

    cfg = compose(["+recipe=llama2-7b-medical"])
    assert settings_for(cfg).lm_head_loss == "fused"
    monkeypatch.setattr(versions, "installed", lambda name: "1.15.0" if name == "trl" else "0")
    assert settings_for(cfg).lm_head_loss == "materialized"


def test_rule_linear_subclasses_decides_falcon_quantization(monkeypatch):
    from finetune.architectures import catalog
    from finetune.probes import spec_of

    falcon = catalog.model_config("tiiuae/falcon-7b")[0]
    assert not any(lin.quantizable for lin in spec_of(falcon).linears)
    monkeypatch.setattr(versions, "QUANTIZES_LINEAR_SUBCLASSES_SINCE", "5.24")
    assert all(lin.quantizable for lin in spec_of(falcon).linears)


def test_rule_eager_attention_families_and_reloads_use_the_plans_attention():
    """BLOOM plans eager attention because transformers has no SDPA path for it; GPT-J SDPA from transformers
    5.24 (its SDPA path), eager before. A reload passes the plan's choice, so it computes as training did
    whatever transformers' default is."""
    import transformers

    from finetune.architectures import catalog
    from finetune.models.loader import ATTENTION
    from finetune.probes import spec_of

    bloom = spec_of(catalog.model_config("bigscience/bloom-7b1")[0])
    assert bloom.attention == "eager"
    assert not transformers.BloomPreTrainedModel._supports_sdpa, (
        f"rule drifted: transformers {versions.installed('transformers')} has an SDPA path for BLOOM "
        f"(none through {versions.VERIFIED['transformers']}); the memory model could plan it")
    # GPT-J's SDPA path is new in transformers 5.24 (GPTJPreTrainedModel._supports_sdpa); eager before
    gptj = "sdpa" if versions.parse(versions.installed("transformers")) >= (5, 24) else "eager"
    assert spec_of(catalog.model_config("EleutherAI/gpt-j-6b")[0]).attention == gptj
    assert ATTENTION["eager"] == "eager" and ATTENTION["flash2"] == "flash_attention_2"
