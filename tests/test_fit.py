"""The ahead-of-time fit check (`--compile_only`, `--topology`): the tiny model's real train step
compiled for TPU slices on this CPU machine (libtpu from requirements_tpu.txt), the report's
keys and arithmetic, the layout search, and bad topology names."""

import json
import os
import subprocess
import sys

import pytest

from sdjax.train.fit import choose_layout, summary_line
from tests.conftest import DEMO_DATA
from tests.helpers import run_cli

KEYS = {"topology", "device_kind", "devices", "hbm_bytes_per_device", "per_device_bytes",
        "fits", "flops_per_step", "flops_per_image", "sharding"}


def check(tmp_path, *flags):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli([
        "text_to_image", "--pretrained_model_name_or_path=tiny", f"--train_data_dir={DEMO_DATA}",
        f"--output_dir={out}", "--resolution=64", "--train_batch_size=2", "--use_ema",
        "--mixed_precision=bf16", "--gradient_checkpointing", "--compile_only", *flags])
    assert code == 0, stderr
    return json.loads((out / "compile_report.json").read_text()), stdout, out


@pytest.fixture(scope="module")
def local_check(tmp_path_factory):
    """Without --topology: the 4 local CPU devices, replicated, at batch 4 per device: the 16
    images per step of the TPU slices' checks below (8 devices x 2)."""
    return check(tmp_path_factory.mktemp("local"), "--train_batch_size=4")


@pytest.mark.parametrize("topology, kind, devices, hbm_gib", [
    ("v5e-8", "TPU v5 lite", 8, 16), ("v2:2x2", "TPU v2", 8, 8)])
def test_compile_for_a_tpu_slice(topology, kind, devices, hbm_gib, tmp_path, local_check):
    report, stdout, out = check(tmp_path, f"--topology={topology}", "--fsdp=4")
    assert KEYS <= set(report)
    assert (report["device_kind"], report["devices"]) == (kind, devices)
    assert report["hbm_bytes_per_device"] == hbm_gib * 2**30
    b = report["per_device_bytes"]
    assert b["peak"] == b["arguments"] + b["outputs"] - b["aliased"] + b["temporaries"]
    assert 0 < b["peak"] < 2**30 and report["fits"] is True
    assert report["sharding"] == {"strategy": "zero3", "fsdp": 4, "data": 2}
    assert report["gradient_checkpointing"] == "nothing_saveable"
    # 2 images per device x 8 devices; the tiny UNet's step is tens of MFLOP per image.
    assert report["flops_per_step"] == pytest.approx(report["flops_per_image"] * 16)
    assert 1e6 < report["flops_per_image"] < 1e10
    # The step's arithmetic, whatever the chip and layout: the same as for 16 images on the
    # local CPU devices, replicated. (The compiled ZeRO-3 program's own count was 10% lower on
    # this tiny model: XLA counts the body of the partitioner's windowed loops once.)
    assert report["flops_per_step"] == pytest.approx(local_check[0]["flops_per_step"], rel=1e-9)
    assert "state zero3 over fsdp groups of 4" in stdout and "fits in " in stdout
    assert sorted(p.name for p in out.iterdir()) == ["compile_report.json"]  # nothing else


def test_compile_for_the_local_devices_replicated_first(local_check):
    """Without --topology: the 4 local CPU devices (memory unknown), replicated."""
    report, stdout, _ = local_check
    assert report["topology"] == "local" and report["devices"] == 4
    assert report["fits"] is None and report["sharding"]["strategy"] == "replicated"
    assert "memory unknown" in stdout


def test_layout_search_takes_the_first_that_fits():
    peaks = {("replicated", 1): 20, ("zero1", 8): 14, ("zero3", 8): 9}

    def compile_one(strategy, fsdp):
        return {"per_device_bytes": {"peak": peaks[(strategy, fsdp)]},
                "sharding": {"strategy": strategy, "fsdp": fsdp}}

    layouts = list(peaks)
    chosen, tried = choose_layout(layouts, compile_one, hbm=16)
    assert chosen["sharding"]["strategy"] == "zero1" and len(tried) == 2
    chosen, tried = choose_layout(layouts, compile_one, hbm=8)  # nothing fits: the last, said
    assert chosen["sharding"]["strategy"] == "zero3" and chosen["fits"] is False
    report = dict(chosen, topology="v5e:2x4", devices=8, device_kind="TPU v5 lite",
                  hbm_bytes_per_device=8, flops_per_image=None,
                  per_device_bytes={"peak": 9, "arguments": 1, "temporaries": 8, "outputs": 1,
                                    "aliased": 1})
    assert "does NOT fit" in summary_line(report, "x.json")


@pytest.mark.parametrize("flags, message", [
    (["--topology=v9z-8", "--compile_only"], "--topology v9z-8 is not a TPU topology"),
    (["--topology=v5e-8"], "--topology compiles for a TPU slice you are not on: add --compile_only"),
])
def test_bad_topology(flags, message, tmp_path):
    code, _, stderr = run_cli(["text_to_image", "--pretrained_model_name_or_path=tiny",
                               f"--train_data_dir={DEMO_DATA}", f"--output_dir={tmp_path}/o",
                               *flags])
    assert code == 2 and message in stderr, stderr
    assert not (tmp_path / "o").exists()


def test_without_libtpu_the_message_says_what_to_install(monkeypatch, tmp_path):
    from jax.experimental import topologies

    def missing(**_):
        raise RuntimeError("JAX TPU support not installed; cannot generate TPU topology.")

    monkeypatch.setattr(topologies, "get_topology_desc", missing)
    code, _, stderr = run_cli(["text_to_image", "--pretrained_model_name_or_path=tiny",
                               f"--train_data_dir={DEMO_DATA}", f"--output_dir={tmp_path}/o",
                               "--compile_only", "--topology=v5e-8"])
    assert code == 2 and "pip install -r requirements_tpu.txt" in stderr


def test_libtpu_starts_quietly_on_a_machine_without_tpu():
    """libtpu (installed here for these checks) on a host with no TPU: neither JAX's start nor
    a topology prints libtpu's INVALID_ARGUMENT error and warnings about the TPU VM's worker
    hostnames and host bounds it cannot find."""
    code = ("from sdjax.cli import _quiet_libraries; _quiet_libraries(); import jax; "
            "print(jax.devices()[0].platform); from sdjax.train.fit import topology_devices; "
            "print(len(topology_devices('v5e-8')[1]))")
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_PLATFORMS", "TPU_WORKER_HOSTNAMES", "TPU_HOST_BOUNDS")}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["cpu", "8"]  # JAX tried libtpu, fell back to the CPU
    for noise in ("INVALID_ARGUMENT", "could not determine", "Failed to find host bounds"):
        assert noise not in run.stderr, run.stderr[-2000:]


def test_a_topology_check_leaves_the_compilation_cache_alone(monkeypatch, tmp_path):
    """A program compiled for a slice this machine is not cannot be loaded back (JAX warns on
    the next identical check and compiles anyway): only real runs turn the cache on."""
    from sdjax.config import parse_train_args
    from sdjax.train import setup

    calls = []
    monkeypatch.setattr(setup, "enable_compilation_cache", lambda: calls.append(1))
    flags = ["--pretrained_model_name_or_path=tiny", f"--train_data_dir={DEMO_DATA}",
             f"--output_dir={tmp_path}", "--compile_only"]
    setup.start_run(parse_train_args(flags + ["--topology=v5e-8"])[0], None)
    assert calls == []
    setup.start_run(parse_train_args(flags)[0], None)
    assert calls == [1]


def test_megacore_chips_are_one_device_each():
    """A v4-8 / v5p-8 VM shows JAX its 4 chips (two TensorCores each) as 4 devices of 32 / 95
    GiB; libtpu's default description would give 8 cores of half the memory."""
    from sdjax.train.fit import HBM_BYTES, topology_devices

    for name, kind in (("v4-8", "TPU v4"), ("v5p-8", "TPU v5")):
        topology, devices = topology_devices(name)
        assert len(devices) == 4 and devices[0].device_kind == kind
        assert HBM_BYTES[kind] >= 32 * 2**30
    assert len(topology_devices("v3-8")[1]) == 8  # v2/v3: a device per core, as on the VMs
    assert len(topology_devices("v5e-1")[1]) == 1


def test_explicit_layouts_are_tried_alone():
    from types import SimpleNamespace

    from sdjax.train.fit import candidate_layouts

    def cfg(fsdp=None, sharding=None):
        strategy = sharding or ("zero3" if (fsdp or 1) > 1 else "replicated")
        return SimpleNamespace(fsdp=fsdp, sharding=sharding, sharding_strategy=strategy)

    assert candidate_layouts(cfg(sharding="replicated"), 8) == [("replicated", 1)]
    assert candidate_layouts(cfg(sharding="zero1"), 8) == [("zero1", 8)]
    assert candidate_layouts(cfg(fsdp=4), 8) == [("zero3", 4)]
    assert candidate_layouts(cfg(), 8) == [("replicated", 1), ("zero1", 8), ("zero3", 8)]


def _scan_unrolls(jaxpr) -> list:
    """The `unroll` of every scan in a jaxpr, nested ones included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            found.append(eqn.params["unroll"])
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    found += _scan_unrolls(inner if hasattr(inner, "eqns") else inner.jaxpr)
    return found


def test_micro_batches_loop_on_a_tpu_and_unroll_on_a_cpu():
    """The accumulation loop is unrolled for CPU devices only (XLA:CPU runs convolutions in a loop
    body slowly): a TPU slice's step, compiled on this CPU machine, keeps the loop its own host
    would compile, so the check measures that program."""
    import jax

    from sdjax.config import parse_train_args
    from sdjax.train.fit import shapes_pipeline, step_arguments, topology_devices, topology_mesh
    from sdjax.train.trainer import step_program

    cfg, _ = parse_train_args(["--pretrained_model_name_or_path=tiny",
                               f"--train_data_dir={DEMO_DATA}", "--output_dir=unused",
                               "--resolution=32", "--train_batch_size=1",
                               "--gradient_accumulation_steps=2"], task="text_to_image")
    sd = shapes_pipeline(cfg)
    unrolls = {}
    for platform, devices in (("tpu", topology_devices("v5e-8")[1]), ("cpu", jax.devices())):
        mesh = topology_mesh(devices, 1)
        program = step_program(cfg, sd, mesh, 10, False, False)
        traced = program.step_fn.trace(*step_arguments(program, cfg, sd, mesh))
        unrolls[platform] = _scan_unrolls(traced.jaxpr.jaxpr)
    assert unrolls == {"tpu": [1], "cpu": [2]}
