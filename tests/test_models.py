"""Model construction: full-size parameter counts, config validation, remat, attention kernels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import ConfigError, StableDiffusion
from sdjax.models import UNet2DConditionModel
from sdjax.models.config import unet_config
from sdjax.models.build import build_models, count_params

# Parameter counts of the models as diffusers/transformers build them (shared/DESIGN.md).
FULL_SIZE = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd21": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sd21-base": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
}


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_parameter_counts(name):
    sd = StableDiffusion.from_config(name, init_params=False)
    assert {k: count_params(v) for k, v in sd.params.items()} == FULL_SIZE[name]


def test_parameter_shapes_are_remembered_per_model(sd1, sd2):
    """param_shapes keeps each model's shapes (a run asks several times): every model gets its
    own, and each call returns its own containers."""
    from sdjax.models.build import param_shapes

    def shapes(tree):
        return jax.tree_util.tree_map(lambda x: (x.shape, jnp.dtype(x.dtype)), tree)

    for sd in (sd1, sd2, sd1):
        for component in ("unet", "vae", "text_encoder"):
            got = param_shapes(getattr(sd, component), component)
            assert shapes(got) == shapes(sd.params[component]), component
    first, second = param_shapes(sd1.unet, "unet"), param_shapes(sd1.unet, "unet")
    first.pop("conv_in")
    assert "conv_in" in second and "conv_in" in param_shapes(sd1.unet, "unet")


def test_shipped_configs_carry_their_differences():
    sd15 = StableDiffusion.from_config("sd15", init_params=False)
    sd21 = StableDiffusion.from_config("sd21", init_params=False)
    base = StableDiffusion.from_config("sd21-base", init_params=False)
    assert sd15.unet.config.heads_per_block == (8, 8, 8, 8)
    assert sd21.unet.config.heads_per_block == (5, 10, 20, 20)
    assert sd21.unet.config.upcast_attention and not base.unet.config.upcast_attention
    assert sd21.scheduler_config["prediction_type"] == "v_prediction"
    assert base.scheduler_config["prediction_type"] == "epsilon"
    assert sd15.text_encoder.config.hidden_act == "quick_gelu"
    assert sd21.text_encoder.config.hidden_act == "gelu"


@pytest.mark.parametrize("option,value", [
    ("class_embed_type", "timestep"), ("resnet_time_scale_shift", "scale_shift"),
    ("only_cross_attention", True), ("time_embedding_type", "fourier"),
    ("addition_embed_type", "text_time"), ("some_future_option", 3),
])
def test_unet_options_that_change_the_math_raise(sd1_dir, option, value):
    import json
    import os

    with open(os.path.join(sd1_dir, "unet", "config.json")) as f:
        config = json.load(f)
    config[option] = value
    with pytest.raises(ConfigError, match=option):
        unet_config(config)


def test_unet_unknown_switched_off_option_is_accepted(sd1_dir):
    import json
    import os

    with open(os.path.join(sd1_dir, "unet", "config.json")) as f:
        config = json.load(f)
    config["some_future_option"] = None
    assert unet_config(config).cross_attention_dim == 32


def test_unsupported_text_encoder_raises():
    from sdjax.models.config import clip_text_config

    with pytest.raises(ConfigError, match="hidden_act"):
        clip_text_config({"hidden_act": "relu"})
    with pytest.raises(ConfigError, match="CLIPTextModelWithProjection"):
        clip_text_config({"architectures": ["CLIPTextModelWithProjection"]})


def test_num_attention_heads_takes_precedence(sd1_dir):
    import json
    import os

    with open(os.path.join(sd1_dir, "unet", "config.json")) as f:
        config = json.load(f)
    config["num_attention_heads"] = [2, 8, 8]
    assert unet_config(config).heads_per_block == (2, 8, 8)


@pytest.fixture(scope="module")
def tiny_inputs():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((2, 4, 8, 8)).astype(np.float32), np.array([1, 700]),
            rng.standard_normal((2, 5, 32)).astype(np.float32))


def assert_trees_close(a, b):
    """Equal up to float reassociation: remat recomputes the same ops, XLA may fuse them anew.
    (Tolerance relative to the largest gradient: some gradients are analytically ~0 and noise.)"""
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    scale = max(float(np.abs(y).max()) for y in leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6 * scale)


def _unet_loss_and_grads(sd, unet, inputs):
    def loss(params):
        return jnp.mean(unet.apply({"params": params}, *inputs) ** 2)

    return jax.jit(jax.value_and_grad(loss))(sd.params["unet"])


@pytest.mark.jax_api
def test_gradient_checkpointing_gives_identical_outputs_and_gradients(sd2, tiny_inputs):
    remat = UNet2DConditionModel(sd2.unet.config, gradient_checkpointing=True)
    plain_loss, plain_grads = _unet_loss_and_grads(sd2, sd2.unet, tiny_inputs)
    remat_loss, remat_grads = _unet_loss_and_grads(sd2, remat, tiny_inputs)
    np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-6)
    assert_trees_close(remat_grads, plain_grads)
    # The switch really inserts rematerialisation (a no-op switch would also pass the above).
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(remat.apply({"params": p}, *tiny_inputs))))(
        sd2.params["unet"]))
    assert "remat" in jaxpr or "checkpoint" in jaxpr


def test_text_encoder_gradient_checkpointing(sd2):
    models = build_models(sd2.configs, gradient_checkpointing=True)
    ids = np.arange(12, dtype=np.int32).reshape(2, 6)

    def loss(module):
        return lambda p: jnp.sum(module.apply({"params": p}, ids) ** 2)

    remat, plain = models["text_encoder"], sd2.text_encoder
    params = sd2.params["text_encoder"]
    (la, ga), (lb, gb) = (jax.jit(jax.value_and_grad(loss(m)))(params) for m in (remat, plain))
    np.testing.assert_allclose(la, lb, rtol=1e-6)
    assert_trees_close(ga, gb)
    jaxpr = str(jax.make_jaxpr(jax.grad(loss(remat)))(params))
    assert "remat" in jaxpr or "checkpoint" in jaxpr


@pytest.mark.parametrize("flags, policy", [
    ([], None), (["--gradient_checkpointing"], "nothing_saveable"),
    (["--gradient_checkpointing_policy=dense"], "dots_with_no_batch_dims_saveable"),
    (["--gradient_checkpointing", "--gradient_checkpointing_policy=dots_saveable"], "dots_saveable"),
])
def test_gradient_checkpointing_policy_flag(flags, policy):
    """A policy by its short or JAX name; a policy alone turns checkpointing on."""
    from sdjax.config import parse_train_args

    cfg, _ = parse_train_args(["--output_dir=o", *flags])
    assert cfg.remat == (policy is not None)
    if policy:
        assert cfg.remat_policy == policy


def test_gradient_checkpointing_policies_save_more_in_order(sd2, tiny_inputs):
    """What each policy keeps for the backward pass (JAX's own account of the residuals):
    nothing < dense outputs < every matmul and conv output < everything."""
    import contextlib
    import io

    from jax.ad_checkpoint import print_saved_residuals

    counts = []
    for policy in ("nothing", "dense", "dots", "everything"):
        unet = build_models(sd2.configs, gradient_checkpointing=True, remat_policy=policy)["unet"]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            print_saved_residuals(lambda p: jnp.sum(unet.apply({"params": p}, *tiny_inputs) ** 2),
                                  sd2.params["unet"])
        counts.append(len(out.getvalue().splitlines()))
    assert counts == sorted(set(counts)), counts


def test_remat_policy_is_validated(sd2):
    with pytest.raises(ConfigError, match="unknown gradient checkpointing policy 'sometimes'; "
                                          "choose one of nothing"):
        build_models(sd2.configs, gradient_checkpointing=True, remat_policy="sometimes")["unet"].apply(
            {"params": sd2.params["unet"]}, np.zeros((1, 4, 8, 8), np.float32), 1,
            np.zeros((1, 2, 32), np.float32))


def test_attention_implementation_selectable(sd2, tiny_inputs):
    default = sd2.unet.apply({"params": sd2.params["unet"]}, *tiny_inputs)
    auto = UNet2DConditionModel(sd2.unet.config, attention_implementation=None)
    np.testing.assert_allclose(auto.apply({"params": sd2.params["unet"]}, *tiny_inputs), default,
                               rtol=1e-6, atol=1e-6)
    bogus = UNet2DConditionModel(sd2.unet.config, attention_implementation="flash9")
    with pytest.raises(ConfigError, match="attention implementation"):
        bogus.apply({"params": sd2.params["unet"]}, *tiny_inputs)


def test_attention_implementation_reaches_the_kernel(sd2, tiny_inputs, monkeypatch):
    seen = []
    original = jax.nn.dot_product_attention

    def spy(query, key, *args, implementation=None, **kwargs):
        seen.append((implementation, key.shape[1]))
        return original(query, key, *args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    # bf16 (cuDNN takes no float32); the self-attention (64 and 16 tokens) goes to cuDNN, the
    # cross-attention's 5 text tokens (odd) to XLA, as `choose_attention_implementation` says.
    cudnn = UNet2DConditionModel(sd2.unet.config, dtype=jnp.bfloat16,
                                 attention_implementation="cudnn")
    cudnn.apply({"params": sd2.params["unet"]}, *tiny_inputs)
    assert seen and set(seen) == {("cudnn", 64), ("cudnn", 16), ("xla", 5)}


@pytest.mark.jax_api
def test_bfloat16_compute_is_close_to_float32(sd2, tiny_inputs):
    full = np.asarray(sd2.unet.apply({"params": sd2.params["unet"]}, *tiny_inputs))
    half = UNet2DConditionModel(sd2.unet.config, dtype=jnp.bfloat16)
    out = half.apply({"params": sd2.params["unet"]}, *tiny_inputs)
    assert out.dtype == jnp.bfloat16
    assert np.abs(np.asarray(out, np.float32) - full).max() < 0.1 * np.abs(full).max()
