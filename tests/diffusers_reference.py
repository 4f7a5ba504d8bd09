"""diffusers' schedulers by sdjax sampler name, and a way to hand them sdjax's random draws."""

import sys

import numpy as np
import torch


def diffusers_scheduler(name, config):
    """The diffusers scheduler that sdjax's sampler `name` reproduces, set up by its class's
    from_config(config) (with the options the name fixes)."""
    import diffusers

    from sdjax.sampling.schedulers import SAMPLERS

    spec = SAMPLERS[name]
    return getattr(diffusers, spec.diffusers_class).from_config(config, **spec.diffusers_options)


class FixedNoise:
    """Stands in for diffusers' randn_tensor in every scheduler module that draws noise with it
    (the ancestral and DDPM samplers), and for DPMSolverSDEScheduler's Brownian-tree noise
    sampler (see BrownianDraws): hands out the given draws, in order."""

    def __init__(self, monkeypatch, draws):
        import diffusers.schedulers  # noqa: F401 (loads the scheduler modules)
        import diffusers.schedulers.scheduling_dpmsolver_sde as sde  # needs torchsde

        self.draws = iter(draws)
        for module_name, module in list(sys.modules.items()):
            if module_name.startswith("diffusers.schedulers.scheduling_") and hasattr(
                    module, "randn_tensor"):
                monkeypatch.setattr(module, "randn_tensor", self._draw)
        monkeypatch.setattr(sde, "BrownianTreeNoiseSampler",
                            lambda x, *args, **kwargs: BrownianDraws(self.draws, x.shape))

    def _draw(self, shape, **kwargs):
        return torch.from_numpy(np.array(next(self.draws), np.float32).reshape(shape))


class BrownianDraws:
    """A Brownian path in sigma made of the given standard-normal draws, called as diffusers
    calls its noise sampler: (sigma, sigma_next) -> the path's increment over that interval
    divided by the square root of its length. Each call takes one draw, for the part of its
    interval no earlier call covered: a call whose interval extends the previous one's (same
    start, further end), as DPMSolverSDEScheduler's second stage extends its first, adds the
    draw's increment over the extension to the previous increment."""

    def __init__(self, draws, shape):
        self.draws, self.shape = draws, shape
        self.previous = None  # (start, end, increment)

    def __call__(self, sigma, sigma_next):
        start, end = float(sigma), float(sigma_next)
        draw = np.array(next(self.draws), np.float64).reshape(self.shape)
        if self.previous is not None and self.previous[0] == start \
                and abs(end - start) > abs(self.previous[1] - start):
            increment = self.previous[2] + draw * np.sqrt(abs(end - self.previous[1]))
        else:
            increment = draw * np.sqrt(abs(end - start))
        self.previous = (start, end, increment)
        return torch.from_numpy((increment / np.sqrt(abs(end - start))).astype(np.float32))
