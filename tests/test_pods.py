"""Multi-process start-up: an environment that says "one of several" either starts JAX's
distributed runtime or stops with one line; it never trains alone as process 0."""

import os
import socket
import subprocess
import sys

import pytest

from sdjax.parallel import multi_process_environment
from tests.conftest import DEMO_DATA
from tests.tiny_torch import REPO


@pytest.mark.parametrize("env, words", [
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"}, "JAX_COORDINATOR_ADDRESS=10.0.0.2:1234"),
    ({"JAX_NUM_PROCESSES": "4"}, "JAX_NUM_PROCESSES=4"),
    ({"TPU_WORKER_HOSTNAMES": "t1,t2,t3,t4", "TPU_WORKER_ID": "2"}, "TPU pod"),
    ({"TPU_PROCESS_ADDRESSES": "a:1,b:1"}, "TPU pod"),
    ({"MEGASCALE_NUM_SLICES": "2"}, "multi-slice"),
    ({"SLURM_NTASKS": "8", "SLURM_PROCID": "3"}, "SLURM with 8 tasks"),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "Open MPI with 2 processes"),
    ({"JOBSET_NAME": "sd-train"}, "Kubernetes JobSet"),
])
def test_multi_process_environments_are_recognised(env, words):
    assert words in multi_process_environment(env)


@pytest.mark.parametrize("env", [
    {}, {"TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0"},
    {"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, {"SLURM_NTASKS": "4"},  # salloc, not srun
    {"OMPI_COMM_WORLD_SIZE": "1"}, {"JAX_NUM_PROCESSES": "1"},
])
def test_single_process_environments(env):
    assert multi_process_environment(env) is None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(tmp_path, env):
    out = tmp_path / "out"
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROCESS", "TPU_", "SLURM_",
                                  "OMPI_", "JOBSET_"))}
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "train_flax.py"), "--pretrained_model_name_or_path=tiny",
         f"--train_data_dir={DEMO_DATA}", "--resolution=64", "--max_train_steps=1",
         "--distributed_timeout=3", f"--output_dir={out}"],
        env=dict(clean, JAX_PLATFORMS="cpu", **env), capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    return result, errors, out


@pytest.mark.jax_api
def test_unreachable_coordinator_stops_with_one_line(tmp_path):
    address = f"127.0.0.1:{_free_port()}"  # nobody listens there
    result, errors, out = _train(tmp_path, {"JAX_COORDINATOR_ADDRESS": address,
                                            "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert len(errors) == 1 and f"coordinator {address} did not answer" in errors[0]
    assert "JAX_NUM_PROCESSES=2" in errors[0]
    assert not out.exists()


@pytest.mark.jax_api
def test_detected_pod_without_a_coordinator_stops_with_one_line(tmp_path):
    # The TPU pod variables, but no way for JAX to find the coordinator: training alone as
    # "process 0" on every worker, all writing one output_dir, must not happen.
    result, errors, out = _train(tmp_path, {"TPU_WORKER_HOSTNAMES": "127.0.0.1,127.0.0.2",
                                            "TPU_WORKER_ID": "1"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert len(errors) == 1
    assert "TPU pod (TPU_WORKER_HOSTNAMES lists 2 workers)" in errors[0]
    assert "jax.distributed.initialize failed" in errors[0] and "--num_processes 1" in errors[0]
    assert not out.exists()
