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


@pytest.mark.parametrize("broken, where, problem", [
    ("dataset:\n  path: data.jsonl\n  format: [alpaca\n", "mine.yaml:6:1", "expected ',' or ']'"),
    ("dataset:\n  path: data.jsonl\n   format: alpaca\n", "mine.yaml:5:10", "mapping values are not allowed"),
    ("dataset:\n\tpath: data.jsonl\n", "mine.yaml:4:1", "found character '\\t'"),
])
def test_a_yaml_syntax_error_in_the_users_recipe_is_exit_2_naming_file_and_line(run_cli, tmp_path, broken, where,
                                                                                 problem):
    (tmp_path / "my-recipes" / "recipe").mkdir(parents=True)
    (tmp_path / "my-recipes" / "recipe" / "mine.yaml").write_text("# @package _global_\nname: mine\n" + broken)
    proc = run_cli("--config-dir", "my-recipes", "+recipe=mine", "stages=[preflight]")
    assert proc.returncode == 2
    line = _one_error_line(proc)
    assert f"my-recipes/recipe/{where}: YAML syntax error: {problem}" in line, line
    assert not (tmp_path / "outputs").exists()


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


def test_a_hub_id_not_in_the_catalog_is_refused_offline_before_the_data_stage(tmp_path):
    """Offline, a hub id neither local nor in the catalog cannot be planned: one line, exit 2, in seconds, without
    the data stage's minute of retrying the hub."""
    import os
    import time

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "finetune", "+recipe=tiny-demo",
                           "model.name_or_path=someone/not-a-catalog-model"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    line = _one_error_line(proc)
    assert "'someone/not-a-catalog-model' is neither a local directory" in line and "config.json" in line
    assert time.monotonic() - start < 60, "no retries against the hub"
    assert not list((tmp_path / "outputs").glob("*/*")), "the rejected command leaves no run directory"


@pytest.mark.slow
def test_with_two_rows_the_console_says_the_eval_ran_on_training_rows(run_cli, tmp_path):
    """Two rows leave the eval split empty: the eval scores training rows, and the console says so plainly instead
    of "on 2 held-out examples"."""
    (tmp_path / "rows.jsonl").write_text("".join(
        json.dumps({"instruction": f"What is {i} plus {i}?", "input": "", "output": str(2 * i)}) + "\n"
        for i in range(2)))
    proc = run_cli("+recipe=tiny-demo", "dataset.path=rows.jsonl", "dataset.format=alpaca", "train.max_steps=2",
                   "tracking.system_metrics=false", "tracking.register_model=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = proc.stdout + proc.stderr
    assert "on 2 TRAINING examples: the eval split is empty" in said and "held-out examples" not in said
    report = json.loads(next((tmp_path / "outputs" / "tiny-demo").glob("*/eval.json")).read_text())
    assert any("training split" in note for note in report["notes"])


def test_the_rust_libraries_disk_full_errors_are_exit_5():
    """tokenizers' save and safetensors' raise plain exceptions that name neither errno nor path (a checkpoint
    save on a full disk): still one line, exit 5, not a traceback and exit 1."""
    from tokenizers import Tokenizer, models

    from finetune.cli import classify

    with pytest.raises(Exception) as tokenizers_error:
        Tokenizer(models.BPE()).save("/dev/full")  # every write fails as on a full disk (ENOSPC)
    safetensors_error = RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                     '"No space left on device" })')  # safetensors' text (its save is atomic)
    for error in (tokenizers_error.value, safetensors_error):
        try:
            raise RuntimeError("the trainer could not save its checkpoint") from error
        except RuntimeError as wrapped:
            code, line = classify(wrapped)
        assert code == 5 and "is full" in line and "free some space" in line and "\n" not in line, line


def test_torch_saves_failing_write_is_exit_5_not_a_traceback(tmp_path):
    """torch.save (the checkpoint's optimizer.pt) says neither errno nor path when the disk stops a write, only
    "unexpected pos A vs B" from its C++ writer: a trainer checkpoint on a full disk is still one line, exit 5.
    The real error, made by a file size limit on this process (a full tmpfs gives the very same one)."""
    import resource

    import torch

    from finetune.cli import classify

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))  # Python ignores SIGXFSZ: the write fails
    try:
        with pytest.raises(RuntimeError) as torch_error:
            torch.save({"exp_avg": torch.zeros(100_000)}, tmp_path / "optimizer.pt")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    try:
        raise RuntimeError("the trainer could not save its checkpoint") from torch_error.value
    except RuntimeError as wrapped:
        code, line = classify(wrapped)
    assert code == 5 and "\n" not in line, line
    assert line.startswith("torch.save could not write under ") and "GB free" in line and "ulimit -f" in line
    assert "hydra.run.dir=DIR" in line


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


def test_the_checkpoint_space_asked_is_proportional_to_what_is_written(tmp_path, monkeypatch):
    """The tiny demo's checkpoints are well under a MiB each: the check asks a few MiB, not a fixed 64 MiB
    margin, and suggests fewer checkpoints only where that would fit."""
    import shutil
    from collections import namedtuple

    from finetune.config import compose
    from finetune.errors import EnvError
    from finetune.models.loader import load_tokenizer
    from finetune.preflight import run_preflight
    from finetune.train import check_checkpoint_space, checkpoint_bytes, tokenizer_bytes

    cfg = compose(["+recipe=tiny-demo", "stages=[preflight]"])
    plan = run_preflight(cfg).to_dict()
    tokenizer = tokenizer_bytes(load_tokenizer(cfg.model))
    needed = checkpoint_bytes(cfg, plan, tokenizer)
    assert needed < 8 * 2**20, needed
    one = checkpoint_bytes(cfg, plan, tokenizer, keep=1)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * needed, 0, one))
    with pytest.raises(EnvError, match=r"lower train.keep_checkpoints \(1 would fit\)"):
        check_checkpoint_space(cfg, plan, tmp_path, tokenizer)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * needed, 0, one - 1))
    with pytest.raises(EnvError) as info:
        check_checkpoint_space(cfg, plan, tmp_path, tokenizer)
    assert "keep_checkpoints (1" not in str(info.value), "fewer checkpoints would not fit either"


def test_a_cluster_launcher_that_is_not_installed_is_one_line_naming_the_extra(run_cli):
    import importlib.util

    if importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is not None:
        pytest.skip("the Ray launcher is installed here (make test-cluster)")
    proc = run_cli("-m", "hydra/launcher=ray", "+recipe=llama2-7b-medical", "stages=[preflight]", "adapter.rank=8,16")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["error: hydra/launcher=ray needs hydra-ray-launcher, which is not installed: pip install "
                     "'finetune-recipes[cluster]' (Ray, SLURM and Optuna for sweeps)"], proc.stderr
