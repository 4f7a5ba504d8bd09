"""The TPU flash-attention path and the "auto" default.

The kernel itself runs here in Pallas' TPU interpret mode (`pltpu.force_tpu_interpret_mode`),
on CPU: its outputs and gradients must equal XLA's. The choice tests need no kernel: which call
sites get flash on a TPU, which fall back to XLA and why, what "auto" is per platform, and that a
traced model sends to the kernel exactly what the plan says (a spy stands in for the kernel).
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sdjax import StableDiffusion
from sdjax.config import parse_train_args
from sdjax.errors import ConfigError
from sdjax.models import UNet2DConditionModel
from sdjax.models import attention as attention_module
from sdjax.models.attention import (attention, choose_attention_implementation, device_platform,
                                    flash_block_sizes, local_platform, resolve_auto)
from sdjax.models.config import UNetConfig, clip_text_config, unet_config, vae_config
from sdjax.models.clip import plan_attention as plan_clip
from sdjax.models.unet import plan_attention as plan_unet
from sdjax.models.vae import plan_attention as plan_vae
from sdjax.parallel import mesh_context
from sdjax.pipeline import SHIPPED_CONFIGS
from sdjax.models.build import build_models

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32


def shipped(name):
    return StableDiffusion._read_configs(f"{SHIPPED_CONFIGS}/{name}")


# --- the kernel against XLA (interpret mode) -----------------------------------------------------

def interpret_mode():
    """Pallas TPU kernels run on CPU in interpret mode. It needs JAX >= 0.7 (the main CI run's
    JAX); these tests are not jax_api tests, so the oldest-stack run does not collect them."""
    assert hasattr(pltpu, "force_tpu_interpret_mode"), (
        f"jax {jax.__version__} cannot interpret Pallas TPU kernels on CPU: run these tests "
        "with JAX >= 0.7")
    return pltpu.force_tpu_interpret_mode()


def outputs_and_grads(implementation, q, k, v, cotangent, heads, is_causal):
    def run(q, k, v):
        return attention(q, k, v, heads, is_causal=is_causal, implementation=implementation)

    out, vjp = jax.vjp(run, q, k, v)
    return (out, *vjp(cotangent))


def random_qkv(dtype, batch, q_len, kv_len, width, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, q_len, width)).astype(dtype)
    k = jax.random.normal(keys[1], (batch, kv_len, width)).astype(dtype)
    v = jax.random.normal(keys[2], (batch, kv_len, width)).astype(dtype)
    cotangent = jax.random.normal(keys[3], (batch, q_len, width)).astype(dtype)
    return q, k, v, cotangent


def assert_close(got, want, tolerance):
    got, want = (np.asarray(x, np.float32) for x in (got, want))
    assert np.abs(got - want).max() <= tolerance * np.abs(want).max()


@pytest.mark.slow  # the interpreter: about 10 s a case
@pytest.mark.parametrize("dtype,heads,head_dim,q_len,kv_len,is_causal,tolerance", [
    # Blocks of 128: two query and two key blocks, against XLA in bfloat16 (both round p to bf16).
    (BF16, 2, 64, 256, 256, False, 2e-2),
    # SD 1.5's head dim 160 (zero-padded to 256), T != S (two key blocks), float32.
    (F32, 1, 160, 128, 256, False, 1e-5),
])
def test_flash_equals_xla(monkeypatch, dtype, heads, head_dim, q_len, kv_len, is_causal,
                          tolerance):
    monkeypatch.setattr(attention_module, "FLASH_MAX_BLOCK", 128)
    inputs = random_qkv(dtype, 1, q_len, kv_len, heads * head_dim)
    want = outputs_and_grads("xla", *inputs, heads, is_causal)
    with interpret_mode():
        got = jax.jit(outputs_and_grads, static_argnums=(0, 5, 6))("flash", *inputs, heads,
                                                                   is_causal)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert_close(g, w, tolerance)


@pytest.mark.slow
def test_flash_under_a_mesh_runs_per_batch_shard():
    # 4 CPU devices: the kernel runs in shard_map, one example per device, and still equals XLA
    # (forward only: the backward of shard_map is JAX's, and the kernel's is tested above).
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    rows = NamedSharding(mesh, P("data"))
    q, k, v, _ = (jax.device_put(x, rows) for x in random_qkv(F32, 4, 128, 128, 64, seed=1))
    want = attention(q, k, v, 1, implementation="xla")

    def on_mesh(q, k, v):
        with mesh_context(mesh):
            return attention(q, k, v, 1, implementation="flash")

    with interpret_mode():
        lowered = jax.jit(on_mesh).lower(q, k, v)
        assert "shard_map" in lowered.as_text() or "manual_computation" in lowered.as_text()
        got = lowered.compile()(q, k, v)
    assert got.sharding.is_equivalent_to(rows, 3)
    assert_close(got, want, 1e-5)


def test_block_sizes():
    blocks = flash_block_sizes(4096, 1024)
    assert (blocks.block_q, blocks.block_k_major, blocks.block_k) == (512, 512, 512)
    assert (blocks.block_q_dq, blocks.block_k_dkv) == (512, 512)
    blocks = flash_block_sizes(2304, 384)  # SD 2.x at 768 px, level 1: 2304 = 9 x 256
    assert (blocks.block_q, blocks.block_k_major) == (256, 128)
    assert flash_block_sizes(4096, 4096, max_block=128).block_q == 128


# --- which sites get the kernel ----------------------------------------------------------------

@pytest.mark.parametrize("head_dim,q_len,kv_len,expected,reason", [
    (40, 4096, 4096, "flash", ""),               # SD 1.5 at 512 px, level 0
    (160, 256, 256, "flash", ""),                # level 2: head dim padded to 256
    (64, 9216, 9216, "flash", ""),               # SD 2.x at 768 px, level 0
    (512, 4096, 4096, "flash", ""),              # the VAE's single head
    (40, None, None, "flash", ""),               # lengths unknown: checked when traced
    (40, 4096, 77, "xla", "77 keys not a multiple of 128"),       # cross-attention to the text
    (160, 64, 64, "xla", "64 keys not a multiple of 128"),        # 8x8 latents (mid block)
    (64, 576, 576, "xla", "576 keys not a multiple of 128"),      # SD 2.x at 768 px, level 2
    (64, 576, 1024, "xla", "576 queries not a multiple of 128"),
    (640, 256, 256, "xla", "head dim 640 > 512"),
])
def test_flash_table(head_dim, q_len, kv_len, expected, reason):
    assert choose_attention_implementation("flash", BF16, head_dim, 8, q_len, kv_len,
                                           platform="tpu") == (expected, reason)


def test_flash_falls_back_for_dtype_mask_and_platform():
    assert choose_attention_implementation("flash", F32, 64, 8, 256, 256, platform="tpu") == (
        "flash", "")
    implementation, reason = choose_attention_implementation("flash", F16, 64, 8, platform="tpu")
    assert implementation == "xla" and "float16" in reason
    implementation, reason = choose_attention_implementation("flash", BF16, 64, 8, 256, 256,
                                                             has_mask=True, platform="tpu")
    assert implementation == "xla" and "mask" in reason
    implementation, reason = choose_attention_implementation("flash", BF16, 64, 8, platform="gpu")
    assert implementation == "xla" and "for TPU v4 and later, not gpu" in reason


@pytest.mark.parametrize("platform,head_dim,expected", [
    ("tpu", 40, "flash"), ("tpu", 160, "flash"),
    ("gpu", 40, "cudnn"), ("gpu", 160, "xla"),   # cuDNN's own rules: head dim <= 128
    ("cpu", 40, "xla"), ("gpu-sm75", 40, "xla"), ("rocm", 40, "xla"), ("tpu-v3", 40, "xla"),
])
def test_auto_per_platform(platform, head_dim, expected):
    implementation, _ = choose_attention_implementation("auto", BF16, head_dim, 8,
                                                        platform=platform)
    assert implementation == expected


class FakeDevice:
    def __init__(self, platform, device_kind="", compute_capability=None, version="cuda 12080"):
        self.platform, self.device_kind = platform, device_kind
        self.compute_capability = compute_capability
        self.client = type("Client", (), {"platform_version": version})()


@pytest.mark.parametrize("device,expected", [
    (FakeDevice("tpu", "TPU v5 lite"), "tpu"), (FakeDevice("tpu", "TPU v4"), "tpu"),
    (FakeDevice("tpu", "TPU v6 lite"), "tpu"), (FakeDevice("tpu", "TPU v3"), "tpu-v3"),
    (FakeDevice("tpu", "TPU v2"), "tpu-v2"), (FakeDevice("cpu", "cpu"), "cpu"),
    (FakeDevice("gpu", "NVIDIA H100", "9.0"), "gpu"), (FakeDevice("gpu", "A100", "8.0"), "gpu"),
    (FakeDevice("gpu", "Tesla T4", "7.5"), "gpu-sm75"),
    (FakeDevice("gpu", "MI300X", None, "rocm 6.2"), "rocm"),
])
def test_device_platform(device, expected):
    assert device_platform(device) == expected


def test_auto_here_is_xla():
    assert local_platform() == "cpu" and resolve_auto("auto") == "xla"
    assert choose_attention_implementation("auto", BF16, 64) == ("xla", "")
    assert resolve_auto("flash", "cpu") == "flash" and resolve_auto(None, "tpu") is None


def test_auto_takes_flash_from_1024_tokens():
    assert choose_attention_implementation("auto", BF16, 80, 8, 1024, 1024, platform="tpu") == (
        "flash", "")
    assert choose_attention_implementation("auto", BF16, 160, 8, 256, 256, platform="tpu") == (
        "xla", "256 tokens, auto takes flash from 1024")
    assert choose_attention_implementation("auto", BF16, 160, 8, platform="tpu") == ("flash", "")
    # An explicit request is not second-guessed.
    assert choose_attention_implementation("flash", BF16, 160, 8, 256, 256, platform="tpu") == (
        "flash", "")


def test_sd15_tpu_plan():
    cfg = shipped("sd15")
    unet = unet_config(cfg["unet"])
    value, choices = plan_unet(unet, "auto", BF16, "tpu", 64, 77)
    assert value == ("flash", "flash", "xla", "xla")  # 4096, 1024, 256 and 64 tokens at 512 px
    got = {(c.site.name, c.site.cross): (c.implementation, c.reason) for c in choices}
    for block in ("down_blocks_0", "down_blocks_1", "up_blocks_2", "up_blocks_3"):
        assert got[block, False] == ("flash", "")
    for block in ("down_blocks_2", "up_blocks_1"):
        assert got[block, False] == ("xla", "256 tokens, auto takes flash from 1024")
    for block in ("down_blocks_0", "down_blocks_1", "down_blocks_2", "up_blocks_1",
                  "up_blocks_2", "up_blocks_3"):
        assert got[block, True] == ("xla", "77 keys not a multiple of 128")
    assert got["mid_block", False] == ("xla", "64 keys not a multiple of 128")
    # An explicit flash: every level (lengths are checked when traced); at 1024 px level 2 has
    # 1024 tokens, so auto takes it too.
    assert plan_unet(unet, "flash", BF16, "tpu", 64, 77)[0] == "flash"
    assert plan_unet(unet, "auto", BF16, "tpu", 128, 77)[0] == ("flash", "flash", "flash", "xla")
    value, choices = plan_vae(vae_config(cfg["vae"]), "auto", BF16, "tpu", 64)
    assert value == "flash" and {c.implementation for c in choices} == {"flash"}
    value, choices = plan_clip(clip_text_config(cfg["text_encoder"]), "auto", BF16, "tpu")
    assert value == "xla" and choices[0].reason == "77 keys not a multiple of 128"


def test_sd21_at_768_px_plan():
    value, choices = plan_unet(unet_config(shipped("sd21")["unet"]), "flash", BF16, "tpu", 96, 77)
    assert value == "flash"
    assert plan_unet(unet_config(shipped("sd21")["unet"]), "auto", BF16, "tpu", 96, 77)[0] == (
        "flash", "flash", "xla", "xla")
    own = {c.site.name: c.implementation for c in choices if not c.site.cross}
    assert own == {"down_blocks_0": "flash", "down_blocks_1": "flash", "down_blocks_2": "xla",
                   "mid_block": "xla", "up_blocks_1": "xla", "up_blocks_2": "flash",
                   "up_blocks_3": "flash"}  # 96, 48, 24 (576 tokens), 12 latent pixels


def test_tpu_message(caplog):
    with caplog.at_level(logging.INFO, logger="sdjax"):
        models = build_models(shipped("sd15"), BF16, "auto", platform="tpu")
    assert models["unet"].attention_implementation == ("flash", "flash", "xla", "xla")
    assert models["vae"].attention_implementation == "flash"
    assert models["text_encoder"].attention_implementation == "xla"
    records = [r for r in caplog.records if "attention_implementation" in r.getMessage()]
    assert len(records) == 1 and records[0].levelno == logging.INFO  # auto: expected fallbacks
    message = records[0].getMessage()
    assert "\n" not in message and message.startswith("attention_implementation=auto (tpu): ")
    flash_part, xla_part = message.split("; XLA for ")
    assert flash_part.endswith("flash for unet self-attention[down_blocks_0, down_blocks_1, "
                               "up_blocks_2, up_blocks_3] and vae")
    assert ("unet self-attention[down_blocks_2, up_blocks_1] (256 tokens, auto takes flash "
            "from 1024)") in xla_part
    assert "unet self-attention[mid_block] (64 keys not a multiple of 128)" in xla_part
    assert "unet cross-attention and text_encoder (77 keys not a multiple of 128)" in xla_part


def test_explicit_flash_warns_and_auto_elsewhere_is_quiet(caplog):
    with caplog.at_level(logging.INFO, logger="sdjax"):
        build_models(shipped("sd15"), BF16, "flash", platform="tpu", image_size=256)
        build_models(shipped("sd15"), BF16, "auto")  # this CPU: xla everywhere, nothing to say
        build_models(shipped("sd15"), BF16, "flash")  # asked for on a CPU: XLA, with the reason
    records = [r for r in caplog.records if "attention_implementation" in r.getMessage()]
    assert [r.levelno for r in records] == [logging.WARNING, logging.WARNING]
    # 256 px: 32x32 latents, so level 2 is 8x8 (64 tokens) and level 3 4x4 (16)
    assert ("unet self-attention[down_blocks_2, up_blocks_1] (64 keys not a multiple of 128), "
            "unet self-attention[mid_block] (16 keys") in records[0].getMessage()
    assert "flash for no module" in records[1].getMessage()
    assert "for TPU v4 and later, not cpu" in records[1].getMessage()


def test_auto_on_a_gpu_is_the_cudnn_plan():
    auto = build_models(shipped("sd15"), BF16, "auto", platform="gpu")
    cudnn = build_models(shipped("sd15"), BF16, "cudnn")
    assert {c: m.attention_implementation for c, m in auto.items()} == {
        c: m.attention_implementation for c, m in cudnn.items()}


def test_config_default_and_validation():
    assert parse_train_args([])[0].attention_implementation == "auto"
    cfg, _ = parse_train_args(["--attention_implementation=flash"])
    assert cfg.attention_implementation == "flash"
    with pytest.raises(ConfigError, match="choose auto, xla, cudnn or flash"):
        parse_train_args(["--attention_implementation=flash9"])[0].validate()


# --- what a traced model sends to the kernel ----------------------------------------------------

class FlashSpy:
    """Stands in for the Pallas kernel: records (T, S, head dim) and computes with XLA."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, *, is_causal=False, max_block=None):
        self.calls.append((q.shape[1], k.shape[1], q.shape[-1]))
        return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation="xla")


def test_traced_unet_sends_only_multiples_of_128(monkeypatch):
    spy = FlashSpy()
    monkeypatch.setattr(attention_module, "tpu_flash_attention", spy)
    config = UNetConfig(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D",) * 2,
                        up_block_types=("CrossAttnUpBlock2D",) * 2, layers_per_block=1,
                        norm_num_groups=8, cross_attention_dim=16, attention_head_dim=(2, 2))
    unet = UNet2DConditionModel(config, dtype=BF16, attention_implementation="flash")
    inputs = (jnp.zeros((1, 4, 16, 16)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 77, 16)))
    jax.eval_shape(unet.init, jax.random.key(0), *inputs)
    # 16x16 latents: level 0 self-attention (256 tokens, 2 heads of 16) runs flash in the down
    # block (1 layer) and the up block (2); level 1 (8x8 = 64 tokens) and all cross-attention
    # (77 keys) run XLA.
    assert spy.calls == [(256, 256, 16)] * 3


def test_a_batch_the_mesh_does_not_divide_runs_xla(monkeypatch):
    spy = FlashSpy()
    monkeypatch.setattr(attention_module, "tpu_flash_attention", spy)
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    q = jax.ShapeDtypeStruct((2, 128, 64), F32)

    def run(q):
        with mesh_context(mesh):
            return attention(q, q, q, 1, implementation="flash")

    jax.eval_shape(run, q)
    assert spy.calls == []
    jax.eval_shape(run, jax.ShapeDtypeStruct((4, 128, 64), F32))
    assert spy.calls == [(128, 128, 64)]
