"""Stage 3 — model: a conditional hierarchical VAE of the small scales given the large scales.

Shapes (normalised units, see the weights' metadata "normalisation"):
    x     (B, 1, n, n)      the small scales of a patch: ln I minus its coarse part
    c     (B, 2, n/2, n/2)  the condition: [coarse part minus its patch mean, patch-mean ln I]
    eps   (B, latent_dim)   whitened latents, N(0, I) under the prior

The latent is spatial and hierarchical (top-down, as Ladder VAE / NVAE): groups z_k of
`latent_channels[k]` channels on grids of n/2, n/4, n/8 ... pixels (finest first in the
config, sampled coarsest first). Each group has a learned conditional prior
p(z_k | z_coarser, c) = N(mu_k, sigma_k^2) computed by the decoder from the condition and the
coarser groups, and a posterior q(z_k | x, c, z_coarser) that corrects that prior with encoder
features of x. The whitened latent eps_k = (z_k - mu_k) / sigma_k is what the outside sees:
the prior in eps is N(0, I), so sampling, seeding per tile and MAP fits work on eps alone.
With `latent_flow_layers` the prior of a group can be non-Gaussian and spatially coupled:
z_k = mu_k + sigma_k g_k(eps_k), g_k an invertible flow of affine couplings on checkerboards
conditioned on the decoder's features (`LatentFlow`: neighbouring latents shape each other, so
the prior can draw elongated, coherent structure); eps_k = g_k^-1((z_k - mu_k) / sigma_k) is
still N(0, I) under the prior, and the KL of such a group is a one-sample estimate.

The decoder sees the condition at every scale (features of c added at each resolution) and is
a plain convolutional network (SiLU, bilinear upsampling: no transpose convolutions and their
checkerboards, no linear shortcut). The likelihood p(x | eps, c) is Gaussian around the decoded
mean with a noise whose spectrum is learned per radial Fourier bin (stationary within a patch)
and whose power on the fine scales follows the condition (`log_noise_gain`: log-linear in the
patch-mean level and in the log amplitude of the condition's finest scales, zero while training,
set by `train.calibrate_decoder_noise` on the bins `noise_gain_bins`); samples add it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

#: channels of the condition c: coarse structure, patch-mean log intensity
CONDITION_CHANNELS = 2


@dataclass
class VAEConfig:
    """Architecture of the conditional VAE (stored in the weights file).

    npix: patch pixels across; widths: feature channels at n, n/2, n/4, ... (one per scale);
    latent_channels: channels of the latent groups at n/2, n/4, ... (finest first, one per
    scale below n; 0: no group at that scale); decoder_logvar_init: initial log noise variance per
    Fourier mode; latent_flow_layers: affine couplings of each group's prior flow, finest first
    (0: a Gaussian prior; empty: all Gaussian)."""

    npix: int = 64
    widths: tuple = (8, 16, 32, 64)
    latent_channels: tuple = (2, 4, 8)
    decoder_logvar_init: float = -2.0
    latent_flow_layers: tuple = ()

    def __post_init__(self):
        self.widths = tuple(int(w) for w in self.widths)
        self.latent_channels = tuple(int(c) for c in self.latent_channels)
        if len(self.widths) < 3 or min(self.widths) < 1:
            raise ValueError(f"widths={self.widths}: expected at least 3 positive channel counts")
        if (len(self.latent_channels) != len(self.widths) - 1 or min(self.latent_channels) < 0
                or max(self.latent_channels) < 1):
            raise ValueError(f"latent_channels={self.latent_channels}: expected {len(self.widths) - 1} counts >= 0, "
                             f"not all 0 (one per scale n/2 ... n/{2 ** (len(self.widths) - 1)}; 0 = no group)")
        self.latent_flow_layers = tuple(int(n) for n in self.latent_flow_layers) or (0,) * len(self.latent_channels)
        if (len(self.latent_flow_layers) != len(self.latent_channels) or min(self.latent_flow_layers) < 0
                or any(n and not c for n, c in zip(self.latent_flow_layers, self.latent_channels))):
            raise ValueError(f"latent_flow_layers={self.latent_flow_layers}: expected {len(self.latent_channels)} "
                             "counts >= 0, one per latent group (0 = a Gaussian prior; 0 where latent_channels is 0)")
        down = 2 ** (len(self.widths) - 1)
        if self.npix % down or self.npix < 2 * down:
            raise ValueError(f"npix={self.npix} must be a multiple of 2**(len(widths)-1)={down}, at least {2 * down}")

    @property
    def latent_shapes(self) -> list[tuple[int, int, int]]:
        """{group index k: (channels, side, side)} of the latent groups (k = scale index - 1),
        finest first."""
        return {k: (c, self.npix // 2 ** (k + 1), self.npix // 2 ** (k + 1))
                for k, c in enumerate(self.latent_channels) if c}

    @property
    def latent_dim(self) -> int:
        return sum(c * s * s for c, s, _ in self.latent_shapes.values())

    @property
    def condition_npix(self) -> int:
        return self.npix // 2

    def to_dict(self) -> dict:
        """The fields; latent_flow_layers only where a group has a flow (files without flows read as before)."""
        out = asdict(self)
        if not any(self.latent_flow_layers):
            del out["latent_flow_layers"]
        return out


def conv(c_in: int, c_out: int, k: int = 3) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, k, padding=k // 2)


def silu_fresh(h: torch.Tensor) -> torch.Tensor:
    """SiLU of a tensor nothing else holds (a layer's output): in place where no gradient is
    recorded (inference: half the memory traffic, ~7 % of a decoding on the CPU)."""
    return F.silu(h, inplace=not torch.is_grad_enabled())


class SiLU(nn.Module):
    """`silu_fresh` as a layer (after a convolution in nn.Sequential)."""

    def forward(self, h):
        return silu_fresh(h)


class ResBlock(nn.Module):
    """h + conv(silu(conv(silu(h)))), the last conv zero-initialised (starts as identity)."""

    def __init__(self, width: int):
        super().__init__()
        self.a, self.b = conv(width, width), conv(width, width)
        nn.init.zeros_(self.b.weight)
        nn.init.zeros_(self.b.bias)

    def forward(self, h):
        return h + self.b(silu_fresh(self.a(F.silu(h))))


def down(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), SiLU())


def up(h: torch.Tensor) -> torch.Tensor:
    return F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False)


def radial_bins(npix: int, torus: int = 1) -> torch.Tensor:
    """(torus npix, torus npix) long: rounded |k| of each FFT frequency of a grid of `torus` times
    the patch side (same pixels), in units of the patch fundamental, capped at the patch's largest."""
    k = torch.fft.fftfreq(torus * npix, d=1.0 / npix)
    kmax = round(math.sqrt(2) * (npix // 2))
    return torch.sqrt(k[:, None] ** 2 + k[None, :] ** 2).round().long().clamp_max(kmax)


def wavelet_filters(npix: int, n_scales: int = 4, n_angles: int = 4) -> torch.Tensor:
    """(J L, n, n) Fourier-space Morlet-like (Gaussian, one-sided) band-pass filters: centre
    frequency 0.375 cycles/px / 2^j along angle pi l / L, relative width 0.5 (for fft2 images)."""
    k = torch.fft.fftfreq(npix)
    ky, kx = torch.meshgrid(k, k, indexing="ij")
    out = []
    for j in range(n_scales):
        centre, width = 0.375 / 2**j, 0.5 * 0.375 / 2**j
        for a in range(n_angles):
            theta = math.pi * a / n_angles
            out.append(torch.exp(-((kx - centre * math.cos(theta)) ** 2 + (ky - centre * math.sin(theta)) ** 2)
                                 / (2 * width**2)))
    return torch.stack(out)


#: images of a batch whose statistics enter the training loss (the term costs ~ a decoder pass each)
STATS_BATCH = 8


def texture_pairs(n_scales: int = 4, n_angles: int = 4) -> torch.Tensor:
    """(P, 2) filter-index pairs (k1, k2) of the second-order statistics: k2 at a coarser scale
    than k1, parallel or perpendicular to it (filter index = scale * n_angles + angle)."""
    pairs = [(j1 * n_angles + a, j2 * n_angles + (a + da) % n_angles)
             for j1 in range(n_scales) for j2 in range(j1 + 1, n_scales) for a in range(n_angles)
             for da in (0, n_angles // 2)]
    return torch.tensor(pairs)


def texture_statistics(x: torch.Tensor, filters: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Scattering-type statistics per image (B, K + P), log: first order log <|x * psi_k|> (power
    per scale and orientation) and second order log <|psi_k2 * |x * psi_k1||> / <|x * psi_k1|>
    for the `pairs` (k1, k2) (how the envelope of one band is organised at a coarser scale: what
    tells filaments from Gaussian fields of the same spectrum). x (B, 1, n, n)."""
    first = torch.fft.ifft2(torch.fft.fft2(x) * filters).abs()             # (B, K, n, n)
    s1 = first.mean(dim=(-2, -1)).clamp_min(1e-6)
    envelope = torch.fft.fft2(first[:, pairs[:, 0]]) * filters[pairs[:, 1]]  # (B, P, n, n)
    s2 = torch.fft.ifft2(envelope).abs().mean(dim=(-2, -1))
    return torch.cat([s1.log(), (s2 / s1[:, pairs[:, 0]]).clamp_min(1e-6).log()], 1)


def gaussian_kl(mean_q, logvar_q, mean_p, logvar_p) -> torch.Tensor:
    """Elementwise KL(N(mean_q, e^logvar_q) || N(mean_p, e^logvar_p)), nats."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mean_q - mean_p) ** 2) * (-logvar_p).exp() - 1)


def noise_gain_features(c: torch.Tensor) -> torch.Tensor:
    """(B, 2) what the decoder noise's amplitude follows in conditions c (B, 2, m, m): the level
    plane (normalised patch-mean ln I) and the log standard deviation of the coarse structure's
    five-point Laplacian (the amplitude of the finest scales the condition holds, which the
    small scales continue; on the IRIS validation split it predicts their power far better than
    the structure's standard deviation, which the largest scales of the patch set)."""
    level = c[:, 1].mean((-2, -1))
    s = c[:, 0]
    laplacian = (4 * s[:, 1:-1, 1:-1] - s[:, :-2, 1:-1] - s[:, 2:, 1:-1] - s[:, 1:-1, :-2] - s[:, 1:-1, 2:])
    return torch.stack([level, torch.log(laplacian.flatten(1).std(1) + 1e-6)], 1)


class LatentFlow(nn.Module):
    """Invertible map u = g(eps; h) of a latent group (B, C, s, s), conditioned on features h
    (B, W, s, s): `layers` affine couplings, each rescaling and shifting the latents on one
    colour of a checkerboard (alternating) by a two-layer convolution of the other colour's
    latents and h. Starts as the identity (last convolutions zero)."""

    def __init__(self, channels: int, width: int, layers: int):
        super().__init__()
        self.nets = nn.ModuleList([nn.Sequential(conv(channels + width, width), SiLU(), conv(width, 2 * channels))
                                   for _ in range(layers)])
        for net in self.nets:
            nn.init.zeros_(net[-1].weight)
            nn.init.zeros_(net[-1].bias)

    @staticmethod
    def _mask(layer: int, like: torch.Tensor) -> torch.Tensor:
        """(s, s) 1 on the checkerboard colour layer `layer` reads (kept), 0 on the one it changes."""
        i = torch.arange(like.shape[-1], device=like.device)
        return ((i[:, None] + i[None, :] + layer) % 2).to(like.dtype)

    def _coupling(self, layer: int, u: torch.Tensor, h: torch.Tensor):
        """(kept mask, log scale, shift) of coupling `layer` at latents u."""
        keep = self._mask(layer, u)
        log_scale, shift = self.nets[layer](torch.cat([u * keep, h], 1)).chunk(2, 1)
        return keep, torch.tanh(log_scale), shift

    def forward(self, eps: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """u = g(eps; h), same shape as eps."""
        u = eps
        for layer in range(len(self.nets)):
            keep, log_scale, shift = self._coupling(layer, u, h)
            u = keep * u + (1 - keep) * (u * log_scale.exp() + shift)
        return u

    def inverse(self, u: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps = g^-1(u; h), elementwise log |d eps / d u| whose sum is the log Jacobian), each as u."""
        eps, log_det = u, torch.zeros_like(u)
        for layer in reversed(range(len(self.nets))):
            keep, log_scale, shift = self._coupling(layer, eps, h)
            eps = keep * eps + (1 - keep) * (eps - shift) * (-log_scale).exp()
            log_det = log_det - (1 - keep) * log_scale
        return eps, log_det


class PatchCritic(nn.Module):
    """Adversarial critic of small scales given their condition (training only: the VAE-GAN
    term of `train.adversarial_term`): D(x (B, 1, n, n), c (B, 2, n/2, n/2)) -> (B,) scores,
    the mean of a patch map at n / 2^(len(widths) - 1) (receptive field ~40 px in x with the
    default widths) of spectrally normalised convolutions (LeakyReLU 0.2) of [x, c upsampled to n]."""

    def __init__(self, widths: tuple = (16, 32, 64, 64)):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        layers = [sn(conv(1 + CONDITION_CHANNELS, widths[0])), nn.LeakyReLU(0.2)]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [sn(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*layers, sn(conv(widths[-1], 1)))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, up(c)], 1)).mean(dim=(1, 2, 3))


class ConditionalVAE(nn.Module):
    """p(x | eps, c) p(eps) with the top-down hierarchical latent described in the module doc."""

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = cfg = config or VAEConfig()
        w = cfg.widths
        n_scales = len(w)
        # condition features at n/2, n/4, ... (c arrives at n/2)
        self.cond_in = nn.Sequential(conv(CONDITION_CHANNELS, w[1]), SiLU())
        self.cond_down = nn.ModuleList([down(w[s], w[s + 1]) for s in range(1, n_scales - 1)])
        # encoder of (x, c) features at n/2, n/4, ...
        self.enc_in = nn.Sequential(conv(1 + CONDITION_CHANNELS, w[0]), SiLU(), down(w[0], w[1]))
        self.enc_down = nn.ModuleList([nn.Sequential(ResBlock(w[s]), down(w[s], w[s + 1]))
                                       for s in range(1, n_scales - 1)])
        # top-down decoder: one latent group per scale n/2 ... (index k = scale s - 1)
        def per_group(make):
            return nn.ModuleList([make(w[k + 1], c) if c else nn.Identity() for k, c in enumerate(cfg.latent_channels)])

        self.prior_head = per_group(lambda width, c: conv(width, 2 * c))
        self.post_head = per_group(lambda width, c: conv(2 * width, 2 * c))
        self.latent_in = per_group(lambda width, c: conv(c, width))
        self.prior_flow = nn.ModuleList([LatentFlow(c, w[k + 1], n) if c and n else nn.Identity()
                                         for k, (c, n) in enumerate(zip(cfg.latent_channels, cfg.latent_flow_layers))])
        # residual blocks at n/2 and coarser only: at n they would cost a third of the decoding time
        self.dec_block = nn.ModuleList([ResBlock(w[s]) for s in range(1, n_scales)])
        self.dec_up = nn.ModuleList([conv(w[s + 1], w[s]) for s in range(n_scales - 1)])
        self.out = conv(w[0], 1)
        for k in self.config.latent_shapes:  # start at the N(0, I) prior
            for head in (self.prior_head[k], self.post_head[k]):
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)
        self.register_buffer("noise_bin", radial_bins(cfg.npix), persistent=False)
        self.register_buffer("filters", wavelet_filters(cfg.npix), persistent=False)
        self.register_buffer("pairs", texture_pairs(), persistent=False)
        self.decoder_logvar = nn.Parameter(torch.full((int(self.noise_bin.max()) + 1,), float(cfg.decoder_logvar_init)))
        #: log gain of the decoder-noise power on [1, *noise_gain_features(c)], the features clamped to
        #: noise_gain_range (rows: features; columns: the calibration split's min, max): 0 (gain 1) until calibrated
        self.register_buffer("noise_gain", torch.zeros(3))
        self.register_buffer("noise_gain_range", torch.tensor([[-1.0, 1.0], [-1.0, 1.0]]))
        #: 1 in the radial bins the gain applies to (the fine scales it was fitted on), 0 elsewhere
        self.register_buffer("noise_gain_bins", torch.ones(int(self.noise_bin.max()) + 1))

    @property
    def device(self) -> torch.device:
        return self.decoder_logvar.device

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    # --- pieces -----------------------------------------------------------------------------
    def condition_features(self, c: torch.Tensor) -> list[torch.Tensor]:
        """Features of c at every scale: [None (n), (B, w1, n/2), (B, w2, n/4), ...]."""
        feats = [None, self.cond_in(c)]
        for layer in self.cond_down:
            feats.append(layer(feats[-1]))
        return feats

    def encoder_features(self, x: torch.Tensor, c: torch.Tensor) -> list[torch.Tensor]:
        """Bottom-up features of (x, c): [None, (B, w1, n/2), (B, w2, n/4), ...]."""
        h = self.enc_in(torch.cat([x, up(c)], 1))
        feats = [None, h]
        for layer in self.enc_down:
            feats.append(layer(feats[-1]))
        return feats

    def split(self, eps: torch.Tensor) -> dict[int, torch.Tensor]:
        """Flat whitened latents (B, latent_dim) -> {k: (B, c_k, s_k, s_k)}, finest first."""
        out, start = {}, 0
        for k, shape in self.config.latent_shapes.items():
            size = math.prod(shape)
            out[k] = eps[:, start:start + size].reshape(-1, *shape)
            start += size
        return out

    def _top_down(self, c: torch.Tensor, eps: torch.Tensor | None = None, enc: list | None = None,
                  generator: torch.Generator | None = None, use_mean: bool = False, cond: list | None = None):
        """Run the decoder from the coarsest scale: each latent group is the prior's mean + sigma eps
        (eps given), or drawn from the posterior given encoder features `enc` (its mean if
        `use_mean`); `cond`: c's `condition_features` when already computed. Returns (decoded
        mean (B, 1, n, n), [per-element terms (B, c_k, s_k, s_k) whose sum is each group's KL, coarsest
        first] or None, whitened eps (B, latent_dim)). The KL is analytic for a Gaussian prior and
        log q - log p at the drawn z for a flow prior (a one-sample estimate; its elements alone mean
        nothing, and with `use_mean` neither does the sum)."""
        cond = self.condition_features(c) if cond is None else cond
        groups = None if eps is None else self.split(eps)
        kl_maps, whitened = [], {}
        n_scales = len(self.config.widths)
        h = cond[-1]
        for s in range(n_scales - 1, -1, -1):
            k = s - 1
            if k in self.config.latent_shapes:
                mean_p, logvar_p = self.prior_head[k](h).chunk(2, 1)
                logvar_p = logvar_p.clamp(-10.0, 4.0)
                flow = self.prior_flow[k] if isinstance(self.prior_flow[k], LatentFlow) else None
                if enc is None:
                    z = mean_p + (0.5 * logvar_p).exp() * (groups[k] if flow is None else flow(groups[k], h))
                    whitened[k] = groups[k]
                else:
                    dm, dl = self.post_head[k](torch.cat([h, enc[s]], 1)).chunk(2, 1)
                    mean_q, logvar_q = mean_p + dm, (logvar_p + dl).clamp(-12.0, 4.0)
                    noise = torch.zeros_like(mean_q) if use_mean else torch.randn(
                        mean_q.shape, generator=generator, device=mean_q.device)
                    z = mean_q + (0.5 * logvar_q).exp() * noise
                    u = (z - mean_p) * (-0.5 * logvar_p).exp()
                    if flow is None:
                        whitened[k] = u
                        kl_maps.append(gaussian_kl(mean_q, logvar_q, mean_p, logvar_p))
                    else:
                        whitened[k], log_det = flow.inverse(u, h)
                        kl_maps.append(0.5 * (whitened[k].square() - noise.square() + logvar_p - logvar_q) - log_det)
                h = h + self.latent_in[k](z)
            if s > 0:
                h = self.dec_block[s - 1](h)
                h = silu_fresh(self.dec_up[s - 1](up(h)))
                if cond[s - 1] is not None:
                    h = h + cond[s - 1]
        eps_out = torch.cat([whitened[k].flatten(1) for k in sorted(whitened)], 1)
        return self.out(h), (kl_maps if enc is not None else None), eps_out

    # --- public API -------------------------------------------------------------------------
    def decode(self, eps: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Decoder mean (B, 1, n, n) of whitened latents eps (B, D) given conditions c."""
        return self._top_down(c, eps=eps)[0]

    def decode_with_prediction(self, eps: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(decoder mean of eps, decoder mean at eps = 0: the prediction from c alone, the latents at
        their prior means, or at g(0) of a group's flow), each (B, 1, n, n), the features of c
        computed once for both."""
        cond = self.condition_features(c)
        return (self._top_down(c, eps=eps, cond=cond)[0],
                self._top_down(c, eps=torch.zeros_like(eps), cond=cond)[0])

    def encode(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Whitened latents (B, D) of the posterior means of q(z | x, c) (groups at their means)."""
        return self._top_down(c, enc=self.encoder_features(x, c), use_mean=True)[2]

    def noise_logvar(self, torus: int = 1) -> torch.Tensor:
        """(m, m) log variance of the decoder noise per FFT mode (orthonormal FFT) of a grid of
        m = torus n pixels (the patch's pixel size: torus 2 samples the same spectrum twice as
        finely in frequency)."""
        return self.decoder_logvar[self._bins(torus)]

    def _bins(self, torus: int) -> torch.Tensor:
        """`radial_bins` of the grid of torus x npix pixels (the stored ones for torus 1)."""
        return self.noise_bin if torus == 1 else radial_bins(self.config.npix, torus).to(self.noise_bin.device)

    def log_noise_gain(self, c: torch.Tensor) -> torch.Tensor:
        """(B,) log of the factor on the decoder-noise power of patches with conditions c: linear
        (`noise_gain`) in their `noise_gain_features`, each clamped to `noise_gain_range` (a sky
        brighter, fainter or more contrasted than the calibration's keeps its end's gain)."""
        f = noise_gain_features(c)
        f = torch.minimum(torch.maximum(f, self.noise_gain_range[:, 0]), self.noise_gain_range[:, 1])
        return self.noise_gain[0] + f @ self.noise_gain[1:]

    def noise_gain_mask(self, torus: int = 1) -> torch.Tensor:
        """(m, m) 1 on the FFT modes (grid as `noise_logvar`) whose power the gain scales, else 0."""
        return self.noise_gain_bins[self._bins(torus)]

    def noise_variance(self, c: torch.Tensor, torus: int = 1) -> torch.Tensor:
        """(B, m, m) decoder-noise variance per FFT mode of patches with conditions c: exp(noise_logvar)
        times the gain exp(log_noise_gain(c)) on the modes of `noise_gain_mask`."""
        return self.noise_log_variance(c, torus).exp()

    def noise_log_variance(self, c: torch.Tensor, torus: int = 1) -> torch.Tensor:
        """(B, m, m) log of `noise_variance` (exactly noise_logvar where the gain is 1)."""
        gain = self.log_noise_gain(c).exp()[:, None, None]
        return self.noise_logvar(torus) + torch.log1p(self.noise_gain_mask(torus) * (gain - 1))

    def decoder_noise(self, white: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Decoder-noise draws (B, 1, n, n) of patches with conditions c (B, 2, n/2, n/2), coloured
        from standard normals `white`: of shape (B, 1, n, n), periodic over the patch (training,
        sampling, the component: the blend's taper hides the wrap-around); of shape (B, 1, 2n, 2n),
        the n x n corner of the field on a torus of twice the side, so that correlations do not
        wrap across the patch edges (conditioning: `posterior.decoder_noise_covariance` is its covariance).
        Its per-mode variance is `noise_variance`."""
        n, m = self.config.npix, white.shape[-1]
        if m not in (n, 2 * n) or white.shape[-2] != m:
            raise ValueError(f"white noise of shape {tuple(white.shape)}: expected (..., {n}, {n}) or "
                             f"(..., {2 * n}, {2 * n})")
        amplitude = self.noise_variance(c, m // n).sqrt().reshape(white.shape)
        return torch.fft.ifft2(torch.fft.fft2(white, norm="ortho") * amplitude, norm="ortho").real[..., :n, :n]

    def sample(self, c: torch.Tensor, generator: torch.Generator | None = None, eps: torch.Tensor | None = None,
               noise: bool = True) -> torch.Tensor:
        """Conditional samples (B, 1, n, n) given c: decoded mean of eps (default eps ~ N(0, I))
        plus, if `noise`, the decoder noise."""
        if eps is None:
            eps = torch.randn((len(c), self.latent_dim), generator=generator, device=c.device)
        out = self.decode(eps, c)
        if noise:
            out = out + self.decoder_noise(torch.randn(out.shape, generator=generator, device=c.device), c)
        return out

    def reconstruct(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Decoder mean at the posterior mean of the latents: (B, 1, n, n)."""
        return self.decode(self.encode(x, c), c)

    def neg_log_likelihood(self, x: torch.Tensor, mean: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """-log p(x | mean, c) per image (B,), nats: x - mean is the decoder noise."""
        power = torch.fft.fft2(x - mean, norm="ortho").abs().square().flatten(1)
        logvar = self.noise_log_variance(c).flatten(1)
        return 0.5 * (power * torch.exp(-logvar) + logvar + math.log(2 * math.pi)).sum(1)

    def elbo_terms(self, x: torch.Tensor, c: torch.Tensor, beta: float = 1.0, free_bits: float = 0.0,
                   stats_weight: float = 0.0, generator: torch.Generator | None = None) -> dict:
        """Per-image means of the training loss and its parts (nats): dict(loss, recon, kl,
        kl_per_group (coarsest group first), mse, stats). `free_bits` (nats per latent dimension):
        each group's batch-mean KL per dimension below it costs free_bits instead (guards against
        posterior collapse); the reported kl is the true one (for a group with a flow prior, its
        one-sample estimate: free bits then compare a noisy batch mean with the floor). `stats_weight`: weight of the
        sample-statistics term, the squared difference of `texture_statistics` between one
        conditional sample (prior latents, decoder noise) and the real x of each c, summed over
        the statistics, for the first STATS_BATCH images (0: the plain negative ELBO)."""
        mean, kl_maps, _ = self._top_down(c, enc=self.encoder_features(x, c), generator=generator)
        recon = self.neg_log_likelihood(x, mean, c)
        kl_groups = [m.flatten(1).sum(1) for m in kl_maps]
        kl = sum(kl_groups)
        penalised = 0.0
        for kl_k, kl_map in zip(kl_groups, kl_maps):
            dims = kl_map[0].numel()
            penalised = penalised + torch.clamp(kl_k.mean(), min=free_bits * dims)
        loss = recon.mean() + beta * penalised
        mismatch = torch.zeros((), device=x.device)
        if stats_weight > 0:
            sample = self.sample(c[:STATS_BATCH], generator)
            mismatch = (texture_statistics(sample, self.filters, self.pairs)
                        - texture_statistics(x[:STATS_BATCH], self.filters, self.pairs)).square().sum(1).mean()
            loss = loss + stats_weight * mismatch
        return {"loss": loss, "recon": recon.mean(), "kl": kl.mean(),
                "kl_per_group": torch.stack([k.mean() for k in kl_groups]).detach(),
                "mse": (x - mean).square().mean(), "stats": mismatch}
