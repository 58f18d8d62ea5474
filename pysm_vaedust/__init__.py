"""pysm_vaedust: stochastic non-Gaussian small-scale thermal dust for PySM3, from a VAE trained on Planck."""

__version__ = "0.1.0"
