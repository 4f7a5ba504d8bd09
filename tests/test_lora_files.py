"""LoRA files: what sdjax writes loads in diffusers (PyTorch) with the same effect as sdjax's own
merge, every layout in use reads back to the same adapters, and bad files fail in one line."""

import contextlib
import io
import logging
import os
import warnings

import jax
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors.numpy import load_file, save_file

from sdjax.errors import WeightsError
from sdjax.lora.adapters import init_adapters, merge_adapters
from sdjax.lora.files import DIFFUSERS_FILE, KOHYA_FILE, read_lora, write_lora
from sdjax.lora.fuse import fuse_lora_files, parse_lora_spec
from sdjax.lora.targets import find_targets, layer_names

RANK, ALPHA = 4, 6.0  # alpha != rank: the scale 1.5 must survive every file
TOL = 1e-4
STYLES = ["sd1", "sd2"]
FORMATS = ["diffusers", "kohya"]


def random_adapters(sd, seed=0):
    """Non-zero adapters: LoCon on the UNet (linear and conv layers), kohya's standard set on
    the text encoder."""
    rng = np.random.default_rng(seed)
    out = {}
    for component, preset in (("unet", "locon"), ("text_encoder", "transformer")):
        targets, unused = find_targets(sd.params[component], component,
                                       layer_names(preset)[component])
        assert targets and not (unused and component == "text_encoder")
        tree = init_adapters(jax.random.key(seed), sd.params[component], targets, RANK)
        flat = {p: (rng.standard_normal(x.shape).astype(np.float32) * 0.2 if p[-1] == "up"
                    else np.asarray(x)) for p, x in flatten_dict(tree).items()}
        out[component] = unflatten_dict(flat)
    return out


def merged(sd, adapters, scale=ALPHA / RANK):
    params = dict(sd.params)
    for component, tree in adapters.items():
        params[component] = merge_adapters(sd.params[component], tree, scale)
    return params


@pytest.fixture(scope="module")
def cases(request, tmp_path_factory):
    """Per style: (sd, diffusers folder, adapters, {format: written file})."""
    cache = {}

    def get(style):
        if style not in cache:
            sd = request.getfixturevalue(style)
            folder = request.getfixturevalue(f"{style}_dir")
            adapters = random_adapters(sd, seed=1 if style == "sd1" else 2)
            out = tmp_path_factory.mktemp(f"lora-{style}")
            arch = "stable-diffusion-v1" if style == "sd1" else "stable-diffusion-v2-768-v"
            files = {fmt: write_lora(str(out), adapters, RANK, ALPHA, fmt,
                                     metadata={"architecture": arch, "base_model": "tiny"})
                     for fmt in FORMATS}
            cache[style] = (sd, folder, adapters, files)
        return cache[style]

    return get


@contextlib.contextmanager
def captured_messages():
    """Every log record of diffusers, peft and transformers, and every Python warning."""
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep(level=logging.DEBUG)
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield records
        finally:
            for lg, level in zip(loggers, levels):
                lg.removeHandler(handler)
                lg.setLevel(level)
            records.extend(str(w.message) for w in caught)


def relative_diff(ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def model_inputs(sd):
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    context = rng.standard_normal((2, 7, 32)).astype(np.float32)
    tokens = sd.tokenizer(["a red cat", "a blue dog on the grass"], padding="max_length",
                          max_length=sd.tokenizer.model_max_length, return_tensors="np")
    return sample, np.array([3, 700]), context, tokens.input_ids


def sdjax_outputs(sd, params):
    sample, t, context, ids = model_inputs(sd)
    return (np.asarray(sd.unet.apply({"params": params["unet"]}, sample, t, context)),
            np.asarray(sd.text_encoder.apply({"params": params["text_encoder"]}, ids)))


def torch_outputs(sd, pipe):
    sample, t, context, ids = model_inputs(sd)
    with torch.no_grad():
        unet = pipe.unet(torch.from_numpy(sample), torch.from_numpy(t),
                         torch.from_numpy(context)).sample.numpy()
        text = pipe.text_encoder(torch.from_numpy(ids)).last_hidden_state.numpy()
    return unet, text


# --- diffusers loads what we write ------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("style", STYLES)
def test_diffusers_loads_our_files_with_the_same_effect(cases, style, fmt):
    from diffusers import StableDiffusionPipeline

    sd, folder, adapters, files = cases(style)
    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    base_unet, base_text = torch_outputs(sd, pipe)
    with captured_messages() as messages:
        if fmt == "diffusers":  # the folder, as a user passes it
            pipe.load_lora_weights(os.path.dirname(files[fmt]))
        else:
            pipe.load_lora_weights(os.path.dirname(files[fmt]), weight_name=KOHYA_FILE)
    bad = [m for m in messages if any(w in m.lower() for w in ("unexpected", "missing",
                                                               "not found", "no lora keys"))]
    assert not bad, bad
    ref_unet, ref_text = torch_outputs(sd, pipe)
    ours_unet, ours_text = sdjax_outputs(sd, merged(sd, adapters))
    # The LoRA changes both models, so matching means matching its effect.
    assert relative_diff(base_unet, ref_unet) > 1e-2
    assert relative_diff(base_text, ref_text) > 1e-2
    assert relative_diff(ours_unet, ref_unet) <= TOL
    assert relative_diff(ours_text, ref_text) <= TOL

    if fmt == "diffusers":
        # diffusers' fuse_lora at 0.5 writes the same kernels as ours.
        from sdjax.weights.convert import to_torch_state_dict

        pipe.fuse_lora(lora_scale=0.5)
        pipe.unload_lora_weights()
        ours = merged(sd, adapters, ALPHA / RANK * 0.5)
        for component, module in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
            expected = to_torch_state_dict(ours[component], component)
            state = {k.removeprefix("text_model."): v.numpy()
                     for k, v in module.state_dict().items()}
            worst = max(float(np.abs(state[k] - v).max()) for k, v in expected.items())
            assert worst <= 1e-5, (component, worst)


def test_metadata(cases):
    from safetensors import safe_open

    _, _, _, files = cases("sd2")
    with safe_open(files["kohya"], "numpy") as f:
        meta = f.metadata()
        alpha = f.get_tensor(next(k for k in f.keys() if k.endswith(".alpha")))
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "6"
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert meta["ss_base_model_version"] == "sd_v2_v" and meta["base_model"] == "tiny"
    assert alpha.shape == () and float(alpha) == ALPHA
    assert os.path.basename(files["diffusers"]) == DIFFUSERS_FILE
    with safe_open(files["diffusers"], "numpy") as f:
        keys = list(f.keys())
        assert all(k.startswith(("unet.", "text_encoder.text_model.")) for k in keys)
        assert f.metadata()["base_model"] == "tiny"


# --- reading ------------------------------------------------------------------------------------

def assert_same_adapters(read, adapters, scale=ALPHA / RANK):
    for component, tree in adapters.items():
        got, want = flatten_dict(read.adapters[component]), flatten_dict(tree)
        assert got.keys() == want.keys(), component
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7)
        assert read.scales[component].keys() == {p[:-1] for p in want}
        assert all(v == pytest.approx(scale) for v in read.scales[component].values())
    assert set(read.adapters) == set(adapters)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("style", STYLES)
def test_round_trip(cases, style, fmt):
    sd, _, adapters, files = cases(style)
    read = read_lora(files[fmt], sd.params)
    assert_same_adapters(read, adapters)
    assert (read.rank, read.alpha) == (RANK, ALPHA)
    # A folder is read through its pytorch_lora_weights.safetensors.
    if fmt == "diffusers":
        assert read_lora(os.path.dirname(files[fmt]), sd.params).format == "diffusers"


def rename(path, out, fn, drop_alpha=False):
    tensors = load_file(path)
    renamed = {}
    for k, v in tensors.items():
        if drop_alpha and k.endswith(".alpha"):
            continue
        new = fn(k)
        if new is not None:
            renamed[new] = v
    save_file(renamed, str(out))
    return str(out)


def only(adapters, component, keep):
    """The adapters of `component` whose layer path passes `keep`."""
    flat = {p: v for p, v in flatten_dict(adapters[component]).items() if keep(p)}
    return {component: unflatten_dict(flat)}


def test_older_diffusers_layouts(cases, tmp_path):
    sd, _, adapters, files = cases("sd1")

    def old(k):  # unet.X.lora.down.weight; text encoder: X.lora_linear_layer.down.weight
        k = k.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight",
                                                                     ".lora.up.weight")
        if k.startswith("text_encoder."):
            k = k.replace(".lora.", ".lora_linear_layer.")
        return k

    read = read_lora(rename(files["diffusers"], tmp_path / "old.safetensors", old), sd.params)
    assert_same_adapters(read, adapters, scale=1.0)  # no metadata: alpha = rank
    assert read.alpha == RANK and read.format == "diffusers-old"

    # Attention processors (UNet only, no prefix), as diffusers 0.1x saved attn_procs.
    def procs(k):
        if not k.startswith("unet.") or ".attn" not in k or ".to_" not in k:
            return None
        k = k[len("unet."):]
        for proj in ("to_q", "to_k", "to_v"):
            k = k.replace(f".{proj}.lora_", f".processor.{proj}_lora.lora_")
        k = k.replace(".to_out.0.lora_", ".processor.to_out_lora.lora_")
        return k.replace("lora.lora_A.weight", "lora.down.weight").replace(
            "lora.lora_B.weight", "lora.up.weight")

    read = read_lora(rename(files["diffusers"], tmp_path / "procs.safetensors", procs),
                     sd.params)
    attention = only(adapters, "unet", lambda p: p[-2].startswith(("to_q", "to_k", "to_v",
                                                                   "to_out")))
    assert_same_adapters(read, attention, scale=1.0)

    # A .bin file in a folder, read with torch.load(weights_only=True).
    folder = tmp_path / "bin"
    folder.mkdir()
    torch.save({k: torch.from_numpy(v) for k, v in load_file(files["diffusers"]).items()},
               str(folder / "pytorch_lora_weights.bin"))
    read = read_lora(str(folder), sd.params)
    assert_same_adapters(read, adapters, scale=1.0)  # .bin files hold no metadata


def test_peft_adapter_names_and_text_model_prefix(cases, tmp_path):
    sd, _, adapters, files = cases("sd2")

    def peft(k):  # lora_A.default.weight, and the text encoder without text_model.
        k = k.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight")
        return k.replace("text_encoder.text_model.", "text_encoder.")

    from safetensors import safe_open

    with safe_open(files["diffusers"], "numpy") as f:
        header = f.metadata()
    tensors = {peft(k): v for k, v in load_file(files["diffusers"]).items()}
    save_file(tensors, str(tmp_path / "peft.safetensors"), metadata=header)
    read = read_lora(str(tmp_path / "peft.safetensors"), sd.params)
    assert_same_adapters(read, adapters)  # metadata kept: alpha 6, rank 4


def test_kohya_without_alpha(cases, tmp_path):
    sd, _, adapters, files = cases("sd1")
    path = rename(files["kohya"], tmp_path / "noalpha.safetensors", lambda k: k,
                  drop_alpha=True)
    read = read_lora(path, sd.params)
    assert_same_adapters(read, adapters, scale=1.0)
    assert read.alpha == RANK


def test_per_layer_alphas_and_ranks(cases, tmp_path):
    """kohya files may give each layer its own alpha and rank."""
    sd, _, adapters, files = cases("sd1")
    tensors = load_file(files["kohya"])
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    tensors[f"{name}.alpha"] = np.asarray(1.0, np.float32)
    tensors[f"{name}.lora_down.weight"] = tensors[f"{name}.lora_down.weight"][:2]
    tensors[f"{name}.lora_up.weight"] = tensors[f"{name}.lora_up.weight"][:, :2]
    save_file(tensors, str(tmp_path / "mixed.safetensors"))
    read = read_lora(str(tmp_path / "mixed.safetensors"), sd.params)
    layer = next(p for p in read.scales["text_encoder"] if p[-1] == "q_proj" and "0" in p)
    assert read.scales["text_encoder"][layer] == pytest.approx(0.5)
    assert read.adapters["text_encoder"]
    assert isinstance(read.rank, dict) and isinstance(read.alpha, dict)
    assert read.rank["text_encoder"][layer] == 2


# --- bad files ----------------------------------------------------------------------------------

def test_unknown_keys_are_listed(cases, tmp_path):
    sd, _, _, files = cases("sd1")
    tensors = load_file(files["diffusers"])
    extra = np.zeros((4, 8), np.float32)
    for k in ("unet.conv_nowhere.lora_A.weight", "unet.conv_nowhere.lora_B.weight",
              "something_else"):
        tensors[k] = extra
    save_file(tensors, str(tmp_path / "extra.safetensors"))
    with pytest.raises(WeightsError) as e:
        read_lora(str(tmp_path / "extra.safetensors"), sd.params)
    message = str(e.value)
    assert "3 key(s)" in message and "something_else" in message
    assert "unet.conv_nowhere.lora_A.weight" in message and "\n" not in message


def test_sdxl_lora_is_refused(cases, tmp_path):
    sd, _, _, files = cases("sd1")
    tensors = load_file(files["kohya"])
    sdxl = {k.replace("lora_te_", "lora_te1_"): v for k, v in tensors.items()}
    sdxl["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = np.zeros((4, 1280))
    save_file(sdxl, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(WeightsError, match="is an SDXL LoRA"):
        read_lora(str(tmp_path / "sdxl.safetensors"), sd.params)
    # The same UNet names, but 2048-wide cross-attention.
    tensors = load_file(files["diffusers"])
    key = next(k for k in tensors if k.endswith("attn2.to_k.lora_A.weight"))
    tensors[key] = np.zeros((RANK, 2048), np.float32)
    save_file(tensors, str(tmp_path / "wide.safetensors"))
    with pytest.raises(WeightsError, match="is an SDXL LoRA"):
        read_lora(str(tmp_path / "wide.safetensors"), sd.params)


def test_shape_mismatch_names_the_layer(cases, tmp_path):
    sd, _, _, files = cases("sd1")
    tensors = load_file(files["diffusers"])
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
    tensors[key] = np.zeros((RANK, 48), np.float32)
    save_file(tensors, str(tmp_path / "shape.safetensors"))
    with pytest.raises(WeightsError) as e:
        read_lora(str(tmp_path / "shape.safetensors"), sd.params)
    message = str(e.value)
    assert "another architecture" in message
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in message
    assert "(32, 32)" in message and "(4, 48)" in message


def test_truncated_file(cases, tmp_path):
    sd, _, _, files = cases("sd1")
    data = open(files["diffusers"], "rb").read()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="damaged or incomplete"):
        read_lora(str(path), sd.params)


def test_lora_spec():
    assert parse_lora_spec("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_lora_spec("a.safetensors:0.5") == ("a.safetensors", 0.5)
    assert parse_lora_spec("gs://b/x.safetensors") == ("gs://b/x.safetensors", 1.0)
    assert parse_lora_spec("gs://b/x.safetensors:-1") == ("gs://b/x.safetensors", -1.0)
    assert parse_lora_spec("dir:name/lora") == ("dir:name/lora", 1.0)


# --- fusing and generate --lora -----------------------------------------------------------------

def test_fuse_lora_files_adds_up_and_keeps_dtypes(cases):
    sd, _, adapters, files = cases("sd1")
    fused = fuse_lora_files(sd.params, [files["diffusers"] + ":0.5",
                                        files["kohya"] + ":0.25"])
    want = merged(sd, adapters, ALPHA / RANK * 0.75)
    for component in ("unet", "text_encoder"):
        for (path, got), exp in zip(flatten_dict(fused[component]).items(),
                                    flatten_dict(want[component]).values()):
            np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-6, err_msg=str(path))
    assert fused["vae"] is sd.params["vae"]
    half = {c: jax.tree_util.tree_map(lambda x: np.asarray(x).astype(np.float16), sd.params[c])
            for c in ("unet", "text_encoder")}
    out = fuse_lora_files(half, [files["kohya"]])
    assert all(x.dtype == np.float16 for x in jax.tree_util.tree_leaves(out))


def test_generate_with_lora(cases, tmp_path):
    from PIL import Image

    from sdjax import StableDiffusion
    from sdjax.cli import main
    from sdjax.sampling.images import to_pil

    sd, folder, _, files = cases("sd1")
    settings = ["--num_inference_steps", "2", "--guidance_scale", "3.0", "--seed", "1",
                "--height", "32", "--width", "32", "--scheduler", "ddim", "--prompt", "a cube"]
    images = {}
    for name, extra in (("plain", []), ("lora", ["--lora", files["kohya"] + ":0.5"])):
        out = str(tmp_path / name)
        with contextlib.redirect_stdout(io.StringIO()) as stdout:
            assert main(["generate", "--model", str(folder), "--output_dir", out,
                         *settings, *extra]) == 0
        images[name] = np.asarray(Image.open(os.path.join(out, "000-000.png")), np.int16)
    assert "LoRA" in stdout.getvalue()
    assert np.abs(images["plain"] - images["lora"]).max() > 8

    by_hand = StableDiffusion.from_pretrained(str(folder))
    by_hand.params.update(fuse_lora_files(by_hand.params, [files["kohya"] + ":0.5"]))
    out = by_hand("a cube", num_inference_steps=2, guidance_scale=3.0, seed=1, height=32,
                  width=32, scheduler="ddim", output_type="np")
    expected = np.asarray(to_pil(out)[0], np.int16)
    assert np.abs(expected - images["lora"]).max() <= 1

    with contextlib.redirect_stderr(io.StringIO()) as stderr:
        code = main(["generate", "--model", str(folder), "--output_dir", str(tmp_path / "x"),
                     *settings, "--lora", str(tmp_path / "missing.safetensors")])
    assert code == 2 and "does not exist" in stderr.getvalue()
    assert stderr.getvalue().count("\n") == 1
