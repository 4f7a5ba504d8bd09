"""What several test files use: running the command line in this process, the one-line error,
weights of a saved pipeline, small image folders, a README command's argv, the processes of a
multi-host job, and the check that an exported folder is a working diffusers pipeline."""

import contextlib
import io
import os
import shlex
import socket
import subprocess

import numpy as np
from PIL import Image
from safetensors.numpy import load_file

from sdjax.cli import main
from tests.conftest import xla_flags
from tests.tiny_torch import REPO

WEIGHTS = {"unet": "unet/diffusion_pytorch_model.safetensors",
           "vae": "vae/diffusion_pytorch_model.safetensors",
           "text_encoder": "text_encoder/model.safetensors"}


# --- the command line, in this process ---------------------------------------------------------

def run_cli(argv):
    """`python train_flax.py ARGV` in this process -> (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def error_line(stderr):
    """The one error line (the progress bar also writes to stderr); no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def readme_argv(command, variables, script_names=None):
    """A README command with its script names replaced (`script_names`: {old: new}) and its
    $VARIABLES filled in, split as the shell splits it -> the argv of train_flax.py."""
    for script, ours in (script_names or {}).items():
        command = command.replace(script, ours)
    for name, value in variables.items():
        command = command.replace(f"${name}", shlex.quote(value))
    # As the shell reads it: a backslash-newline continues the line; quotes group words.
    words = shlex.split(command.replace("\\\n", " "))
    assert words[:2] == ["python", "train_flax.py"], words
    return words[2:]


def override(argv, values):
    """Sets each flag named in `values`: its `--name=value` in argv replaced, or appended."""
    result, done = [], set()
    for word in argv:
        name = word[2:].split("=", 1)[0] if word.startswith("--") else None
        if name in values:
            assert "=" in word, word  # the README writes flag values as --name=value
            word = f"--{name}={values[name]}"
            done.add(name)
        result.append(word)
    return result + [f"--{name}={value}" for name, value in values.items() if name not in done]


# --- files --------------------------------------------------------------------------------------

def random_pngs(folder, count, seed=0):
    """`count` small PNGs of random pixels, of different sizes (the loader resizes and crops)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        h, w = 32 + 8 * (i % 3), 32 + 8 * ((i + 1) % 3)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(folder / f"dog{i}.png")
    return str(folder)


def weights(folder, component):
    """The saved weights of one component of a diffusers folder, as numpy arrays by key."""
    return load_file(os.path.join(str(folder), WEIGHTS[component]))


def unet_weights(folder):
    return weights(folder, "unet")


def changed(before, after):
    assert before.keys() == after.keys()
    return any(not np.array_equal(before[k], after[k]) for k in before)


def assert_diffusers_pipeline(folder, text_encoder=True):
    """`folder` loads as diffusers' StableDiffusionPipeline, and the models it loaded compute
    what sdjax computes with the same folder's weights: the text encoder's hidden states of a
    prompt and one UNet prediction (float32, tiny models). -> the pipeline."""
    import jax.numpy as jnp
    import torch
    from diffusers import StableDiffusionPipeline

    from sdjax.pipeline import load_pipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    assert pipe.tokenizer is not None and (pipe.text_encoder is not None or not text_encoder)
    sd = load_pipeline(str(folder))
    ids = pipe.tokenizer(["a photo of a dog"], padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, return_tensors="np").input_ids
    with torch.no_grad():
        context = pipe.text_encoder(torch.from_numpy(ids))[0].numpy()
    ours = np.asarray(sd.text_encoder.apply({"params": sd.params["text_encoder"]},
                                            jnp.asarray(ids)))
    np.testing.assert_allclose(ours, context, atol=1e-4)
    config = pipe.unet.config
    size = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
    latents = np.random.default_rng(0).standard_normal(
        (1, config.in_channels, size, size)).astype(np.float32)
    with torch.no_grad():
        reference = pipe.unet(torch.from_numpy(latents), 10, torch.from_numpy(context)).sample
    prediction = np.asarray(sd.unet.apply({"params": sd.params["unet"]}, jnp.asarray(latents),
                                          jnp.asarray([10]), jnp.asarray(context)))
    np.testing.assert_allclose(prediction, reference.numpy(), atol=1e-4 * max(
        1.0, float(np.abs(reference.numpy()).max())))
    return pipe


# --- several processes: the hosts of a multi-host job ------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def host_env(devices):
    """The environment of a test process with `devices` CPU devices."""
    return dict(os.environ, XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu")


def start(command, devices):
    """`command` in the background with `devices` CPU devices (a 1-host reference run, or one
    host of a job); `wait_all` collects it."""
    return subprocess.Popen(command, env=host_env(devices), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_all(procs, check=True, timeout=600):
    """Waits for every process (killing the rest if one hangs); -> [(stdout, stderr)]."""
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outputs):
        assert not check or p.returncode == 0, err[-3000:]
    return outputs
