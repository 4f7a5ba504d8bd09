"""Attention on a TPU, XLA against the Pallas flash kernel, compiled ahead of time (no TPU needed).

    python bench/attention_tpu.py                          # every site below, batch 1 and 4, v5e:1x1
    python bench/attention_tpu.py --topology v5e:2x4 --batch 8 --impls xla flash
    python bench/attention_tpu.py --no_sites --unet sd15   # the whole UNet, xla against auto (slow)
    python bench/attention_tpu.py --time                   # on a TPU host: also the clock

Each row compiles the forward and backward (the VJP of a random output cotangent with respect to
q, k and v) of ONE attention call site of Stable Diffusion at its real size, in bfloat16, through
`sdjax.models.attention`, for a TPU topology (`jax.experimental.topologies`: libtpu compiles for
it on any machine, a CPU-only one included), and reports the compiled program's
`memory_analysis()` (temporaries: HBM the program needs beyond its inputs and outputs) and
`cost_analysis()` (FLOPs and bytes accessed as XLA counts them; the Pallas kernels are custom
calls whose cost XLA only knows from the estimate they attach: the flash kernel's forward
attaches one, its backward kernels and splash attach none, so their FLOPs and bytes are
undercounted). Implementations:
  xla         jax.nn.dot_product_attention(implementation="xla"), sdjax's default before "auto"
  flash       sdjax's "flash": the Pallas TPU flash kernel, blocks of up to 512 (what sdjax runs)
  flash-b128  the same kernel with its own default blocks (128 everywhere)
  splash      JAX's Pallas splash-attention kernel (full mask, blocks of up to 512), for reference
A site the kernel cannot take (lengths not a multiple of 128) is reported with the reason and no
figures. With --unet, the whole UNet's forward and backward (gradient of the mean output with
respect to the parameters, float32 parameters, bfloat16 compute, no remat) at its native size,
batch 1, built with `build_models(..., platform="tpu")` for each of --unet_impls: "xla", "flash"
(the kernel wherever it fits) or "auto" (what training on a TPU gets): ten to twenty-five
minutes of compiling each on a small machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# (model, site, tokens, heads, head dim). SD 1.x: 8 heads of channels/8 (320, 640, 1280);
# SD 2.x: heads of 64 channels. Tokens: the latent's pixels at that level (512 px -> 64x64,
# 768 px -> 96x96 latents); the VAE's mid-block attention is one head of 512 over the latent.
SITES = [
    ("sd15-512", "unet level 0", 4096, 8, 40),
    ("sd15-512", "unet level 1", 1024, 8, 80),
    ("sd15-512", "unet level 2", 256, 8, 160),
    ("sd15-512", "unet level 3 (mid)", 64, 8, 160),
    ("sd15-512", "vae mid", 4096, 1, 512),
    ("sd21-768", "unet level 0", 9216, 5, 64),
    ("sd21-768", "unet level 1", 2304, 10, 64),
    ("sd21-768", "unet level 2", 576, 20, 64),
    ("sd21-768", "vae mid", 9216, 1, 512),
]
IMPLS = ("xla", "flash", "flash-b128", "splash")
UNET_SIZES = {"sd15": 512, "sd21": 768, "sd21-base": 512}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--topology", default="v5e:1x1", help="TPU topology to compile for")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="global batch sizes")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--models", nargs="+", default=["sd15-512", "sd21-768"],
                   help="which SITES rows (sd15-512, sd21-768)")
    p.add_argument("--unet", nargs="*", choices=sorted(UNET_SIZES), default=None,
                   help="also compile these whole UNets (batch 1, native size)")
    p.add_argument("--unet_impls", nargs="+", choices=("xla", "flash", "auto"),
                   default=["xla", "auto"], help="attention_implementation of the --unet compiles")
    p.add_argument("--no_sites", action="store_true", help="only the --unet compiles")
    p.add_argument("--time", action="store_true",
                   help="run on the local TPU devices instead and report milliseconds per call")
    p.add_argument("--json", help="also write the rows to this file")
    return p.parse_args()


def devices_for(args):
    import jax

    if args.time:
        devices = jax.devices()
        if devices[0].platform != "tpu":
            sys.exit("--time needs a TPU host (jax.devices() are " + devices[0].platform + ")")
        return devices
    from jax.experimental import topologies

    name = args.topology
    # A one-chip topology needs its host bounds spelled out (libtpu's default host is 2x2).
    options = {"chips_per_host_bounds": (1, 1, 1)} if name.endswith(":1x1") else {}
    return list(topologies.get_topology_desc(platform="tpu", topology_name=name,
                                             **options).devices)


def splash(q, k, v):
    """JAX's splash attention on (B, T, N, D): full mask, q pre-scaled (the kernel has no scale)."""
    import jax
    import jax.numpy as jnp
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    t, s, n, d = q.shape[1], k.shape[1], q.shape[2], q.shape[3]

    def block(length):
        return next(b for b in (512, 256, 128) if length % b == 0)

    bq, bk = block(t), block(s)
    sizes = sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                          block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    kernel = sk.make_splash_mha_single_device(sm.MultiHeadMask([sm.FullMask((t, s))] * n),
                                              block_sizes=sizes)
    scaled = (q.astype(jnp.float32) / math.sqrt(d)).astype(q.dtype)
    out = jax.vmap(kernel)(*(jnp.swapaxes(x, 1, 2) for x in (scaled, k, v)))
    return jnp.swapaxes(out, 1, 2)


def site_fn(impl, heads, mesh):
    """f(q, k, v, cotangent) -> (dq, dk, dv) of one attention call on (B, T, heads*D) arrays."""
    import jax
    from jax.sharding import PartitionSpec as P

    from sdjax.models.attention import attention, tpu_flash_attention

    def forward(q, k, v):
        if impl in ("xla", "flash"):
            return attention(q, k, v, heads, implementation=impl)
        b, t, inner = q.shape
        split = [x.reshape(b, x.shape[1], heads, inner // heads) for x in (q, k, v)]
        if impl == "flash-b128":
            out = tpu_flash_attention(*split, max_block=128)
        else:
            kernel = splash
            if mesh is not None and mesh.size > 1:
                spec = P(tuple(mesh.axis_names))
                kernel = jax.shard_map(splash, mesh=mesh.abstract_mesh, in_specs=(spec,) * 3,
                                       out_specs=spec, check_vma=False)
            out = kernel(*split)
        return out.reshape(b, t, inner)

    def grads(q, k, v, cotangent):
        context = (jax.sharding.use_abstract_mesh(mesh.abstract_mesh) if mesh is not None
                   else contextlib.nullcontext())
        with context:
            _, vjp = jax.vjp(forward, q, k, v)
            return vjp(cotangent)

    return grads


def analyse(compiled) -> dict:
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"temp_bytes": int(memory.temp_size_in_bytes),
            "argument_bytes": int(memory.argument_size_in_bytes),
            "output_bytes": int(memory.output_size_in_bytes),
            "flops": float(cost.get("flops", -1)),
            "bytes_accessed": float(cost.get("bytes accessed", -1))}


def clock(fn, inputs, repeats=20) -> float:
    import jax

    jax.block_until_ready(fn(*inputs))
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(*inputs)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats * 1e3


def measure_site(args, devices, model, site, tokens, heads, head_dim, batch, impl) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from sdjax.models.attention import choose_attention_implementation

    row = {"model": model, "site": site, "tokens": tokens, "heads": heads, "head_dim": head_dim,
           "batch": batch, "impl": impl, "topology": "local" if args.time else args.topology}
    if impl != "xla":
        _, reason = choose_attention_implementation("flash", jnp.bfloat16, head_dim, heads,
                                                    tokens, tokens, platform="tpu")
        if reason:
            return dict(row, skipped=reason)
    mesh = Mesh(np.asarray(devices).reshape(-1), ("data",)) if len(devices) > 1 else None
    if mesh is not None and batch % mesh.size:
        return dict(row, skipped=f"batch {batch} not divisible by {mesh.size} devices")
    sharding = (NamedSharding(mesh, P("data")) if mesh is not None
                else jax.sharding.SingleDeviceSharding(devices[0]))
    shape = jax.ShapeDtypeStruct((batch, tokens, heads * head_dim), jnp.bfloat16, sharding=sharding)
    fn = jax.jit(site_fn(impl, heads, mesh))
    start = time.perf_counter()
    try:
        compiled = fn.lower(shape, shape, shape, shape).compile()
    except Exception as e:  # a kernel that does not lower for this shape: say so and go on
        return dict(row, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    row["compile_s"] = round(time.perf_counter() - start, 1)
    row.update(analyse(compiled))
    if args.time:
        rng = np.random.default_rng(0)
        inputs = [jax.device_put(rng.standard_normal(shape.shape).astype(jnp.bfloat16), sharding)
                  for _ in range(4)]
        row["ms"] = round(clock(compiled, inputs), 3)
    return row


def measure_unet(args, devices, name, impl) -> dict:
    """The whole UNet's forward and backward at its native size, batch 1, on one device."""
    import jax
    import jax.numpy as jnp

    from sdjax.pipeline import SHIPPED_CONFIGS, StableDiffusion
    from sdjax.models.build import build_models, param_shapes

    size = UNET_SIZES[name]
    configs = StableDiffusion._read_configs(os.path.join(SHIPPED_CONFIGS, name))
    unet = build_models(configs, jnp.bfloat16, impl, platform="tpu", image_size=size)["unet"]
    sharding = jax.sharding.SingleDeviceSharding(devices[0])
    params = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32,
                                                                   sharding=sharding),
                                    param_shapes(unet, "unet"))
    latent = size // 8
    sample = jax.ShapeDtypeStruct((1, 4, latent, latent), jnp.bfloat16, sharding=sharding)
    steps = jax.ShapeDtypeStruct((1,), jnp.int32, sharding=sharding)
    context = jax.ShapeDtypeStruct((1, 77, configs["unet"]["cross_attention_dim"]), jnp.bfloat16,
                                   sharding=sharding)

    def loss(p, x, t, c):
        return jnp.mean(unet.apply({"params": p}, x, t, c).astype(jnp.float32))

    start = time.perf_counter()
    compiled = jax.jit(jax.grad(loss)).lower(params, sample, steps, context).compile()
    row = {"model": name, "site": f"whole unet {size}px", "batch": 1, "impl": impl,
           "topology": args.topology, "compile_s": round(time.perf_counter() - start, 1)}
    row.update(analyse(compiled))
    return row


def show(row):
    head = (f"{row['model']:9} {row['site']:19} B={row['batch']} "
            f"T={row.get('tokens', '-')} {row.get('heads', '-')}x{row.get('head_dim', '-')} "
            f"{row['impl']:10}")
    if "skipped" in row or "error" in row:
        print(f"{head} -- {row.get('skipped') or row.get('error')}", flush=True)
        return
    mib = 2 ** 20
    print(f"{head} temp {row['temp_bytes'] / mib:9.1f} MiB  flops {row['flops'] / 1e9:8.2f} G  "
          f"bytes {row['bytes_accessed'] / mib:9.1f} MiB  compile {row['compile_s']:6.1f} s"
          + (f"  {row['ms']} ms" if "ms" in row else ""), flush=True)


def main():
    args = parse_args()
    devices = devices_for(args)
    flags = {k: os.environ.get(k) for k in ("XLA_FLAGS", "LIBTPU_INIT_ARGS") if os.environ.get(k)}
    print(f"# {len(devices)} x {devices[0].device_kind}; flags: {flags or 'none (defaults)'}")
    rows = []
    if not args.no_sites:
        for model, site, tokens, heads, head_dim in SITES:
            if model not in args.models:
                continue
            for batch in args.batch:
                for impl in args.impls:
                    row = measure_site(args, devices, model, site, tokens, heads, head_dim,
                                       batch, impl)
                    show(row)
                    rows.append(row)
    for name in args.unet or ():
        for impl in args.unet_impls:
            row = measure_unet(args, devices[:1], name, impl)
            show(row)
            rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
