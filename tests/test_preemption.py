"""Processes that die: SIGKILL in the middle of a checkpoint save, SIGTERM (TPU preemption)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import DEMO_DATA, xla_flags
from tests.tiny_torch import REPO


def _args(out, steps, *extra):
    return [sys.executable, os.path.join(REPO, "train_flax.py"),
            "--pretrained_model_name_or_path=tiny", f"--train_data_dir={DEMO_DATA}",
            "--resolution=64", "--train_batch_size=1", "--use_ema", "--learning_rate=1e-4",
            "--checkpointing_steps=1", "--logging_steps=1", f"--max_train_steps={steps}",
            f"--output_dir={out}", *extra]


def _env():
    return dict(os.environ, XLA_FLAGS=xla_flags(1))


def _complete_steps(folder):
    if not os.path.isdir(folder):
        return []
    return sorted(int(n.split("_")[1]) for n in os.listdir(folder)
                  if n.startswith("checkpoint_") and n.split("_")[1].isdigit())


def _partial(folder):
    return [n for n in os.listdir(folder) if "tmp" in n] if os.path.isdir(folder) else []


@pytest.mark.slow
def test_sigkill_during_save_then_resume_latest(tmp_path):
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    proc = subprocess.Popen(_args(out, 10_000), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        # Wait until a save is in flight (Orbax writes under a temporary name), then kill.
        while time.time() < deadline and proc.poll() is None:
            if _partial(ckpts) and len(_complete_steps(ckpts)) >= 2:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-2000:]
    leftover = _partial(ckpts)
    complete = _complete_steps(ckpts)
    assert complete, "no checkpoint was completed before the kill"
    assert leftover, "the kill did not land in the middle of a save"

    last = max(complete)
    result = subprocess.run(_args(out, last + 2, "--resume_from_checkpoint", "latest"), env=_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"training steps {last} -> {last + 2}" in result.stdout
    assert (out / "model_index.json").exists()
    assert not _partial(ckpts)  # the half-written save was cleaned up, nothing else touched
    assert max(_complete_steps(ckpts)) == last + 2


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    args = _args(out, 10_000, "--checkpointing_steps=100000")
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        seen = ""
        for line in proc.stdout:  # wait until the steps run
            seen += line
            if line.startswith("compiled the train step"):
                break
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
        stdout = seen + stdout
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert "stopped by SIGTERM at step" in stdout
    step = int(stdout.split("stopped by SIGTERM at step ")[1].split(":")[0])
    assert _complete_steps(out / "checkpoints") == [step]
    assert not (out / "model_index.json").exists()  # no export of an unfinished run

    result = subprocess.run(_args(out, step + 1, "--resume_from_checkpoint", "latest"), env=_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"training steps {step} -> {step + 1}" in result.stdout
