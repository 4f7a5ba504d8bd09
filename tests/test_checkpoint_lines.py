"""`checkpoints/` holds one line of training, and nothing of the user's is deleted or mixed:
resuming another folder's checkpoint starts a new line (the old one moves aside whole),
--checkpoints_total_limit only deletes the line's own checkpoints, branches get folders of their
own, a failed move stops every host, a missing checkpoint leaves nothing on disk, and LoRA runs
touch only the checkpoint-N folders they wrote.

RunCheckpoints is driven directly with a tiny state (what the trainer hands it), so each case
costs Orbax's I/O, not a training run."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from sdjax.checkpoints import read_meta
from sdjax.cli import main
from sdjax.errors import SdjaxError
from sdjax.train import run_checkpoints as checkpoint_module
from sdjax.train.run_checkpoints import ABANDONED, RunCheckpoints
from tests.conftest import DEMO_DATA
from tests.helpers import free_port, host_env, run_cli
from tests.tiny_torch import REPO

LAYOUT = {"version": 2, "trained": ["unet"], "ema": False}


def _state(value):
    return {"w": jnp.full((3,), float(value), jnp.float32)}


def _run(out, steps, line, limit=None, resume=None, companions=None):
    """A run of line `line` that resumes from `resume` (or starts afresh) and saves `steps`."""
    checkpoints = RunCheckpoints(str(out), limit, True)
    if companions is not None:
        checkpoints.companions = companions
    if resume is not None:
        assert checkpoints.resume(str(resume), _state(0), LAYOUT) is not None
    for step in steps:
        checkpoints.save(step, _state(step), {"state_layout": LAYOUT, "config": {}, "line": line})
    checkpoints.wait()
    checkpoints.close()
    return checkpoints


def _steps(folder):
    return sorted(int(n.split("_")[1]) for n in os.listdir(folder) if n.startswith("checkpoint_"))


def _lines(folder):
    return {s: read_meta(str(folder / f"checkpoint_{s}"))["line"] for s in _steps(folder)}


def _aside(out):
    return sorted(os.listdir(out / ABANDONED)) if (out / ABANDONED).exists() else []


def test_another_folders_checkpoint_starts_a_new_line(tmp_path, capsys):
    """The issue's case: run A saved 1..5 in out/, run B 1..3 in other/; resuming B's step 2
    into out/ with a limit of 3 mixed A's steps with B's and deleted A's oldest. Now A's line
    moves aside whole and the limit only counts B's line."""
    out, other = tmp_path / "out", tmp_path / "other"
    _run(out, [1, 2, 3, 4, 5], "A")
    _run(other, [1, 2, 3], "B")
    capsys.readouterr()
    _run(out, [3, 4, 5], "B'", limit=3, resume=other / "checkpoints" / "checkpoint_2")
    printed = capsys.readouterr().out
    assert _lines(out / "checkpoints") == {3: "B'", 4: "B'", 5: "B'"}
    (folder,) = _aside(out)
    assert folder.startswith("before_new_line_")
    assert _lines(out / ABANDONED / folder) == {s: "A" for s in (1, 2, 3, 4, 5)}
    moved = [line for line in printed.splitlines() if "were moved to" in line]
    assert len(moved) == 1 and "another folder's checkpoint" in moved[0]
    assert str(other / "checkpoints" / "checkpoint_2") in moved[0]
    assert _lines(other / "checkpoints") == {1: "B", 2: "B", 3: "B"}  # the source untouched

    # A checkpoint under abandoned_checkpoints/ is another folder's too: back to A's step 4.
    _run(out, [5, 6], "A'", resume=out / ABANDONED / folder / "checkpoint_4")
    assert _lines(out / "checkpoints") == {5: "A'", 6: "A'"}
    assert len(_aside(out)) == 2  # B's line moved aside in a folder of its own
    assert sum(len(_steps(out / ABANDONED / f)) for f in _aside(out)) == 5 + 3


def test_limit_deletes_only_the_lines_own_checkpoints(tmp_path):
    """A fresh run into a folder with checkpoints is a new line too; the limit then deletes
    that line's old steps and nothing else."""
    out = tmp_path / "out"
    _run(out, [10, 20], "old")
    _run(out, [1, 2, 3, 4], "new", limit=2)
    assert _lines(out / "checkpoints") == {3: "new", 4: "new"}
    (folder,) = _aside(out)
    assert _lines(out / ABANDONED / folder) == {10: "old", 20: "old"}


def test_two_branches_from_one_step_in_the_same_second(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(checkpoint_module.time, "strftime", lambda fmt: "20261207-120000")
    _run(out, [1, 2, 3], "A")
    _run(out, [2, 3], "B", resume="checkpoint_1")
    _run(out, [2, 3], "C", resume="checkpoint-1")
    assert _aside(out) == ["after_step_1_20261207-120000", "after_step_1_20261207-120000-2"]
    assert [_lines(out / ABANDONED / f) for f in _aside(out)] == [{2: "A", 3: "A"},
                                                                  {2: "B", 3: "B"}]
    assert _lines(out / "checkpoints") == {1: "A", 2: "C", 3: "C"}


def test_a_failed_move_aside_stops_the_run_and_moves_nothing_else(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _run(out, [1, 2], "A")

    def refuse(source, destination):
        raise OSError("403 Forbidden")

    monkeypatch.setattr(checkpoint_module.storage, "move", refuse)
    with pytest.raises(SdjaxError, match="^OSError: 403 Forbidden$"):
        _run(out, [1], "B")
    assert _lines(out / "checkpoints") == {1: "A", 2: "A"}


@pytest.mark.hosts
def test_a_failed_move_aside_stops_every_host_with_host_0s_message(tmp_path):
    """Host 0's move fails (a bucket error); host 1, which waited for it, stops at once with
    the same message instead of waiting at the next barrier for JAX's timeout."""
    out = tmp_path / "out"
    _run(out, [1, 2], "A")
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "tests.multihost_move_aside", str(out),
                               f"localhost:{port}", str(i)], cwd=REPO, env=host_env(1),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        outputs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 3, stderr[-2000:]
        assert ("SdjaxError: OSError: 403 Forbidden: cannot move checkpoint_1 (on host 0, during "
                "moving checkpoints aside)") in stdout, stdout
        assert float(stdout.split("stopped after ")[1].split(" s")[0]) < 60
    assert _lines(out / "checkpoints") == {1: "A", 2: "A"}


def test_a_missing_checkpoint_leaves_nothing_on_disk(tmp_path, capsys):
    out = tmp_path / "new-run"
    args = ["--pretrained_model_name_or_path=tiny", f"--train_data_dir={DEMO_DATA}",
            "--resolution=64", "--train_batch_size=1", "--max_train_steps=2",
            f"--output_dir={out}"]
    assert main(args + ["--resume_from_checkpoint", "checkpoint-777"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "checkpoint checkpoint-777 does not exist" in err
    assert not out.exists()
    assert main(args + ["--resume_from_checkpoint", str(tmp_path / "x" / "checkpoint_5")]) == 2
    assert "does not exist" in capsys.readouterr().err and not out.exists()
    # An existing run: the error names its complete checkpoints, and nothing is added.
    _run(out, [1], "A")
    before = sorted(os.listdir(out))
    assert main(args + ["--resume_from_checkpoint", "checkpoint-777"]) == 2
    assert "(complete checkpoints: 1)" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == before


# --- LoRA runs: the checkpoint-N folders (diffusers' names) --------------------------------

def _lora_folder(out, step, ours, files=("pytorch_lora_weights.safetensors",)):
    from sdjax.lora.training import MARKER

    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    for name in files:
        (folder / name).write_bytes(b"weights")
    if ours:
        (folder / MARKER).write_text(json.dumps({"files": list(files)}))
    return folder


def _lora_output(out):
    from types import SimpleNamespace

    from sdjax.lora.training import LoraOutput

    cfg = SimpleNamespace(output_dir=str(out), save_lora_format="diffusers", use_ema=False)
    return LoraOutput(cfg, {}, {}, True)


def test_lora_pruning_removes_only_folders_sdjax_wrote(tmp_path):
    out = tmp_path / "out"
    _lora_folder(out, 1, ours=True)
    theirs = _lora_folder(out, 2, ours=False, files=("pytorch_lora_weights.safetensors",
                                                     "optimizer.bin"))
    _lora_output(out)._prune({3})
    assert not (out / "checkpoint-1").exists()
    assert sorted(os.listdir(theirs)) == ["optimizer.bin", "pytorch_lora_weights.safetensors"]


def test_a_branch_moves_its_lora_folders_aside_with_its_checkpoints(tmp_path):
    out = tmp_path / "out"
    _run(out, [1, 2, 3], "A")
    for step in (1, 2, 3):
        _lora_folder(out, step, ours=True)
    _run(out, [2], "B", resume="checkpoint_1", companions=_lora_output(out).own_folders)
    (folder,) = _aside(out)
    assert sorted(os.listdir(out / ABANDONED / folder)) == [
        "checkpoint-2", "checkpoint-3", "checkpoint_2", "checkpoint_3"]
    assert (out / "checkpoint-1").is_dir() and not (out / "checkpoint-3").exists()


@pytest.mark.parametrize("theirs", ["checkpoint-500", "pytorch_lora_weights.safetensors"])
def test_a_lora_run_refuses_another_tools_files_before_compiling(theirs, tmp_path, sd1_dir):
    """diffusers' LoRA scripts write the same names (checkpoint-N/ with optimizer state, the
    final LoRA file): a run into that --output_dir stops at start-up, one line, and writes
    nothing."""
    out = tmp_path / "out"
    if theirs.startswith("checkpoint-"):
        _lora_folder(out, 500, ours=False, files=("optimizer.bin", "random_states_0.pkl"))
    else:
        out.mkdir()
        (out / theirs).write_bytes(b"a diffusers LoRA")
    before = {p: os.path.getmtime(os.path.join(d, p)) for d, _, files in os.walk(out)
              for p in files}
    code, stdout, stderr = run_cli([
        "text_to_image_lora", f"--pretrained_model_name_or_path={sd1_dir}",
        f"--train_data_dir={DEMO_DATA}", f"--output_dir={out}", "--resolution=32",
        "--train_batch_size=1", "--max_train_steps=1"])
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert f"holds {theirs}, not written by sdjax" in stderr and "another --output_dir" in stderr
    assert "compiled" not in stdout
    after = {p: os.path.getmtime(os.path.join(d, p)) for d, _, files in os.walk(out)
             for p in files}
    assert after == before and not (out / "checkpoints").exists()
