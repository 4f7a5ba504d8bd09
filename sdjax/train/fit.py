"""Will it fit? The run's train step compiled ahead of time for a TPU slice (or the local
devices), and the memory and FLOPs of the compiled program.

    python train_flax.py <the run's flags> --compile_only --topology v5e-8

With libtpu installed (`pip install -r requirements_tpu.txt`), JAX compiles for a TPU topology
on any machine, a CPU-only one included (`jax.experimental.topologies`); the compiled program's
`memory_analysis()` and `cost_analysis()` are what the chip will see. Nothing is read but the
model's configs: no weights, no data. The result is `output_dir/compile_report.json` and one
summary line. Without --fsdp/--sharding the check tries replicated first and then the state split
over every device of the slice (ZeRO-1, then ZeRO-3), and reports the first that fits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from sdjax import storage
from sdjax.errors import ConfigError
from sdjax.parallel import quiet_libtpu_without_tpu
from sdjax.train.step_loop import batch_key

GIB = 2 ** 30
# GCP accelerator-type names -> JAX topology names (a slice of one host unless stated).
TOPOLOGY_ALIASES = {
    "v2-8": "v2:2x2", "v3-8": "v3:2x2", "v4-8": "v4:2x2x1", "v5p-8": "v5p:2x2x1",
    "v5e-1": "v5e:1x1", "v5e-4": "v5e:2x2", "v5e-8": "v5e:2x4", "v5litepod-1": "v5e:1x1",
    "v5litepod-4": "v5e:2x2", "v5litepod-8": "v5e:2x4", "v6e-1": "v6e:1x1", "v6e-4": "v6e:2x2",
    "v6e-8": "v6e:2x4"}
MEGACORE_GENERATIONS = ("v4", "v5p")
# HBM per JAX device by device_kind (a v2/v3 device is one core; v4/v5p: one megacore chip).
HBM_BYTES = {"TPU v2": 8 * GIB, "TPU v3": 16 * GIB, "TPU v4": 32 * GIB, "TPU v5 lite": 16 * GIB,
             "TPU v5": 95 * GIB, "TPU v5p": 95 * GIB, "TPU v6 lite": 32 * GIB}


def topology_devices(name: str) -> tuple:
    """(JAX topology name, its devices) of `--topology` (v5e:2x4 or v5e-8 style)."""
    from jax.experimental import topologies

    # Compiling for a topology uses no chip: let several such processes load libtpu at once
    # (it otherwise holds /tmp/libtpu_lockfile for one process).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    quiet_libtpu_without_tpu()
    topology = TOPOLOGY_ALIASES.get(name, name)
    try:
        # v4 and v5p VMs run each chip's two TensorCores as one device (megacore); libtpu's
        # default for a described topology is a device per core.
        options = ({"chip_config_name": "megacore"}
                   if topology.split(":")[0] in MEGACORE_GENERATIONS else {})
        if topology.endswith(":1x1"):  # one chip: libtpu's default host is 2x2 chips
            options["chips_per_host_bounds"] = (1, 1, 1)
        described = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                                 **options)
    except Exception as e:  # JAX's (no libtpu) or libtpu's own (a name it does not know)
        if "TPU support not installed" in str(e):
            raise ConfigError("--topology needs libtpu to compile for a TPU: `pip install -r "
                              "requirements_tpu.txt` (it runs on a CPU-only machine)") from None
        raise ConfigError(f"--topology {name} is not a TPU topology JAX knows (e.g. v5e:2x4, "
                          f"v5e-8, v2-8, v4:2x2x1): {str(e).splitlines()[0][:160]}") from None
    return topology, list(described.devices)


def device_memory(device) -> Optional[int]:
    """Bytes of memory one device may use: what its runtime reports (a GPU's share under XLA's
    preallocation, a TPU's usable HBM), else the TPU table (topology devices have no runtime);
    None when unknown (CPU)."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # topology devices and CPUs have no runtime stats
        stats = {}
    return stats.get("bytes_limit") or HBM_BYTES.get(device.device_kind)


def shapes_pipeline(cfg):
    """The run's base model as parameter shapes only (configs read; no weights loaded)."""
    from sdjax.pipeline import SHIPPED_CONFIGS, StableDiffusion

    name = cfg.pretrained_model_name_or_path
    if os.path.isdir(name) or os.path.isdir(os.path.join(SHIPPED_CONFIGS, name)):
        return StableDiffusion.from_config(name, init_params=False)
    from sdjax.model_files import is_single_file, open_model

    if is_single_file(name):
        files = open_model(name, original_config=cfg.original_config)
        return StableDiffusion.from_configs(files.configs, files.scheduler_config)
    from huggingface_hub import snapshot_download

    folder = snapshot_download(name, revision=cfg.revision, allow_patterns=[
        "model_index.json", "*/config.json", "scheduler/*"])
    return StableDiffusion.from_config(folder, init_params=False)


def abstract_batch(cfg, sd, mesh: Mesh) -> dict:
    """The shapes of one step's global batch (k micro-batches of every device's rows)."""
    from sdjax.parallel import batch_sharded

    sharding = batch_sharded(mesh, 1)
    k = cfg.gradient_accumulation_steps
    rows = cfg.train_batch_size * mesh.devices.size * (2 if cfg.prior_preservation else 1)
    res = cfg.resolution
    dtype = jnp.dtype(cfg.compute_dtype_name)
    batch = {}
    if cfg.cache_latents:
        channels = sd.configs["vae"].get("latent_channels", 4)
        shape = (k, rows, channels, res // 8, res // 8)
        batch["latent_mean"] = batch["latent_std"] = jax.ShapeDtypeStruct(shape, dtype,
                                                                           sharding=sharding)
    else:
        batch["pixel_values"] = jax.ShapeDtypeStruct((k, rows, res, res, 3), jnp.uint8,
                                                     sharding=sharding)
    width = sd.configs["text_encoder"]["hidden_size"]
    length = sd.configs["text_encoder"].get("max_position_embeddings", 77)
    if text_embeddings_in_batch(cfg):
        batch["text_embeddings"] = jax.ShapeDtypeStruct((k, rows, length, width), dtype,
                                                        sharding=sharding)
    else:
        batch["input_ids"] = jax.ShapeDtypeStruct((k, rows, length), jnp.int32,
                                                  sharding=sharding)
    if cfg.prior_preservation:
        batch["prior_mask"] = jax.ShapeDtypeStruct((k, rows), jnp.float32, sharding=sharding)
    return batch


def text_embeddings_in_batch(cfg) -> bool:
    return not cfg.train_text_encoder and (cfg.cache_latents or cfg.pre_compute_text_embeddings)


def _with_shardings(tree, shardings):
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


@dataclasses.dataclass(frozen=True)
class StepFacts:
    """What the step needs besides the config: the schedule length (a number the step takes,
    not a constant) and what the batch brings instead of the VAE / the frozen text encoder."""
    max_steps: int
    cached_latents: bool
    text_embeddings: bool

    @classmethod
    def of_config(cls, cfg) -> "StepFacts":
        return cls(cfg.max_train_steps or 1000, cfg.cache_latents, text_embeddings_in_batch(cfg))


def topology_mesh(devices: list, fsdp: int) -> Mesh:
    from sdjax.parallel import DATA_AXIS, FSDP_AXIS

    if len(devices) % fsdp:
        raise ConfigError(f"--fsdp {fsdp} does not divide the {len(devices)} devices")
    return Mesh(np.asarray(devices).reshape(-1, fsdp), (DATA_AXIS, FSDP_AXIS))


def step_arguments(program, run, sd, mesh: Mesh) -> tuple:
    """The abstract (state, frozen, batch, numbers) of `program` (`step_program(run, sd, mesh,
    ...)`), with their shardings: what its `step_fn` lowers for."""
    return (_with_shardings(program.abstract_state, program.shardings),
            _with_shardings(program.frozen, program.frozen_sharding),
            abstract_batch(run, sd, mesh), program.numbers)


def images_per_step(cfg, devices: int) -> int:
    """Rows of one optimizer step over `devices` (every micro-batch; class images included)."""
    return (cfg.train_batch_size * devices * cfg.gradient_accumulation_steps
            * (2 if cfg.prior_preservation else 1))


def compile_step(cfg, sd, mesh: Mesh, strategy: str, facts: StepFacts) -> dict:
    """Compiles the run's step on `mesh` with the state laid out by `strategy` over its fsdp
    axis; -> the per-device bytes, FLOPs and compile time, and the executable ("compiled",
    which the training loop reuses for the first batch shape: `batch_key`)."""
    from sdjax.parallel import fsdp_size
    from sdjax.train.trainer import step_program

    fsdp = fsdp_size(mesh)
    run = dataclasses.replace(cfg, sharding=strategy, fsdp=fsdp)
    program = step_program(run, sd, mesh, facts.max_steps, facts.cached_latents,
                           facts.text_embeddings)
    arguments = step_arguments(program, run, sd, mesh)
    batch = arguments[2]
    t0 = time.perf_counter()
    layout = {"strategy": strategy if fsdp > 1 else "replicated", "fsdp": fsdp,
              "data": mesh.devices.size // fsdp}
    try:
        compiled = program.step_fn.lower(*arguments).compile()
    except Exception as e:  # the TPU compiler refuses a program that cannot fit its HBM
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return {"per_device_bytes": None, "fits": False, "sharding": layout,
                "compiler": " ".join(str(e).split())[:300],
                "compile_seconds": round(time.perf_counter() - t0, 1)}
    seconds = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else (cost or {})
    per_device = {"arguments": int(memory.argument_size_in_bytes),
                  "temporaries": int(memory.temp_size_in_bytes),
                  "outputs": int(memory.output_size_in_bytes),
                  "aliased": int(memory.alias_size_in_bytes)}
    per_device["peak"] = (per_device["arguments"] + per_device["outputs"]
                          - per_device["aliased"] + per_device["temporaries"])
    images = images_per_step(cfg, mesh.devices.size)
    flops = float(cost.get("flops", 0.0)) * mesh.devices.size  # per-device program's, all devices
    return {"per_device_bytes": per_device, "flops_per_step": flops,
            "flops_per_image": flops / images if images else None,
            "images_per_step": images, "compile_seconds": round(seconds, 1),
            "sharding": layout, "compiled": compiled, "batch_key": batch_key(batch)}


def step_flops(cfg, sd, facts: StepFacts, devices: int) -> Optional[float]:
    """FLOPs of one optimizer step over the whole batch (every device's share together), from
    XLA's cost analysis of the step as traced, before partitioning: lowered (not compiled) for
    one CPU device with the global batch, attention in plain XLA, micro-batches unrolled. So
    the figure is the step's arithmetic, remat's recomputation included, whatever the layout
    or chip. The compiled program's own analysis is not: XLA counts a loop's body once, and the
    TPU partitioner turns ZeRO-3's gathered convolutions and matmuls into windowed loops over
    the shards (SD 1.5 read 2.3 TFLOP per image under ZeRO-3 instead of 4.0), a scan over
    micro-batches likewise, and a Pallas kernel not at all. None where JAX has no CPU backend."""
    from sdjax.train.trainer import step_program

    try:
        cpu = jax.devices("cpu")[:1]
    except RuntimeError:  # JAX_PLATFORMS without cpu
        return None
    mesh = topology_mesh(cpu, 1)
    run = dataclasses.replace(cfg, sharding="replicated", fsdp=1, attention_implementation="xla",
                              train_batch_size=cfg.train_batch_size * devices)
    program = step_program(run, sd, mesh, facts.max_steps, facts.cached_latents,
                           facts.text_embeddings)
    cost = program.step_fn.lower(*step_arguments(program, run, sd, mesh)).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else (cost or {})
    return float(cost.get("flops", 0.0)) or None


def candidate_layouts(cfg, devices: int) -> list:
    """(strategy, fsdp) to try in order: the run's own, or replicated, then split over every
    device (ZeRO-1, then ZeRO-3)."""
    if cfg.fsdp or cfg.sharding:
        fsdp = cfg.fsdp or (1 if cfg.sharding_strategy == "replicated" else devices)
        return [(cfg.sharding_strategy if fsdp > 1 else "replicated", fsdp)]
    layouts = [("replicated", 1)]
    if devices > 1:
        layouts += [("zero1", devices), ("zero3", devices)]
    return layouts


def choose_layout(layouts: list, compile_one, hbm: Optional[int]) -> tuple:
    """Compiles the layouts in order until one fits `hbm` bytes (every one when hbm is
    unknown: the first). -> (the chosen result, the results tried)."""
    tried = []
    for strategy, fsdp in layouts:
        result = compile_one(strategy, fsdp)
        if result.get("per_device_bytes") is not None:  # else: the compiler refused it (OOM)
            result["fits"] = None if hbm is None else result["per_device_bytes"]["peak"] <= hbm
        tried.append(result)
        if result["fits"] is not False:
            return result, tried
    return tried[-1], tried


def compile_check(cfg, devices: Optional[list] = None, hbm: Optional[int] = None,
                  topology: Optional[str] = None) -> dict:
    """The `--compile_only` run: compiles, writes compile_report.json, prints one line.
    `devices` (with `topology`, their name, and `hbm`, bytes per device) replace those of
    --topology or the local ones: bench/gpu_compile.py passes a GPU described without one."""
    if devices is None and cfg.topology:
        topology, devices = topology_devices(cfg.topology)
    elif devices is None:
        topology, devices = None, jax.devices()
    sd = shapes_pipeline(cfg)
    hbm = hbm or device_memory(devices[0])
    facts = StepFacts.of_config(cfg)
    chosen, tried = choose_layout(
        candidate_layouts(cfg, len(devices)),
        lambda s, f: compile_step(cfg, sd, topology_mesh(devices, f), s, facts), hbm)
    chosen = {k: v for k, v in chosen.items() if k not in ("compiled", "batch_key")}
    flops = step_flops(cfg, sd, facts, len(devices)) if chosen.get("images_per_step") else None
    if flops:  # else the compiled program's own count (see step_flops)
        chosen.update(flops_per_step=flops, flops_per_image=flops / chosen["images_per_step"])
    report = {"topology": topology or "local", "device_kind": devices[0].device_kind,
              "devices": len(devices), "hbm_bytes_per_device": hbm,
              "gradient_checkpointing": cfg.remat_policy if cfg.remat else None,
              "attention": cfg.attention_implementation, **chosen,
              "tried": [{"sharding": t["sharding"], "fits": t["fits"],
                         "peak": (t["per_device_bytes"] or {}).get("peak"),
                         **({"compiler": t["compiler"]} if "compiler" in t else {})}
                        for t in tried]}
    path = storage.join(cfg.output_dir, "compile_report.json")
    if jax.process_index() == 0:
        storage.makedirs(cfg.output_dir)
        storage.write_text(path, json.dumps(report, indent=2) + "\n")
        print(summary_line(report, path))
    return report


def summary_line(report: dict, path: str) -> str:
    b = report["per_device_bytes"]
    layout = report["sharding"]
    if b is None:  # no layout fits: the compiler's own words for the last one tried
        return (f"compile check, {report['topology']} ({report['devices']} x "
                f"{report['device_kind']}): does NOT fit with any layout tried; "
                f"{report['compiler']} -> {path}")
    how = ("replicated" if layout["strategy"] == "replicated"
           else f"{layout['strategy']} over fsdp groups of {layout['fsdp']}")
    hbm = report["hbm_bytes_per_device"]
    verdict = ("memory unknown" if report["fits"] is None else
               f"{'fits' if report['fits'] else 'does NOT fit'} in {hbm / GIB:.1f} GiB")
    flops = (f"; {report['flops_per_image'] / 1e12:.2f} TFLOP per image, "
             f"{report['flops_per_step'] / 1e12:.2f} per step" if report["flops_per_image"] else "")
    return (f"compile check, {report['topology']} ({report['devices']} x "
            f"{report['device_kind']}), state {how}: peak {b['peak'] / GIB:.2f} GiB per device "
            f"(arguments {b['arguments'] / GIB:.2f}, temporaries {b['temporaries'] / GIB:.2f}, "
            f"outputs {b['outputs'] / GIB:.2f}, aliased {b['aliased'] / GIB:.2f}): {verdict}"
            f"{flops} -> {path}")


def choose_run_layout(cfg, sd, facts: StepFacts):
    """The layout of a training run given no --fsdp/--sharding: its step compiled for the
    devices, replicated, then with the state split over each host's devices (ZeRO-1, then
    ZeRO-3), until one fits the memory the devices report.

    -> (cfg with the layout set, its mesh, a note for the start-up summary, {batch_key: the
    compiled step} for the step loop to reuse). Nothing is compiled where there is nothing to
    choose: an explicit layout, one device, or devices that report no memory limit (CPU).
    """
    from jax.experimental import multihost_utils

    from sdjax.parallel import make_mesh

    hbm = min((device_memory(d) or 0) for d in jax.local_devices()) or None
    if cfg.fsdp or cfg.sharding or jax.device_count() == 1 or hbm is None:
        return cfg, None, None, {}
    local = jax.local_device_count()
    layouts = candidate_layouts(cfg, local if local > 1 else jax.device_count())
    meshes = {}

    def compile_one(strategy, fsdp):
        meshes[strategy] = make_mesh(fsdp)
        return compile_step(cfg, sd, meshes[strategy], strategy, facts)

    chosen, tried = choose_layout(layouts, compile_one, hbm)
    index = here = tried.index(chosen)
    if jax.process_count() > 1:  # every host trains the layout host 0 chose
        index = int(multihost_utils.broadcast_one_to_all(np.int32(index)))
    if not chosen["fits"]:
        raise ConfigError(
            f"the train step does not fit the {hbm / GIB:.1f} GiB of a device with any layout "
            f"({layout_costs(tried)}): lower --train_batch_size or --resolution, add "
            "--gradient_checkpointing or --mixed_precision bf16, or force a layout with --fsdp")
    strategy, fsdp = layouts[index]
    run = dataclasses.replace(cfg, sharding=strategy, fsdp=fsdp)
    compiled = {chosen["batch_key"]: chosen["compiled"]} if index == here else {}
    note = f"chosen for {hbm / GIB:.1f} GiB per device: {layout_costs(tried[:index + 1])}"
    return run, meshes.get(strategy) or make_mesh(fsdp), note, compiled


def layout_costs(tried: list) -> str:
    """"replicated needs 18.3 GiB, zero1 12.1 GiB": what each layout tried needs per device."""
    parts = []
    for t in tried:
        name = t["sharding"]["strategy"]
        peak = (t["per_device_bytes"] or {}).get("peak")
        parts.append(f"{name} refused by the compiler (out of memory)" if peak is None
                     else f"{name} {peak / GIB:.2f} GiB")
    return ", ".join(parts)
