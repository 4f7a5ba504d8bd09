"""Test set-up: 4 fake CPU devices, no network, and tiny random diffusers pipelines on disk."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests import tiny_torch  # noqa: E402


@pytest.fixture(scope="session")
def sd1_dir(tmp_path_factory):
    """A tiny SD 1.x-style pipeline saved by diffusers (conv projections, int head count,
    quick_gelu text encoder, safetensors)."""
    return tiny_torch.save_pipeline(tmp_path_factory.mktemp("sd1") / "pipe", "sd1")


@pytest.fixture(scope="session")
def sd2_dir(tmp_path_factory):
    """A tiny SD 2.x-style pipeline (linear projections, per-block head counts, upcast
    attention, gelu text encoder, v-prediction scheduler)."""
    return tiny_torch.save_pipeline(tmp_path_factory.mktemp("sd2") / "pipe", "sd2")


@pytest.fixture(scope="session")
def sd1(sd1_dir):
    from sdjax import StableDiffusion

    return StableDiffusion.from_pretrained(str(sd1_dir))


@pytest.fixture(scope="session")
def sd2(sd2_dir):
    from sdjax import StableDiffusion

    return StableDiffusion.from_pretrained(str(sd2_dir))
