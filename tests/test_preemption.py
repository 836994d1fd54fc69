"""Surviving the cluster: resume_from_checkpoint=auto, preemption signals (a checkpoint at the step
reached, agreed by every rank, exit code 75), a second signal, and a SIGKILLed worker restarted by
torchrun --max-restarts, each continued run bit-identical to an uninterrupted one."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers.trainer_callback import TrainerCallback

from helpers import RaggedLM, run_ranks, tiny_gpt2
from scaletrain import Trainer, TrainingArguments
from scaletrain.checkpoint import CheckpointError, resolve_resume_target
from scaletrain.checkpoint.manager import COMMIT_MARKER
from scaletrain.trainer.preemption import PREEMPTED_EXIT_CODE, Preempted

ROOT = Path(__file__).parent.parent
SCRIPTS = Path(__file__).parent / "scripts"


def _args(out: Path, **kw) -> TrainingArguments:
    settings = dict(max_steps=8, per_device_train_batch_size=4, save_steps=2, logging_steps=1, disable_tqdm=True,
                    optim="adamw_torch")
    return TrainingArguments(output_dir=str(out), **{**settings, **kw})


class SignalAt(TrainerCallback):
    def __init__(self, step: int, when=lambda: True) -> None:
        self.step, self.when = step, when

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and self.when():
            os.kill(os.getpid(), signal.SIGTERM)


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_auto_starts_fresh_without_a_checkpoint_and_takes_the_newest_committed_one(tmp_path):
    out = tmp_path / "run"
    assert resolve_resume_target("auto", out) is None  # nothing there: a fresh start, not an error
    Trainer(model=tiny_gpt2(), args=_args(out, max_steps=4), train_dataset=RaggedLM(32)).train()
    (out / "checkpoint-6.tmp").mkdir()  # an interrupted save is never a resume target
    assert resolve_resume_target("auto", out) == out / "checkpoint-4"
    with pytest.raises(CheckpointError, match="no committed checkpoint"):
        resolve_resume_target("latest", tmp_path / "empty")
    # a restart after the last step's checkpoint (before the run's end was reported) trains no extra step
    done = Trainer(model=tiny_gpt2(), args=_args(out, max_steps=4), train_dataset=RaggedLM(32))
    done.train(resume_from_checkpoint="auto")
    assert done.state.global_step == 4 and not (out / "checkpoint-5").exists()
    # a checkpoint of another model is an error, not a silent fresh start
    from transformers import GPT2Config, GPT2LMHeadModel

    other = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16))
    with pytest.raises(CheckpointError, match="model"):
        Trainer(model=other, args=_args(out), train_dataset=RaggedLM(32)).train(resume_from_checkpoint="auto")


def test_sigterm_commits_a_checkpoint_at_the_step_reached_and_the_rerun_is_bit_identical(tmp_path):
    whole = Trainer(model=tiny_gpt2(), args=_args(tmp_path / "whole"), train_dataset=RaggedLM(32))
    whole.train()
    out = tmp_path / "preempted"
    trainer = Trainer(model=tiny_gpt2(), args=_args(out), train_dataset=RaggedLM(32), callbacks=[SignalAt(3)])
    with pytest.raises(Preempted) as caught:
        trainer.train()
    assert caught.value.code == PREEMPTED_EXIT_CODE and caught.value.step == 3  # not a save_steps multiple
    assert (out / "checkpoint-3" / COMMIT_MARKER).is_file()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers given back
    _assert_auto_resume_ends_as(whole, out)


def _assert_auto_resume_ends_as(whole, out: Path) -> None:
    """resume_from_checkpoint='auto' in `out` finishes the run bit-identical to the uninterrupted `whole`."""
    again = Trainer(model=tiny_gpt2(), args=_args(out), train_dataset=RaggedLM(32))
    again.train(resume_from_checkpoint="auto")
    assert again.state.global_step == 8
    for name, value in _weights(whole).items():
        assert torch.equal(_weights(again)[name], value), name


@pytest.mark.parametrize("signals", [["SIGTERM", "SIGUSR1"], []])
def test_jit_checkpoint_commits_on_sigterm_and_train_returns_as_hf_does(tmp_path, signals):
    """HF's enable_jit_checkpoint: the checkpoint of the step reached, then training stops and train()
    returns (no exit); SIGTERM is watched even when preemption_signals leaves it out."""
    whole = Trainer(model=tiny_gpt2(), args=_args(tmp_path / "whole"), train_dataset=RaggedLM(32))
    whole.train()
    out = tmp_path / "jit"
    trainer = Trainer(model=tiny_gpt2(), args=_args(out, enable_jit_checkpoint=True, preemption_signals=signals),
                      train_dataset=RaggedLM(32), callbacks=[SignalAt(3)])
    result = trainer.train()
    assert result.global_step == trainer.state.global_step == 3
    assert (out / "checkpoint-3" / COMMIT_MARKER).is_file() and not (out / "checkpoint-4").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers given back
    _assert_auto_resume_ends_as(whole, out)


def _script(out: Path, signals: str, grace: str = "30") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent), SIGNALS=signals, GRACE=grace)
    return subprocess.run([sys.executable, str(SCRIPTS / "preemption_job.py"), str(out)], env=env,
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("case", ["second-signal", "grace-over"])
def test_a_second_signal_or_the_grace_period_exits_at_once_keeping_the_last_checkpoint(tmp_path, case):
    # SIGTERM in step 3's on_step_end, then the process sleeps there as a hung step would: a second SIGTERM
    # 1.5 s later ends it; or the copy sent at once (the launcher's duplicate) is ignored and the 1 s grace
    # period ends it
    proc = _script(tmp_path / "run", "3:1.5", grace="30") if case == "second-signal" else \
        _script(tmp_path / "run", "3:0", grace="1")
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    expected = "second SIGTERM: exiting now" if case == "second-signal" else "grace period (1 s) is over"
    assert expected in proc.stderr
    committed = sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*") if (p / COMMIT_MARKER).is_file())
    assert committed == ["checkpoint-2"]  # the save before the signal, intact
    assert resolve_resume_target("auto", tmp_path / "run") == tmp_path / "run" / "checkpoint-2"


def _one_rank_signalled_job(rank: int, out: str) -> None:
    trainer = Trainer(model=tiny_gpt2(), args=_args(Path(out), strategy="ddp", ddp_timeout=60),
                      train_dataset=RaggedLM(32), callbacks=[SignalAt(3, when=lambda: rank == 1)])
    try:
        trainer.train()
        outcome = {"stopped": None}
    except Preempted as exc:
        outcome = {"stopped": exc.step}
    Path(out, f"rank{rank}.json").write_text(json.dumps(outcome))


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    run_ranks(_one_rank_signalled_job, str(out), timeout=200)
    stops = [json.loads((out / f"rank{r}.json").read_text())["stopped"] for r in (0, 1)]
    assert stops[0] == stops[1] == 4  # rank 1's request is agreed one step later, on both ranks
    assert (out / "checkpoint-4" / COMMIT_MARKER).is_file()


def _torchrun(out: Path, extra_env: dict, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1", "NPROC": "2",
           "PYTHON": sys.executable, **extra_env}
    cmd = ["bash", str(ROOT / "launch" / "torchrun.sh"), "tiny-test", "--output_dir", str(out), "--max_steps",
           "120", "--save_steps", "40", "--eval_strategy", "no", "--logging_steps", "20", "--optim", "adamw_torch",
           *overrides]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _workers(launcher: subprocess.Popen) -> list:
    import psutil

    return [p for p in psutil.Process(launcher.pid).children(recursive=True) if "scaletrain" in " ".join(p.cmdline())
            and "torch.distributed.run" not in " ".join(p.cmdline())]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def _final(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2"])
def test_torchrun_restarts_a_killed_worker_and_the_run_ends_bit_identical(tmp_path, strategy):
    whole = _torchrun(tmp_path / "whole", {}, "--strategy", strategy)
    assert whole.wait(timeout=300) == 0, whole.communicate()[1][-3000:]
    run = _torchrun(tmp_path / "killed", {"MAX_RESTARTS": "1"}, "--strategy", strategy)
    _wait_for(tmp_path / "killed" / "checkpoint-40" / COMMIT_MARKER, run)
    _workers(run)[-1].kill()  # SIGKILL: no handler, no save, as a node failure would end it
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr[-3000:]
    assert "resumed from" in stderr and "checkpoint-40" in stderr  # the restarted workers continued
    reference = _final(tmp_path / "whole")
    for name, value in _final(tmp_path / "killed").items():
        assert torch.equal(value, reference[name]), name


def test_sigterm_to_every_rank_under_torchrun_exits_75_and_auto_continues_bit_identical(tmp_path):
    run = _torchrun(tmp_path / "run", {})
    _wait_for(tmp_path / "run" / "checkpoint-40" / COMMIT_MARKER, run)
    for worker in _workers(run):  # SLURM signals every process of the step
        worker.send_signal(signal.SIGTERM)
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode != 0 and f"exit code {PREEMPTED_EXIT_CODE}" in stderr, stderr[-3000:]
    stopped = max(int(p.name.split("-")[1]) for p in (tmp_path / "run").glob("checkpoint-*")
                  if (p / COMMIT_MARKER).is_file())
    assert 40 < stopped < 120  # the step reached, not the last periodic save
    again = _torchrun(tmp_path / "run", {}, "--resume_from_checkpoint", "auto")
    assert again.wait(timeout=300) == 0, again.communicate()[1][-3000:]
    whole = _torchrun(tmp_path / "whole", {})
    assert whole.wait(timeout=300) == 0
    reference = _final(tmp_path / "whole")
    for name, value in _final(tmp_path / "run").items():
        assert torch.equal(value, reference[name]), name


def test_a_full_disk_during_a_save_is_a_clear_error_that_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    from scaletrain.checkpoint import manager

    write, calls = manager._write_state, []

    def full_disk_at_the_second_save(path, state):
        calls.append(path.parent.name)
        if path.parent.name == "checkpoint-4.tmp":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return write(path, state)

    monkeypatch.setattr(manager, "_write_state", full_disk_at_the_second_save)
    out = tmp_path / "run"
    trainer = Trainer(model=tiny_gpt2(), args=_args(out, save_total_limit=1), train_dataset=RaggedLM(32))
    with pytest.raises(CheckpointError, match=r"saving checkpoint-4 failed: the disk under .* is full .*"
                                              r"checkpoint-2 stays the newest committed one"):
        trainer.train()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]
    monkeypatch.setattr(manager, "_write_state", write)  # space freed: the run continues from checkpoint-2
    again = Trainer(model=tiny_gpt2(), args=_args(out, save_total_limit=1), train_dataset=RaggedLM(32))
    again.train(resume_from_checkpoint="auto")
    whole = Trainer(model=tiny_gpt2(), args=_args(tmp_path / "whole"), train_dataset=RaggedLM(32))
    whole.train()
    for name, value in _weights(whole).items():
        assert torch.equal(_weights(again)[name], value), name


class NaNLossAt(Trainer):
    """The loss of optimizer step `nan_step` (1-based) is NaN on `ranks`: its gradients are NaN too."""

    nan_step, ranks = 3, (0,)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.state.global_step + 1 == self.nan_step and self.strategy.rank in self.ranks and model.training:
            loss = loss * float("nan")
        return loss


@pytest.mark.parametrize("logging_steps", [1, 10])
def test_a_nan_loss_stops_the_run_without_saving_the_poisoned_state(tmp_path, logging_steps):
    from scaletrain.errors import NonFiniteLossError

    out = tmp_path / "run"
    trainer = NaNLossAt(model=tiny_gpt2(), args=_args(out, logging_steps=logging_steps), train_dataset=RaggedLM(32))
    # found at the step's log (logging_steps=1), else at the next save (step 4), before anything is written
    # (by then step 4 too was NaN: it started from step 3's NaN weights)
    step, bad = (3, 1) if logging_steps == 1 else (4, 2)
    with pytest.raises(NonFiniteLossError, match=rf"NaN or inf in {bad} rank-step\(s\) up to step {step}.*"
                                                 r"checkpoint-2 holds the last good state"):
        trainer.train()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]


def test_skip_leaves_a_nan_step_out_and_continue_trains_on_as_hf_does(tmp_path):
    skipped = NaNLossAt(model=tiny_gpt2(), args=_args(tmp_path / "skip", nonfinite_loss="skip"),
                        train_dataset=RaggedLM(32))
    skipped.train()
    assert all(torch.isfinite(v).all() for v in _weights(skipped).values())
    assert [e["skipped_steps"] for e in skipped.state.log_history if "skipped_steps" in e][-1] == 1
    assert skipped.state.global_step == 8
    continued = NaNLossAt(model=tiny_gpt2(), args=_args(tmp_path / "continue", nonfinite_loss="continue"),
                          train_dataset=RaggedLM(32))
    continued.train()
    assert not all(torch.isfinite(v).all() for v in _weights(continued).values())  # what HF would train on


def _nan_on_one_rank_job(rank: int, out: str, policy: str) -> None:
    from scaletrain.errors import NonFiniteLossError

    class OnRankOne(NaNLossAt):
        ranks = (1,)

    trainer = OnRankOne(model=tiny_gpt2(), args=_args(Path(out) / policy, strategy="ddp", nonfinite_loss=policy,
                                                      ddp_timeout=60), train_dataset=RaggedLM(32))
    try:
        trainer.train()
        outcome = {"finished": trainer.state.global_step,
                   "finite": all(bool(torch.isfinite(v).all()) for v in _weights(trainer).values())}
    except NonFiniteLossError:
        outcome = {"stopped": trainer.state.global_step}
    Path(out, f"{policy}-rank{rank}.json").write_text(json.dumps(outcome))


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_nan_loss_on_one_rank_is_acted_on_by_every_rank(tmp_path, policy):
    run_ranks(_nan_on_one_rank_job, str(tmp_path), policy, timeout=200)
    outcomes = [json.loads((tmp_path / f"{policy}-rank{r}.json").read_text()) for r in (0, 1)]
    expected = {"stopped": 3} if policy == "stop" else {"finished": 8, "finite": True}
    assert outcomes == [expected, expected]


class DieAt(TrainerCallback):
    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3 and self.rank == 1:
            os._exit(1)  # a crash: no cleanup, no message to the peer


def _dead_peer_job(rank: int, out: str) -> None:
    start = time.monotonic()
    trainer = Trainer(model=tiny_gpt2(), args=_args(Path(out) / "run", strategy="ddp", ddp_timeout=20),
                      train_dataset=RaggedLM(32), callbacks=[DieAt(rank)])
    try:
        trainer.train()
        outcome = "finished"
    except Exception as exc:  # noqa: BLE001 - the outcome is what the test reads
        outcome = type(exc).__name__
    Path(out, f"rank{rank}.json").write_text(json.dumps({"outcome": outcome, "s": time.monotonic() - start}))


def test_a_dead_peer_makes_the_other_rank_fail_within_the_collective_timeout(tmp_path):
    import torch.multiprocessing as mp

    from helpers import _entry, free_port

    ctx = mp.start_processes(_entry, args=(_dead_peer_job, 2, free_port(), (str(tmp_path),)), nprocs=2, join=False,
                             start_method="spawn")
    for process in ctx.processes:
        process.join(timeout=120)
    assert not any(p.is_alive() for p in ctx.processes), "a rank hung"
    survivor = json.loads((tmp_path / "rank0.json").read_text())
    assert survivor["outcome"] != "finished" and survivor["s"] < 20 + 30, survivor  # ddp_timeout, not 30 min
    assert ctx.processes[1].exitcode == 1
