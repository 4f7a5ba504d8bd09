"""Test set-up: 4 fake CPU devices, no network, and tiny random diffusers pipelines on disk."""

import os

# 4 fake CPU devices; LLVM optimisation off: the tiny models' programs are compile-bound (about
# 40% less compile time for a 2-core CI machine; results differ from -O2 in the last float bits).
def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test process (this one, or a subprocess) with `devices` CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"


os.environ.setdefault("XLA_FLAGS", xla_flags(4))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import shutil  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

# One persistent XLA cache per test session, for every program however quick to compile and for
# every process (pytest's workers and the runs they start): each run builds its jitted functions
# anew, so without it a worker compiled the same small programs (state init, sampler, checkpoint
# slices) once per run. About 40% less time for the tests on 2 cores.
# The process that makes the directory (pytest's main process; its workers inherit the variable)
# removes it at the end: it holds about 150 MB after a full run.
_own_compilation_cache = None
if "SDJAX_COMPILATION_CACHE" not in os.environ:
    _own_compilation_cache = tempfile.mkdtemp(prefix="sdjax-xla-")
    os.environ["SDJAX_COMPILATION_CACHE"] = _own_compilation_cache
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["SDJAX_COMPILATION_CACHE"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

from tests import tiny_torch  # noqa: E402


def pytest_unconfigure(config):
    if _own_compilation_cache is not None:
        shutil.rmtree(_own_compilation_cache, ignore_errors=True)


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


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The shipped tiny config with random weights, saved as a diffusers folder (stands in for a
    hub model in the seed command lines)."""
    from sdjax import StableDiffusion

    return StableDiffusion.from_config("tiny", seed=0).save_pretrained(
        str(tmp_path_factory.mktemp("tiny") / "tiny-sd"))


@pytest.fixture(scope="session")
def tiny_v_dir(tmp_path_factory, tiny_dir):
    """The tiny model as an SD 2 768-v style model: v-prediction scheduler."""
    import json
    import shutil

    folder = shutil.copytree(tiny_dir, tmp_path_factory.mktemp("tiny_v") / "tiny-sd-v")
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config["prediction_type"] = "v_prediction"
    path.write_text(json.dumps(config))
    return str(folder)


DEMO_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                         "demo_data")


@pytest.fixture(scope="session")
def saved_dataset(tmp_path_factory):
    """The demo images as a Hugging Face dataset saved with save_to_disk (a local --dataset_name)."""
    import datasets

    data = datasets.load_dataset("imagefolder", data_dir=DEMO_DATA, split="train")
    path = str(tmp_path_factory.mktemp("datasets") / "demo-captions")
    data.save_to_disk(path)
    return path


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
    """A prepared TFDS data directory holding tiny_demo_captions (configs all/half)."""
    from tests.tiny_tfds import prepare

    return prepare(str(tmp_path_factory.mktemp("tfds")))


# The files with the longest tests start first: with `-n 2 --dist loadfile` a worker takes the
# next file when it is done, so a long file left for the end keeps one worker busy while the
# other idles. (A file missing here only loses that: the order is otherwise unchanged.)
LONG_FILES = ("test_sharding.py", "test_checkpoint_branches.py",
              "test_train_loop.py", "test_remote_storage.py", "test_train_commands.py",
              "test_train_state.py", "test_lora_training.py", "test_fit.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = os.path.basename(str(item.fspath))
        return LONG_FILES.index(name) if name in LONG_FILES else len(LONG_FILES)

    items.sort(key=rank)  # stable: the order within a file and among the rest is kept
