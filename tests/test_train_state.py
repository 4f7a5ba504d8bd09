"""The train state keyed by component: the DreamBooth loss against a hand computation; the
optimizer (per-component learning rates, one global clipping norm, EMA of every component); and,
through the command line, runs that train the text encoder, whose checkpoints record what they
hold (refused by a run of another layout; exported, sampled and resumed with every trained
component)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

from sdjax import StableDiffusion
from sdjax.schedule import NoiseSchedule
from sdjax.train.optimizer import make_optimizer
from sdjax.train.state import init_state
from sdjax.train.step import LossConfig, _per_sample_draws, make_loss_fn, make_train_step
from tests.conftest import DEMO_DATA

PRIOR_MASK = np.array([0.0, 1.0, 0.0, 1.0], np.float32)
PRIOR_LOSS_WEIGHT = 0.7
SNR_GAMMA = 5.0


def leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def max_change(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(leaves(a), leaves(b)))


@pytest.fixture(scope="module")
def tiny():
    """The tiny model with the weights `--pretrained_model_name_or_path tiny --seed 3` starts
    from (the base of the runs below)."""
    return StableDiffusion.from_config("tiny", seed=3)


KEY = jax.random.key(28)  # timesteps 522, 595, 73, 140: min-SNR weights 1, 1, 0.40, 0.94


# --- 1. the loss ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def losses(tiny):
    """-> (each row's MSE and min-SNR weight by hand, {(snr_gamma, mask, prior_loss_weight): the
    step's loss}) on one fixed batch of 4 rows, as the latent cache and pre-computed embeddings
    give it (the loss's own arithmetic is what is checked; the encoders are not).

    By hand: the step's own per-sample draws, then diffusers' noising and min-SNR weights in
    numpy (float64), and the UNet applied to those noisy latents. One compiled program computes
    that prediction and the step's loss in every variant."""
    sd = tiny
    rng = np.random.default_rng(0)
    batch = {"latent_mean": rng.standard_normal((4, 4, 4, 4)).astype(np.float32),
             "latent_std": rng.uniform(0.1, 0.5, (4, 4, 4, 4)).astype(np.float32),
             "text_embeddings": rng.standard_normal((4, 77, 32)).astype(np.float32)}
    config = sd.scheduler_config
    assert config["beta_schedule"] == "scaled_linear" and config["prediction_type"] == "epsilon"
    steps = config["num_train_timesteps"]
    betas = np.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, steps,
                        dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    z, noise, t, _, _ = (np.asarray(x) for x in _per_sample_draws(
        KEY, jnp.arange(4), (4, 4, 4), steps))
    latents = (batch["latent_mean"] + batch["latent_std"] * z) * sd.vae.scaling_factor
    a = alphas_cumprod[t].reshape(-1, 1, 1, 1)
    noisy = (np.sqrt(a) * latents + np.sqrt(1.0 - a) * noise).astype(np.float32)

    schedule = NoiseSchedule.from_config(config)
    masks = {"prior": PRIOR_MASK, "zeros": np.zeros(4, np.float32), "none": None}
    variants = {(gamma, mask, weight): make_loss_fn(sd.unet, sd.vae, sd.text_encoder, schedule,
                                                    LossConfig(snr_gamma=gamma,
                                                               prior_loss_weight=weight))
                for gamma, mask, weight in ((None, "prior", PRIOR_LOSS_WEIGHT),
                                            (SNR_GAMMA, "prior", PRIOR_LOSS_WEIGHT),
                                            (None, "none", 0.3), (SNR_GAMMA, "zeros", 0.3))}

    @jax.jit
    def run(unet_params):
        pred = sd.unet.apply({"params": unet_params}, noisy, t, batch["text_embeddings"])
        step = [loss_fn({"unet": unet_params}, {},
                        batch if masks[mask] is None else dict(batch, prior_mask=masks[mask]),
                        KEY, 0) for (_, mask, _), loss_fn in variants.items()]
        return pred, step

    pred, step = run(sd.params["unet"])
    mse = np.mean((np.asarray(pred, np.float64) - noise) ** 2, axis=(1, 2, 3))  # epsilon target
    snr = alphas_cumprod[t] / (1.0 - alphas_cumprod[t])
    weights = np.minimum(snr, SNR_GAMMA) / snr
    return (mse, weights), {name: float(loss) for name, loss in zip(variants, step)}


def test_dreambooth_loss_is_the_diffusers_formula(losses):
    (mse, weights), step_losses = losses
    instance, prior = PRIOR_MASK == 0, PRIOR_MASK == 1
    # The draws make the check meaningful: min-SNR weights below 1 on both kinds of rows, so
    # weighting the class rows too, or not weighting the instance rows, would show.
    assert (weights[instance] < 0.99).any() and (weights[prior] < 0.99).any(), weights

    plain = mse[instance].mean() + PRIOR_LOSS_WEIGHT * mse[prior].mean()
    np.testing.assert_allclose(step_losses[None, "prior", PRIOR_LOSS_WEIGHT], plain, rtol=2e-5)

    min_snr = (weights[instance] * mse[instance]).mean() + PRIOR_LOSS_WEIGHT * mse[prior].mean()
    np.testing.assert_allclose(step_losses[SNR_GAMMA, "prior", PRIOR_LOSS_WEIGHT], min_snr,
                               rtol=2e-5)
    assert abs(min_snr - plain) > 1e-2 * plain


def test_without_class_rows_the_loss_is_the_plain_mean(losses):
    """The text_to_image loss is unchanged: the mean over the rows (min-SNR weighted with
    --snr_gamma), whatever --prior_loss_weight says; an all-zero prior_mask is the same."""
    (mse, weights), step_losses = losses
    np.testing.assert_allclose(step_losses[None, "none", 0.3], mse.mean(), rtol=2e-5)
    np.testing.assert_allclose(step_losses[SNR_GAMMA, "zeros", 0.3], (weights * mse).mean(),
                               rtol=2e-5)


# --- 2. the optimizer -------------------------------------------------------------------------

def toy_params(seed=0):
    rng = np.random.default_rng(seed)
    return {"unet": {"a": rng.standard_normal((3, 4)).astype(np.float32),
                     "b": {"c": rng.standard_normal(5).astype(np.float32)}},
            "text_encoder": {"d": rng.standard_normal((2, 6)).astype(np.float32)}}


ADAM = dict(beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=1e-2)


def test_each_component_moves_at_its_own_rate_after_one_global_clip():
    lr_a, lr_b, limit = 1e-2, 3e-3, 1.0
    schedules = {"unet": optax.linear_schedule(lr_a, lr_a / 2, 4), "text_encoder": lambda _: lr_b}
    tx = make_optimizer(schedules, max_grad_norm=limit, **ADAM)
    params = jax.tree_util.tree_map(jnp.asarray, toy_params())
    state = tx.init(params)
    # The reference: optax.clip_by_global_norm over every gradient together, then an
    # independent optax.adamw per component. The other candidate: each component clipped alone.
    clip = optax.clip_by_global_norm(limit)
    adamw = {c: optax.adamw(s, b1=ADAM["beta1"], b2=ADAM["beta2"], eps=ADAM["eps"],
                            weight_decay=ADAM["weight_decay"]) for c, s in schedules.items()}
    refs = {"global": (dict(params), {c: adamw[c].init(params[c]) for c in adamw}),
            "alone": (dict(params), {c: adamw[c].init(params[c]) for c in adamw})}
    rng = np.random.default_rng(1)
    for step, scale in enumerate((1.0, 5.0, 2.0)):
        # The UNet's gradient alone is under the limit, both together are over it, by another
        # factor at each step (AdamW is invariant to one constant scale, not to changing ones).
        grads = {"unet": {"a": np.full((3, 4), 0.15, np.float32),
                          "b": {"c": rng.uniform(-0.1, 0.1, 5).astype(np.float32)}},
                 "text_encoder": {"d": scale * rng.uniform(0.3, 0.5, (2, 6)).astype(np.float32)}}
        flat = np.concatenate([g.ravel() for g in leaves(grads)])
        unet_norm = np.linalg.norm(np.concatenate([g.ravel() for g in leaves(grads["unet"])]))
        assert unet_norm < limit < np.linalg.norm(flat)

        updates, state = tx.update(grads, state, params)
        if step == 0:  # AdamW's first step: lr x sign(gradient) (+ lr x decay x weight)
            for component, lr in (("unet", lr_a), ("text_encoder", lr_b)):
                np.testing.assert_allclose(np.abs(leaves(updates[component])[0]), lr, rtol=0.05)
        params = optax.apply_updates(params, updates)

        clipped, _ = clip.update(grads, clip.init(grads))
        np.testing.assert_allclose(np.linalg.norm(np.concatenate(
            [g.ravel() for g in leaves(clipped)])), limit, rtol=1e-5)
        clipped_alone = {c: clip.update(g, clip.init(g))[0] for c, g in grads.items()}
        for name, given in (("global", clipped), ("alone", clipped_alone)):
            ref_params, ref_states = refs[name]
            for c in adamw:
                u, ref_states[c] = adamw[c].update(given[c], ref_states[c], ref_params[c])
                ref_params[c] = optax.apply_updates(ref_params[c], u)
    for ours, ref in zip(leaves(params), leaves(refs["global"][0])):
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)
    # Clipping each component alone would have moved the UNet differently.
    assert max_change(params["unet"], refs["alone"][0]["unet"]) > 1e-4


def test_a_zero_rate_leaves_that_component_alone():
    tx = make_optimizer({"unet": lambda _: 1e-2, "text_encoder": lambda _: 0.0},
                        max_grad_norm=1.0, **ADAM)
    start = jax.tree_util.tree_map(jnp.asarray, toy_params())
    params, state = start, tx.init(start)
    for seed in range(2):
        grads = toy_params(seed + 5)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    for ours, first in zip(leaves(params["text_encoder"]), leaves(start["text_encoder"])):
        np.testing.assert_array_equal(ours, first)
    assert max_change(params["unet"], start["unet"]) > 1e-3


def test_the_step_keeps_an_ema_of_every_component_and_one_grad_norm():
    """make_train_step with a quadratic loss over both components: grad_norm is the norm of
    both gradients together, the EMA follows diffusers' EMAModel (decay 0, 2/11, 3/12) for both,
    and each component's learning rate is reported."""
    target = toy_params(7)

    def loss_fn(trainable, frozen, batch, key, first_position):
        scale = jnp.mean(batch["x"])
        return sum(jnp.sum((p - scale * t) ** 2) for p, t in zip(
            jax.tree_util.tree_leaves(trainable), jax.tree_util.tree_leaves(target)))

    schedules = {"unet": lambda _: 0.05, "text_encoder": lambda _: 0.02}
    tx = make_optimizer(schedules, max_grad_norm=0.0, **ADAM)
    step = jax.jit(make_train_step(loss_fn, lambda numbers: (tx, schedules)))
    state = init_state(toy_params(), tx, use_ema=True)
    ema = state.params
    batch = {"x": np.ones((1, 4, 2), np.float32)}
    for decay in (0.0, 2 / 11, 3 / 12):
        grads = jax.grad(loss_fn)(state.params, {}, {"x": batch["x"][0]}, None, 0)
        state, metrics = step(state, {}, batch, {"seed_key": jax.random.key_data(jax.random.key(0))})
        flat = np.concatenate([g.ravel() for g in leaves(grads)])
        np.testing.assert_allclose(metrics["grad_norm"], np.linalg.norm(flat), rtol=1e-5)
        assert float(metrics["lr_text_encoder"]) == pytest.approx(0.02)
        assert float(metrics["lr"]) == pytest.approx(0.05)
        ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p, ema, state.params)
        assert set(state.ema) == {"unet", "text_encoder"}
        for ours, ref in zip(leaves(state.ema), leaves(ema)):
            np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)
    assert max_change(state.ema["text_encoder"], state.params["text_encoder"]) > 1e-4


def test_text_encoder_lr_reaches_its_schedule():
    from sdjax.config import parse_train_args
    from sdjax.train.optimizer import run_optimizer
    from sdjax.train.trainer import step_numbers

    def rates(*flags):
        cfg, _ = parse_train_args(["--pretrained_model_name_or_path", "tiny", "--train_data_dir",
                                   DEMO_DATA, "--learning_rate", "1e-4",
                                   "--lr_scheduler", "constant", *flags])
        cfg.validate()
        _, schedules = run_optimizer(cfg.lr_scheduler, step_numbers(cfg, 10, 4))
        return {c: float(s(3)) for c, s in schedules.items()}

    assert rates() == {"unet": pytest.approx(1e-4)}
    assert rates("--train_text_encoder") == {"unet": pytest.approx(1e-4),
                                             "text_encoder": pytest.approx(1e-4)}
    assert rates("--train_text_encoder", "--text_encoder_lr", "5e-6") == {
        "unet": pytest.approx(1e-4), "text_encoder": pytest.approx(5e-6)}


def test_the_run_numbers_are_arguments_of_one_program(tiny):
    """Two runs that differ in seed, learning rates, warmup, length, clipping and AdamW's
    settings lower to the same program (so the second reuses the first's compiled step from the
    persistent cache); their numbers reach the step as its last argument."""
    from sdjax.config import parse_train_args
    from sdjax.parallel import make_mesh
    from sdjax.train.fit import _with_shardings, abstract_batch
    from sdjax.train.trainer import step_program

    def lowered(*flags):
        cfg, _ = parse_train_args(["--pretrained_model_name_or_path", "tiny", "--train_data_dir",
                                   DEMO_DATA, "--resolution", "32", "--train_text_encoder",
                                   "--lr_scheduler", "cosine", *flags])
        cfg.validate()
        mesh = make_mesh()
        program = step_program(cfg, tiny, mesh, cfg.max_train_steps, False, False)
        state = _with_shardings(program.abstract_state, program.shardings)
        frozen = _with_shardings(program.frozen, program.frozen_sharding)
        text = program.step_fn.lower(state, frozen, abstract_batch(cfg, tiny, mesh),
                                     program.numbers).as_text()
        return text, program.numbers

    first, numbers = lowered("--max_train_steps", "10")
    second, other = lowered("--max_train_steps", "30", "--seed", "9", "--learning_rate", "3e-4",
                            "--text_encoder_lr", "7e-6", "--lr_warmup_steps", "4",
                            "--max_grad_norm", "0", "--adam_beta1", "0.8", "--adam_beta2", "0.98",
                            "--adam_epsilon", "1e-6", "--adam_weight_decay", "0.1")
    assert first == second
    assert other["learning_rate"] == {"unet": np.float32(3e-4), "text_encoder": np.float32(7e-6)}
    assert (other["lr_total_steps"], other["lr_warmup_steps"], other["max_grad_norm"]) == (30, 4, 0)
    assert not np.array_equal(numbers["seed_key"], other["seed_key"])
    assert (other["adam_beta1"], other["adam_weight_decay"]) == (np.float32(0.8), np.float32(0.1))
    # What does shape the program still does (a constant scheduler has no cosine).
    assert lowered("--max_train_steps", "10", "--lr_scheduler", "constant")[0] != first


# --- 3. runs that train the text encoder, through the command line ---------------------------

def run_main(argv):
    import contextlib
    import io

    from sdjax.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def train_args(out, steps, *extra):
    return ["--pretrained_model_name_or_path", "tiny", "--train_data_dir", DEMO_DATA,
            "--resolution", "32", "--center_crop", "--train_batch_size", "1", "--use_ema",
            "--learning_rate", "1e-3", "--lr_scheduler", "constant", "--max_train_steps", steps,
            "--checkpointing_steps", "1", "--logging_steps", "1", "--seed", "3",
            "--output_dir", out, *extra]


TEXT_ENCODER = ["--train_text_encoder", "--text_encoder_lr", "1e-2"]


def scalars(out):
    """{(tag, step): value} of a run's TensorBoard scalars."""
    from tests.tensorboard_events import summary_values

    return {(value.tag, step): value.simple_value
            for step, value in summary_values(os.path.join(out, "logs", "text2image-fine-tune"))
            if value.HasField("simple_value")}


def pipeline_weights(folder, component):
    name = "model" if component == "text_encoder" else "diffusion_pytorch_model"
    return load_file(os.path.join(folder, component, f"{name}.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 32 px run (EMA on, a checkpoint every step) twice: the UNet alone for 1 step,
    and with the text encoder (--text_encoder_lr 1e-2) for 2 steps."""
    root = tmp_path_factory.mktemp("state_runs")
    paths = {"unet": str(root / "unet"), "both": str(root / "both")}
    for name, steps, extra in (("unet", 1, []), ("both", 2, TEXT_ENCODER)):
        code, out, err = run_main(train_args(paths[name], steps, *extra))
        assert code == 0, err[-3000:]
    return paths


def check_base(meta):
    """The runs' base model is `tiny` (below) with the run's seed."""
    assert meta["base_model"]["pretrained_model_name_or_path"] == "tiny"
    assert meta["base_model"]["seed"] == 3


@pytest.mark.jax_api
def test_the_text_encoder_gets_gradients_and_trains(runs, tiny):
    """Step 1 of both runs sees the same batch and noise: the same loss, and a gradient norm that
    with the text encoder also holds its gradient (the two are clipped as one)."""
    unet, both = scalars(runs["unet"]), scalars(runs["both"])
    assert unet[("train/loss", 1)] == pytest.approx(both[("train/loss", 1)], rel=1e-5)
    norms = {name: run[("train/grad_norm", 1)] for name, run in (("unet", unet), ("both", both))}
    assert np.sqrt(norms["both"] ** 2 - norms["unet"] ** 2) > 1e-2 * norms["unet"]
    assert both[("train/lr_text_encoder", 1)] == pytest.approx(1e-2)
    assert both[("train/lr", 1)] == unet[("train/lr", 1)] == pytest.approx(1e-3)
    assert ("train/lr_text_encoder", 1) not in unet

    from sdjax.checkpoints import read_trained

    checkpoint = os.path.join(runs["both"], "checkpoints", "checkpoint_1")
    trained, step, meta, used_ema = read_trained(checkpoint, tiny.params, ema=False)
    check_base(meta)
    assert (step, used_ema, sorted(trained)) == (1, False, ["text_encoder", "unet"])
    assert meta["state_layout"] == {"version": 2, "trained": ["unet", "text_encoder"], "ema": True}
    # AdamW's first step moves every weight with a gradient by about the learning rate: 1e-2 for
    # the text encoder, 1e-3 for the UNet.
    assert 5e-3 < max_change(trained["text_encoder"], tiny.params["text_encoder"]) < 2e-2
    assert 5e-4 < max_change(trained["unet"], tiny.params["unet"]) < 2e-3


@pytest.mark.jax_api
def test_a_checkpoint_of_another_layout_is_refused(runs):
    for name, flags, message in (
            ("unet", TEXT_ENCODER, "it holds unet trained, EMA on; this run has unet + "
                                   "text_encoder trained, EMA on"),
            ("both", [], "it holds unet + text_encoder trained, EMA on; this run has unet "
                         "trained, EMA on")):
        before = sorted(os.listdir(os.path.join(runs[name], "checkpoints")))
        code, _, err = run_main(train_args(runs[name], 3, "--resume_from_checkpoint", "latest",
                                           *flags))
        assert code == 2, err[-3000:]
        assert "Traceback" not in err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and message in lines[0], err
        assert f"checkpoint_{len(before)} does not fit this run" in lines[0]
        assert sorted(os.listdir(os.path.join(runs[name], "checkpoints"))) == before


@pytest.fixture(scope="module")
def exported(runs, tiny, tmp_path_factory):
    """Step 2 of the text-encoder run exported (EMA weights, the default), and its weights read
    from the checkpoint."""
    from sdjax.checkpoints import read_trained

    checkpoint = os.path.join(runs["both"], "checkpoints", "checkpoint_2")
    folder = str(tmp_path_factory.mktemp("exported") / "pipe")
    code, out, err = run_main(["export", "--checkpoint", checkpoint, "--output", folder])
    assert code == 0, err[-3000:]
    assert "exported step 2 (unet and text_encoder, EMA weights, float32)" in out
    trained, _, meta, used_ema = read_trained(checkpoint, tiny.params)
    check_base(meta)
    assert used_ema
    return checkpoint, folder, trained


@pytest.mark.jax_api
def test_export_writes_every_trained_component(runs, tiny, exported):
    checkpoint, folder, trained = exported
    written = StableDiffusion.from_pretrained(folder).params
    for component in ("unet", "text_encoder"):
        for ours, saved in zip(leaves(written[component]), leaves(trained[component])):
            np.testing.assert_array_equal(ours, saved)
        assert max_change(written[component], tiny.params[component]) > 1e-4
    for ours, saved in zip(leaves(written["vae"]), leaves(tiny.params["vae"])):
        np.testing.assert_array_equal(ours, saved)
    # The run's own export at its last step (step 2) holds the same weights.
    for component in ("unet", "text_encoder"):
        final = pipeline_weights(runs["both"], component)
        export = pipeline_weights(folder, component)
        assert final.keys() == export.keys()
        for key in final:
            np.testing.assert_array_equal(final[key], export[key], err_msg=key)


@pytest.mark.jax_api
def test_generate_samples_with_the_trained_text_encoder(tiny, exported, tmp_path):
    """generate --checkpoint makes the images of the checkpoint's UNet and text encoder sampled
    directly, not those of its UNet with the base text encoder."""
    from PIL import Image

    from sdjax.sampling.images import to_pil

    checkpoint, _, trained = exported
    settings = dict(num_inference_steps=2, guidance_scale=4.0, seed=1, height=32, width=32)
    code, _, err = run_main(["generate", "--checkpoint", checkpoint, "--prompt", "a red cube",
                             "--scheduler", "ddim", "--output_dir", tmp_path,
                             *[a for k, v in settings.items() for a in (f"--{k}", v)]])
    assert code == 0, err[-3000:]
    generated = np.asarray(Image.open(tmp_path / "000-000.png").convert("RGB"), np.int16)

    sampler = tiny.sampler()
    images = {name: np.asarray(to_pil(sampler.sample(dict(tiny.params, **weights), ["a red cube"],
                                                     scheduler="ddim", **settings).images)[0],
                               np.int16)
              for name, weights in (("trained", trained), ("unet_only",
                                                           {"unet": trained["unet"]}))}
    np.testing.assert_array_equal(generated, images["trained"])
    assert np.abs(generated - images["unet_only"]).max() > 2


@pytest.mark.jax_api
def test_resume_of_a_text_encoder_run_is_exact(runs, tmp_path):
    """Step 1's checkpoint resumed to step 2 (in another output_dir) gives step 2's weights."""
    out = tmp_path / "resumed"
    code, stdout, err = run_main(train_args(out, 2, *TEXT_ENCODER, "--checkpointing_steps", "5",
                                            "--resume_from_checkpoint",
                                            os.path.join(runs["both"], "checkpoints",
                                                         "checkpoint_1")))
    assert code == 0, err[-3000:]
    assert "training steps 1 -> 2" in stdout
    for component in ("unet", "text_encoder"):
        whole, resumed = pipeline_weights(runs["both"], component), pipeline_weights(out, component)
        for key in whole:
            np.testing.assert_array_equal(resumed[key], whole[key], err_msg=key)
