"""Run in each process of the multi-host data test: builds the latent cache with the trainer's
own start-up path, then writes this host's step plans and cached batch values for one epoch.

    python -m tests.multihost_data RESULT.json <train_flax.py flags>
"""

import json
import sys
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np

from sdjax.config import parse_train_args
from sdjax.parallel import make_mesh
from sdjax.train.inputs import open_inputs
from sdjax.train.setup import start_run


def main(result_path, argv):
    cfg, notes = parse_train_args(argv)
    is_main = start_run(cfg, notes)
    loader = open_inputs(cfg, is_main, make_mesh(), use_cache=True).loader
    steps = int(loader.steps_per_epoch)
    plans, latents = [], []
    with ThreadPoolExecutor(2) as pool:
        for step in range(steps):
            size, indices = loader.step_plan(step)
            batch = loader.step_batch(pool, step)
            plans.append({"size": list(size), "indices": indices.tolist()})
            latents.append(np.asarray(batch["latent_mean"], np.float64).sum(axis=(2, 3, 4)).tolist())
    with open(result_path, "w") as f:
        json.dump({"process": jax.process_index(), "plans": plans,
                   "latent_sums": latents}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
