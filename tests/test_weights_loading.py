"""Every way weights reach sdjax gives the same parameters as the reference safetensors folder."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from flax import serialization
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file, save_file

from sdjax import StableDiffusion
from tests import tiny_torch

WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
BIN_NAMES = {"unet": "diffusion_pytorch_model.bin", "vae": "diffusion_pytorch_model.bin",
             "text_encoder": "pytorch_model.bin"}


def assert_same_params(a, b, cast=None):
    fa, fb = flatten_dict(a), flatten_dict(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        expected = np.asarray(fb[k]) if cast is None else np.asarray(fb[k]).astype(cast).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(fa[k]), expected, err_msg="/".join(k))


def copy_pipeline(src, dst):
    shutil.copytree(src, dst)
    return dst


def rewrite_safetensors(folder, component, rename):
    path = os.path.join(folder, component, WEIGHTS[component] + ".safetensors")
    state = load_file(path)
    save_file({rename(k): v for k, v in state.items()}, path, metadata={"format": "pt"})


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder"])
def test_loaded_params_equal_source_tensors(sd1, sd1_dir, component):
    """Independent of our key mapping: every tensor in the file appears, transposed, in the tree."""
    state = load_file(os.path.join(sd1_dir, component, WEIGHTS[component] + ".safetensors"))
    ours = sorted(np.sort(np.asarray(v).ravel())[:5].tolist() + [np.asarray(v).size]
                  for v in flatten_dict(sd1.params[component]).values())
    theirs = sorted(np.sort(v.ravel())[:5].tolist() + [v.size] for v in state.values())
    assert ours == theirs


def test_pytorch_bin(sd1, sd1_dir, tmp_path):
    folder = copy_pipeline(sd1_dir, tmp_path / "bin")
    for component, name in BIN_NAMES.items():
        st = os.path.join(folder, component, WEIGHTS[component] + ".safetensors")
        state = {k: torch.from_numpy(v) for k, v in load_file(st).items()}
        torch.save(state, os.path.join(folder, component, name))
        os.remove(st)
    assert_same_params(StableDiffusion.from_pretrained(str(folder)).params, sd1.params)


def test_pytorch_bin_without_torch_says_so(sd1_dir, tmp_path, monkeypatch):
    folder = copy_pipeline(sd1_dir, tmp_path / "bin")
    st = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
    torch.save({k: torch.from_numpy(v) for k, v in load_file(st).items()},
               os.path.join(folder, "unet", "diffusion_pytorch_model.bin"))
    os.remove(st)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(Exception, match=r"need torch to read: `pip install torch`"):
        StableDiffusion.from_pretrained(str(folder))


def test_flax_msgpack(sd1, sd1_dir, tmp_path):
    folder = copy_pipeline(sd1_dir, tmp_path / "flax")
    names = {"unet": "diffusion_flax_model.msgpack", "vae": "diffusion_flax_model.msgpack",
             "text_encoder": "flax_model.msgpack"}
    for component, name in names.items():
        os.remove(os.path.join(folder, component, WEIGHTS[component] + ".safetensors"))
        with open(os.path.join(folder, component, name), "wb") as f:
            # The text encoder as transformers' Flax CLIP saved it: wrapped in {"params": ...}.
            tree = sd1.params[component]
            f.write(serialization.msgpack_serialize({"params": tree} if component == "text_encoder"
                                                    else tree))
    assert_same_params(StableDiffusion.from_pretrained(str(folder)).params, sd1.params)


def test_fp16_variant(sd1, tmp_path):
    pipe = tiny_torch.build_pipeline("sd1").to(torch.float16)
    pipe.save_pretrained(str(tmp_path / "fp16"), variant="fp16")
    assert os.path.exists(tmp_path / "fp16" / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    loaded = StableDiffusion.from_pretrained(str(tmp_path / "fp16"), variant="fp16")
    assert_same_params(loaded.params, sd1.params, cast=np.float16)
    assert flatten_dict(loaded.params["unet"])[("conv_in", "kernel")].dtype == np.float32


def test_dtype_bfloat16(sd1, sd1_dir):
    import jax.numpy as jnp

    loaded = StableDiffusion.from_pretrained(str(sd1_dir), dtype=jnp.bfloat16)
    leaves = flatten_dict(loaded.params["unet"])
    assert all(v.dtype == jnp.bfloat16 for v in leaves.values())
    assert loaded.unet.dtype == jnp.bfloat16
    assert_same_params(loaded.params, sd1.params, cast=jnp.bfloat16)


def test_sharded_safetensors(sd1, tmp_path):
    pipe = tiny_torch.build_pipeline("sd1")
    pipe.save_pretrained(str(tmp_path / "sharded"), max_shard_size="200KB")
    unet_files = os.listdir(tmp_path / "sharded" / "unet")
    assert "diffusion_pytorch_model.safetensors.index.json" in unet_files
    assert_same_params(StableDiffusion.from_pretrained(str(tmp_path / "sharded")).params, sd1.params)


def test_legacy_vae_attention_names(sd1, sd1_dir, tmp_path):
    folder = copy_pipeline(sd1_dir, tmp_path / "legacy")
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def rename(key):
        for new, legacy in old.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{legacy}.")
        return key

    rewrite_safetensors(folder, "vae", rename)
    keys = load_file(os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors")).keys()
    assert any(".proj_attn." in k for k in keys) and not any(".to_q." in k for k in keys)
    assert_same_params(StableDiffusion.from_pretrained(str(folder)).params, sd1.params)


def test_clip_with_text_model_prefix(sd1, sd1_dir, tmp_path):
    folder = copy_pipeline(sd1_dir, tmp_path / "prefixed")
    rewrite_safetensors(folder, "text_encoder", lambda k: "text_model." + k)
    assert_same_params(StableDiffusion.from_pretrained(str(folder)).params, sd1.params)


def _fake_hub_cache(cache, repo_id, refs):
    """A Hugging Face cache as huggingface_hub lays it out: snapshots/<commit>/, refs/<name>."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for ref, (commit, source) in refs.items():
        shutil.copytree(source, repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


def test_hub_id_from_offline_cache(sd1, sd1_dir, sd2_dir, tmp_path):
    """A hub id resolves through the local cache with HF_HUB_OFFLINE=1, revisions included."""
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "tiny-org/tiny-sd", {"main": ("a" * 40, sd1_dir), "v2": ("b" * 40, sd2_dir)})
    script = (
        "import json, sys, numpy as np\n"
        "from sdjax import StableDiffusion\n"
        "out = {}\n"
        "for rev in (None, 'v2'):\n"
        "    sd = StableDiffusion.from_pretrained('tiny-org/tiny-sd', revision=rev)\n"
        "    k = np.asarray(sd.params['unet']['conv_in']['kernel'])\n"
        "    out[str(rev)] = [float(k.sum()), sd.scheduler_config['prediction_type']]\n"
        "print(json.dumps(out))\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "home"),
               PYTHONPATH=tiny_torch.REPO)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["None"][0] == pytest.approx(float(np.asarray(sd1.params["unet"]["conv_in"]["kernel"]).sum()))
    assert out["None"][1] == "epsilon" and out["v2"][1] == "v_prediction"


def test_online_download_picks_one_weights_file_per_model():
    """Online, only configs, tokenizer, scheduler and the preferred weights are downloaded."""
    from sdjax.hub import files_to_download

    repo = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.bin",
            "unet/diffusion_flax_model.msgpack", "vae/config.json", "vae/diffusion_pytorch_model.bin",
            "text_encoder/config.json", "text_encoder/model.safetensors.index.json",
            "text_encoder/model-00001-of-00002.safetensors", "text_encoder/flax_model.msgpack",
            "tokenizer/vocab.json", "scheduler/scheduler_config.json"]
    patterns = files_to_download(repo, None)
    assert "unet/diffusion_pytorch_model.safetensors" in patterns
    assert "vae/diffusion_pytorch_model.bin" in patterns
    assert "text_encoder/model.safetensors.index.json" in patterns
    assert "text_encoder/model-*-of-*.safetensors" in patterns
    assert not any("msgpack" in p or "fp16" in p for p in patterns)
    fp16 = files_to_download(repo, "fp16")
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in fp16
    assert "unet/diffusion_pytorch_model.safetensors" not in fp16
