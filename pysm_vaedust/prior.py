"""Stage 3b — learned latent prior: a RealNVP normalizing flow fitted to the aggregated posterior.

A VAE's N(0, I) prior and its aggregated posterior q(z) = E_x q(z|x) differ, so decoded N(0, I)
draws lack the data's statistics (the seed's failure). The flow maps standard normals eps to
latents z = f(eps) distributed like q(z) (two-stage VAE idea, Dai & Wipf 2019; flow: Dinh et
al. 2017). Latents are (B, dim) float32 tensors.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn
from tqdm import tqdm


class _Coupling(nn.Module):
    """Affine coupling: the dims where mask == 0 are scaled/shifted by an MLP of the others."""

    def __init__(self, mask: torch.Tensor, hidden: int):
        super().__init__()
        dim = mask.numel()
        self.register_buffer("mask", mask)
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 2 * dim))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def _scale_shift(self, x_fixed):
        log_s, t = self.net(x_fixed).chunk(2, dim=1)
        log_s = torch.tanh(log_s) * (1 - self.mask)  # bounded scales keep the flow stable
        return log_s, t * (1 - self.mask)

    def forward(self, x):  # data -> noise direction
        log_s, t = self._scale_shift(x * self.mask)
        return x * self.mask + (1 - self.mask) * (x * log_s.exp() + t), log_s.sum(1)

    def inverse(self, y):  # noise -> data direction
        log_s, t = self._scale_shift(y * self.mask)
        return y * self.mask + (1 - self.mask) * ((y - t) * (-log_s).exp())


class LatentFlow(nn.Module):
    """z <-> eps: a data-initialised affine map followed by `n_layers` affine couplings with fixed
    random binary masks (stored, so the file fully defines the flow)."""

    def __init__(self, dim: int, n_layers: int = 6, hidden: int = 256, mask_seed: int = 0):
        super().__init__()
        self.dim, self.n_layers, self.hidden, self.mask_seed = dim, n_layers, hidden, mask_seed
        gen = torch.Generator().manual_seed(mask_seed)
        masks = [(torch.randperm(dim, generator=gen) < dim // 2).float() for _ in range(n_layers)]
        self.shift = nn.Parameter(torch.zeros(dim))
        self.log_scale = nn.Parameter(torch.zeros(dim))
        self.layers = nn.ModuleList([_Coupling(m, hidden) for m in masks])

    def architecture(self) -> dict:
        return {"dim": self.dim, "n_layers": self.n_layers, "hidden": self.hidden, "mask_seed": self.mask_seed}

    @torch.no_grad()
    def initialise(self, z: torch.Tensor) -> None:
        """Set the affine layer to standardise `z` (N, dim)."""
        self.shift.copy_(z.mean(0))
        self.log_scale.copy_(z.std(0).clamp_min(1e-6).log())

    def to_normals(self, z: torch.Tensor):
        """(eps, log|det d eps / d z|) for latents z (B, dim)."""
        x = (z - self.shift) * (-self.log_scale).exp()
        logdet = -self.log_scale.sum().expand(len(z))
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def sample_from_normals(self, eps: torch.Tensor) -> torch.Tensor:
        """Latents z (B, dim) distributed like the aggregated posterior, from normals (B, dim)."""
        x = eps
        for layer in reversed(self.layers):
            x = layer.inverse(x)
        return x * self.log_scale.exp() + self.shift

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log density (B,) of latents under the flow (nats)."""
        eps, logdet = self.to_normals(z)
        return -0.5 * (eps**2).sum(1) - 0.5 * self.dim * math.log(2 * math.pi) + logdet


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) per row (B,)."""
    return -0.5 * (z**2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi)


@torch.no_grad()
def posterior_draws(vae, data: torch.Tensor, n_draws: int, generator: torch.Generator, batch: int = 512):
    """z ~ q(z|x) for every image of `data` (N, 1, n, n), `n_draws` each: (N * n_draws, dim)."""
    out = []
    for start in range(0, len(data), batch):
        mean, logvar = vae.encode(data[start:start + batch].to(vae.device))
        for _ in range(n_draws):
            out.append(mean + torch.randn(mean.shape, generator=generator, device=mean.device) * (0.5 * logvar).exp())
    return torch.cat(out)


def train_prior(vae, train_data: torch.Tensor, val_data: torch.Tensor, epochs: int, seed: int,
                n_layers: int = 6, hidden: int = 256, lr: float = 1e-3, batch_size: int = 256,
                n_draws: int = 4, progress: bool = True):
    """Fit a LatentFlow to the aggregated posterior of `train_data` (augmented images (N, 1, n, n)).

    Returns (flow at its best validation epoch, report dict with validation NLLs per latent dim of
    the flow and of N(0, I))."""
    gen = torch.Generator(device=vae.device).manual_seed(seed)
    z_train = posterior_draws(vae, train_data, n_draws, gen)
    z_val = posterior_draws(vae, val_data, n_draws, gen)
    torch.manual_seed(seed)
    flow = LatentFlow(z_train.shape[1], n_layers, hidden).to(vae.device)
    flow.initialise(z_train)
    optimiser = torch.optim.Adam(flow.parameters(), lr=lr)
    cpu_gen = torch.Generator().manual_seed(seed)
    best, best_state, history = math.inf, None, []
    bar = tqdm(range(epochs), desc="latent prior (flow)", disable=not progress, file=sys.stderr)
    for _ in bar:
        flow.train()
        order = torch.randperm(len(z_train), generator=cpu_gen)
        for start in range(0, len(order), batch_size):
            loss = -flow.log_prob(z_train[order[start:start + batch_size]]).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        flow.eval()
        with torch.no_grad():
            val_nll = float(-flow.log_prob(z_val).mean()) / flow.dim
        history.append(val_nll)
        bar.set_postfix(val_nll_per_dim=f"{val_nll:.4f}")
        if val_nll < best:
            best, best_state = val_nll, {k: v.clone() for k, v in flow.state_dict().items()}
    flow.load_state_dict(best_state)
    flow.eval().requires_grad_(False)
    with torch.no_grad():
        gauss_val = float(-standard_normal_log_prob(z_val).mean()) / flow.dim
    report = {"architecture": flow.architecture(), "val_nll_per_dim_flow": best,
              "val_nll_per_dim_standard_normal": gauss_val, "history_val_nll_per_dim": history,
              "default": bool(best < gauss_val), "epochs": epochs, "n_posterior_draws": n_draws}
    return flow, report
