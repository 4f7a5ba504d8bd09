"""Going back to an older checkpoint: the new branch never mixes with (or loses) the old one;
checkpoints named by path; no non-finite state is ever saved."""

import dataclasses
import os

import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.cli import main
from sdjax.checkpoints import read_meta as checkpoint_meta
from tests.conftest import DEMO_DATA
from tests.helpers import error_line, unet_weights


def _args(out, steps, *extra):
    return ["--pretrained_model_name_or_path=tiny", f"--train_data_dir={DEMO_DATA}",
            "--resolution=64", "--center_crop", "--train_batch_size=1", "--use_ema",
            "--learning_rate=1e-3", "--checkpointing_steps=2", "--logging_steps=1",
            f"--max_train_steps={steps}", "--seed=3", f"--output_dir={out}", *extra]


def _steps(folder):
    return sorted(int(n.split("_")[1]) for n in os.listdir(folder) if n.startswith("checkpoint_"))


def _lr(checkpoint):
    return checkpoint_meta(str(checkpoint))["config"]["learning_rate"]


class _StopAt:
    """Stands in for the SIGTERM handler: asks the loop to stop at one step."""

    def __init__(self, step):
        self.step = step

    def __call__(self):
        outer = self

        class Preemption:
            def should_stop(self, step):
                return step == outer.step

            def close(self):
                pass

        return Preemption()


@pytest.mark.slow
def test_branch_from_an_older_checkpoint(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    assert main(_args(run, 6)) == 0
    assert _steps(ckpts) == [2, 4, 6]
    capsys.readouterr()

    # Back to step 2 with another learning rate; a SIGTERM at step 4, a step the old branch
    # has, saves the new branch's step 4 (Orbax alone would refuse every step up to 6).
    import sdjax.train.loop as loop

    with monkeypatch.context() as patch:
        patch.setattr(loop, "Preemption", _StopAt(4))
        assert main(_args(run, 10, "--resume_from_checkpoint", "checkpoint_2",
                          "--learning_rate=2e-3", "--checkpointing_steps=100")) == 0
    out = capsys.readouterr().out
    assert "training steps 2 -> 10" in out and "stopped by SIGTERM at step 4" in out
    aside = run / "abandoned_checkpoints"
    (branch,) = os.listdir(aside)
    assert branch.startswith("after_step_2_")
    moved = [line for line in out.splitlines() if "were moved to" in line]
    assert len(moved) == 1 and "checkpoint_4, checkpoint_6" in moved[0] and str(aside) in moved[0]
    assert _steps(ckpts) == [2, 4] and _steps(aside / branch) == [4, 6]
    assert _lr(ckpts / "checkpoint_4") == 2e-3  # the new branch's step 4 ...
    assert _lr(aside / branch / "checkpoint_4") == 1e-3  # ... and the old one's, kept whole
    assert _lr(aside / branch / "checkpoint_6") == 1e-3

    # `latest` is the newest checkpoint of the branch being trained (4, not the old 6).
    assert main(_args(run, 5, "--resume_from_checkpoint", "latest", "--learning_rate=2e-3",
                      "--checkpointing_steps=100")) == 0
    assert "training steps 4 -> 5" in capsys.readouterr().out

    # Seed 000's checkpoint-to-model command trains nothing and moves nothing.
    before = sorted(os.listdir(aside)), _steps(ckpts)
    assert main(_args(run, 4, "--resume_from_checkpoint", "checkpoint-4")) == 0
    assert (sorted(os.listdir(aside)), _steps(ckpts)) == before
    assert "moved" not in capsys.readouterr().out
    assert main(["export", "--checkpoint", str(ckpts / "checkpoint_4"), "--output",
                 str(tmp_path / "exported")]) == 0
    exported, final = unet_weights(str(tmp_path / "exported")), unet_weights(str(run))
    for key in exported:
        np.testing.assert_array_equal(exported[key], final[key])

    # A checkpoint of another run, named by its path, is that run's checkpoint.
    other = tmp_path / "other"
    assert main(_args(other, 4, "--resume_from_checkpoint", str(aside / branch / "checkpoint_6"),
                      "--max_train_steps=6")) == 0
    assert main(["export", "--checkpoint", str(aside / branch / "checkpoint_6"), "--output",
                 str(tmp_path / "old6")]) == 0
    old6, resumed = unet_weights(str(tmp_path / "old6")), unet_weights(str(other))
    for key in old6:
        np.testing.assert_array_equal(old6[key], resumed[key])
    assert not os.path.exists(other / "checkpoints") or _steps(other / "checkpoints") == []

    # A divergence right after going back names the checkpoint the branch started from.
    capsys.readouterr()
    nan = [a for a in _args(run, 8, "--resume_from_checkpoint", "checkpoint-2",
                            "--max_grad_norm=0") if not a.startswith("--learning_rate")]
    assert main(nan + ["--learning_rate=1e30"]) == 2
    err = error_line(capsys.readouterr().err)
    assert "at step" in err and err.endswith(f"last good checkpoint is {ckpts / 'checkpoint_2'}")
    assert _steps(ckpts) == [2, 4]


def test_checkpoint_names_and_paths(tmp_path, capsys):
    from sdjax.errors import ConfigError
    from sdjax.checkpoints import CheckpointRef, parse_ref

    assert parse_ref("latest") == CheckpointRef(None)
    for name in ("500", "checkpoint-500", "checkpoint_500"):
        assert parse_ref(name) == CheckpointRef(500), name
    assert parse_ref("/runs/a/checkpoints/checkpoint_500/") == CheckpointRef(500, "/runs/a/checkpoints")
    assert parse_ref("gs://bucket/a/checkpoints/checkpoint_7") == CheckpointRef(
        7, "gs://bucket/a/checkpoints")
    with pytest.raises(ConfigError, match="not a checkpoint folder"):
        parse_ref("/runs/a/checkpoints")
    missing = tmp_path / "nowhere" / "checkpoints" / "checkpoint_5"
    code = main(_args(tmp_path / "o", 2, "--resume_from_checkpoint", str(missing)))
    assert code == 2
    assert f"{missing} does not exist" in error_line(capsys.readouterr().err)


def test_non_finite_weights_are_never_saved():
    from sdjax.train.guard import TrainingStopped, check_finite as _check_finite
    from sdjax.train.state import TrainState

    class Checkpoints:
        def last_good(self):
            return "/run/checkpoints/checkpoint_2"

    good = TrainState(step=jnp.int32(3), params={"w": jnp.ones(3)}, opt_state=(),
                      ema={"w": jnp.ones(3)})
    finite = {"loss": 0.1, "grad_norm": 2.0, "lr": 1e-4}
    _check_finite(finite, good, 3, True, Checkpoints())
    # A finite loss and gradient norm, but the update overflowed the weights (or the EMA).
    for bad in (dataclasses.replace(good, params={"w": jnp.array([1.0, jnp.inf, 1.0])}),
                dataclasses.replace(good, ema={"w": jnp.array([jnp.nan, 1.0, 1.0])})):
        with pytest.raises(TrainingStopped, match="weights are not finite at step 3.*checkpoint_2"):
            _check_finite(finite, bad, 3, True, Checkpoints())
        _check_finite(finite, bad, 3, False, Checkpoints())  # checked before saves only
    with pytest.raises(TrainingStopped, match="grad_norm is inf at step 3"):
        _check_finite(dict(finite, grad_norm=float("inf")), good, 3, False, Checkpoints())
