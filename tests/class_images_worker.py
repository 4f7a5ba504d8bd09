"""Run in each process of the multi-host class images test: class images into a folder both
hosts share, into a folder of each host's own, then into a folder only host 1 cannot use.

    python -m tests.class_images_worker RESULT.json COORDINATOR PROCESS_ID SHARED OWN BAD

Writes {"process", "shared", "own": ClassImages as a dict, "bad_error": the error's message}.
"""

import dataclasses
import json
import sys

import jax

from sdjax.errors import ConfigError
from sdjax.parallel import initialize_distributed
from sdjax.train.setup import enable_compilation_cache

SETTINGS = dict(prompt="a photo of a dog", count=5, sample_batch_size=1, num_inference_steps=2,
                seed=3)


def main(result_path, coordinator, process_id, shared, own, bad):
    enable_compilation_cache()
    initialize_distributed(coordinator, 2, int(process_id))
    from sdjax import StableDiffusion
    from sdjax.class_images import ensure_class_images

    sd = StableDiffusion.from_config("tiny", seed=0)
    is_main = jax.process_index() == 0
    result = {"process": jax.process_index()}
    for what, folder in (("shared", shared), ("own", own)):
        result[what] = dataclasses.asdict(ensure_class_images(sd, folder, is_main=is_main,
                                                              **SETTINGS))
    try:
        ensure_class_images(sd, bad, is_main=is_main, **SETTINGS)
        result["bad_error"] = None
    except ConfigError as e:
        result["bad_error"] = str(e)
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
