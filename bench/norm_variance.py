"""GroupNorm's variance, two-pass (sdjax: E[(x - mean)^2], as PyTorch) or one-pass (Flax's fast
E[x^2] - mean^2), measured where it would matter: one SD 1.5 UNet resnet block (GroupNorm 32,
SiLU, 3x3 conv, twice), forward + backward, bf16, compiled for a TPU v5e chip on this machine
(libtpu). Reports XLA's FLOPs, bytes accessed and temporaries per variant.

    python bench/norm_variance.py --batch 4
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from sdjax.models import layers  # noqa: E402

# SD 1.5 UNet resnet blocks at 512 px: (latent side, channels) per level.
LEVELS = ((64, 320), (32, 640), (16, 1280), (8, 1280))


def measure(side: int, channels: int, batch: int, fast: bool, device) -> dict:
    def group_norm(groups, eps, dtype, name):
        return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, use_fast_variance=fast,
                            name=name)

    layers.group_norm = group_norm  # the block reads it from its module at trace time
    block = layers.ResnetBlock2D(channels, 32, 1e-5, dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((batch, side, side, channels), jnp.bfloat16)
    temb = jax.ShapeDtypeStruct((batch, 1280), jnp.bfloat16)
    params = jax.eval_shape(lambda: block.init(jax.random.key(0), jnp.zeros(x.shape, x.dtype),
                                               jnp.zeros(temb.shape, temb.dtype)))

    def loss(p, x, t):
        return jnp.sum(block.apply(p, x, t).astype(jnp.float32) ** 2)

    sharding = jax.sharding.SingleDeviceSharding(device)
    args = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), (params, x, temb))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {"flops": cost.get("flops", 0.0), "bytes": cost.get("bytes accessed", 0.0),
            "temporaries": compiled.memory_analysis().temp_size_in_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--topology", default="v5e:2x2")
    args = parser.parse_args()
    from jax.experimental import topologies

    device = topologies.get_topology_desc(platform="tpu", topology_name=args.topology).devices[0]
    print(f"{device.device_kind}, batch {args.batch}, bf16, forward + backward of one block")
    print("| latent | channels | variance | GFLOP | GB accessed | temporaries MiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for side, channels in LEVELS:
        for fast in (False, True):
            r = measure(side, channels, args.batch, fast, device)
            print(f"| {side}x{side} | {channels} | {'one-pass' if fast else 'two-pass'} | "
                  f"{r['flops'] / 1e9:.2f} | {r['bytes'] / 1e9:.3f} | "
                  f"{r['temporaries'] / 2**20:.1f} |", flush=True)


if __name__ == "__main__":
    main()
