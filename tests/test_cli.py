"""The command line contract: exit codes, one-line errors, the preflight dry run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PLAN_KEYS = {"schema_version", "model", "choices", "predicted", "breakdown_bytes", "budget_bytes", "fits",
             "alternatives", "explanation", "measured", "versions"}
CHOICE_KEYS = {"quantization", "double_quant", "compute_dtype", "gradient_checkpointing", "micro_batch_size",
               "gradient_accumulation_steps", "max_seq_len", "seq_len_source", "packing", "optimizer",
               "attention", "distributed", "num_gpus"}
BREAKDOWN_KEYS = {"weights_quantized", "weights_unquantized", "quant_constants", "lora_params", "lora_grads",
                  "optimizer_state", "activations", "lm_head_and_loss", "workspace", "allocator_cache",
                  "cuda_context"}


def _one_error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_misspelled_key_exits_2_with_one_line(run_cli):
    proc = run_cli("+recipe=tiny-demo", "adaptr.rank=8")
    assert proc.returncode == 2
    line = _one_error_line(proc)
    assert "adaptr.rank" in line


def test_unknown_recipe_exits_2_and_lists_recipes(run_cli):
    proc = run_cli("+recipe=no-such-recipe")
    assert proc.returncode == 2
    line = _one_error_line(proc)
    assert "no-such-recipe" in line and "tiny-demo" in line


def test_no_recipe_exits_2(run_cli):
    proc = run_cli()
    assert proc.returncode == 2
    assert "+recipe=NAME" in _one_error_line(proc)


@pytest.mark.parametrize("override, needle", [
    ("adapter.rank=abc", "adapter.rank"),
    ("adapter.rank=0", "adapter.rank"),
    ("dataset.format=yaml", "dataset.format"),
    ("hardware=no-such-card", "hardware"),
])
def test_bad_values_exit_2_naming_the_key(run_cli, override, needle):
    proc = run_cli("+recipe=tiny-demo", override, "stages=[preflight]")
    assert proc.returncode == 2
    assert needle in _one_error_line(proc)


def test_full_error_shows_the_traceback(run_cli):
    proc = run_cli("+recipe=tiny-demo", "adapter.rank=0", "stages=[preflight]", env={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr


def test_headline_preflight_is_an_offline_dry_run(run_cli, tmp_path):
    proc = run_cli("+recipe=llama2-7b-medical", "stages=[preflight]", env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "Plan for meta-llama/Llama-2-7b-hf" in proc.stdout
    plans = list((tmp_path / "outputs" / "llama2-7b-medical").glob("*/plan.json"))
    assert len(plans) == 1
    plan = json.loads(plans[0].read_text())
    assert set(plan) == PLAN_KEYS
    assert set(plan["choices"]) == CHOICE_KEYS
    assert set(plan["breakdown_bytes"]) == BREAKDOWN_KEYS
    assert plan["model"]["params_total"] == 6_738_415_616
    assert plan["fits"] is True
    assert plan["choices"]["quantization"] == "nf4"  # 7B in bf16 cannot fit 12 GiB
    assert plan["predicted"]["device_total_bytes"] <= plan["budget_bytes"] == int(12 * 2**30 * 0.9)
    assert plan["measured"] is None
    assert plan["versions"]["verified"]["transformers"] and plan["versions"]["drift"] == []  # the locked env
    assert not (tmp_path / "mlflow.db").exists(), "a dry run opens no MLflow run"


def test_preflight_imports_neither_torch_nor_mlflow(tmp_path):
    code = (
        "import sys\n"
        "sys.argv = ['finetune', '+recipe=llama2-7b-medical', 'stages=[preflight]']\n"
        "from finetune import cli\n"
        "try:\n"
        "    cli.main()\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "print('IMPORTED', 'torch' in sys.modules, 'mlflow' in sys.modules, 'transformers' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "IMPORTED False False False" in proc.stdout


def test_model_dir_with_only_config_json_is_planned(run_cli, tmp_path):
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "mistral", "architectures": ["MistralForCausalLM"], "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": False,
    }))
    proc = run_cli("+recipe=llama2-7b-medical", "stages=[preflight]", f"model.name_or_path={model_dir}")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(next((tmp_path / "outputs").rglob("plan.json")).read_text())
    assert plan["model"]["architecture"] == "MistralForCausalLM"
    assert plan["model"]["params_total"] == 7_241_732_096


def test_does_not_fit_exits_4_with_a_suggestion(run_cli):
    proc = run_cli("+recipe=llama2-7b-medical", "stages=[preflight]", "model.name_or_path=meta-llama/Llama-2-70b-hf")
    assert proc.returncode == 4, proc.stderr
    line = _one_error_line(proc)
    assert "does not fit" in line and "GiB" in line


def test_users_own_recipe_directory(run_cli, tmp_path):
    mine = tmp_path / "my-recipes" / "recipe"
    mine.mkdir(parents=True)
    (mine / "mine.yaml").write_text(
        "# @package _global_\n"
        "defaults:\n  - override /model: llama2-7b\n  - override /hardware: rtx4090\n  - _self_\n"
        "name: mine\ndataset:\n  path: data.jsonl\n  format: alpaca\nadapter:\n  rank: 8\n"
    )
    proc = run_cli("--config-dir", str(tmp_path / "my-recipes"), "+recipe=mine", "stages=[preflight]")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(next((tmp_path / "outputs" / "mine").glob("*/plan.json")).read_text())
    assert plan["model"]["name"] == "meta-llama/Llama-2-7b-hf"
    assert plan["budget_bytes"] == int(24 * 2**30 * 0.9)


def test_multirun_exits_with_the_worst_jobs_code(run_cli, tmp_path):
    proc = run_cli("-m", "+recipe=llama2-7b-medical", "stages=[preflight]", "adapter.rank=8,0")
    assert proc.returncode == 2
    assert len(list((tmp_path / "outputs" / "llama2-7b-medical").glob("*-sweep/0/plan.json"))) == 1
    assert "adapter.rank" in proc.stderr


def test_jobs_launched_in_other_processes_report_their_exit_codes(run_cli, tmp_path):
    """Through submitit's local launcher (the SLURM launcher's twin: each job its own process), the job's exit
    codes come back from their directories and the multirun exits with the worst."""
    proc = run_cli("-m", "hydra/launcher=submitit_local", "+recipe=llama2-7b-medical", "stages=[preflight]",
                   "adapter.rank=8,0")
    assert proc.returncode == 2, proc.stderr[-2000:]
    [sweep] = (tmp_path / "outputs" / "llama2-7b-medical").glob("*-sweep")
    codes = sorted(json.loads(p.read_text())["exit_code"] for p in sweep.glob("*/sweep_job.json"))
    assert codes == [0, 2] and (sweep / "0" / "plan.json").is_file()


@pytest.mark.slow  # runs the data stage in a subprocess (and builds the tiny model when first)
def test_a_bare_target_preset_on_the_command_line(run_cli, tmp_path):
    proc = run_cli("+recipe=tiny-demo", "adapter.targets=attention", "stages=[data,preflight]")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(next((tmp_path / "outputs" / "tiny-demo").glob("*/plan.json")).read_text())
    assert plan["model"]["lora_targets"] == ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.mark.slow  # runs the data stage in a subprocess (and builds the tiny model when first)
def test_a_recipe_in_the_users_own_directory(run_cli, tmp_path):
    """README: `finetune --config-dir ~/my-recipes +recipe=mine` finds my-recipes/recipe/mine.yaml, which may
    use the shipped groups; a recipe without `name:` is named by its file; data paths are the working dir's."""
    (tmp_path / "my-recipes" / "recipe").mkdir(parents=True)
    (tmp_path / "my-recipes" / "recipe" / "mine.yaml").write_text(
        "# @package _global_\n"
        "defaults:\n  - override /model: tiny-llama\n  - override /hardware: cpu\n  - _self_\n"
        "dataset:\n  path: rows.jsonl\n  format: alpaca\n  eval_fraction: 0.2\n")
    (tmp_path / "rows.jsonl").write_text("".join(
        json.dumps({"instruction": f"What is {i} plus {i}?", "input": "", "output": str(2 * i)}) + "\n"
        for i in range(40)))
    proc = run_cli("--config-dir", "my-recipes", "+recipe=mine", "stages=[data,preflight]")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(next((tmp_path / "outputs" / "mine").glob("*/data_report.json")).read_text())
    assert report["rows_read"] == 40 and report["train_rows"] + report["eval_rows"] == 40


@pytest.mark.parametrize("override, key", [
    ("+adapter.rnak=8", "adapter.rnak"),
    ("++adapter.rnak=8", "adapter.rnak"),
    ("++preflight.pin.quantizaton=nf4", "preflight.pin.quantizaton"),
    ("+lerning_rate=1e-3", "lerning_rate"),
])
def test_an_added_key_the_schema_lacks_exits_2_like_a_typo(run_cli, override, key):
    """`+key=` / `++key=` add keys with Hydra's struct mode off (its own hint suggests `++`): they must
    fail the same way a plain misspelled key does, not be dropped silently."""
    proc = run_cli("+recipe=tiny-demo", override, "stages=[preflight]")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = _one_error_line(proc)
    assert f"'{key}'" in line and "spelling" in line


def test_force_adding_a_key_that_exists_still_works(run_cli, tmp_path):
    import yaml

    proc = run_cli("+recipe=tiny-demo", "++adapter.rank=8", "++hydra.job.name=mine", "stages=[preflight]")
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load(next((tmp_path / "outputs" / "tiny-demo").glob("*/config.yaml")).read_text())
    assert config["adapter"]["rank"] == 8


def test_an_output_directory_that_cannot_be_written_is_exit_5(run_cli):
    proc = run_cli("+recipe=tiny-demo", "stages=[preflight]", "hydra.run.dir=/sys/finetune-test/run")
    assert proc.returncode == 5
    line = _one_error_line(proc)
    assert "cannot write /sys/finetune-test" in line and "hydra.run.dir" in line


def test_a_full_disk_is_exit_5_naming_the_path_and_the_free_space(tmp_path):
    """A write that fails with ENOSPC deep inside a library (wrapped by it) is one line, exit 5."""
    from finetune.cli import classify

    with pytest.raises(OSError) as full:
        with open("/dev/full", "w") as f:  # every write fails as on a full disk (ENOSPC)
            f.write("checkpoint")
            f.flush()
    full.value.filename = str(tmp_path / "checkpoint-30" / "adapter_model.safetensors")
    try:
        raise RuntimeError("the trainer could not save its checkpoint") from full.value
    except RuntimeError as wrapped:
        code, line = classify(wrapped)
    assert code == 5 and f"the disk holding {tmp_path}" in line and "GB free" in line and "\n" not in line


def test_a_gpu_plan_on_a_machine_without_one_stops_before_any_work(run_cli, tmp_path):
    """hardware=rtx4090 on this CPU machine: exit 5 before the data stage runs or an MLflow run exists."""
    proc = run_cli("+recipe=tiny-demo", "hardware=rtx4090")
    assert proc.returncode == 5
    assert "plans for a CUDA GPU" in _one_error_line(proc)
    assert not (tmp_path / "mlflow.db").exists()
    assert not list((tmp_path / "outputs").glob("*/*/data_report.json"))


def test_too_little_disk_for_the_checkpoints_is_caught_before_training(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from finetune.config import compose
    from finetune.errors import EnvError
    from finetune.preflight import run_preflight
    from finetune.train import check_checkpoint_space, checkpoint_bytes

    cfg = compose(["+recipe=llama2-7b-medical", "stages=[preflight]"])
    plan = run_preflight(cfg).to_dict()
    needed = checkpoint_bytes(cfg, plan)
    b = plan["breakdown_bytes"]
    assert needed > (cfg.train.keep_checkpoints + 1) * (b["lora_params"] + b["optimizer_state"])
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * needed, 9 * needed, needed - 1))
    with pytest.raises(EnvError, match=rf"{tmp_path}.*checkpoints need about .* MiB.*train.keep_checkpoints"):
        check_checkpoint_space(cfg, plan, tmp_path / "run")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * needed, 0, needed))
    check_checkpoint_space(cfg, plan, tmp_path / "run")


def test_a_cluster_launcher_that_is_not_installed_is_one_line_naming_the_extra(run_cli):
    import importlib.util

    if importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is not None:
        pytest.skip("the Ray launcher is installed here (make test-cluster)")
    proc = run_cli("-m", "hydra/launcher=ray", "+recipe=llama2-7b-medical", "stages=[preflight]", "adapter.rank=8,16")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["error: hydra/launcher=ray needs hydra-ray-launcher, which is not installed: pip install "
                     "'finetune-recipes[cluster]' (Ray, SLURM and Optuna for sweeps)"], proc.stderr
