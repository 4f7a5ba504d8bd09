"""diffusers' schedulers by sdjax sampler name, and a way to hand them sdjax's random draws."""

import numpy as np
import torch


def diffusers_scheduler(name, config):
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler,
                           EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, PNDMScheduler)

    return {"ddim": lambda: DDIMScheduler.from_config(config),
            "pndm": lambda: PNDMScheduler.from_config(config, skip_prk_steps=True),
            "euler": lambda: EulerDiscreteScheduler.from_config(config),
            "euler_a": lambda: EulerAncestralDiscreteScheduler.from_config(config),
            "dpmpp_2m": lambda: DPMSolverMultistepScheduler.from_config(config),
            "dpmpp_2m_karras": lambda: DPMSolverMultistepScheduler.from_config(
                config, use_karras_sigmas=True)}[name]()


class FixedNoise:
    """Stands in for diffusers' randn_tensor in the ancestral scheduler: hands out given noise."""

    def __init__(self, monkeypatch, draws):
        import diffusers.schedulers.scheduling_euler_ancestral_discrete as module

        self.draws = iter(draws)
        monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: torch.from_numpy(
            np.array(next(self.draws), np.float32).reshape(shape)))
