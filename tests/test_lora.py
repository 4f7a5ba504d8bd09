"""LoRA core: which layers get adapters (the same as PEFT picks in the diffusers/transformers
models), PEFT's initialisation, and the in-layer application the train step uses against the
adapters merged into the kernels (forward and gradients), on the tiny SD 1.x-style model (linear
and convolution layers)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from sdjax.errors import ConfigError
from sdjax.lora.adapters import AdaptedModel, adapter_layers, init_adapters, merge_adapters
from sdjax.lora.targets import PRESETS, find_targets, layer_names, module_name
from sdjax.lora.training import targets_for


def _peft_layers(model, names):
    from peft import LoraConfig, inject_adapter_in_model

    # peft itself, not transformers' `add_adapter`, whose peft version floor can run ahead of
    # what the package index has.
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=list(names)), model)
    return {name[: -len(".lora_A")] for name, _ in model.named_modules()
            if name.endswith(".lora_A")}


@pytest.mark.parametrize("preset", ["attention", "transformer", "locon"])
def test_targets_are_the_layers_peft_adapts(preset, sd1, sd1_dir):
    """Each preset's names given to PEFT adapt exactly the layers sdjax adapts (UNet and CLIP)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    names = layer_names(preset)
    for component, model in (("unet", UNet2DConditionModel.from_pretrained(sd1_dir, subfolder="unet")),
                             ("text_encoder", CLIPTextModel.from_pretrained(
                                 sd1_dir, subfolder="text_encoder"))):
        paths, unmatched = find_targets(sd1.params[component], component, names[component])
        ours = {module_name(p, component) for p in paths}
        assert ours == _peft_layers(model, names[component]), (preset, component)
        assert not unmatched
    # Each preset widens the one before.
    assert set(PRESETS["attention"]["unet"]) < set(PRESETS["transformer"]["unet"]) < set(
        PRESETS["locon"]["unet"])


def test_initialisation_as_peft(sd1):
    paths, _ = find_targets(sd1.params["unet"], "unet", layer_names("locon")["unet"])
    for init, rank in (("gaussian", 4), ("kaiming", 3)):
        layers = adapter_layers(init_adapters(jax.random.key(0), sd1.params["unet"], paths, rank,
                                              init))
        assert set(layers) == set(paths)
        downs = []
        for path, adapter in layers.items():
            kernel = flatten_dict(sd1.params["unet"])[path + ("kernel",)]
            assert adapter["down"].shape == kernel.shape[:-1] + (rank,)
            assert adapter["up"].shape == (rank, kernel.shape[-1])
            assert not adapter["up"].any()  # B = 0: the model is unchanged at step 0
            if init == "kaiming":
                fan_in = int(np.prod(kernel.shape[:-1]))
                assert np.abs(adapter["down"]).max() <= 1.0 / np.sqrt(fan_in)
            downs.append(adapter["down"].ravel())
        if init == "gaussian":  # N(0, 1/rank^2), as PEFT's "gaussian"
            assert np.std(np.concatenate(downs)) == pytest.approx(1.0 / rank, rel=0.05)


def _random_adapters(params, component, preset, rank, seed):
    paths, _ = find_targets(params, component, layer_names(preset)[component])
    adapters = init_adapters(jax.random.key(seed), params, paths, rank, "kaiming")
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: x if x.any() else
                                  rng.normal(size=x.shape).astype(np.float32) * 0.05, adapters)


def _unet_inputs(sd, rows=2):
    cfg = sd.unet.config
    rng = np.random.default_rng(1)
    return (jnp.asarray(rng.normal(size=(rows, cfg.in_channels, 8, 8)), jnp.float32),
            jnp.asarray([10, 700][:rows], jnp.int32),
            jnp.asarray(rng.normal(size=(rows, 7, cfg.cross_attention_dim)), jnp.float32))


def test_in_layer_adapters_equal_merged_kernels(sd1):
    """UNet (LoCon: linear and convolution adapters, alpha != rank) and text encoder: outputs
    and adapter gradients of the in-layer application equal those of the merged kernels."""
    scale = 3.0 / 2
    inputs = _unet_inputs(sd1)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 100, (2, 77)), jnp.int32)
    cases = (("unet", sd1.unet, "locon", inputs), ("text_encoder", sd1.text_encoder,
                                                   "transformer", (ids,)))
    for component, module, preset, args in cases:
        base = sd1.params[component]
        adapters = _random_adapters(base, component, preset, 2, seed=3)
        adapted = AdaptedModel(module, scale)

        def in_layer(a):
            return adapted.apply({"params": base, "lora": a}, *args)

        def merged(a):
            return module.apply({"params": merge_adapters(base, a, scale)}, *args)

        def loss(apply):  # -> (loss, output), gradients: one compile per way
            def value(a):
                out = apply(a)
                return jnp.mean(out ** 2), out

            return jax.jit(jax.value_and_grad(value, has_aux=True))

        plain = jax.jit(module.apply)({"params": base}, *args)  # (eager: op-by-op compiles)
        (_, got), g_in = loss(in_layer)(adapters)
        (_, want), g_merged = loss(merged)(adapters)
        assert float(jnp.abs(got - plain).max()) > 1e-3  # the adapters do change the output
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        for a, b in zip(jax.tree_util.tree_leaves(g_in), jax.tree_util.tree_leaves(g_merged)):
            np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-6)


def test_bad_targets_and_ranks(sd1):
    shapes = {c: sd1.params[c] for c in ("unet", "text_encoder")}
    with pytest.raises(ConfigError, match=r"--lora_layers: to_qq match no layer"):
        targets_for(shapes, ["unet"], "to_q,to_qq")
    # A text-encoder name is fine when the text encoder is adapted too.
    targets = targets_for(shapes, ["unet", "text_encoder"], "to_q,q_proj")
    assert targets["unet"] and targets["text_encoder"]
    with pytest.raises(ConfigError, match=r"--rank=64 is larger than .* \(32 wide\)"):
        targets_for(shapes, ["unet"], "attention", rank=64)
    with pytest.raises(ConfigError, match="names no layer"):
        layer_names(" , ")


def test_adapter_dropout_as_peft():
    """--lora_dropout drops the adapter's input (inverted dropout) when the step passes a
    dropout rng; sampling (no rng) and rate 0 leave it whole."""
    import flax.linen as nn

    rng = np.random.default_rng(0)
    layer = nn.Dense(16)
    base = {"kernel": jnp.asarray(rng.normal(size=(32, 16)), jnp.float32),
            "bias": jnp.zeros((16,), jnp.float32)}
    adapter = {"down": jnp.asarray(rng.normal(size=(32, 4)), jnp.float32),
               "up": jnp.asarray(rng.normal(size=(4, 16)), jnp.float32)}
    x = jnp.asarray(rng.normal(size=(8, 32)), jnp.float32)
    variables = {"params": base, "lora": adapter}
    plain = layer.apply({"params": base}, x)
    whole = AdaptedModel(layer, 0.5).apply(variables, x)
    dropped = AdaptedModel(layer, 0.5, dropout=0.25)
    key = jax.random.key(1)
    once = dropped.apply(variables, x, rngs={"dropout": key})
    np.testing.assert_array_equal(once, dropped.apply(variables, x, rngs={"dropout": key}))
    np.testing.assert_allclose(dropped.apply(variables, x), whole, rtol=1e-6)  # no rng: whole
    np.testing.assert_allclose(AdaptedModel(layer, 0.5, 0.0).apply(
        variables, x, rngs={"dropout": key}), whole, rtol=1e-6)
    assert not np.allclose(once, whole)
    # Inverted dropout: over many masks, the adapter's output averages to the whole one.
    mean = np.mean([np.asarray(dropped.apply(variables, x, rngs={"dropout": jax.random.key(i)}))
                    for i in range(400)], axis=0)
    np.testing.assert_allclose(mean, whole, atol=0.15 * float(np.abs(whole - plain).max()))
