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
    (the ancestral and DDPM samplers): hands out the given draws, in order."""

    def __init__(self, monkeypatch, draws):
        import diffusers.schedulers  # noqa: F401 (loads the scheduler modules)

        self.draws = iter(draws)
        for module_name, module in list(sys.modules.items()):
            if module_name.startswith("diffusers.schedulers.scheduling_") and hasattr(
                    module, "randn_tensor"):
                monkeypatch.setattr(module, "randn_tensor", self._draw)

    def _draw(self, shape, **kwargs):
        return torch.from_numpy(np.array(next(self.draws), np.float32).reshape(shape))
