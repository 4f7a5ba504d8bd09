"""The sharded train state (--fsdp, --sharding): on 4 CPU devices, training with the state split
over the "fsdp" axis (ZeRO-3: weights, moments, EMA and frozen weights; ZeRO-1: moments and EMA)
gives the weights replicated training gives, and a checkpoint saved with one layout resumes
under another (ZeRO-3 fsdp 4 -> ZeRO-1 fsdp 2 -> replicated), Orbax restoring into the new
shardings.

Runs: the tiny model at 32 px with EMA, 2 steps, a checkpoint at each; each layout is its own
compiled program (about 30 s each on 2 cores).
"""

import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file

from sdjax.parallel import fsdp_sharding, make_mesh
from tests.conftest import DEMO_DATA
from tests.helpers import run_cli


def flags(model, out, *extra):
    return ["text_to_image", f"--pretrained_model_name_or_path={model}",
            f"--train_data_dir={DEMO_DATA}", f"--output_dir={out}", "--resolution=32",
            "--train_batch_size=1", "--max_train_steps=2", "--checkpointing_steps=1",
            "--learning_rate=1e-3", "--lr_warmup_steps=0", "--use_ema", "--seed=5", *extra]


def run(model, out, *extra):
    code, stdout, stderr = run_cli(flags(model, out, *extra))
    assert code == 0, stderr
    return stdout


def unet(folder):
    return load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))


def assert_close(a, b, base):
    assert a.keys() == b.keys()
    moved = max(float(np.abs(a[k] - base[k]).max()) for k in a)
    assert moved > 1e-3  # two Adam steps at lr 1e-3: equality below is meaningful
    # Float tolerance: the sharded program sums gradients in another order. Adam divides by
    # sqrt(v) + 1e-8, so where a gradient is about 1e-8 that order shows in the update: a few
    # weights in 10^4 differ by up to ~10% of one step (8e-5 seen with XLA:CPU at -O0; bounds as
    # in the two-host test); all the others agree to 1e-5. A wrong gather or split would move most
    # weights by a whole step (1e-3).
    diff = np.concatenate([np.abs(a[k] - b[k]).ravel() for k in a])
    assert diff.max() < 2e-4, diff.max()
    assert np.mean(diff > 1e-5) < 1e-4, np.mean(diff > 1e-5)


@pytest.fixture(scope="module")
def replicated_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("replicated") / "out"
    stdout = run(tiny_dir, out)
    assert "state replicated" in stdout and "compiled the train step" in stdout
    return str(out)


def test_fsdp_sharding_splits_the_largest_divisible_axis():
    mesh = make_mesh(4)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4}
    assert fsdp_sharding(mesh, (3, 3, 32, 64)).spec == P(None, None, None, "fsdp")
    assert fsdp_sharding(mesh, (320, 6)).spec == P("fsdp", None)
    assert fsdp_sharding(mesh, (6,)).spec == P()  # nothing divisible: replicated
    assert fsdp_sharding(make_mesh(1), (64, 64)).spec == P()


def test_to_replicated_places_a_tree_and_keeps_what_is_already_replicated():
    """Sampling's placement: split leaves come back whole on every device, in their places in
    the tree; replicated ones are passed through untouched."""
    from sdjax.parallel import replicate, to_replicated

    mesh = make_mesh(4)
    values = np.arange(32.0).reshape(8, 4)
    split = jax.device_put(values, fsdp_sharding(mesh, values.shape))
    assert not split.sharding.is_fully_replicated
    whole = replicate(np.ones(3), mesh)
    out = to_replicated({"a": split, "b": [whole, split * 2]}, mesh)
    assert out["b"][0] is whole
    for got, want in ((out["a"], values), (out["b"][1], 2 * values)):
        assert got.sharding.is_fully_replicated
        np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.slow
def test_checkpoint_resumes_under_another_layout(replicated_run, tiny_dir, tmp_path):
    """Saved with fsdp 4 (ZeRO-3) at step 1, resumed as ZeRO-1 over fsdp 2, and that step-1
    checkpoint resumed replicated: both end where the replicated run ends. (A wrong ZeRO-3 step
    or ZeRO-1 step would show as well as a wrong restore; ZeRO-1 over all 4 devices trains in
    the layout-choice test below.)"""
    import shutil

    first = tmp_path / "fsdp4"
    assert "state zero3 over fsdp groups of 4" in run(tiny_dir, first, "--fsdp=4",
                                                      "--max_train_steps=1")
    second = tmp_path / "fsdp2"
    shutil.copytree(first / "checkpoints", second / "checkpoints")
    stdout = run(tiny_dir, second, "--fsdp=2", "--sharding=zero1", "--resume_from_checkpoint=latest")
    assert "state zero1 over fsdp groups of 2" in stdout and "training steps 1 -> 2" in stdout
    assert_close(unet(second), unet(replicated_run), unet(tiny_dir))
    third = tmp_path / "replicated"
    shutil.copytree(first / "checkpoints", third / "checkpoints")
    run(tiny_dir, third, "--resume_from_checkpoint=latest")
    assert_close(unet(third), unet(replicated_run), unet(tiny_dir))


@pytest.mark.parametrize("flags, message", [
    (["--fsdp=3"], "--fsdp 3 does not divide the 4 devices"),
    (["--sharding=zero2"], "--sharding='zero2': choose one of replicated, zero1, zero3"),
    (["--sharding=replicated", "--fsdp=2"], "--sharding replicated keeps everything"),
])
def test_bad_sharding_flags(flags, message, tiny_dir, tmp_path):
    code, _, stderr = run_cli(["text_to_image", f"--pretrained_model_name_or_path={tiny_dir}",
                               f"--train_data_dir={DEMO_DATA}", f"--output_dir={tmp_path}/o",
                               *flags])
    assert code == 2 and message in stderr, stderr
    assert jax.device_count() == 4


@pytest.mark.slow
def test_the_run_chooses_the_layout_that_fits(replicated_run, tiny_dir, tmp_path, monkeypatch):
    """No --fsdp/--sharding on devices that report their memory: the step is compiled
    replicated, then ZeRO-1 over the host's devices, ...; the first that fits trains, the
    summary says why, and the step loop runs the executable the check compiled. With memory
    for none: one line, before anything is written."""
    from sdjax.config import parse_train_args
    from sdjax.pipeline import StableDiffusion
    from sdjax.train import fit

    cfg, _ = parse_train_args(flags(tiny_dir, tmp_path / "x")[1:], task="text_to_image")
    sd = StableDiffusion.from_config(str(tiny_dir), init_params=False)
    facts = fit.StepFacts(max_steps=2, cached_latents=False, text_embeddings=False)
    peak = {s: fit.compile_step(cfg, sd, make_mesh(f), s, facts)["per_device_bytes"]["peak"]
            for s, f in (("replicated", 1), ("zero1", 4))}
    assert peak["zero1"] < peak["replicated"]  # moments and EMA split 4 ways
    limit = (peak["zero1"] + peak["replicated"]) // 2
    monkeypatch.setattr(fit, "device_memory", lambda device: limit)
    out = tmp_path / "out"
    stdout = run(tiny_dir, out)
    assert "state zero1 over fsdp groups of 4 (chosen for " in stdout
    assert f"replicated {peak['replicated'] / 2**30:.2f} GiB" in stdout
    assert "compiled the train step" not in stdout  # the check's executable was reused
    assert_close(unet(out), unet(replicated_run), unet(tiny_dir))

    monkeypatch.setattr(fit, "device_memory", lambda device: 1024)
    code, _, stderr = run_cli(flags(tiny_dir, tmp_path / "none"))
    assert code == 2 and "does not fit" in stderr and "with any layout" in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "none" / "checkpoints").exists()
