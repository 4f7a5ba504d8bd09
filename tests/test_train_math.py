"""Training arithmetic against diffusers: noise schedule, targets, min-SNR, LR schedules, EMA."""

import numpy as np
import pytest
import torch

from sdjax.schedule import NoiseSchedule
from sdjax.train.optimizer import ema_decay, learning_rate_schedule

SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "num_train_timesteps": 1000}


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_noise_and_targets_match_ddpm_scheduler(beta_schedule, prediction_type):
    from diffusers import DDPMScheduler

    config = dict(SCHEDULER, beta_schedule=beta_schedule, prediction_type=prediction_type)
    ref = DDPMScheduler(**config)
    ours = NoiseSchedule.from_config(config)
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
    noise = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
    t = np.array([0, 417, 999])
    np.testing.assert_allclose(ours.add_noise(x0, noise, t),
                               ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise),
                                             torch.from_numpy(t)).numpy(), atol=1e-5)
    expected = noise if prediction_type == "epsilon" else ref.get_velocity(
        torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(ours.target(x0, noise, t), expected, atol=1e-5)


@pytest.mark.parametrize("script", ["text_to_image", "dreambooth"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_diffusers(prediction_type, script):
    """train_text_to_image.py divides min(SNR, 5) by SNR + 1 for v-prediction;
    train_dreambooth.py divides by SNR and adds 1 ("floored to an SNR weight of one")."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    ref = DDPMScheduler(**SCHEDULER, prediction_type=prediction_type)
    ours = NoiseSchedule.from_config(dict(SCHEDULER, prediction_type=prediction_type))
    t = torch.tensor([1, 10, 100, 500, 999])
    snr = compute_snr(ref, t)
    clipped = torch.stack([snr, 5.0 * torch.ones_like(t)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        expected = clipped / snr
    elif script == "dreambooth":
        expected = clipped / snr + 1
    else:
        expected = clipped / (snr + 1)
    got = ours.min_snr_weights(t.numpy(), 5.0, v_floor=script == "dreambooth")
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4)


def test_each_command_takes_its_scripts_min_snr_weights():
    from sdjax.config import parse_train_args
    from sdjax.train.trainer import loss_config

    common = ["--pretrained_model_name_or_path=tiny", "--snr_gamma=5", "--output_dir=/tmp/x"]
    dreambooth = parse_train_args(common + ["--instance_data_dir=/tmp", "--instance_prompt=a sks dog"],
                                  task="dreambooth")[0]
    for lora in (False, True):
        text = parse_train_args(common + ["--train_data_dir=/tmp"], lora=lora)[0]
        booth = parse_train_args(common + ["--instance_data_dir=/tmp",
                                           "--instance_prompt=a sks dog"], task="dreambooth",
                                 lora=lora)[0]
        assert loss_config(text).snr_v_floor is False
        assert loss_config(booth).snr_v_floor is True
    assert loss_config(dreambooth).snr_gamma == 5.0


def test_prediction_type_override():
    assert NoiseSchedule.from_config(SCHEDULER, "v_prediction").prediction_type == "v_prediction"
    assert NoiseSchedule.from_config(dict(SCHEDULER, prediction_type="v_prediction")
                                     ).prediction_type == "v_prediction"


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "linear", "cosine"])
def test_learning_rate_schedules_match_diffusers(name):
    from diffusers.optimization import get_scheduler

    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=2e-4)
    ref = get_scheduler(name, optimizer=opt, num_warmup_steps=10, num_training_steps=50)
    ours = learning_rate_schedule(name, 2e-4, 10, 50)
    for step in range(51):  # steps 0..50 of a 50-step run (diffusers wraps cosine past the end)
        assert float(ours(step)) == pytest.approx(ref.get_last_lr()[0], rel=1e-5, abs=1e-9), step
        opt.step()
        ref.step()


def test_ema_matches_diffusers_ema_model():
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = EMAModel(model.parameters())
    ours = [np.array(p.detach().numpy()) for p in model.parameters()]
    for step in range(1, 30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.step(model.parameters())
        decay = float(ema_decay(step))
        params = [p.detach().numpy() for p in model.parameters()]
        ours = [e - (1 - decay) * (e - p) for e, p in zip(ours, params)]
        for mine, theirs in zip(ours, ema.shadow_params):
            np.testing.assert_allclose(mine, theirs.numpy(), rtol=1e-5, atol=1e-6)
