"""No break anywhere: the renderer's transfer with synthetic power-law fields in place of the
decoded patches at every cascade level (issue 21).

Each level k's patches are drawn (independently per tile, in the decoder-noise channel, so the
blend is variance-preserving) as a flat-sky Gaussian field with C_l = l^-alpha times the level's
own high-pass (1 - G_k)^2 (G_k: the Gaussian of the level's conditioning FWHM F / f_k, what the
model is trained to add) and seen through the training targets' window (the data's beam and the
cutouts' box average, applied by FFT: an implementation independent of the renderer's DCT). On a
constant template, the map's full-sky C_l over what an ideal cascade would give,

    T(l) C(l),  T = sum_k (1 - G_k)^2 H_{k+1}^2 [l < l_Nyquist,k],  H_{k+1}^2 = 1 - (1 - G_{k+1})^2,

is printed in Delta l = 50 bins from 100 to 1.5 nside (mean and spread over seeds); T itself is
1 except where a level's pixels end (level k keeps H_{k+1}^2 of the sky at its Nyquist frequency:
5.5 % with steps of 2), so the output over C(l) is printed too.

    python benchmarks/renderer_transfer.py --nside 1024 2048 --seeds 0 1 2 3 --json benchmarks/renderer_transfer.json \
        --figure docs/figures/renderer_transfer.png
"""

from __future__ import annotations

import argparse
import json
import time

import healpy as hp
import numpy as np
import torch

from pysm_vaedust import VAEDust
from pysm_vaedust.renderer import Renderer
from pysm_vaedust.tiling import gaussian_transfer, handover_gain

ALPHA = 2.8


def synthetic_decode(window: tuple[float, int], fwhm0_deg: float):
    """A Renderer.decode that returns (0, power-law patches) for the tiles' own normals."""
    fwhm_pix, box = window

    def decode(self, level, conditions, normals, ids=None):
        n = self.vae.config.npix
        white = normals[:, self.vae.latent_dim:].reshape(-1, n, n).astype(np.float64)
        pixel_rad = np.radians(level.geometry.pixel_size_deg)
        f = np.fft.fftfreq(n)                                   # cycles per pixel
        fx, fy = np.meshgrid(f, f, indexing="ij")
        radial = np.hypot(fx, fy)
        ell = np.maximum(2 * np.pi * radial / pixel_rad, 1.0)
        highpass = 1 - gaussian_transfer(radial, fwhm0_deg / level.factor / level.geometry.pixel_size_deg)
        box_gain = np.ones_like(fx)
        if box > 1:
            for c in (fx, fy):
                box_gain *= np.where(c == 0, 1.0, np.sinc(c) / np.where(c == 0, 1.0, np.sinc(c / box)))
        gain = np.sqrt(ell ** -ALPHA / pixel_rad**2) * highpass * gaussian_transfer(radial, fwhm_pix) * box_gain
        gain[0, 0] = 0.0
        field = np.fft.ifft2(np.fft.fft2(white) * gain).real
        return torch.from_numpy(np.stack([np.zeros_like(field), field]).astype(np.float32))

    return decode


def ideal_transfer(levels, fwhm0_deg: float, lmax: int) -> np.ndarray:
    """T(l) of the module doc for the cascade `levels`."""
    ell = np.arange(lmax + 1)
    total = np.zeros(lmax + 1)
    for k, level in enumerate(levels):
        pixel_rad = np.radians(level.geometry.pixel_size_deg)
        freq = ell * pixel_rad / (2 * np.pi)                  # cycles per pixel of level k
        share = (1 - gaussian_transfer(freq, fwhm0_deg / level.factor / level.geometry.pixel_size_deg)) ** 2
        if k + 1 < len(levels):
            share *= handover_gain(freq, fwhm0_deg / levels[k + 1].factor / level.geometry.pixel_size_deg) ** 2
        total += share * (freq < 0.5)
    return total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nside", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--json", default=None)
    parser.add_argument("--figure", default=None)
    args = parser.parse_args(argv)
    results, curves = {}, {}
    for nside in args.nside:
        lmax = int(1.5 * nside)
        ratios = []
        for seed in args.seeds:
            start = time.time()
            component = VAEDust(nside=nside, seed=seed, template=np.full(hp.nside2npix(64), 100.0),
                                template_freq="545 GHz", polarization=False)
            component.renderer.coherence = None   # synthetic levels are independent of each other
            fwhm0 = float(component.renderer.normalisation["template_fwhm_deg"])
            original = Renderer.decode
            Renderer.decode = synthetic_decode(component.renderer.window, fwhm0)
            try:
                field = np.log(component.reference_map()) - component.template_at_pixels()
            finally:
                Renderer.decode = original
            levels = component.renderer.levels(nside)
            ell = np.arange(lmax + 1)
            power_law = np.maximum(ell, 1.0) ** -ALPHA
            cl = hp.anafast(field, lmax=lmax, iter=1)
            ideal = ideal_transfer(levels, fwhm0, lmax)
            ratios.append((cl / np.where(ideal > 0, ideal * power_law, np.inf), cl / power_law))
            print(f"nside {nside} seed {seed}: {time.time() - start:.0f} s", flush=True)
        edges = np.arange(100, lmax + 1, 50)
        bands = {kind: np.array([[r[kind][lo:hi].mean() for lo, hi in zip(edges[:-1], edges[1:])] for r in ratios])
                 for kind in (0, 1)}
        mean, spread = bands[0].mean(0), bands[0].std(0) / np.sqrt(len(ratios))
        worst = int(np.argmax(np.abs(mean - 1)))
        print(f"nside {nside} (levels {[lv.factor for lv in levels]}): output / ideal in Delta l = 50 bins, "
              f"l 100-{lmax}: {mean.min():.3f}-{mean.max():.3f} (worst {mean[worst]:.3f} +- {spread[worst]:.3f} at "
              f"l {edges[worst]}-{edges[worst + 1]}); output / l^-alpha {bands[1].mean(0).min():.3f}-"
              f"{bands[1].mean(0).max():.3f}")
        print("  per band:", " ".join(f"{lo}:{v:.3f}" for lo, v in zip(edges[:-1], mean)))
        results[str(nside)] = {"levels": [lv.factor for lv in levels], "edges": edges.tolist(),
                               "output_over_ideal": mean.tolist(), "standard_error": spread.tolist(),
                               "output_over_power_law": bands[1].mean(0).tolist(), "seeds": args.seeds}
        curves[nside] = (edges, mean, bands[1].mean(0))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4), constrained_layout=True)
        for nside, (edges, mean, raw) in curves.items():
            centre = 0.5 * (edges[1:] + edges[:-1])
            ax.plot(centre, mean, label=f"nside {nside}: output / ideal cascade")
            ax.plot(centre, raw, ls=":", label=f"nside {nside}: output / l^-{ALPHA}")
        for y in (0.97, 1.03):
            ax.axhline(y, color="gray", lw=0.5, ls="--")
        ax.axhline(1, color="k", lw=0.6)
        ax.set_xscale("log")
        ax.set_xlabel("ell")
        ax.set_ylabel("C_l ratio")
        ax.set_title("Renderer transfer: synthetic power-law patches at every level")
        ax.legend(fontsize=8)
        fig.savefig(args.figure, dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
