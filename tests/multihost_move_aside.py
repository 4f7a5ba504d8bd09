"""Run in each process of a two-host job: a new line of training must move the folder's old
checkpoints aside on host 0, and host 0's move fails (as a bucket error would). Every host must
stop with host 0's message, at once, rather than wait at a barrier for JAX's timeout.

    python -m tests.multihost_move_aside OUTPUT_DIR COORDINATOR PROCESS_ID
"""

import sys
import time

import numpy as np

from sdjax import storage
from sdjax.parallel import initialize_distributed


def main(output_dir, coordinator, process_id):
    initialize_distributed(coordinator, 2, int(process_id), timeout_seconds=120)
    import jax

    from sdjax.train.run_checkpoints import RunCheckpoints

    if jax.process_index() == 0:
        def refuse(source, destination):
            raise OSError(f"403 Forbidden: cannot move {storage.basename(source)}")
        storage.move = refuse
    checkpoints = RunCheckpoints(output_dir, None, jax.process_index() == 0)
    start = time.perf_counter()
    try:
        checkpoints.save(9, {"w": np.zeros(3, np.float32)}, {})
    except Exception as e:  # noqa: BLE001
        print(f"stopped after {time.perf_counter() - start:.1f} s: {type(e).__name__}: {e}",
              flush=True)
        sys.exit(3)
    print("saved", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
