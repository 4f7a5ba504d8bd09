"""The step and the loop: accumulation, determinism, exact resume, data sharding, bad input."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from sdjax import StableDiffusion
from sdjax.cli import main
from sdjax.data import Loader, open_dataset
from sdjax.errors import ConfigError
from sdjax.models.vae import normalize_pixels
from sdjax.parallel import PREFETCH_TO_DEVICES, make_mesh, placed_ahead
from sdjax.schedule import NoiseSchedule
from sdjax.train.state import init_state
from sdjax.train.step import LossConfig, make_loss_fn, make_train_step
from tests.conftest import DEMO_DATA
from tests.helpers import error_line, unet_weights


@pytest.fixture(scope="module")
def tiny_sd():
    return StableDiffusion.from_config("tiny", seed=0)


def test_accumulated_micro_batches_equal_one_batch(tiny_sd):
    """k micro-batches of B/k give the same update as one batch of B (SGD, so the gradient's
    scale matters: a missing 1/k would show)."""
    sd = tiny_sd
    schedule = NoiseSchedule.from_config(sd.scheduler_config)
    loss_fn = make_loss_fn(sd.unet, sd.vae, sd.text_encoder, schedule,
                           LossConfig(noise_offset=0.1, input_perturbation=0.1, snr_gamma=5.0))
    tx = optax.sgd(0.5)
    step = jax.jit(make_train_step(loss_fn, lambda numbers: (tx, {"unet": lambda count: 0.5})))
    frozen = {"vae": sd.params["vae"], "text_encoder": sd.params["text_encoder"]}
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (4, 32, 32, 3), np.uint8)
    ids = rng.integers(0, 500, (4, 77)).astype(np.int32)
    state = init_state({"unet": sd.params["unet"]}, tx, use_ema=True)
    results = {}
    for k in (1, 2):
        batch = {"pixel_values": pixels.reshape(k, 4 // k, 32, 32, 3),
                 "input_ids": ids.reshape(k, 4 // k, 77)}
        results[k] = step(state, frozen, batch,
                          {"seed_key": jax.random.key_data(jax.random.key(0))})
    (ref_state, ref_metrics) = results[1]
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(
        jax.tree_util.tree_leaves(ref_state.params), jax.tree_util.tree_leaves(state.params)))
    assert moved > 1e-4  # the step really changed the weights
    for k in (2,):
        new_state, metrics = results[k]
        np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
        np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-4)
        for a, b in zip(jax.tree_util.tree_leaves(new_state.params),
                        jax.tree_util.tree_leaves(ref_state.params)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_pixels_are_normalised_on_the_device_exactly_as_on_the_host():
    """Every uint8 value, under jit, equals the host's old float32 x / 127.5 - 1 bit for bit."""
    values = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    host = values.astype(np.float32) / 127.5 - 1.0
    device = np.asarray(jax.jit(normalize_pixels)(values))
    assert device.dtype == np.float32
    np.testing.assert_array_equal(device, host)
    with pytest.raises(TypeError, match="uint8"):
        normalize_pixels(jnp.asarray(host))


def test_uint8_nhwc_batch_gives_the_loss_of_the_old_float_nchw_batch(tiny_sd, monkeypatch):
    """The step's loss on a uint8 (rows, H, W, 3) batch, normalised on the device and encoded
    channels-last, equals the old path's bit for bit: the loader's float32 (rows, 3, H, W) made
    on the host with x / 127.5 - 1, straight into the VAE's NCHW `encode`. Input perturbation,
    offset noise, min-SNR and prior rows (DreamBooth) included."""
    import sdjax.train.step as step_module

    sd = tiny_sd
    schedule = NoiseSchedule.from_config(sd.scheduler_config)
    config = LossConfig(noise_offset=0.1, input_perturbation=0.1, snr_gamma=5.0)
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (4, 32, 32, 3), np.uint8)
    pixels[0] = np.resize(np.arange(256, dtype=np.uint8), (32, 32, 3))  # every value
    text = {"input_ids": rng.integers(0, 500, (4, 77)).astype(np.int32),
            "prior_mask": np.array([0.0, 1.0, 0.0, 1.0], np.float32)}
    trainable = {"unet": sd.params["unet"]}
    frozen = {"vae": sd.params["vae"], "text_encoder": sd.params["text_encoder"]}
    key = jax.random.key(5)
    new_loss = jax.jit(make_loss_fn(sd.unet, sd.vae, sd.text_encoder, schedule, config))
    new = new_loss(trainable, frozen, dict(text, pixel_values=pixels), key, 0)

    class OldVAE:  # the old step's call: `encode` of the host's NCHW floats
        scaling_factor = sd.vae.scaling_factor

        @staticmethod
        def apply(variables, images, method):
            return sd.vae.apply(variables, images, method="encode")

    monkeypatch.setattr(step_module, "normalize_pixels", lambda images: images)
    old_loss = jax.jit(make_loss_fn(sd.unet, OldVAE, sd.text_encoder, schedule, config))
    old_pixels = pixels.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0  # the old loader
    old = old_loss(trainable, frozen, dict(text, pixel_values=old_pixels), key, 0)
    assert float(new) == float(old)


def test_batches_are_placed_two_ahead_in_order():
    """The step loop's placement: the next two batches are on the devices before a step gets its
    own, in the source's order, split over the devices by rows; a source error surfaces when its
    batch is due; closing closes the source."""
    mesh = make_mesh()
    read, closed = [], []

    def source(fail_at=None):
        try:
            for i in range(6):
                if i == fail_at:
                    raise ConfigError("unreadable")
                read.append(i)
                yield {"x": np.full((2, 4, 3), i, np.uint8)}
        finally:
            closed.append(True)

    batches = placed_ahead(source(), mesh, sample_axis=1)
    first = next(batches)
    assert read == [0, 1, 2] and PREFETCH_TO_DEVICES == 2
    assert isinstance(first["x"], jax.Array) and first["x"].dtype == jnp.uint8
    assert first["x"].sharding.spec == P(None, ("data", "fsdp"))
    assert [int(b["x"][0, 0, 0]) for b in batches] == [1, 2, 3, 4, 5] and closed == [True]

    read.clear()
    batches = placed_ahead(source(fail_at=3), mesh, sample_axis=1)
    assert [int(next(batches)["x"][0, 0, 0]) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ConfigError, match="unreadable"):
        next(batches)

    closed.clear()
    batches = placed_ahead(source(), mesh, sample_axis=1)
    next(batches)
    batches.close()
    assert closed == [True]


def test_hosts_read_disjoint_shares(tiny_sd):
    images = open_dataset(train_data_dir=DEMO_DATA)
    common = dict(global_batch=4, accumulation_steps=1, seed=3, resolution=64, center_crop=True,
                  random_flip=False)
    single = Loader(images, tiny_sd.tokenizer, process_index=0, process_count=1, **common)
    hosts = [Loader(images, tiny_sd.tokenizer, process_index=i, process_count=2, **common)
             for i in range(2)]
    seen = []
    for micro_batch in range(single.batches_per_epoch):
        parts = [h.sample_indices(micro_batch) for h in hosts]
        assert not set(parts[0]) & set(parts[1])
        np.testing.assert_array_equal(np.concatenate(parts), single.sample_indices(micro_batch))
        seen += list(np.concatenate(parts))
    assert sorted(seen) == list(range(12))  # one epoch: every image once (12 = 3 full batches)
    # The next epoch is a different order of the same images.
    assert list(single.sample_indices(3)) != list(single.sample_indices(0))


def _demo_args(out, steps, extra=""):
    return (f"--pretrained_model_name_or_path=tiny --train_data_dir={DEMO_DATA} --resolution=64 "
            "--center_crop --random_flip --train_batch_size=1 --gradient_accumulation_steps=2 "
            f"--use_ema --learning_rate=1e-3 --lr_scheduler=constant --checkpointing_steps=2 "
            f"--max_train_steps={steps} --seed=7 --output_dir={out} {extra}").split()


@pytest.mark.slow
def test_deterministic_and_resume_is_exact(tmp_path, capsys):
    assert main(_demo_args(tmp_path / "a", 4, "--tracker_project_name=minecraft")) == 0
    a = unet_weights(str(tmp_path / "a"))

    # Another run with the same seed, stopped after 2 steps and resumed to 4: bit for bit the
    # weights of the uninterrupted run (its first 2 steps repeat run a's: deterministic).
    assert main(_demo_args(tmp_path / "c", 2)) == 0
    assert main(_demo_args(tmp_path / "c", 4, "--resume_from_checkpoint latest")) == 0
    assert "training steps 2 -> 4" in capsys.readouterr().out
    c = unet_weights(str(tmp_path / "c"))
    for key in a:
        np.testing.assert_array_equal(a[key], c[key])

    # Any checkpoint exports on its own: EMA by default, raw weights with --no_ema, any dtype.
    ckpt = str(tmp_path / "a" / "checkpoints" / "checkpoint_2")
    assert main(["export", "--checkpoint", ckpt, "--output", str(tmp_path / "ema")]) == 0
    assert main(["export", "--checkpoint", ckpt, "--output", str(tmp_path / "raw"), "--no_ema",
                 "--dtype", "float16"]) == 0
    ema, raw = unet_weights(str(tmp_path / "ema")), unet_weights(str(tmp_path / "raw"))
    assert all(v.dtype == np.float16 for v in raw.values())
    assert any(not np.array_equal(ema[k].astype(np.float16), raw[k]) for k in ema)

    # TensorBoard got the scalars, in the run folder named by --tracker_project_name.
    assert os.listdir(tmp_path / "a" / "logs") == ["minecraft"]
    events = [f for f in os.listdir(tmp_path / "a" / "logs" / "minecraft") if f.startswith("events")]
    data = (tmp_path / "a" / "logs" / "minecraft" / events[0]).read_bytes()
    for tag in (b"train/loss", b"train/lr", b"train/grad_norm", b"train/images_per_sec"):
        assert tag in data


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "nan"
    args = _demo_args(out, 30, "--logging_steps=1 --checkpointing_steps=1 --max_grad_norm=0")
    args = [a for a in args if not a.startswith("--learning_rate")] + ["--learning_rate=1e30"]
    assert main(args) == 2
    err = error_line(capsys.readouterr().err)
    assert "at step" in err and "last good checkpoint is" in err
    bad_step = int(err.split("at step ")[1].split(";")[0])
    saved = sorted(int(n.split("_")[1]) for n in os.listdir(out / "checkpoints"))
    assert saved and max(saved) < bad_step
    assert not (out / "model_index.json").exists()


def _error_of(args, capsys):
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    return error_line(err)


def test_bad_data_inputs(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    base = [a for a in _demo_args(tmp_path / "o", 2) if not a.startswith("--train_data_dir")]
    assert "contains no images" in _error_of(base + [f"--train_data_dir={empty}"], capsys)

    uncaptioned = shutil.copytree(DEMO_DATA, tmp_path / "uncaptioned")
    lines = (uncaptioned / "metadata.jsonl").read_text().splitlines()
    lines[3] = lines[3].split(', "text"')[0] + "}"
    (uncaptioned / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    assert "has no caption" in _error_of(base + [f"--train_data_dir={uncaptioned}"], capsys)

    err = _error_of(_demo_args(tmp_path / "o", 2, "--caption_column=caption"), capsys)
    assert "--caption_column 'caption' is not a column" in err and "text" in err

    few = shutil.copytree(DEMO_DATA, tmp_path / "few")
    keep = (few / "metadata.jsonl").read_text().splitlines()[:3]
    for name in os.listdir(few):
        if name.endswith(".png") and not any(name in line for line in keep):
            os.remove(few / name)
    (few / "metadata.jsonl").write_text("\n".join(keep) + "\n")
    assert "fewer than one global batch" in _error_of(base + [f"--train_data_dir={few}"], capsys)
    # Nothing the user provided was changed.
    assert len(os.listdir(DEMO_DATA)) == 13


def test_bad_run_inputs(tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a folder")
    assert "is not a directory" in _error_of(_demo_args(a_file, 2), capsys)
    assert "multiple of 8" in _error_of(_demo_args(tmp_path / "o", 2, "--resolution=100"), capsys)
    err = _error_of(_demo_args(tmp_path / "o", 2, "--resume_from_checkpoint checkpoint-99"), capsys)
    assert "checkpoint checkpoint-99 does not exist" in err
    assert "did you mean --max_train_steps" in _error_of(
        _demo_args(tmp_path / "o", 2, "--max_train_step=3"), capsys)


@pytest.mark.jax_api
def test_checkpoint_references_and_total_limit(tmp_path):
    from sdjax.errors import ConfigError
    from sdjax.train import run_checkpoints as ckpt

    from sdjax.checkpoints import state_layout

    layout = state_layout(["unet"], ema=False)
    manager = ckpt.make_manager(str(tmp_path / "checkpoints"), max_to_keep=2)
    for step in (5, 10, 15):
        ckpt.save(manager, step, {"w": np.full(3, step, np.float32)},
                  {"step": step, "state_layout": layout})
    manager.wait_until_finished()
    assert manager.all_steps() == [10, 15]  # --checkpoints_total_limit=2
    for ref, step in [("latest", 15), ("checkpoint-10", 10), ("checkpoint_10", 10), ("15", 15),
                      (str(tmp_path / "checkpoints" / "checkpoint_10"), 10)]:
        assert ckpt.resolve_step(manager, ref) == step, ref
    with pytest.raises(ConfigError, match="complete checkpoints: 10, 15"):
        ckpt.resolve_step(manager, "checkpoint-5")
    state, meta = ckpt.restore(manager, 10, {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}, layout)
    assert meta["step"] == 10 and float(state["w"][0]) == 10.0
    # A checkpoint of another layout is refused with one line saying what differs.
    with pytest.raises(ConfigError, match="holds unet trained, EMA off; this run has unet \\+ "
                                          "text_encoder trained, EMA on"):
        ckpt.restore(manager, 10, {"w": jax.ShapeDtypeStruct((3,), jnp.float32)},
                     state_layout(["unet", "text_encoder"], ema=True))
    manager.close()
