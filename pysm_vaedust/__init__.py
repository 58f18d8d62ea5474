"""pysm_vaedust: stochastic non-Gaussian small-scale thermal dust for PySM3, drawn by a conditional VAE
trained on the IRIS 100 um sky given the large scales beneath them.

Public API: `VAEDust` (the pysm3 component), `pysm_vaedust.config.build_sky` (skies from dicts /
TOML), `pysm_vaedust.conditioning` (MAP fits and constrained realizations), `load_weights`.
Imports are lazy so that `import pysm_vaedust` does not load torch.
"""

__version__ = "0.1.0"

_LAZY = {"VAEDust": "component", "load_weights": "weights", "build_sky": "config",
         "ConditionedVAEDust": "conditioning", "condition_sky": "conditioning", "FittedLatents": "conditioning"}


_SUBMODULES = ("component", "conditioning", "config", "statistics", "tiling", "weights", "train", "validate")


def __getattr__(name):
    from importlib import import_module

    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    if name in _SUBMODULES:
        return import_module(f".{name}", __name__)
    raise AttributeError(f"module 'pysm_vaedust' has no attribute {name!r}")


__all__ = list(_LAZY)
