"""Per-module attention kernels: a `cudnn` request only reaches attention cuDNN can take.

Nothing here runs cuDNN (these tests run on CPU): the modules are traced with `jax.eval_shape`
while a spy stands in for `jax.nn.dot_product_attention`, records which implementation each call
asked for and with what head dim and dtype, and computes with XLA.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import ConfigError, StableDiffusion
from sdjax.models import CLIPTextModel, UNet2DConditionModel
from sdjax.models.attention import (CUDNN_MAX_HEAD_DIM, AttentionChoice, AttentionSite,
                                    attention_plan_message, choose_attention_implementation)
from sdjax.models.config import UNetConfig, clip_text_config, unet_config, vae_config
from sdjax.models.clip import plan_attention as plan_clip
from sdjax.models.unet import plan_attention as plan_unet
from sdjax.models.vae import plan_attention as plan_vae
from sdjax.pipeline import SHIPPED_CONFIGS
from sdjax.models.build import build_models, param_shapes

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32


def shipped(name):
    return StableDiffusion._read_configs(f"{SHIPPED_CONFIGS}/{name}")


class KernelSpy:
    """Records (implementation, head_dim, dtype) per attention call; always computes with XLA."""

    def __init__(self):
        self.calls = []
        self.lengths = []  # (implementation, query length, key length) per call
        self.batches = []  # (implementation, batch size the kernel sees) per call
        self.original = jax.nn.dot_product_attention

    def __call__(self, query, key, value, *args, implementation=None, **kwargs):
        self.calls.append((implementation, query.shape[-1], jnp.dtype(query.dtype).name))
        self.lengths.append((implementation, query.shape[1], key.shape[1]))
        self.batches.append((implementation, query.shape[0]))
        return self.original(query, key, value, *args, implementation="xla", **kwargs)

    def implementations(self):
        return {impl for impl, _, _ in self.calls}


@pytest.fixture
def spy(monkeypatch):
    kernel_spy = KernelSpy()
    monkeypatch.setattr(jax.nn, "dot_product_attention", kernel_spy)
    return kernel_spy


def trace(module, component, spy):
    """Traces `module.init` abstractly (no parameters allocated, nothing run); returns its calls."""
    spy.calls.clear()
    spy.lengths.clear()
    spy.batches.clear()
    param_shapes(module, component)
    return list(spy.calls)


# --- the decision function ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("head_dim,heads,expected", [
    (40, 8, "cudnn"),     # SD 1.5 UNet level 0 (320 channels / 8 heads)
    (80, 8, "cudnn"),     # SD 1.5 UNet level 1
    (160, 8, "xla"),      # SD 1.5 UNet levels 2-3 (1280 / 8)
    (64, 5, "cudnn"),     # SD 2.x UNet (head dim 64 everywhere)
    (128, 1, "cudnn"),    # the limit itself
    (256, 2, "xla"),      # Hopper-only: not taken, the rules keep the conservative side
    (512, 1, "xla"),      # SD's VAE: one head of 512 channels
    (20, 4, "xla"),       # not a multiple of 8
])
def test_half_precision_table(dtype, head_dim, heads, expected):
    implementation, reason = choose_attention_implementation("cudnn", dtype, head_dim, heads)
    assert implementation == expected
    assert (reason == "") == (expected == "cudnn")
    if expected == "xla":
        assert f"head dim {head_dim}" in reason


@pytest.mark.parametrize("head_dim,heads", [(40, 8), (64, 12), (160, 8), (512, 1)])
def test_float32_is_xla_everywhere(head_dim, heads):
    implementation, reason = choose_attention_implementation("cudnn", F32, head_dim, heads)
    assert implementation == "xla" and "float32" in reason


def test_cudnn_length_and_mask_rules():
    # CLIP: causal self-attention over 77 tokens, head dim 64 (SD 1.x 768/12, SD 2.x 1024/16):
    # odd, which JAX's cuDNN training path refuses (see test_cudnn_training_traces_...).
    implementation, reason = choose_attention_implementation("cudnn", BF16, 64, 12, 77, 77,
                                                             is_causal=True)
    assert implementation == "xla" and reason.startswith("77 keys odd")
    assert choose_attention_implementation("cudnn", BF16, 64, 12, 76, 76, is_causal=True) == ("cudnn", "")
    implementation, reason = choose_attention_implementation("cudnn", BF16, 64, 12, 76, 76,
                                                             is_causal=True, has_mask=True)
    assert implementation == "xla" and "mask" in reason
    implementation, reason = choose_attention_implementation("cudnn", BF16, 64, 12, 76, 64,
                                                             is_causal=True)
    assert implementation == "xla" and "causal" in reason
    # Different query/key lengths without a causal mask (UNet cross-attention) are fine when even.
    assert choose_attention_implementation("cudnn", BF16, 40, 8, 4096, 78) == ("cudnn", "")
    implementation, reason = choose_attention_implementation("cudnn", BF16, 40, 8, 4096, 77)
    assert implementation == "xla" and reason.startswith("77 keys odd")
    implementation, reason = choose_attention_implementation("auto", BF16, 40, 8, 65 * 65, 78,
                                                             platform="gpu")
    assert implementation == "xla" and reason.startswith("4225 queries odd")


@pytest.mark.parametrize("requested", ["xla", None])
@pytest.mark.parametrize("dtype,head_dim", [(BF16, 64), (F32, 64), (BF16, 512)])
def test_other_requests_pass_through(requested, dtype, head_dim):
    assert choose_attention_implementation(requested, dtype, head_dim) == (requested, "")


def test_unknown_request_and_bad_shapes_raise():
    with pytest.raises(ConfigError, match="attention implementation"):
        choose_attention_implementation("flash9", BF16, 64)
    with pytest.raises(ValueError):
        choose_attention_implementation("cudnn", BF16, 0)


# --- the per-model plans on the shipped configs -----------------------------------------------

def test_sd15_plan():
    cfg = shipped("sd15")
    unet = unet_config(cfg["unet"])
    value, choices = plan_unet(unet, "cudnn", BF16)
    assert value == ("cudnn", "cudnn", "xla", "xla")  # head dims 40, 80, 160, 160
    got = {c.site.name: (c.implementation, c.site.head_dim) for c in choices}
    assert got == {"down_blocks_0": ("cudnn", 40), "down_blocks_1": ("cudnn", 80),
                   "down_blocks_2": ("xla", 160), "mid_block": ("xla", 160),
                   "up_blocks_1": ("xla", 160), "up_blocks_2": ("cudnn", 80),
                   "up_blocks_3": ("cudnn", 40)}
    value, choices = plan_vae(vae_config(cfg["vae"]), "cudnn", BF16)
    assert value == "xla" and [c.site.head_dim for c in choices] == [512, 512]
    value, choices = plan_clip(clip_text_config(cfg["text_encoder"]), "cudnn", BF16)
    assert value == "xla" and choices[0].site.head_dim == 64  # 77 tokens: odd
    assert choices[0].reason.startswith("77 keys odd")


@pytest.mark.parametrize("name", ["sd21", "sd21-base"])
def test_sd2_plan(name):
    cfg = shipped(name)
    assert plan_unet(unet_config(cfg["unet"]), "cudnn", BF16)[0] == "cudnn"  # head dim 64
    assert plan_vae(vae_config(cfg["vae"]), "cudnn", BF16)[0] == "xla"
    assert plan_clip(clip_text_config(cfg["text_encoder"]), "cudnn", BF16)[0] == "xla"  # 77


@pytest.mark.parametrize("name", ["sd15", "sd21", "tiny"])
def test_float32_plan_is_xla_everywhere(name):
    models = build_models(shipped(name), F32, "cudnn")
    assert {m.attention_implementation for m in models.values()} == {"xla"}


@pytest.mark.parametrize("requested", ["xla", None])
def test_other_requests_reach_every_module_unchanged(requested, caplog):
    with caplog.at_level(logging.DEBUG, logger="sdjax"):
        models = build_models(shipped("sd15"), BF16, requested)
    assert {m.attention_implementation for m in models.values()} == {requested}
    assert not [r for r in caplog.records if "attention" in r.getMessage()]


# --- what the kernels actually receive (traced, never run) ------------------------------------

@pytest.fixture(scope="module")
def sd15_bf16_calls():
    """Every attention call of the sd15 models built for bf16 + cudnn, by component."""
    mp = pytest.MonkeyPatch()
    kernel_spy = KernelSpy()
    mp.setattr(jax.nn, "dot_product_attention", kernel_spy)
    try:
        models = build_models(shipped("sd15"), BF16, "cudnn")
        calls = {}
        for component, model in models.items():
            calls[component] = trace(model, component, kernel_spy)
            calls[component + " lengths"] = list(kernel_spy.lengths)
        return calls
    finally:
        mp.undo()


def test_sd15_cudnn_never_reaches_what_cudnn_cannot_take(sd15_bf16_calls):
    for component in ("unet", "vae", "text_encoder"):
        calls = sd15_bf16_calls[component]
        assert calls, component
        for implementation, q_len, kv_len in sd15_bf16_calls[component + " lengths"]:
            if implementation == "cudnn":
                assert q_len % 2 == 0 and kv_len % 2 == 0, (component, q_len, kv_len)
        for implementation, head_dim, dtype in calls:
            if implementation == "cudnn":
                assert dtype in ("bfloat16", "float16"), (component, head_dim, dtype)
                assert head_dim <= CUDNN_MAX_HEAD_DIM and head_dim % 8 == 0, (component, head_dim)
    # The VAE's single 512-wide head never sees cuDNN (the old code passed cudnn everywhere).
    assert {impl for impl, _, _ in sd15_bf16_calls["vae"]} == {"xla"}
    assert {h for _, h, _ in sd15_bf16_calls["vae"]} == {512}


def test_sd15_cudnn_is_kept_where_it_fits(sd15_bf16_calls):
    unet = {}
    for implementation, head_dim, _ in sd15_bf16_calls["unet"]:
        unet.setdefault(head_dim, set()).add(implementation)
    assert unet == {40: {"cudnn", "xla"}, 80: {"cudnn", "xla"}, 160: {"xla"}}
    # At head dims 40 and 80 the self-attention runs cuDNN, the cross-attention XLA (its keys:
    # the traced context's one token here, 77 text tokens in a run: odd either way); the text
    # encoder (77 tokens) XLA.
    heads = [h for _, h, _ in sd15_bf16_calls["unet"]]
    by_kind = {(impl, kv_len == q_len)
               for (impl, q_len, kv_len), h in zip(sd15_bf16_calls["unet lengths"], heads) if h < 160}
    assert by_kind == {("cudnn", True), ("xla", False)}
    assert {(i, h) for i, h, _ in sd15_bf16_calls["text_encoder"]} == {("xla", 64)}


def test_float32_traces_only_xla(spy):
    models = build_models(shipped("tiny"), F32, "cudnn")
    for component in ("unet", "text_encoder"):
        calls = trace(models[component], component, spy)
        assert calls and {impl for impl, _, _ in calls} == {"xla"}, component


def test_unet_levels_get_their_own_kernel(spy):
    # Two attention levels with different head dims (16, 32): each level gets its entry.
    config = UNetConfig(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D",) * 2,
                        up_block_types=("CrossAttnUpBlock2D",) * 2, layers_per_block=1,
                        norm_num_groups=8, cross_attention_dim=16, attention_head_dim=(2, 2))
    unet = UNet2DConditionModel(config, dtype=BF16, attention_implementation=("cudnn", "xla"))
    calls = trace(unet, "unet", spy)
    self_attention = [call for call, (_, q_len, kv_len) in zip(calls, spy.lengths) if q_len == kv_len]
    assert {(impl, h) for impl, h, _ in self_attention} == {("cudnn", 16), ("xla", 32)}
    with pytest.raises(ConfigError, match="2 UNet block levels"):
        trace(UNet2DConditionModel(config, attention_implementation=("cudnn",)), "unet", spy)


def test_text_encoder_with_padding_mask_uses_xla(spy):
    config = clip_text_config(shipped("tiny")["text_encoder"])
    encoder = CLIPTextModel(config, dtype=BF16, attention_implementation="cudnn")
    ids = jnp.zeros((2, 76), jnp.int32)  # even: 77 would run XLA for its length alone
    jax.eval_shape(encoder.init, jax.random.key(0), ids)
    assert spy.implementations() == {"cudnn"}
    spy.calls.clear()
    jax.eval_shape(encoder.init, jax.random.key(0), ids, jnp.ones((2, 76), jnp.int32))
    assert spy.implementations() == {"xla"}
    spy.calls.clear()
    jax.eval_shape(encoder.init, jax.random.key(0), jnp.zeros((2, 77), jnp.int32))
    assert spy.implementations() == {"xla"}


@pytest.fixture
def jax_cudnn_rules(monkeypatch):
    """JAX's own cuDNN attention checks, run on CPU: its first check ("cuDNN is not detected",
    on a jaxlib without CUDA) is told cuDNN 9.7 is there, so tracing reaches the shape rules
    that a GPU applies (nothing is lowered or run)."""
    from jax._src.cudnn import fused_attention_stablehlo

    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 90700)


@pytest.mark.jax_api
def test_jax_cudnn_rules_refuse_odd_lengths_in_training(jax_cudnn_rules):
    # What the rule below guards against, as JAX 0.6-0.10 does it: any T and S without a
    # gradient, even ones only with (the training path always sees a placeholder bias).
    q = jax.ShapeDtypeStruct((2, 64, 2, 16), BF16)

    def loss(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn").astype(F32).sum()

    for kv_len in (77, 78):
        kv = jax.ShapeDtypeStruct((2, kv_len, 2, 16), BF16)
        jax.eval_shape(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"),
                       q, kv, kv)
        if kv_len % 2:
            with pytest.raises(NotImplementedError, match="Unsupported sequence length"):
                jax.eval_shape(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv)
        else:
            jax.eval_shape(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv)


@pytest.mark.jax_api
@pytest.mark.parametrize("requested", ["cudnn", "auto"])
def test_cudnn_training_traces_under_jax_rules(jax_cudnn_rules, requested):
    # The tiny model (head dims 16 and 8: cuDNN's) trained as on a GPU: the gradient of UNet
    # and text encoder together, 77 text tokens, 64 px (8x8 latents). Before the even-length
    # rule this raised NotImplementedError("Unsupported sequence length Q 77, KV 77").
    models = build_models(shipped("tiny"), BF16, requested, platform="gpu", image_size=64)
    unet, text_encoder = models["unet"], models["text_encoder"]
    params = (param_shapes(unet, "unet"), param_shapes(text_encoder, "text_encoder"))
    latents = jax.ShapeDtypeStruct((2, unet.config.in_channels, 8, 8), BF16)
    ids = jax.ShapeDtypeStruct((2, 77), jnp.int32)

    def loss(params, latents, ids):
        unet_params, text_params = params
        context = text_encoder.apply({"params": text_params}, ids)
        out = unet.apply({"params": unet_params}, latents, jnp.zeros((2,), jnp.int32), context)
        return out.astype(F32).sum()

    real = jax.nn.dot_product_attention
    seen = []

    def record(q, k, v, *args, implementation=None, **kwargs):
        seen.append((implementation, q.shape[1], k.shape[1]))
        return real(q, k, v, *args, implementation=implementation, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jax.nn, "dot_product_attention", record)
        grads = jax.eval_shape(jax.grad(loss), params, latents, ids)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    assert ("cudnn", 4, 4) in seen  # the kernel still runs where it can (2x2 at the last level)
    assert {impl for impl, _, kv_len in seen if kv_len == 77} == {"xla"}


def test_cudnn_runs_per_batch_shard_under_a_mesh(spy):
    # Under a mesh the cuDNN call runs on each device's share of the batch (shard_map), as the
    # TPU kernel does: left to XLA, ZeRO-3's split weights gave q, k and v shardings cuDNN's
    # partitioning rule refused when compiled for 8 GPUs (bench/gpu_compile.py). A batch the
    # mesh does not divide runs XLA.
    from jax.sharding import Mesh

    from sdjax.models.attention import attention
    from sdjax.parallel import mesh_context

    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "fsdp"))
    for batch, want in ((8, [("cudnn", 2)]), (6, [("xla", 6)])):
        q = jax.ShapeDtypeStruct((batch, 64, 32), BF16)
        kv = jax.ShapeDtypeStruct((batch, 78, 32), BF16)
        spy.batches.clear()
        with mesh_context(mesh):
            out = jax.eval_shape(lambda q, k, v: attention(q, k, v, 2, implementation="cudnn"),
                                 q, kv, kv)
        assert out.shape == (batch, 64, 32) and spy.batches == want
    spy.batches.clear()
    jax.eval_shape(lambda q, k, v: attention(q, k, v, 2, implementation="cudnn"), q, kv, kv)
    assert spy.batches == [("cudnn", 6)]  # no mesh: the whole batch


# --- the message --------------------------------------------------------------------------------

def attention_records(caplog):
    return [r for r in caplog.records if r.name.startswith("sdjax") and "cudnn" in r.getMessage()]


def test_message_is_one_line_naming_the_fallbacks(caplog):
    with caplog.at_level(logging.INFO, logger="sdjax"):
        build_models(shipped("sd15"), BF16, "cudnn")
    records = attention_records(caplog)
    assert len(records) == 1
    message = records[0].getMessage()
    assert "\n" not in message and records[0].levelno == logging.WARNING
    cudnn_part, xla_part = message.split("XLA for")
    assert "cuDNN for unet self-attention" in cudnn_part and "text_encoder" not in cudnn_part
    assert "down_blocks_0" in cudnn_part and "down_blocks_2" not in cudnn_part
    assert "cross-attention" not in cudnn_part
    assert "text_encoder (77 keys odd" in xla_part
    assert "vae (head dim 512 > 128)" in xla_part
    assert "mid_block" in xla_part and "head dim 160 > 128" in xla_part


def test_message_for_float32_and_when_nothing_falls_back(caplog):
    with caplog.at_level(logging.INFO, logger="sdjax"):
        build_models(shipped("sd15"), F32, "cudnn")
        build_models(shipped("sd21"), BF16, "cudnn")
    first, second = (r.getMessage() for r in attention_records(caplog))
    assert "cuDNN for no module" in first and "float32" in first
    assert "unet" in first and "vae" in first and "text_encoder" in first
    assert "cuDNN for unet self-attention; XLA for unet cross-attention and text_encoder (77 keys" in second
    assert "vae (head dim 512 > 128)" in second


def test_message_helper():
    site = AttentionSite("unet", "down_blocks_0", 8, 40)
    assert attention_plan_message("xla", [AttentionChoice(site, "xla")]) is None
    assert attention_plan_message("cudnn", [AttentionChoice(site, "cudnn")]) == (
        "attention_implementation=cudnn: cuDNN for unet")
