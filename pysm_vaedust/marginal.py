"""Stage 2b — the one-point (marginal) transform between data space and the VAE's Gaussian space.

The small-scale log intensity is skewed (bright filaments): a monotone map y = g(x) of the
normalised patch values x onto normal scores (the pooled training pixels' quantiles at
Phi^-1(p)) makes the one-point distribution Gaussian, and removes most of the within-patch skewness
as well (measured on the shipped data: mean within-patch skewness 0.53 -> 0.03). The VAE models
y; its samples are mapped back with x = f(y) = g^-1(y), so they carry the sky's skewed one-point
distribution. f is a monotone cubic through the knots (y_k, x_k), linear beyond the end knots;
g inverts it. The knots are fitted once on the training split and stored with the weights
(buffers of the VAE).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

#: normal scores of the knots span [-MAX_SCORE, MAX_SCORE] (p ~ 3e-5 .. 1 - 3e-5)
MAX_SCORE = 4.0
#: Newton steps of the inverse g = f^-1 from the piecewise-linear guess (float64; measured on the
#: shipped knots, max |f(g(x)) - x| over x in [-8, 30]: 1e-3, 7e-7, 4e-13 after 1, 2, 3 steps)
NEWTON_STEPS = 3
#: the linear tails take the secant over this many end intervals (one interval holds ~7 pixels)
TAIL_INTERVALS = 5


def _hermite(y: torch.Tensor, t: torch.Tensor, v: torch.Tensor, m: torch.Tensor):
    """(f(y), f'(y)) of the C1 monotone cubic Hermite interpolant through (t, v) with knot slopes
    m, continued linearly beyond the end knots; any shape."""
    flat = y.reshape(-1)
    idx = torch.searchsorted(t, flat.detach().contiguous()).clamp(1, len(t) - 1)
    t0, t1, v0, v1, m0, m1 = t[idx - 1], t[idx], v[idx - 1], v[idx], m[idx - 1], m[idx]
    h = t1 - t0
    s = (flat - t0) / h
    s2, s3 = s * s, s * s * s
    value = (2 * s3 - 3 * s2 + 1) * v0 + (s3 - 2 * s2 + s) * h * m0 + (3 * s2 - 2 * s3) * v1 + (s3 - s2) * h * m1
    slope = (6 * s2 - 6 * s) * (v0 - v1) / h + (3 * s2 - 4 * s + 1) * m0 + (3 * s2 - 2 * s) * m1
    below, above = flat < t[0], flat > t[-1]
    value = torch.where(below, v[0] + m[0] * (flat - t[0]), torch.where(above, v[-1] + m[-1] * (flat - t[-1]), value))
    slope = torch.where(below, m[0], torch.where(above, m[-1], slope))
    return value.reshape(y.shape), slope.reshape(y.shape)


class MarginalTransform(nn.Module):
    """x = f(y) (Gaussian -> data space) and its inverse y = g(x) through `n_knots` knots.

    f is the monotone cubic (PCHIP, Fritsch-Carlson slopes) through the knots (y_k, x_k), linear
    beyond the end knots with the end secant slopes: continuously differentiable, so fits through
    it converge like fits through a smooth decoder. g inverts f by Newton steps (float64) to
    rounding precision. Before `fit` (and with n_knots = 0) both maps are the identity."""

    def __init__(self, n_knots: int):
        super().__init__()
        if int(n_knots) < 0 or int(n_knots) == 1:
            raise ValueError(f"marginal_knots={n_knots!r}: expected 0 (no transform) or >= 2")
        self.n_knots = int(n_knots)
        if self.n_knots:  # (no buffers without a transform: weights files without one load as before)
            scores = torch.linspace(-MAX_SCORE, MAX_SCORE, self.n_knots)
            self.register_buffer("knots_gaussian", scores)
            self.register_buffer("knots_data", scores.clone())          # identity until fitted
            self.register_buffer("knot_slopes", torch.ones_like(scores))  # dx/dy at the knots

    @property
    def active(self) -> bool:
        return self.n_knots > 0

    @torch.no_grad()
    def fit(self, data: torch.Tensor) -> None:
        """Knots at the quantiles Phi(y_k) of all values of `data` (any shape, normalised units)."""
        if not self.active:
            return
        from scipy.interpolate import PchipInterpolator
        from scipy.special import ndtr

        values = data.detach().double().flatten().cpu().numpy()
        if not np.all(np.isfinite(values)):
            raise ValueError("marginal transform: the training data hold non-finite values")
        scores = self.knots_gaussian.double().cpu().numpy()
        knots = np.quantile(values, ndtr(scores))
        knots = knots.astype(self.knots_data.cpu().numpy().dtype)
        for k in range(1, len(knots)):                           # strictly increasing in the buffer's dtype
            knots[k] = max(knots[k], np.nextafter(knots[k - 1], np.inf))
        knots = knots.astype(np.float64)
        slopes = PchipInterpolator(scores, knots).derivative()(scores)
        tail = min(TAIL_INTERVALS, len(knots) - 1)                # C1 into the linear tails
        slopes[0] = (knots[tail] - knots[0]) / (scores[tail] - scores[0])
        slopes[-1] = (knots[-1] - knots[-1 - tail]) / (scores[-1] - scores[-1 - tail])
        self.knots_data.copy_(torch.from_numpy(knots).to(self.knots_data))
        self.knot_slopes.copy_(torch.from_numpy(slopes).to(self.knot_slopes))

    def _f(self, y: torch.Tensor):
        return _hermite(y, self.knots_gaussian.to(y.dtype), self.knots_data.to(y.dtype), self.knot_slopes.to(y.dtype))

    def to_data(self, y: torch.Tensor) -> torch.Tensor:
        """x = f(y), same shape (differentiable)."""
        return self._f(y)[0] if self.active else y

    def data_log_derivative(self, y: torch.Tensor) -> torch.Tensor:
        """log f'(y), same shape."""
        return self._f(y)[1].log() if self.active else torch.zeros_like(y)

    @torch.no_grad()
    def to_gaussian(self, x: torch.Tensor, log_derivative: bool = False):
        """y = g(x) = f^-1(x), same shape and dtype; with log_derivative, (y, log g'(x))."""
        if not self.active:
            return (x, torch.zeros_like(x)) if log_derivative else x
        target = x.double()
        t, v = self.knots_gaussian.double(), self.knots_data.double()
        idx = torch.searchsorted(v, target.reshape(-1).contiguous()).clamp(1, len(v) - 1).reshape(x.shape)
        y = t[idx - 1] + (target - v[idx - 1]) * (t[idx] - t[idx - 1]) / (v[idx] - v[idx - 1])
        for _ in range(NEWTON_STEPS):
            value, slope = self._f(y)
            y = y - (value - target) / slope
        if not log_derivative:
            return y.to(x.dtype)
        return y.to(x.dtype), -self._f(y)[1].log().to(x.dtype)   # log g'(x) = -log f'(g(x))
