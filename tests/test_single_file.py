"""Single-file checkpoints (the original LDM layout of A1111/ComfyUI/civitai files).

sdjax's writer is checked against diffusers' reader (`from_single_file` gives back exactly the
tensors of the diffusers pipeline the file was written from), sdjax's reader against its writer
(a round trip is bit-exact), and the key mapping against diffusers' own converter at full SD 1.5
and SD 2.1 size.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file, save_file

from sdjax import StableDiffusion, WeightsError
from tests.tiny_torch import TINY_TOKENIZER

COMPONENTS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def files(sd1, sd2, tmp_path_factory):
    folder = tmp_path_factory.mktemp("single")
    return {"sd1": sd1.save_single_file(str(folder / "sd1.safetensors")),
            "sd2": sd2.save_single_file(str(folder / "sd2.safetensors"))}


def assert_params_equal(a, b):
    for component in COMPONENTS:
        fa, fb = flatten_dict(a[component]), flatten_dict(b[component])
        assert fa.keys() == fb.keys(), component
        for path in fa:
            np.testing.assert_array_equal(np.asarray(fa[path]), np.asarray(fb[path]),
                                          err_msg=f"{component} {path}")


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_diffusers_from_single_file_reads_our_file_exactly(style, files, request):
    import torch
    from diffusers import StableDiffusionPipeline

    folder = str(request.getfixturevalue(f"{style}_dir"))
    reference = StableDiffusionPipeline.from_pretrained(folder)
    loaded = StableDiffusionPipeline.from_single_file(files[style], config=folder,
                                                      local_files_only=True)
    for component in COMPONENTS:
        want = getattr(reference, component).state_dict()
        got = getattr(loaded, component).state_dict()
        assert got.keys() == want.keys(), component
        for key, value in want.items():
            assert torch.equal(got[key], value), f"{component} {key}"


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_round_trip_is_exact(style, files, request):
    original = request.getfixturevalue(style)
    folder = str(request.getfixturevalue(f"{style}_dir"))
    back = StableDiffusion.from_single_file(files[style], original_config=folder)
    assert_params_equal(original.params, back.params)
    assert back.tokenizer is not None
    assert back.scheduler_config["prediction_type"] == original.scheduler_config["prediction_type"]


def test_file_uses_the_ldm_names(files, sd1_dir, sd2_dir):
    sd1 = load_file(files["sd1"])
    unet = load_file(os.path.join(sd1_dir, "unet", "diffusion_pytorch_model.safetensors"))
    vae = load_file(os.path.join(sd1_dir, "vae", "diffusion_pytorch_model.safetensors"))
    # layers_per_block 2: input_blocks 1, 2 | 3 (downsampler) | 4, 5 | 6 | 7, 8; 3 levels.
    pairs = {"model.diffusion_model.input_blocks.4.1.proj_in.weight":
             unet["down_blocks.1.attentions.0.proj_in.weight"],
             "model.diffusion_model.input_blocks.6.0.op.weight":
             unet["down_blocks.1.downsamplers.0.conv.weight"],
             "model.diffusion_model.output_blocks.2.1.conv.weight":  # UpBlock2D: no attention
             unet["up_blocks.0.upsamplers.0.conv.weight"],
             "model.diffusion_model.output_blocks.5.2.conv.bias":
             unet["up_blocks.1.upsamplers.0.conv.bias"],
             "model.diffusion_model.output_blocks.8.0.skip_connection.weight":
             unet["up_blocks.2.resnets.2.conv_shortcut.weight"],
             "model.diffusion_model.middle_block.2.emb_layers.1.weight":
             unet["mid_block.resnets.1.time_emb_proj.weight"],
             "first_stage_model.decoder.up.2.block.0.conv1.weight":  # reversed levels
             vae["decoder.up_blocks.0.resnets.0.conv1.weight"],
             "first_stage_model.encoder.down.1.block.0.nin_shortcut.bias":
             vae["encoder.down_blocks.1.resnets.0.conv_shortcut.bias"]}
    for key, value in pairs.items():
        np.testing.assert_array_equal(sd1[key], value, err_msg=key)
    q = sd1["first_stage_model.encoder.mid.attn_1.q.weight"]
    assert q.shape == vae["encoder.mid_block.attentions.0.to_q.weight"].shape + (1, 1)
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in sd1

    sd2 = load_file(files["sd2"])
    text = load_file(os.path.join(sd2_dir, "text_encoder", "model.safetensors"))
    text = {k.removeprefix("text_model."): v for k, v in text.items()}
    fused = sd2["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"]
    np.testing.assert_array_equal(fused, np.concatenate(
        [text[f"encoder.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"]))
    np.testing.assert_array_equal(sd2["cond_stage_model.model.positional_embedding"],
                                  text["embeddings.position_embedding.weight"])
    assert not any(k.startswith("cond_stage_model.transformer") for k in sd2)


def _placeholders(keys):
    return {k: np.array([i]) for i, k in enumerate(keys)}


@pytest.mark.parametrize("name,family", [("sd15", "sd1"), ("sd21", "sd2")])
def test_full_size_names_match_diffusers_converter(name, family):
    """diffusers' own LDM -> diffusers converter, fed our names for every full-size parameter,
    gives back the diffusers name each one came from."""
    import torch
    from types import SimpleNamespace

    from diffusers.loaders import single_file_utils as ref

    from sdjax.weights.convert import torch_key
    from sdjax.weights.single_file_save import single_file_layout

    sd = StableDiffusion.from_config(name, init_params=False)
    layout = single_file_layout(sd.params, sd.configs, family)
    origin = {}
    for ldm, parts in layout.items():
        for part, component, path, _ in parts:
            origin.setdefault(component, {})[(ldm, part)] = torch_key(path, component)
    if family == "sd1":
        assert len(origin["unet"]) == 686  # as in the released SD 1.5 checkpoints
        assert len(origin["text_encoder"]) == 196
    for component, convert in (("unet", ref.convert_ldm_unet_checkpoint),
                               ("vae", ref.convert_ldm_vae_checkpoint)):
        ldm = [k for k, _ in origin[component]]
        converted = convert(_placeholders(ldm), sd.configs[component])
        back = {ldm[int(v[0])]: k for k, v in converted.items()}
        assert back == {k: d for (k, _), d in origin[component].items()}, component
    if family == "sd2":
        width = sd.configs["text_encoder"]["hidden_size"]
        checkpoint = {}
        for i, (ldm, part) in enumerate(origin["text_encoder"]):
            fused = ldm.endswith(("in_proj_weight", "in_proj_bias"))
            checkpoint[ldm] = (torch.arange(3 * width).reshape(3 * width, 1) * 0 + i * 10
                               + torch.arange(3).repeat_interleave(width).reshape(-1, 1)
                               if fused else torch.tensor([i * 10]))
        model = SimpleNamespace(config=SimpleNamespace(hidden_size=width))
        converted = ref.convert_open_clip_checkpoint(model, checkpoint)
        names = list(origin["text_encoder"])
        for key, value in converted.items():
            code = int(value.reshape(-1)[0])
            ldm = names[code // 10][0]
            part = code % 10 if ldm.endswith(("in_proj_weight", "in_proj_bias")) else None
            assert origin["text_encoder"][(ldm, part)] == key.removeprefix("text_model."), key
        assert len(converted) == len(names)


def _tiny_config_folder(tmp_path, family):
    """The shipped tiny model reshaped to what an LDM yaml can describe (32-group norms,
    64-wide text attention heads)."""
    folder = tmp_path / f"tiny-{family}"
    shutil.copytree(os.path.join(os.path.dirname(TINY_TOKENIZER)), folder)

    def edit(component, **changes):
        path = folder / component / "config.json"
        config = json.loads(path.read_text())
        config.update(changes)
        path.write_text(json.dumps(config))

    edit("unet", norm_num_groups=32, block_out_channels=[32, 64], layers_per_block=1,
         down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
         up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
         attention_head_dim=2 if family == "sd1" else [2, 4],
         use_linear_projection=family == "sd2")
    edit("vae", norm_num_groups=32, block_out_channels=[32, 64], layers_per_block=1,
         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
         mid_block_add_attention=True)
    edit("text_encoder", hidden_size=64, num_attention_heads=1, intermediate_size=96,
         hidden_act="quick_gelu" if family == "sd1" else "gelu")
    return str(folder)


LDM_YAML = """
model:
  params:
    parameterization: {parameterization}
    linear_start: 0.00085
    linear_end: 0.012
    timesteps: 1000
    image_size: 8
    scale_factor: 0.18215
    unet_config:
      params:
        image_size: 32
        in_channels: 4
        out_channels: 4
        model_channels: 32
        attention_resolutions: [1]
        num_res_blocks: 1
        channel_mult: [1, 2]
        {heads}
        context_dim: 32
        transformer_depth: 1
        legacy: false
    first_stage_config:
      params:
        embed_dim: 4
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [1, 2]
          num_res_blocks: 1
          attn_resolutions: []
"""


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_ldm_yaml_describes_a_non_standard_file(family, tmp_path):
    folder = _tiny_config_folder(tmp_path, family)
    sd = StableDiffusion.from_config(folder, seed=1)
    path = sd.save_single_file(str(tmp_path / "model.safetensors"))
    heads = ("num_heads: 2" if family == "sd1"
             else "num_head_channels: 16\n        use_linear_in_transformer: true")
    yaml_path = tmp_path / "model.yaml"
    yaml_path.write_text(LDM_YAML.format(parameterization="v" if family == "sd2" else "eps",
                                         heads=heads))
    back = StableDiffusion.from_single_file(path, original_config=str(yaml_path),
                                            tokenizer=TINY_TOKENIZER)
    assert_params_equal(sd.params, back.params)
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                "use_linear_projection", "cross_attention_dim"):
        assert tuple(np.ravel(back.configs["unet"][key])) == tuple(
            np.ravel(sd.configs["unet"][key])), key
    assert back.unet.config.heads_per_block == sd.unet.config.heads_per_block
    assert back.configs["vae"]["block_out_channels"] == [32, 64]
    assert back.configs["text_encoder"]["num_hidden_layers"] == 2
    assert back.configs["text_encoder"]["num_attention_heads"] == 1
    assert back.scheduler_config["prediction_type"] == (
        "v_prediction" if family == "sd2" else "epsilon")


def test_family_defaults_and_prediction_type_override(files):
    from sdjax.model_files import open_single_file_model

    sd1 = open_single_file_model(files["sd1"])
    assert sd1.family == "sd1" and sd1.configs["unet"]["cross_attention_dim"] == 768
    assert sd1.scheduler_config.get("prediction_type", "epsilon") == "epsilon"
    sd2 = open_single_file_model(files["sd2"])
    assert sd2.family == "sd2" and sd2.configs["unet"]["cross_attention_dim"] == 1024
    assert sd2.scheduler_config["prediction_type"] == "v_prediction"
    assert open_single_file_model(files["sd2"], prediction_type="epsilon").scheduler_config[
        "prediction_type"] == "epsilon"


def test_non_standard_file_without_original_config_says_so(files):
    with pytest.raises(WeightsError) as e:
        StableDiffusion.from_single_file(files["sd1"], tokenizer=TINY_TOKENIZER)
    message = str(e.value)
    assert "\n" not in message and "--original_config" in message


def test_default_tokenizer_not_cached_offline(files, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from sdjax.model_files import open_single_file_model

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    for style, name in (("sd1", "openai/clip-vit-large-patch14"),
                        ("sd2", "stabilityai/stable-diffusion-2-1/tokenizer")):
        with pytest.raises(WeightsError) as e:
            open_single_file_model(files[style]).tokenizer()
        assert name in str(e.value) and "--tokenizer_name" in str(e.value)


def test_ckpt_with_state_dict_and_ema(files, sd1, sd1_dir, tmp_path):
    import torch

    tensors = load_file(files["sd1"])
    state = {k: torch.from_numpy(v) for k, v in tensors.items()}
    unet_keys = [k for k in tensors if k.startswith("model.diffusion_model.")]
    for k in unet_keys:  # EMA copies, each 1 more than the raw weight
        state["model_ema." + k[len("model."):].replace(".", "")] = state[k] + 1
    state["model_ema.decay"] = torch.tensor(0.9999)
    path = str(tmp_path / "model.ckpt")
    torch.save({"state_dict": state, "global_step": 10}, path)
    raw = StableDiffusion.from_single_file(path, original_config=str(sd1_dir))
    assert_params_equal(sd1.params, raw.params)
    ema = StableDiffusion.from_single_file(path, original_config=str(sd1_dir), ema=True)
    plus_one = jax.tree_util.tree_map(lambda x: np.asarray(x) + np.float32(1), sd1.params["unet"])
    assert_params_equal({**sd1.params, "unet": plus_one}, ema.params)
    with pytest.raises(WeightsError, match="no EMA weights"):
        StableDiffusion.from_single_file(files["sd1"], original_config=str(sd1_dir), ema=True)


def test_sd2_file_with_openclip_last_layer_and_extras(files, sd2, sd2_dir, tmp_path):
    """A released SD 2.x file holds OpenCLIP's whole text tower: one layer more than SD 2.x
    uses, text_projection, logit_scale; the VAE's loss weights and schedule buffers too."""
    tensors = load_file(files["sd2"])
    prefix = "cond_stage_model.model.transformer.resblocks."
    for k in [k for k in tensors if k.startswith(prefix + "2.")]:
        tensors[k.replace(prefix + "2.", prefix + "3.")] = tensors[k] * 3
    tensors["cond_stage_model.model.text_projection"] = np.eye(32, dtype=np.float32)
    tensors["cond_stage_model.model.logit_scale"] = np.array(4.6, np.float32)
    tensors["first_stage_model.loss.logvar"] = np.zeros((), np.float32)
    tensors["alphas_cumprod"] = np.ones(1000, np.float32)
    path = str(tmp_path / "released.safetensors")
    save_file(tensors, path)
    back = StableDiffusion.from_single_file(path, original_config=str(sd2_dir))
    assert_params_equal(sd2.params, back.params)
    tensors["cond_stage_model.model.transformer.resblocks.0.unknown.weight"] = np.zeros(2)
    save_file(tensors, path)
    with pytest.raises(WeightsError, match="unexpected.*resblocks.0.unknown.weight"):
        StableDiffusion.from_single_file(path, original_config=str(sd2_dir))


def test_save_single_file_float16(sd1, tmp_path):
    path = sd1.save_single_file(str(tmp_path / "half.safetensors"), dtype=np.float16)
    tensors = load_file(path)
    assert {v.dtype for v in tensors.values()} == {np.dtype(np.float16)}
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_legacy_ckpt_format_and_vae_override(files, sd1, sd1_dir, sd2, sd2_dir, tmp_path):
    import torch

    state = {k: torch.from_numpy(v) for k, v in load_file(files["sd1"]).items()}
    path = str(tmp_path / "old.ckpt")  # a plain state dict in the pre-1.6 (non-zip) format
    torch.save(state, path, _use_new_zipfile_serialization=False)
    sd = StableDiffusion.from_single_file(path, original_config=str(sd1_dir),
                                          vae=os.path.join(str(sd2_dir), "vae"))
    assert_params_equal({**sd1.params, "vae": sd2.params["vae"]}, sd.params)
    assert sd.configs["vae"]["scaling_factor"] == 0.5


def test_load_pipeline_and_load_base_take_single_files(files, sd2, sd2_dir):
    from sdjax.pipeline import load_base, load_pipeline

    sd = load_pipeline(files["sd2"], original_config=str(sd2_dir), tokenizer=TINY_TOKENIZER)
    assert_params_equal(sd2.params, sd.params)
    assert sd.tokenizer.name_or_path == TINY_TOKENIZER
    spec = {"pretrained_model_name_or_path": files["sd2"], "original_config": str(sd2_dir)}
    assert_params_equal(sd2.params, load_base(spec).params)
