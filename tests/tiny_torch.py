"""Tiny random Stable Diffusion pipelines built with diffusers/transformers PyTorch (the reference).

Every parameter gets random noise on top of its default init, so scales, biases and norms are
all distinct from their usual constants and a mix-up in conversion cannot hide.
"""

import os
import shutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_TOKENIZER = os.path.join(REPO, "configs", "models", "tiny", "tokenizer")

STYLES = {
    "sd1": dict(
        unet=dict(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=32, attention_head_dim=4, sample_size=8),
        vae=dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
                 down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                 latent_channels=4, sample_size=32),
        text=dict(hidden_act="quick_gelu", num_hidden_layers=2),
        scheduler=dict(prediction_type="epsilon"),
    ),
    "sd2": dict(
        unet=dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                  attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
                  flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, sample_size=8),
        vae=dict(block_out_channels=(16, 32), layers_per_block=2, norm_num_groups=8,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                 latent_channels=4, sample_size=32, scaling_factor=0.5),
        text=dict(hidden_act="gelu", num_hidden_layers=3),
        scheduler=dict(prediction_type="v_prediction"),
    ),
}


def _perturb(model, seed):
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def build_pipeline(style: str, seed: int = 0):
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    spec = STYLES[style]
    torch.manual_seed(seed)
    unet = _perturb(UNet2DConditionModel(**spec["unet"]), seed + 1)
    vae = _perturb(AutoencoderKL(**spec["vae"]), seed + 2)
    tokenizer = CLIPTokenizer.from_pretrained(TINY_TOKENIZER)
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
                                 num_attention_heads=4, max_position_embeddings=77,
                                 projection_dim=32, bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, **spec["text"])
    text_encoder = _perturb(CLIPTextModel(text_config), seed + 3)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              **spec["scheduler"])
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def save_pipeline(path, style: str, **save_kwargs):
    pipe = build_pipeline(style)
    if os.path.exists(path):
        shutil.rmtree(path)
    pipe.save_pretrained(str(path), **save_kwargs)
    return path
