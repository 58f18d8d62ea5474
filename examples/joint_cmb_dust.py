"""Joint CMB + dust inference on real dust patches with the conditional VAE as the dust prior.

    d = s_cmb + g_dust(eps, c) + n        (one patch, normalised dust units)

* dust truth: real held-out (test-split) dust patches of the weights' training data, in the VAE's
  normalised units (small-scale log intensity / the global scale), with their conditions c (the
  large scales, known: in a real analysis they come from the template);
* CMB: a Gaussian field, periodic on the patch, with the damped power law
  C_ell = A (ell / 100)^-2 exp(-(ell / 600)^2) for ell > 0 (C_0 = 0), A set so that the CMB pixel
  rms is `--cmb_rms` (default 0.5) in the same normalised units — a stand-in with a CMB-like
  shape, not a real CMB spectrum in K;
* noise: white, rms `--noise` (default 0.05).

Model: g_dust(eps, c) = mu(eps, c) + e, mu the decoder mean, e the VAE's decoder noise
(stationary, periodic). The CMB, the decoder noise and the white noise are all Gaussian and
diagonal in the patch's orthonormal Fourier basis, so the CMB is marginalised exactly: for given
eps the residual r = d - mu(eps, c) has Fourier variance S_k + C_k + N and

    -2 log p(eps | d, c) = |eps|^2 + sum_k |r_k|^2 / (S_k + C_k + N) + const,

minimised with L-BFGS over the whitened latents eps (N(0, I) prior, as in
pysm_vaedust.conditioning). Then s_hat = S / (S + C + N) r (Wiener filter given the dust) and
dust_hat = mu(eps_map, c) + C / (S + C + N) r. Baselines, two-component Wiener filters:
'Wiener|c' with the VAE's coarse input — dust ~ N(m(c), C_r) of `wiener.ConditionalGaussian`
fitted on the training split (mean linear in c, non-periodic residual covariance), the CMB's
circulant covariance, exact dense solve — and 'Wiener', blind to c (the training split's 2D power
spectrum as the dust's).

    python examples/joint_cmb_dust.py [--weights W] [--patches 12] [--sets-cache runs/bench/sets.pt]

Results with the shipped weights are in the README (section "Conditioning").
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from pysm_vaedust.train import datasets_of_weights
from pysm_vaedust.weights import default_weights_path, load_weights
from pysm_vaedust.wiener import ConditionalGaussian, torus_covariance


def ell_grid(npix: int, size_deg: float) -> torch.Tensor:
    """(npix, npix) multipole of each FFT mode of a flat patch."""
    k = torch.fft.fftfreq(npix, d=1.0 / npix).double()
    return 2 * math.pi / math.radians(size_deg) * torch.sqrt(k[:, None] ** 2 + k[None, :] ** 2)


def cmb_mode_variance(ell: torch.Tensor, rms: float) -> torch.Tensor:
    """Orthonormal-FFT per-mode variance of the damped power law, scaled to pixel rms `rms`."""
    shape = torch.where(ell > 0, (ell.clamp_min(1e-9) / 100.0) ** -2 * torch.exp(-(ell / 600.0) ** 2),
                        torch.zeros_like(ell))
    return shape * rms**2 / shape.mean()  # pixel variance = mean over modes (orthonormal FFT)


def fft(x):
    return torch.fft.fft2(x, norm="ortho")


def ifft(x):
    return torch.fft.ifft2(x, norm="ortho").real


def fit_dust_latents(vae, d, c, total_var, steps=300):
    """MAP whitened latents (1, D) of -2 log p(eps | d, c) = |eps|^2 + sum_k |r_k|^2 / total_var_k,
    r = d - mu(eps, c), with the CMB, decoder noise and white noise marginalised. d (n, n),
    c (1, 2, n/2, n/2). Starts from 0 and from the encoder mean of d."""
    best = None
    with torch.no_grad():
        eps_enc = vae.encode(d[None, None], c)

    def objective(eps):
        r = d - vae.decode(eps, c)[0, 0]
        return eps.square().sum().double() + (fft(r).abs().square() / total_var).sum()

    for eps0 in (torch.zeros_like(eps_enc), eps_enc):
        eps = eps0.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([eps], max_iter=steps, line_search_fn="strong_wolfe", tolerance_grad=1e-6,
                                tolerance_change=1e-12, history_size=20)

        def closure():
            opt.zero_grad()
            loss = objective(eps)
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            loss = float(objective(eps))
        if best is None or loss < best[0]:
            best = (loss, eps.detach())
    return best[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=str(default_weights_path()), help="VAE weights file (HDF5)")
    parser.add_argument("--patches", type=int, default=12, help="number of test-split patches")
    parser.add_argument("--cmb_rms", type=float, default=0.5, help="CMB pixel rms, normalised dust units")
    parser.add_argument("--noise", type=float, default=0.05, help="white-noise rms, normalised dust units")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sets-cache", default=None, help="keep the rebuilt splits in this file (.pt)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    weights = load_weights(args.weights)
    vae = weights.vae
    sets = datasets_of_weights(weights.metadata, args.sets_cache)
    n, size = vae.config.npix, float(weights.metadata["geometry"]["size_deg"])
    ell = ell_grid(n, size)
    S = cmb_mode_variance(ell, args.cmb_rms)
    N = torch.full_like(S, args.noise**2)
    # Gaussian baseline blind to c: the training split's mean 2D periodogram (dihedral-symmetrised)
    train, train_c = sets["train"][0][:, 0].double(), sets["train"][1]
    P = fft(train - train.mean()).abs().square().mean(0)
    P = sum(torch.rot90(P, k) for k in range(4)) / 4
    P = 0.5 * (P + P.T)
    # Gaussian baseline with the same c as the VAE: dust ~ N(m(c), C_r) (wiener.ConditionalGaussian,
    # non-periodic residual covariance), CMB circulant, white noise; one Cholesky serves every patch
    cond = ConditionalGaussian.fit(sets["train"][0], train_c)
    cov_dust = torch.from_numpy(cond.residual.covariance())
    cov_cmb = torus_covariance(S, n)                  # circulant: the simulated CMB is periodic
    chol = torch.linalg.cholesky(cov_dust + cov_cmb + args.noise**2 * torch.eye(n * n, dtype=torch.float64))

    gen = torch.Generator().manual_seed(args.seed)
    test, test_c = sets["test"][0][:, 0], sets["test"][1]
    idx = np.unique(np.linspace(0, len(test) - 1, args.patches).round().astype(int))
    rows = []
    print(f"{len(idx)} test patches; CMB rms {args.cmb_rms}, noise rms {args.noise} (normalised dust units; "
          f"dust rms of these patches {float(test[idx].std()):.3f})")
    print(f"{'patch':>5} | {'dust error: VAE':>15} {'Wiener|c':>8} {'Wiener':>7} | "
          f"{'CMB error: VAE':>14} {'Wiener|c':>8} {'Wiener':>7}")
    for i in idx:
        dust = test[i].double()
        cmb = ifft(fft(torch.randn((n, n), generator=gen, dtype=torch.float64)) * S.sqrt())
        noise = torch.randn((n, n), generator=gen, dtype=torch.float64) * args.noise
        d = (dust + cmb + noise).float()
        # VAE dust prior, CMB profiled out
        c = test_c[i:i + 1]
        C = vae.noise_variance(c)[0].detach().double()   # this patch's decoder noise per orthonormal Fourier mode
        eps_map = fit_dust_latents(vae, d, c, S + C + N)
        with torch.no_grad():
            mu = vae.decode(eps_map, c)[0, 0].double()
        r_hat = fft(d.double() - mu)
        cmb_vae = ifft(S / (S + C + N) * r_hat)
        dust_vae = mu + ifft(C / (S + C + N) * r_hat)
        # Gaussian dust prior given c: two-component Wiener filter about m(c)
        m_c = cond.mean_of(c)[0, 0].double()
        a = torch.cholesky_solve((d.double() - m_c).flatten()[:, None], chol)[:, 0]
        dust_gc = m_c + (cov_dust @ a).reshape(n, n)
        cmb_gc = (cov_cmb @ a).reshape(n, n)
        # Gaussian dust prior blind to c: two-component Wiener filter
        d_hat = fft(d.double() - train.mean())
        cmb_g = ifft(S / (S + P + N) * d_hat)
        dust_g = train.mean() + ifft(P / (S + P + N) * d_hat)

        def rel(est, truth):
            return float((est - truth).square().mean().sqrt() / truth.std())

        row = (rel(dust_vae, dust), rel(dust_gc, dust), rel(dust_g, dust),
               rel(cmb_vae, cmb), rel(cmb_gc, cmb), rel(cmb_g, cmb))
        rows.append(row)
        print(f"{i:>5} | {row[0]:>15.3f} {row[1]:>8.3f} {row[2]:>7.3f} | {row[3]:>14.3f} {row[4]:>8.3f} {row[5]:>7.3f}",
              flush=True)
    rows = np.array(rows)
    mean = rows.mean(0)
    print(f"{'mean':>5} | {mean[0]:>15.3f} {mean[1]:>8.3f} {mean[2]:>7.3f} | {mean[3]:>14.3f} {mean[4]:>8.3f} "
          f"{mean[5]:>7.3f}")
    print(f"VAE better than Wiener|c on {int((rows[:, 0] < rows[:, 1]).sum())} of {len(rows)} patches (dust), "
          f"{int((rows[:, 3] < rows[:, 4]).sum())} (CMB)")
    print("errors: rms(estimate - truth) / rms(truth) per component; Wiener|c: the Gaussian dust prior with the "
          "VAE's coarse input (wiener.ConditionalGaussian); Wiener: blind to c.")
    print(f"done in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
