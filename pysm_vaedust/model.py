"""Stage 3 — model: convolutional VAE of normalised small-scale log-intensity patches.

Images are (B, 1, npix, npix) float32 tensors in normalised units (log-intensity residual
divided by the global scale stored with the weights). Latents are (B, latent_dim).

Encoder and decoder are each a linear map plus a convolutional branch. `init_from_pca` sets the
linear maps to the exact probabilistic-PCA solution of the data (Tipping & Bishop 1999) with the
convolutional branches damped (last layers scaled by 0.1): training starts near the best linear
VAE and the convolutional branches learn the non-Gaussian part. The decoder noise p(x|z) is a
Gaussian whose spectrum is learned per radial Fourier bin ("fourier"), one learned scalar
("learned") or fixed ("fixed"), modulated in pixel space by a log-amplitude map a(z) learned with
the rest (`noise_modulation` > 0):

    x = mu(z) + exp(a(z) / 2) * e,   e stationary with the learned spectrum,
    a(z) = bilinear upsampling of a g x g map linear in z + a small CNN of mu(z).

The modulation lets the small-scale amplitude vary between and inside patches and follow the
decoded structure (brighter filaments carry more small-scale power), which a stationary noise
cannot. Sampling adds the noise, so samples carry the small-scale power the 256-d latent cannot
encode.

With `marginal_knots` > 0 all of this lives in a Gaussian space y = g(x) (`marginal.py`): the
encoder sees g(x), the likelihood is that of g(x) plus the Jacobian sum log g'(x), and samples and
reconstructions are mapped back to data space with f = g^-1. `decode` and `noise_given` stay in
the Gaussian space; `sample`, `reconstruct` and `to_data` give data-space images.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .marginal import MarginalTransform


@dataclass
class VAEConfig:
    """Architecture of the VAE (stored in the weights file)."""

    npix: int = 32
    latent_dim: int = 256
    channels: tuple = (16, 32, 64)
    hidden: int = 256
    decoder_variance: str = "fourier"  # "fourier" (per radial Fourier bin), "learned" (scalar), "fixed"
    decoder_logvar_init: float = -2.0  # log sigma^2 in normalised units
    noise_modulation: int = 8  # g: grid of the z-dependent noise log-amplitude (0: stationary noise)
    marginal_knots: int = 0    # knots of the data <-> Gaussian one-point transform (0: none)

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        down = 2 ** len(self.channels)
        if self.npix % down:
            raise ValueError(f"npix={self.npix} must be divisible by 2**len(channels)={down}")
        if self.decoder_variance not in ("fourier", "learned", "fixed"):
            raise ValueError(f"decoder_variance={self.decoder_variance!r}: expected 'fourier', 'learned' or 'fixed'")
        if not 0 <= int(self.noise_modulation) <= self.npix:
            raise ValueError(f"noise_modulation={self.noise_modulation!r}: expected 0 (off) .. npix={self.npix}")
        self.noise_modulation = int(self.noise_modulation)
        self.marginal_knots = int(self.marginal_knots)

    def to_dict(self) -> dict:
        return asdict(self)


def _conv_block(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.SiLU(),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.SiLU())


def _deconv_block(c_in, c_out):
    # one transpose convolution per scale: the decoder runs on ~250k patches for an nside-2048 sky
    return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.SiLU())


#: hidden channels of the modulation CNN (small: it runs on every decoded patch of a sky)
MODULATION_CHANNELS = 8


def radial_bins(npix: int) -> torch.Tensor:
    """(npix, npix) long: rounded |k| of each FFT frequency, in units of the patch fundamental."""
    k = torch.fft.fftfreq(npix, d=1.0 / npix)
    return torch.sqrt(k[:, None] ** 2 + k[None, :] ** 2).round().long()


class VAE(nn.Module):
    """Gaussian-encoder, stationary-Gaussian-decoder VAE with an N(0, I) prior on z."""

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = config = config or VAEConfig()
        ch, n, d = config.channels, config.npix, config.latent_dim
        self.bottom = n // 2 ** len(ch)
        flat = ch[-1] * self.bottom**2
        self.encoder_conv = nn.Sequential(
            *[_conv_block(c_in, c_out) for c_in, c_out in zip((1,) + ch[:-1], ch)],
            nn.Flatten(), nn.Linear(flat, config.hidden), nn.SiLU(), nn.Linear(config.hidden, 2 * d))
        self.encoder_linear = nn.Linear(n * n, 2 * d)
        self.decoder_input = nn.Sequential(
            nn.Linear(d, config.hidden), nn.SiLU(), nn.Linear(config.hidden, flat), nn.SiLU())
        rev = ch[::-1]
        self.decoder_conv = nn.Sequential(
            *[_deconv_block(c_in, c_out) for c_in, c_out in zip(rev, rev[1:] + (ch[0],))],
            nn.Conv2d(ch[0], 1, 3, padding=1)).to(memory_format=torch.channels_last)
        self.decoder_linear = nn.Linear(d, n * n)
        self.register_buffer("noise_bin", radial_bins(n), persistent=False)
        n_bins = int(self.noise_bin.max()) + 1 if config.decoder_variance == "fourier" else 1
        self.decoder_logvar = nn.Parameter(torch.full((n_bins,), float(config.decoder_logvar_init)),
                                           requires_grad=config.decoder_variance != "fixed")
        self.marginal = MarginalTransform(config.marginal_knots)
        g = config.noise_modulation
        if g:
            self.modulation_global = nn.Linear(d, g * g)
            self.modulation_local = nn.Sequential(
                nn.Conv2d(1, MODULATION_CHANNELS, 3, padding=1), nn.SiLU(),
                nn.Conv2d(MODULATION_CHANNELS, MODULATION_CHANNELS, 3, padding=1), nn.SiLU(),
                nn.Conv2d(MODULATION_CHANNELS, 1, 3, padding=1)).to(memory_format=torch.channels_last)
            for last in (self.modulation_global, self.modulation_local[-1]):  # start stationary
                nn.init.zeros_(last.weight)
                nn.init.zeros_(last.bias)

    @property
    def device(self) -> torch.device:
        return self.decoder_logvar.device

    def noise_logvar(self) -> torch.Tensor:
        """(npix, npix) log variance of the decoder noise per FFT mode (orthonormal FFT)."""
        bins = self.noise_bin if len(self.decoder_logvar) > 1 else torch.zeros_like(self.noise_bin)
        return self.decoder_logvar[bins]

    def embedded_noise_logvar(self) -> torch.Tensor:
        """(2 npix, 2 npix) log variance per FFT mode of the noise on a grid twice the patch: the
        learned per-bin log variance interpolated linearly in |k| (the periodic model rounds |k| to
        its bins; pixel variances differ by ~1 %). Its inverse FFT at lags |dx|, |dy| < npix is the
        aperiodic (non-wrapping) autocovariance of the noise."""
        n = self.config.npix
        k = torch.fft.fftfreq(2 * n, d=1.0 / n, device=self.device)  # patch-fundamental units, step 1/2
        radius = torch.sqrt(k[:, None] ** 2 + k[None, :] ** 2)
        values = self.decoder_logvar
        if len(values) == 1:
            return values.expand(2 * n, 2 * n)
        pos = radius.clamp(max=len(values) - 1)
        lo = pos.floor().long().clamp(max=len(values) - 2)
        frac = pos - lo
        return values[lo] * (1 - frac) + values[lo + 1] * frac

    def to_data(self, y: torch.Tensor) -> torch.Tensor:
        """Data-space images x = f(y) of Gaussian-space images y (identity without a marginal
        transform)."""
        return self.marginal.to_data(y)

    def encode(self, x: torch.Tensor):
        """q(z|x): (mean, log-variance), each (B, latent_dim), for data-space images (B, 1, n, n)
        (no gradient reaches x through a marginal transform)."""
        return self._encode_gaussian(self.marginal.to_gaussian(x))

    def _encode_gaussian(self, y: torch.Tensor):
        h = self.encoder_conv(y) + self.encoder_linear(y.flatten(1))
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-12.0, 6.0)

    def decode_linear(self, z: torch.Tensor) -> torch.Tensor:
        """The linear branch of the decoder mean alone: (B, 1, n, n)."""
        n = self.config.npix
        return self.decoder_linear(z).view(-1, 1, n, n)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decoder mean mu_theta(z) (Gaussian space): (B, 1, n, n) for latents (B, latent_dim)."""
        h = self.decoder_input(z).view(-1, self.config.channels[-1], self.bottom, self.bottom)
        # channels_last makes CPU transpose convolutions ~2.4x faster (measured, torch 2.13)
        h = h.contiguous(memory_format=torch.channels_last)
        return self.decoder_conv(h).contiguous() + self.decode_linear(z)

    def decode_data(self, z: torch.Tensor) -> torch.Tensor:
        """Data-space decoder mean f(mu(z)): (B, 1, n, n) for latents (B, latent_dim)."""
        return self.to_data(self.decode(z))

    def noise_log_amplitude(self, z: torch.Tensor, mean: torch.Tensor) -> torch.Tensor | None:
        """Log-amplitude a(z) (B, 1, n, n) of the decoder noise, from latents (B, D) and the
        decoder mean (B, 1, n, n) of z; None for a stationary-noise model."""
        g = self.config.noise_modulation
        if not g:
            return None
        coarse = self.modulation_global(z).view(-1, 1, g, g)
        n = self.config.npix
        local = self.modulation_local(mean.contiguous(memory_format=torch.channels_last)).contiguous()
        return nn.functional.interpolate(coarse, size=(n, n), mode="bilinear", align_corners=False) + local

    def decoder_noise(self, n: int, generator: torch.Generator | None = None,
                      white: torch.Tensor | None = None, log_amplitude: torch.Tensor | None = None,
                      periodic: bool = True) -> torch.Tensor:
        """(n, 1, npix, npix) draws of the decoder noise of p(x|z): coloured from `white` standard
        normals (n, 1, g, g) when given, times exp(log_amplitude / 2) when given (see
        `noise_log_amplitude`). periodic=True (the likelihood's noise, g = npix) wraps around the
        patch edges; periodic=False draws on a grid of g = 2 npix and keeps one npix corner: the
        same spectrum without the wrap-around correlations."""
        npix = self.config.npix
        grid, logvar = (npix, self.noise_logvar()) if periodic else (2 * npix, self.embedded_noise_logvar())
        if white is None:
            white = torch.randn((n, 1, grid, grid), generator=generator, device=self.device)
        spectrum = torch.fft.fft2(white, norm="ortho") * (0.5 * logvar).exp()
        noise = torch.fft.ifft2(spectrum, norm="ortho").real[..., :npix, :npix]
        return noise if log_amplitude is None else noise * (0.5 * log_amplitude).exp()

    def noise_given(self, z: torch.Tensor, mean: torch.Tensor, generator: torch.Generator | None = None,
                    white: torch.Tensor | None = None) -> torch.Tensor:
        """Draws (B, 1, npix, npix) of the decoder noise of p(x|z) for latents z (B, D) whose
        decoder mean is `mean` (B, 1, n, n): `decoder_noise` modulated by a(z)."""
        return self.decoder_noise(len(z), generator, white, self.noise_log_amplitude(z, mean))

    def reconstruct(self, x: torch.Tensor, n_samples: int = 1, generator: torch.Generator | None = None):
        """Data-space mean of `n_samples` decoder means f(mu(z)), z ~ q(z|x) (n_samples=0: of the
        posterior mean)."""
        mean, logvar = self.encode(x)
        if n_samples == 0:
            return self.decode_data(mean)
        out = 0
        for _ in range(n_samples):
            eps = torch.randn(mean.shape, generator=generator, device=mean.device)
            out = out + self.decode_data(mean + eps * (0.5 * logvar).exp())
        return out / n_samples

    def sample(self, n: int, generator: torch.Generator | None = None, z: torch.Tensor | None = None,
               noise: bool = True) -> torch.Tensor:
        """Data-space samples (n, 1, npix, npix): f of the decoder mean of z (default z ~ N(0, I))
        plus, if `noise`, the decoder noise."""
        if z is None:
            z = torch.randn((n, self.config.latent_dim), generator=generator, device=self.device)
        out = self.decode(z)
        if noise:
            out = out + self.noise_given(z, out, generator)
        return self.to_data(out)

    def neg_log_likelihood(self, x: torch.Tensor, mean: torch.Tensor,
                           log_amplitude: torch.Tensor | None = None) -> torch.Tensor:
        """-log p(x | mu, a) per data-space image (B,), nats: the residual g(x) - mu divided by
        exp(a / 2) is stationary Gaussian noise (Jacobian terms sum a / 2 and -sum log g'(x))."""
        return self._neg_log_likelihood_gaussian(*self.marginal.to_gaussian(x, log_derivative=True),
                                                 mean, log_amplitude)

    def _neg_log_likelihood_gaussian(self, y, log_derivative, mean, log_amplitude):
        """As neg_log_likelihood, from y = g(x) and log g'(x)."""
        jacobian = log_derivative.flatten(1).sum(1)
        resid = y - mean if log_amplitude is None else (y - mean) * (-0.5 * log_amplitude).exp()
        power = torch.fft.fft2(resid, norm="ortho").abs().square().flatten(1)
        logvar = self.noise_logvar().flatten()
        nll = 0.5 * (power * torch.exp(-logvar) + logvar + math.log(2 * math.pi)).sum(1) - jacobian
        return nll if log_amplitude is None else nll + 0.5 * log_amplitude.flatten(1).sum(1)

    def elbo_terms(self, x: torch.Tensor, beta: float = 1.0, generator: torch.Generator | None = None):
        """Per-image mean of the negative ELBO and its parts (nats): dict(loss, recon, kl, mse)."""
        y, log_derivative = self.marginal.to_gaussian(x, log_derivative=True)   # one inversion per batch
        mean, logvar = self._encode_gaussian(y)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device)
        z = mean + eps * (0.5 * logvar).exp()
        recon_mean = self.decode(z)
        recon = self._neg_log_likelihood_gaussian(y, log_derivative, recon_mean,
                                                  self.noise_log_amplitude(z, recon_mean))
        kl = 0.5 * (mean**2 + logvar.exp() - logvar - 1).sum(1)
        mse = (x - self.to_data(recon_mean)).square().mean()
        return {"loss": (recon + beta * kl).mean(), "recon": recon.mean(), "kl": kl.mean(), "mse": mse}

    @torch.no_grad()
    def init_from_pca(self, data: torch.Tensor) -> None:
        """Set the linear maps to the probabilistic-PCA solution of data-space `data` (N, 1, n, n)
        in the Gaussian space and damp the last layers of the convolutional branches (training
        starts near the best linear VAE)."""
        n, d = self.config.npix, self.config.latent_dim
        flat = self.marginal.to_gaussian(data).reshape(len(data), n * n).double()
        mu = flat.mean(0)
        _, s, vt = torch.linalg.svd(flat - mu, full_matrices=False)
        lam = s**2 / (len(flat) - 1)
        sigma2 = lam[d:].mean()
        top, v = lam[:d], vt[:d]                      # (d,), (d, n*n)
        scale = (top - sigma2).clamp_min(1e-12).sqrt()
        self.decoder_linear.weight.copy_((v.T * scale).float())
        self.decoder_linear.bias.copy_(mu.float())
        w = torch.zeros(2 * d, n * n, dtype=torch.float64)
        w[:d] = v * (scale / top)[:, None]
        b = torch.zeros(2 * d, dtype=torch.float64)
        b[:d] = -(v * (scale / top)[:, None]) @ mu
        b[d:] = torch.log(sigma2 / top)
        self.encoder_linear.weight.copy_(w.float())
        self.encoder_linear.bias.copy_(b.float())
        for last in (self.encoder_conv[-1], self.decoder_conv[-1]):
            last.weight.mul_(0.1)  # small, not zero: a zero last layer starves the branch of gradient
            last.bias.zero_()
        self.decoder_logvar.fill_(float(torch.log(sigma2)))
