"""Training that never loses work: resume, signals, out-of-memory re-planning, reproducibility.

Real NF4 + peft + TRL on the CPU with the tiny model. Interruptions and out-of-memory
errors are injected where they really happen (a signal to this process during a step;
torch.OutOfMemoryError from the Trainer's training step), and everything else runs as
in production.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.config import compose
from finetune.errors import ConfigError, DoesNotFitError, Interrupted
from finetune.pipeline import run_pipeline
from finetune.runs import COMPLETE, complete_checkpoints, recipe_changes
from finetune.train import callbacks as train_callbacks
from finetune.train.oom import next_plan

# the tests that train (or start processes) are marked slow one by one; the pure ones stay in make test-fast

STEPS = 16
BASE = ["+recipe=tiny-demo", f"train.max_steps={STEPS}", "train.save_steps=4", "stages=[data,preflight,train]"]


def _mlflow(workdir: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{workdir}/mlflow.db")


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.fixture
def interrupt_at(monkeypatch):
    """Send SIGTERM to this process during optimizer step `n` (as `kill -TERM <pid>` would)."""
    original = train_callbacks.StopOnSignalCallback.on_step_end

    def arm(n: int):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == n and self.stop.signum is None:
                os.kill(os.getpid(), signal.SIGTERM)
            return original(self, args, state, control, **kwargs)

        monkeypatch.setattr(train_callbacks.StopOnSignalCallback, "on_step_end", on_step_end)

    return arm


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.slow
def test_resumed_run_equals_the_uninterrupted_one(workdir, interrupt_at):
    straight = run_pipeline(compose(BASE), workdir / "a" / "tiny-demo" / "run")

    interrupt_at(10)
    first = workdir / "b" / "tiny-demo" / "first"
    with pytest.raises(Interrupted) as info:
        run_pipeline(compose(BASE), first)
    assert info.value.exit_code == 143
    assert "step 10" in str(info.value)
    assert [step for step, _ in complete_checkpoints(first)][-1] == 10
    run_id = json.loads((first / "run.json").read_text())["run_id"]
    assert _mlflow(workdir).get_run(run_id).info.status == "KILLED"
    assert not (first / "adapter").exists(), "an interrupted run leaves no final adapter"

    # The same command again: train.resume=auto finds the interrupted run and continues it there.
    again = workdir / "b" / "tiny-demo" / "second"
    resumed = run_pipeline(compose(BASE), again)
    assert resumed["work_dir"] == first
    assert json.loads((again / "resume.json").read_text())["step"] == 10
    assert resumed["train"].resumed_from_step == 10
    assert resumed["run_id"] == run_id
    run = _mlflow(workdir).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumed_from_step"] == "10"

    # Same loss curve, same adapter (CPU: bit-for-bit in practice; allow float reassociation).
    assert len(resumed["train"].loss_history) == STEPS
    for (s1, l1), (s2, l2) in zip(straight["train"].loss_history, resumed["train"].loss_history, strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-5, abs=1e-6)
    a, b = _adapter(straight["work_dir"]), _adapter(first)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), atol=1e-5, rtol=1e-4)
    history = [m.step for m in _mlflow(workdir).get_metric_history(run_id, "train/loss")]
    assert sorted(set(history)) == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_same_seed_same_loss_curve(workdir):
    one = run_pipeline(compose(BASE + ["train.max_steps=8"]), workdir / "x" / "tiny-demo" / "run")
    two = run_pipeline(compose(BASE + ["train.max_steps=8"]), workdir / "y" / "tiny-demo" / "run")
    assert one["train"].loss_history == two["train"].loss_history
    assert one["train"].adapter_digest == two["train"].adapter_digest
    other = run_pipeline(compose(BASE + ["train.max_steps=8", "train.seed=7"]), workdir / "z" / "tiny-demo" / "run")
    assert other["train"].loss_history != one["train"].loss_history


@pytest.mark.slow
def test_an_interrupted_run_of_another_recipe_is_left_alone_and_blocks_nothing(workdir, interrupt_at, caplog):
    interrupt_at(5)
    first = workdir / "tiny-demo" / "first"
    with pytest.raises(Interrupted):
        run_pipeline(compose(BASE), first)

    # Other overrides: another experiment. It starts fresh beside the interrupted run, which stays resumable.
    with caplog.at_level(logging.WARNING, logger="finetune.runs"):
        other = run_pipeline(compose(BASE + ["adapter.rank=8", "train.learning_rate=0.001", "train.max_steps=2"]),
                             workdir / "tiny-demo" / "two")
    assert other["work_dir"] == workdir / "tiny-demo" / "two" and other["train"].resumed_from_step is None
    lines = [r.getMessage() for r in caplog.records if "not resuming the interrupted run" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "adapter.rank: 16 -> 8" in lines[0] and "train.learning_rate: 0.003 -> 0.001" in lines[0]
    assert f"train.resume={first / 'checkpoints' / 'checkpoint-5'}" in lines[0]
    assert [step for step, _ in complete_checkpoints(first)][-1] == 5 and not (first / "adapter").exists()

    # An explicit checkpoint forces it; train.resume=never starts fresh.
    checkpoint = first / "checkpoints" / "checkpoint-5"
    forced = run_pipeline(compose(BASE + ["train.max_steps=6", f"train.resume={checkpoint}"]),
                          workdir / "tiny-demo" / "three")
    assert forced["train"].resumed_from_step == 5 and forced["train"].steps == 6
    fresh = run_pipeline(compose(BASE + ["adapter.rank=8", "train.max_steps=2", "train.resume=never"]),
                         workdir / "tiny-demo" / "four")
    assert fresh["train"].resumed_from_step is None and fresh["work_dir"] == workdir / "tiny-demo" / "four"


def test_incomplete_checkpoints_are_never_resumed(tmp_path):
    run = tmp_path / "run"
    for step, complete in ((4, True), (8, False)):
        ckpt = run / "checkpoints" / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text("{}")
        if complete:
            (ckpt / COMPLETE).write_text("ok\n")
    assert [s for s, _ in complete_checkpoints(run)] == [4]


def test_recipe_changes_ignore_what_does_not_change_training():
    old = {"stages": ["data", "train"], "train": {"resume": "auto", "seed": 1}, "eval": {"batch_size": 8}}
    new = {"stages": ["train"], "train": {"resume": "never", "seed": 2}, "eval": {"batch_size": 2}}
    assert recipe_changes(old, new) == ["train.seed: 1 -> 2"]


@pytest.fixture
def oom_when(monkeypatch):
    """Make the Trainer's training step raise torch.OutOfMemoryError under a condition, as CUDA would."""
    import trl

    original = trl.SFTTrainer.training_step

    def arm(condition):
        def training_step(self, model, inputs, *args, **kwargs):
            if condition(self, inputs):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")
            return original(self, model, inputs, *args, **kwargs)

        monkeypatch.setattr(trl.SFTTrainer, "training_step", training_step)

    return arm


@pytest.mark.slow
def test_out_of_memory_continues_with_a_smaller_plan(workdir, oom_when):
    # Micro-batches above 4 sequences "do not fit", from step 5 on.
    oom_when(lambda trainer, inputs: trainer.state.global_step >= 5 and inputs["input_ids"].shape[0] > 4)
    run_dir = workdir / "tiny-demo" / "run"
    result = run_pipeline(compose(BASE + ["train.keep_checkpoints=10"]), run_dir)
    train = result["train"]
    assert train.steps == STEPS
    # Each re-plan needs less memory than the one before, until one fits (micro-batch <= 4 here); every
    # attempt continues from the step-5 checkpoint the first out-of-memory error left.
    assert train.oom_replans and all(e["step"] == 5 for e in train.oom_replans)
    event = train.oom_replans[0]
    assert event["checkpoint"].endswith("checkpoint-5")
    assert (run_dir / "checkpoints" / "checkpoint-5" / COMPLETE).is_file(), "the work before the OOM was saved"
    first, final = event["failed"], train.choices
    assert final == train.oom_replans[-1]["next"]
    assert final["micro_batch_size"] <= 4
    assert final["quantization"] == first["quantization"] == "nf4", "never switch the base under the adapter"
    assert final["double_quant"] == first["double_quant"]
    assert final["micro_batch_size"] * final["gradient_accumulation_steps"] == 8, "effective batch kept"
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["choices"] == final and any("out of memory" in line for line in plan["explanation"])
    run = _mlflow(workdir).get_run(result["run_id"])
    n = len(train.oom_replans)
    assert run.info.status == "FINISHED" and run.data.tags["oom_replans"] == str(n)
    replan = json.loads(Path(_mlflow(workdir).download_artifacts(result["run_id"], f"replans/{n}.json")).read_text())
    assert replan["next"] == final


@pytest.mark.slow
def test_out_of_memory_frees_the_old_model_before_the_next_plan_loads(workdir, oom_when, monkeypatch):
    """After an out-of-memory error nothing keeps the failed plan's model alive (not the exception's
    traceback, not the Trainer, its callbacks or its Accelerator): on a GPU, loading the next plan's
    base beside it would run out of memory again. Checked where it matters, at the next load.
    Also: each attempt builds its training arguments (the process group) before it loads the model."""
    import weakref

    import finetune.models.loader as loader
    import finetune.train as train_mod

    models: list[weakref.ref] = []
    alive_at_load: list[int] = []
    order: list[str] = []
    real_load, real_args = loader.load_model, train_mod.sft_config

    def load_model(*args, **kwargs):
        # No gc.collect() here: the train stage must already have freed the old model.
        alive_at_load.append(sum(ref() is not None for ref in models))
        order.append("load")
        model = real_load(*args, **kwargs)
        models.append(weakref.ref(model))
        return model

    def sft_config(*args, **kwargs):
        order.append("args")
        return real_args(*args, **kwargs)

    monkeypatch.setattr(loader, "load_model", load_model)
    monkeypatch.setattr(train_mod, "sft_config", sft_config)
    oom_when(lambda trainer, inputs: trainer.state.global_step >= 2 and inputs["input_ids"].shape[0] > 4)
    cfg = compose(["+recipe=tiny-demo", "train.max_steps=4", "train.save_steps=2", "stages=[data,preflight,train]"])
    train = run_pipeline(cfg, workdir / "tiny-demo" / "run")["train"]
    assert train.steps == 4 and train.oom_replans
    assert len(models) == len(train.oom_replans) + 1
    assert alive_at_load == [0] * len(models), "a failed plan's model was still alive when the next one loaded"
    assert order == ["args", "load"] * len(models)
    assert all(e["error"].startswith("CUDA out of memory") for e in train.oom_replans), "the message is kept"


@pytest.mark.slow
def test_out_of_memory_with_no_smaller_plan_exits_4(workdir, oom_when):
    oom_when(lambda trainer, inputs: True)
    cfg = compose(BASE + ["preflight.pin.micro_batch_size=1", "preflight.pin.gradient_checkpointing=true"])
    with pytest.raises(DoesNotFitError) as info:
        run_pipeline(cfg, workdir / "tiny-demo" / "run")
    assert info.value.exit_code == 4
    assert "smallest plan" in str(info.value)
    run_id = json.loads((workdir / "tiny-demo" / "run" / "run.json").read_text())["run_id"]
    assert _mlflow(workdir).get_run(run_id).info.status == "FAILED"


def test_next_plan_keeps_quantization_and_shrinks():
    failed = {"quantization": "nf4", "double_quant": True, "compute_dtype": "bf16", "gradient_checkpointing": False,
              "micro_batch_size": 8, "gradient_accumulation_steps": 2, "max_seq_len": 512, "optimizer": "adamw",
              "num_gpus": 1, "distributed": "none"}

    def alt(speed, **change):
        return {"choices": dict(failed, **change), "relative_speed": speed, "device_total_bytes": 1}

    plan = {"alternatives": [alt(0.9, quantization="none"), alt(0.8, micro_batch_size=16, gradient_accumulation_steps=1),
                             alt(0.7, micro_batch_size=4, gradient_accumulation_steps=4),
                             alt(0.6, gradient_checkpointing=True)]}
    assert next_plan(plan, failed, [failed])["micro_batch_size"] == 4
    # With no alternatives: checkpointing first, then halving the micro-batch, then nothing.
    step1 = next_plan({}, failed, [failed])
    assert step1["gradient_checkpointing"] and step1["micro_batch_size"] == 8
    step2 = next_plan({}, step1, [failed, step1])
    assert step2["micro_batch_size"] == 4 and step2["gradient_accumulation_steps"] == 4
    smallest = dict(failed, gradient_checkpointing=True, micro_batch_size=1, gradient_accumulation_steps=16)
    assert next_plan({}, smallest, [smallest]) is None


def _wait_for(predicate, timeout: float, proc=None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_same_command_resumes(tmp_path):
    """The real thing: `kill -TERM` on a training process, then the same command again."""
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, "-m", "finetune", "+recipe=tiny-demo", "train.max_steps=40", "train.save_steps=5",
           "stages=[data,preflight,train]"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        started = _wait_for(lambda: any(tmp_path.glob("outputs/tiny-demo/*/checkpoints/checkpoint-5/COMPLETE")),
                            timeout=180, proc=proc)
        assert started, proc.stderr.read() if proc.poll() is not None else "no checkpoint in time"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err
    assert "run the same command again" in err.splitlines()[-1]
    run_dir = next(tmp_path.glob("outputs/tiny-demo/*/checkpoints")).parent
    steps = [s for s, _ in complete_checkpoints(run_dir)]
    assert steps and steps[-1] >= 5 and steps[-1] < 40
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    assert _mlflow(tmp_path).get_run(run_id).info.status == "KILLED"

    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert run_id in again.stdout
    result = json.loads((run_dir / "train_result.json").read_text())
    assert result["steps"] == 40 and result["resumed_from_step"] == steps[-1]
    assert _mlflow(tmp_path).get_run(run_id).info.status == "FINISHED"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_here(tmp_path: Path) -> list[str]:
    """`make -f REPO/Makefile` run from `tmp_path` as from a clone (outputs/, mlflow.db and mlruns/ land there):
    the Makefile's relative paths (.venv, pyproject.toml, the lock) point at the repository's; the venv's
    install stamp is taken as up to date (-o), so make never reinstalls from a test."""
    repo = Path(__file__).resolve().parents[1]
    for name in (".venv", "pyproject.toml", "requirements.lock"):
        (tmp_path / name).symlink_to(repo / name)
    venv = Path(sys.executable).parent.parent
    if venv.resolve() != (repo / ".venv").resolve():
        pytest.skip(f"make runs the repository's .venv; this suite runs {venv}")
    return ["make", "-s", "-f", str(repo / "Makefile"), "-o", ".venv/.installed"]


@pytest.mark.slow
def test_two_nodes_train_the_adapter_of_one_node_with_two_processes(tmp_path):
    """`make train-multi GPUS=2` (torchrun, 2 gloo processes on one node; accelerate launch --cpu --num_processes
    2 silently runs one), then `make train-multi NODES=2 GPUS=1` twice, as on two machines (c10d rendezvous on
    127.0.0.1): the same seed gives the same adapter with no environment variable set by hand (make sets the
    same thread count in both launches; torchrun alone sets it only for several processes per node); both ranks
    end with it; one MLflow run each, from rank 0."""
    env = dict(os.environ)
    for name in ("HYDRA_FULL_ERROR", "OMP_NUM_THREADS"):  # as in a user's shell (the suite pins threads)
        env.pop(name, None)
    make = _make_here(tmp_path)
    args = ("ARGS=train.max_steps=6 stages=[data,preflight,train] tracking.system_metrics=false "
            "tracking.register_model=false")
    proc = subprocess.run([*make, "train-multi", "GPUS=2", "RECIPE=tiny-demo", args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one_node = next((tmp_path / "outputs" / "tiny-demo").iterdir())
    port = _free_port()
    nodes = [subprocess.Popen([*make, "train-multi", "NODES=2", "GPUS=1", f"NODE_RANK={i}", "MASTER_ADDR=127.0.0.1",
                               f"MASTER_PORT={port}", "RUN_ID=two-nodes", "RECIPE=tiny-demo", args],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        errors = [p.communicate(timeout=600)[1] for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(e[-2000:] for e in errors)
    two_nodes = tmp_path / "outputs" / "tiny-demo" / "two-nodes"

    digests = {}
    for run_dir in (one_node, two_nodes):
        leader = json.loads((run_dir / "train_result.json").read_text())
        other = json.loads((run_dir / "train_rank1.json").read_text())
        assert leader["world_size"] == other["world_size"] == 2, "really two processes"
        assert leader["adapter_digest"] == other["adapter_digest"], "both ranks end with the same adapter"
        assert leader["steps"] == other["steps"] == 6
        digests[run_dir] = leader["adapter_digest"]
        c = json.loads((run_dir / "plan.json").read_text())["choices"]
        assert c["distributed"] == "ddp" and c["num_gpus"] == 2
        assert c["micro_batch_size"] * c["gradient_accumulation_steps"] * 2 == 8, "effective batch split over 2"
    assert digests[one_node] == digests[two_nodes], "two nodes train what one node with two processes trains"
    plan = json.loads((two_nodes / "plan.json").read_text())
    assert plan["choices"]["num_nodes"] == 2
    assert any("2 nodes x 1 GPU" in line and "internode_gbps" in line for line in plan["explanation"])
    runs = _mlflow(tmp_path).search_runs(experiment_ids=["1"])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}, "one MLflow run per launch, rank 0's"

def test_world_size_must_match_the_plan(workdir, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError) as info:
        run_pipeline(compose(BASE), workdir / "tiny-demo" / "run")
    assert "hardware.num_gpus=2" in str(info.value)
