"""The recipe tree: every shipped recipe composes; bad keys and values fail at composition."""

from __future__ import annotations

import pytest
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from finetune.cli import describe_config_error
from finetune.config import RunConfig, compose, flatten
from finetune.errors import ConfigError
from finetune.paths import recipes_dir

RECIPES = sorted(p.stem for p in (recipes_dir() / "recipe").glob("*.yaml"))


def test_shipped_recipes_exist():
    assert {"tiny-demo", "llama2-7b-medical"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_composes_and_validates(name):
    cfg = compose([f"+recipe={name}"])
    assert isinstance(cfg, RunConfig)
    assert cfg.name == name
    assert cfg.model.name_or_path and cfg.dataset.path


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_opens_with_purpose_and_command(name):
    text = (recipes_dir() / "recipe" / f"{name}.yaml").read_text()
    lines = text.splitlines()
    assert lines[0] == "# @package _global_"
    header = "\n".join(line for line in lines[1:8] if line.startswith("#"))
    assert len(header) > 40, "a recipe opens with a comment saying what it is for"
    assert f"+recipe={name}" in text or "make demo" in text, "and the command that runs it"


def test_headline_recipe_matches_the_issue():
    cfg = compose(["+recipe=llama2-7b-medical"])
    assert cfg.model.name_or_path == "meta-llama/Llama-2-7b-hf"
    assert cfg.dataset.format.value == "alpaca"
    assert cfg.adapter.rank == 16
    assert cfg.hardware.vram_gib == 12
    assert cfg.model.chat_template == "llama-2"  # Llama-2 base ships none


def test_misspelled_key_fails_at_composition():
    with pytest.raises((HydraException, OmegaConfBaseException)) as info:
        compose(["+recipe=tiny-demo", "adaptr.rank=8"])
    assert describe_config_error(info.value).startswith("unknown recipe key 'adaptr.rank'")


def test_wrong_type_fails_at_composition():
    with pytest.raises((HydraException, OmegaConfBaseException)) as info:
        compose(["+recipe=tiny-demo", "adapter.rank=sixteen"])
    message = describe_config_error(info.value)
    assert message.startswith("adapter.rank:") and "sixteen" in message


def test_bad_enum_value_names_the_choices():
    with pytest.raises((HydraException, OmegaConfBaseException)) as info:
        compose(["+recipe=tiny-demo", "preflight.pin.quantization=fp4"])
    message = describe_config_error(info.value)
    assert message.startswith("preflight.pin.quantization:") and "nf4" in message


@pytest.mark.parametrize("override, key", [
    ("adapter.rank=0", "adapter.rank"),
    ("dataset.eval_fraction=1.5", "dataset.eval_fraction"),
    ("hardware.vram_gib=-1", "hardware.vram_gib"),
    ("train.max_steps=0", "train.max_steps"),
    ("preflight.margin=1", "preflight.margin"),
])
def test_cross_field_checks_name_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        compose(["+recipe=tiny-demo", override])
    assert str(info.value).startswith(key)


def test_flatten_gives_stable_dotted_names():
    flat = flatten(compose(["+recipe=tiny-demo"]))
    assert flat["adapter.rank"] == 16
    assert flat["model.name_or_path"] == "tiny:llama"
    assert flat["preflight.pin.quantization"] == "nf4"
    assert flat["stages"] == "data,preflight,train,eval"


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_plans_offline(name, tmp_path):
    """Each shipped recipe's model is in the catalog, and its plan fits its own card (no network). gpt2-local
    names a local checkpoint directory: a GPT-2 config.json stands in for the user's."""
    import json

    from finetune.architectures import catalog
    from finetune.preflight import run_preflight

    overrides = []
    if name == "gpt2-local":
        (tmp_path / "config.json").write_text(json.dumps(catalog.model_config("openai-community/gpt2")[0]))
        overrides = [f"model.name_or_path={tmp_path}"]
    plan = run_preflight(compose([f"+recipe={name}", *overrides]))
    assert plan.fits
    assert plan.predicted["device_total_bytes"] <= plan.budget_bytes
    c = plan.choices
    per_gpu = max(1, compose([f"+recipe={name}"]).train.effective_batch_size // c["num_gpus"])
    assert c["micro_batch_size"] * c["gradient_accumulation_steps"] >= per_gpu


def test_the_seed_families_each_have_a_recipe():
    wanted = {"llama2-7b-alpaca", "llama2-13b-sharegpt", "llama2-70b", "mistral-7b-domain", "falcon-7b",
              "falcon-180b", "bloom-7b1", "gpt-j-6b", "gpt-neox-20b", "mixtral-8x7b"}
    assert wanted <= set(RECIPES)
    assert compose(["+recipe=llama2-70b"]).hardware.num_gpus > 1
    assert compose(["+recipe=falcon-180b"]).stages[0].value == "preflight" and len(
        compose(["+recipe=falcon-180b"]).stages) == 1, "falcon-180b only plans"


@pytest.mark.parametrize("override, expected", [
    ("adapter.targets=all-linear", ["all-linear"]),
    ("adapter.targets=attention", ["attention"]),
    ("adapter.targets=mlp", ["mlp"]),
    ("adapter.targets=[q_proj,v_proj]", ["q_proj", "v_proj"]),
    ("adapter.targets=[all-linear]", ["all-linear"]),
])
def test_adapter_targets_take_a_bare_name_or_a_list(override, expected):
    assert compose(["+recipe=tiny-demo", override]).adapter.targets == expected


@pytest.mark.parametrize("override", ["adapter.targets=[]", "adapter.targets=3", "adapter.targets=[q_proj,3]"])
def test_bad_adapter_targets_name_the_key(override):
    with pytest.raises(ConfigError, match="adapter.targets"):
        compose(["+recipe=tiny-demo", override])


def test_a_bad_target_names_the_modules_the_model_has():
    from finetune.architectures import catalog
    from finetune.probes import spec_of

    spec = spec_of(catalog.model_config("tiny:llama")[0])
    with pytest.raises(ConfigError, match=r"adapter.targets: qkv_proj is not among .*q_proj, k_proj, v_proj"):
        spec.lora_targets(compose(["+recipe=tiny-demo", "adapter.targets=qkv_proj"]).adapter.targets)
