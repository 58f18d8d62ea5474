"""Stage 9 — validation: how close are reconstructions and prior samples to held-out real dust?

``pysm_vaedust-validate --weights W.h5 --split test --out DIR`` rebuilds the data split the
weights were trained with (or cuts another map, ``--data-map``, with the same geometry and
normalisation) and writes ``DIR/metrics.json`` plus PNG figures:

- reconstructions: mean of L decodings of z ~ q(z|x); residual cross- and auto-spectra
  <x, x - x_rec> / C_l(x) and <x - x_rec, x - x_rec> / C_l(x), and the ell where each first
  reaches 0.1;
- N prior samples (decoder mean + decoder noise; z from N(0, I) or the learned prior) against the
  split and the train split: binned power spectra, pixel histograms, the three Minkowski
  functionals, skewness and kurtosis, wavelet phase harmonics and filament statistics (structure-
  tensor coherence, Hessian ridges; see `morphology`), with bootstrap bands of the data;
- a Gaussian-random-field baseline with the train split's mean 2D power (what PySM d11 amounts
  to), to show the non-Gaussian structure the VAE adds;
- a latent slerp between two encoded patches and a gallery of samples next to real patches.

All images are in normalised units (see the weights' ``normalisation``); spectra in
[normalised units]^2 sr with flat-sky ell of the patch geometry.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from . import __version__
from .cutouts import PatchGeometry, patch_centres
from .component import PRIORS
from .checks import check_int, check_nside, check_seed
from .data import atomic_write, file_digest
from .morphology import (COHERENCE_EDGES, RIDGE_THRESHOLD, SIGMA_DERIVATIVE_PX, SIGMA_INTEGRATION_PX,
                         SIGMA_RIDGE_PX, WPH_ORIENTATIONS, WPH_WAVELENGTH_J0_PX, max_wph_scales,
                         ridge_length_edges, ridge_statistics, structure_tensor_statistics, wph_coefficients,
                         wph_labels)
from .statistics import (apodization_window, bootstrap_band, default_ell_edges, flat_power_spectrum,
                         minkowski_functionals)
from .train import (SPLITS, TrainConfig, build_datasets, load_training_map, resolve_data_path, resolve_device,
                    select_patches)
from .weights import Weights, default_weights_path, load_weights

#: MF thresholds, in units of each set's pixel standard deviation about its mean.
THRESHOLDS_NU = np.linspace(-3.0, 3.0, 25)
#: residual-power level whose first crossing is reported.
RESIDUAL_LEVEL = 0.1
HIST_BINS, HIST_RANGE_SIGMA = 60, 6.0
INTERP_STEPS = 8
FIGURE_NAMES = ("reconstructions.png", "residual_spectra.png", "power_spectra.png", "histograms.png",
                "minkowski.png", "morphology.png", "interpolation.png", "gallery.png")
#: per-patch filament statistics given bootstrap bands (orientation and median length are not averaged).
FILAMENT_KEYS = ("coherence", "global_coherence", "coherence_hist", "ridge_fraction", "ridge_length_fraction")
FILAMENT_HISTOGRAMS = ("coherence_hist", "ridge_length_fraction")  # compared where the reference is > 0


# --------------------------------------------------------------------------------------- data
def normalised_patches(data_map, metadata: dict, split: str = "all", quantity: str | None = None,
                       frame: str | None = None) -> tuple[torch.Tensor, dict]:
    """Patches of any dust map cut and normalised exactly like the training data of `metadata`.

    data_map: FITS path (or a name in the shared data folder). Patch geometry, centres, region
    split and normalisation (log_mean, log_scale, template_fwhm_deg) come from the weights'
    metadata; split: 'train' | 'val' | 'test' (the patch centres stored with the weights) or 'all' (every
    centre at |b| >= lat_min, border patches included). Returns ((N, 1, n, n) float32 tensor in
    normalised units, info dict).
    """
    if split not in SPLITS + ("all",):
        raise ValueError(f"split={split!r}: expected one of {SPLITS + ('all',)}")
    cfg = TrainConfig.of_weights(metadata)
    norm, geo = metadata["normalisation"], metadata["geometry"]
    geometry = PatchGeometry(int(geo["npix"]), float(geo["size_deg"]))
    dust = load_training_map(str(data_map), quantity or "", frame or "", cfg.mosaic_nside)
    if split == "all":
        lon, lat = patch_centres(cfg.lat_min_deg, cfg.spacing_deg)
    else:
        lon, lat = np.asarray(metadata["split"]["centres_lonlat_deg"][split], dtype=float).reshape(-1, 2).T
    *_, residual, selection = select_patches(dust, lon, lat, geometry, float(norm["template_fwhm_deg"]),
                                             cfg.floor_ell_min, cfg.exclude_extragalactic)
    x = (residual - float(norm["log_mean"])) / float(norm["log_scale"])
    return torch.from_numpy(x)[:, None], {"data": dust.provenance(), "split": split, "count": int(len(x)),
                                          "selection": selection}


# --------------------------------------------------------------------------------- helpers
def slerp(z0: torch.Tensor, z1: torch.Tensor, steps: int = INTERP_STEPS) -> torch.Tensor:
    """(steps, D) latents from z0 to z1 (each (D,)), endpoints included: the direction moves along
    the great circle at constant angular speed and the norm interpolates linearly."""
    if steps < 2:
        raise ValueError(f"steps={steps!r}: expected >= 2")
    z0, z1 = z0.double(), z1.double()
    n0, n1 = z0.norm(), z1.norm()
    u0, u1 = z0 / n0.clamp_min(1e-30), z1 / n1.clamp_min(1e-30)
    omega = torch.arccos(torch.clamp(u0 @ u1, -1.0, 1.0))
    t = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)[:, None]
    if float(omega) < 1e-6:  # parallel: plain linear interpolation
        return ((1 - t) * z0 + t * z1).float()
    direction = (torch.sin((1 - t) * omega) * u0 + torch.sin(t * omega) * u1) / torch.sin(omega)
    out = ((1 - t) * n0 + t * n1) * direction
    out[0], out[-1] = z0, z1
    return out.float()


def gaussian_power_2d(patches: np.ndarray, window: np.ndarray | None = None, iterations: int = 100) -> np.ndarray:
    """(n, n) per-mode variance P (orthonormal FFT) of a periodic Gaussian field with the same mean
    power spectrum as patches (N, n, n), as `flat_power_spectrum` measures it with `window`
    (default: its cosine taper).

    The patches' mean windowed |FFT|^2 (per-patch mean removed, / mean(window^2)) is the field's P
    circularly convolved with the window's kernel |FFT(window)|^2; P is recovered by
    Richardson-Lucy deconvolution (non-negative). Using the raw |FFT|^2 instead would turn the
    patch-edge discontinuities into high-ell power (+17 % at Nyquist on the training data).
    P[0, 0] holds the scatter of the patch means about the set's mean pixel value.
    """
    x = np.asarray(patches, dtype=float)
    n = x.shape[-1]
    w = apodization_window(n, n / 8) if window is None else np.asarray(window, dtype=float)
    norm = np.mean(w**2)
    target = np.mean(np.abs(np.fft.fft2((x - x.mean(axis=(-2, -1), keepdims=True)) * w, norm="ortho")) ** 2,
                     axis=0) / norm
    kernel = np.fft.fft2(np.abs(np.fft.fft2(w, norm="ortho")) ** 2 / (n * n * norm))  # symmetric, sums to 1

    def blur(p):
        return np.fft.ifft2(np.fft.fft2(p) * kernel).real

    power = target.copy()
    for _ in range(iterations):
        power *= blur(target / np.maximum(blur(power), 1e-300))
    power[0, 0] = np.mean(np.abs(np.fft.fft2(x - x.mean(), norm="ortho")[:, 0, 0]) ** 2)
    return power


def gaussian_baseline(power_2d: np.ndarray, n: int, rng: np.random.Generator, mean: float = 0.0) -> np.ndarray:
    """(n, npix, npix) periodic Gaussian random fields with per-mode variance `power_2d` (orthonormal
    FFT, e.g. from `gaussian_power_2d`) plus `mean`: white noise coloured in Fourier space."""
    power_2d = np.asarray(power_2d, dtype=float)
    white = rng.standard_normal((int(n),) + power_2d.shape)
    coloured = np.fft.ifft2(np.fft.fft2(white, norm="ortho") * np.sqrt(power_2d), norm="ortho")
    return coloured.real + mean


def patch_histograms(patches: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """(N, nbins) pixel density of each patch (N, n, n): counts / (pixels per patch x bin width);
    pixels outside the edges are not counted, so the mean over patches is the pooled density."""
    x = np.asarray(patches).reshape(len(patches), -1)
    nb = len(edges) - 1
    index = np.searchsorted(edges, x, side="right") - 1
    valid = (index >= 0) & (index < nb)
    flat = (index + nb * np.arange(len(x))[:, None])[valid]
    counts = np.bincount(flat, minlength=len(x) * nb).reshape(len(x), nb)
    return counts / (x.shape[1] * np.diff(edges))


def pooled_moments(patches: np.ndarray, n_boot: int = 200, seed: int = 0, q=(16, 84)) -> dict:
    """Mean, std, skewness and excess kurtosis of all pixels of patches (N, n, n), with bootstrap
    (over patches) percentile bands `q` of skewness and kurtosis."""
    x = np.asarray(patches, dtype=float).reshape(len(patches), -1)
    raw = np.stack([np.mean(x**p, axis=1) for p in (1, 2, 3, 4)], 1)  # (N, 4)

    def stats(m):  # m (..., 4) pooled raw moments
        m1, m2, m3, m4 = np.moveaxis(m, -1, 0)
        c2 = m2 - m1**2
        c3 = m3 - 3 * m1 * m2 + 2 * m1**3
        c4 = m4 - 4 * m1 * m3 + 6 * m1**2 * m2 - 3 * m1**4
        return m1, np.sqrt(c2), c3 / c2**1.5, c4 / c2**2 - 3

    mean, std, skew, kurt = stats(raw.mean(0))
    n = len(x)
    weights = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_boot) / n
    _, _, boot_skew, boot_kurt = stats(weights @ raw)
    return {"mean": mean, "std": std, "skewness": skew, "kurtosis": kurt,
            "skewness_band": np.percentile(boot_skew, q), "kurtosis_band": np.percentile(boot_kurt, q)}


def per_patch_moments(patches: np.ndarray, n_boot: int = 200, seed: int = 0, q=(16, 84)) -> dict:
    """Statistics of the patches one by one (N, n, n), with bootstrap (over patches) bands `q`:
    rms_cv — the patch-to-patch spread of the small-scale amplitude, std / mean of the per-patch
    rms; skewness_mean — mean within-patch skewness; kurtosis_median — median within-patch excess
    kurtosis. (Pooled moments mix the two: a spread of patch amplitudes alone raises the pooled
    kurtosis.)"""
    x = np.asarray(patches, dtype=float).reshape(len(patches), -1)
    c = x - x.mean(1, keepdims=True)
    var = np.mean(c**2, 1)
    rms, skew, kurt = np.sqrt(var), np.mean(c**3, 1) / var**1.5, np.mean(c**4, 1) / var**2 - 3
    rng = np.random.default_rng(seed)
    boot = rng.integers(0, len(x), size=(n_boot, len(x)))

    def entry(values, func):
        return {"value": float(func(values)), "band": np.percentile([func(values[b]) for b in boot], q)}

    return {"rms_cv": entry(rms, lambda v: v.std() / v.mean()), "skewness_mean": entry(skew, np.mean),
            "kurtosis_median": entry(kurt, np.median)}


def first_crossing(ell: np.ndarray, ratio: np.ndarray, level: float = RESIDUAL_LEVEL) -> float | None:
    """ell where `ratio` first reaches `level` (linear interpolation between bin centres); the
    first centre if it already starts above; None if it never does."""
    above = np.flatnonzero(np.asarray(ratio) >= level)
    if len(above) == 0:
        return None
    i = int(above[0])
    if i == 0:
        return float(ell[0])
    f = (level - ratio[i - 1]) / (ratio[i] - ratio[i - 1])
    return float(ell[i - 1] + f * (ell[i] - ell[i - 1]))


def _band(samples, n_boot, seed) -> dict:
    mean, lo, hi = bootstrap_band(samples, n_boot=n_boot, seed=seed)
    return {"mean": mean, "lo": lo, "hi": hi}


def _inside_fraction(values, band: dict, mask=None) -> float:
    inside = (values >= band["lo"]) & (values <= band["hi"])
    if mask is not None:
        inside = inside[mask]
    return float(np.mean(inside)) if inside.size else float("nan")


def set_statistics(patches: np.ndarray, pixel_size_deg: float, ell_edges, hist_edges,
                   n_boot: int, seed: int) -> dict:
    """Power spectrum, histogram, MF, WPH and filament-statistic bands, and pooled moments of one
    set of patches (N, n, n)."""
    x = np.asarray(patches, dtype=float)
    ell, cl = flat_power_spectrum(x, pixel_size_deg, ell_edges)
    std = float(x.std())
    mfs = minkowski_functionals(x - x.mean(), THRESHOLDS_NU * std, pixel_size_deg)
    wph, _, _ = wph_coefficients(x)
    filaments = {**structure_tensor_statistics(x), **ridge_statistics(x)}
    return {"ell": ell, "count": len(x),
            "cl": _band(cl, n_boot, seed),
            "histogram": _band(patch_histograms(x, hist_edges), n_boot, seed),
            "minkowski": {k: _band(v, n_boot, seed) for k, v in mfs.items()},
            "moments": pooled_moments(x, n_boot, seed),
            "patch_moments": per_patch_moments(x, n_boot, seed),
            "wph": _band(wph, n_boot, seed),
            "filaments": {k: _band(filaments[k], n_boot, seed) for k in FILAMENT_KEYS}}


# ----------------------------------------------------------------------------- model passes
@torch.no_grad()
def reconstructions(vae, x: torch.Tensor, n_recon: int, generator: torch.Generator,
                    batch_size: int = 256) -> torch.Tensor:
    """(N, 1, n, n) mean of `n_recon` decodings of z ~ q(z|x), batched."""
    out = [vae.reconstruct(x[s:s + batch_size].to(vae.device), n_recon, generator).cpu()
           for s in range(0, len(x), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def prior_samples(vae, n: int, generator: torch.Generator, prior=None, batch_size: int = 256):
    """(samples, decoder means), each (n, 1, npix, npix) in data space: z from N(0, I) or
    `prior`'s sample_from_normals, decoded, plus the decoder noise (means: f(mu(z)) alone)."""
    samples, means = [], []
    for s in range(0, n, batch_size):
        b = min(batch_size, n - s)
        z = torch.randn((b, vae.config.latent_dim), generator=generator, device=vae.device)
        if prior is not None:
            z = prior.sample_from_normals(z)
        mean = vae.decode(z)
        samples.append(vae.to_data(mean + vae.noise_given(z, mean, generator)).cpu())
        means.append(vae.to_data(mean).cpu())
    return torch.cat(samples), torch.cat(means)


# ---------------------------------------------------------------------------------- figures
def _save(fig, path: Path) -> str:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    return path.name


def _image_grid(axes, images, vmin, vmax, cmap="inferno"):
    for ax, img in zip(np.ravel(axes), images):
        ax.imshow(img, origin="lower", vmin=vmin, vmax=vmax, cmap=cmap)
        ax.set_xticks([])
        ax.set_yticks([])


def make_figures(out: Path, m: dict, images: dict) -> list[str]:
    """Write the PNG figures; returns their file names."""
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas for PNG

    names = []
    split = m["settings"]["split"]
    colours = {"split": "k", "train": "tab:blue", "prior": "tab:red", "prior_mean_only": "tab:orange",
               "grf": "tab:green"}
    labels = {"split": f"{split} (data)", "train": "train (data)", "prior": "VAE prior samples",
              "prior_mean_only": "VAE decoder mean only", "grf": "Gaussian field (d11-like)"}

    # reconstructions
    x, rec = images["recon_input"], images["recon_output"]
    lim = np.percentile(np.abs(x), 99.5)
    fig = Figure(figsize=(6, 2 * len(x)))
    axes = fig.subplots(len(x), 3, squeeze=False)
    for row, (a, b) in enumerate(zip(x, rec)):
        _image_grid(axes[row], [a, b, a - b], -lim, lim, cmap="RdBu_r")
    for ax, title in zip(axes[0], ("input", f"recon (mean of {m['reconstruction']['n_recon']})", "residual")):
        ax.set_title(title, fontsize=9)
    names.append(_save(fig, out / "reconstructions.png"))

    # residual spectra
    r = m["reconstruction"]
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    ax.plot(r["ell"], r["cross_ratio"], "o-", label=r"$\langle x, x-\hat x\rangle / C_\ell$")
    ax.plot(r["ell"], r["auto_ratio"], "s-", label=r"$\langle x-\hat x, x-\hat x\rangle / C_\ell$")
    ax.axhline(RESIDUAL_LEVEL, color="gray", ls="--", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel(r"$\ell$")
    ax.set_ylabel("residual power / input power")
    ax.legend(fontsize=8)
    ax.set_title(f"reconstructions of the {split} split", fontsize=10)
    names.append(_save(fig, out / "residual_spectra.png"))

    # power spectra + ratios
    ps, ell = m["power_spectra"], np.asarray(m["ell"]["centres"])
    fig = Figure(figsize=(6, 6.5))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    for key in ("split", "train", "prior", "prior_mean_only", "grf"):
        band = ps[key]
        top.plot(ell, band["mean"], "o-" if key in ("split", "prior") else "-", color=colours[key],
                 label=labels[key], ms=3)
        if key in ("split", "train"):
            top.fill_between(ell, band["lo"], band["hi"], color=colours[key], alpha=0.25)
    top.set_yscale("log")
    top.set_ylabel(r"$C_\ell$ [norm. units$^2$ sr]")
    top.legend(fontsize=8)
    for key in ("prior/split", "prior/train", "train/split", "grf/split"):
        bottom.plot(ell, m["ratios"][key], "o-", ms=3, label=key.replace("split", split))
    lo = np.asarray(ps["split"]["lo"]) / np.asarray(ps["split"]["mean"])
    hi = np.asarray(ps["split"]["hi"]) / np.asarray(ps["split"]["mean"])
    bottom.fill_between(ell, lo, hi, color="k", alpha=0.2)
    bottom.axhspan(0.9, 1.1, color="gray", alpha=0.1)
    bottom.axhline(1, color="gray", lw=1)
    bottom.set_xlabel(r"$\ell$")
    bottom.set_ylabel("ratio")
    bottom.legend(fontsize=7, ncol=2)
    names.append(_save(fig, out / "power_spectra.png"))

    # histograms
    h = m["histograms"]
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    for key in ("split", "train", "prior", "grf"):
        band = h[key]
        ax.plot(h["centres"], band["mean"], color=colours[key], label=labels[key])
        if key == "split":
            ax.fill_between(h["centres"], band["lo"], band["hi"], color="k", alpha=0.25)
    ax.set_yscale("log")
    ax.set_ylim(bottom=1e-4)
    ax.set_xlabel("pixel value [normalised units]")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    names.append(_save(fig, out / "histograms.png"))

    # Minkowski functionals
    mf = m["minkowski"]
    fig = Figure(figsize=(13, 3.8))
    axes = fig.subplots(1, 3)
    for ax, k, title in zip(axes, ("v0", "v1", "v2"), ("area fraction", "perimeter / 4 [1/rad]",
                                                     "Euler characteristic [1/sr]")):
        for key in ("split", "train", "prior", "grf"):
            band = mf[key][k]
            ax.plot(mf["nu"], band["mean"], color=colours[key], label=labels[key])
            if key == "split":
                ax.fill_between(mf["nu"], band["lo"], band["hi"], color="k", alpha=0.25)
        ax.set_xlabel(r"threshold $\nu$ [pixel std of each set]")
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    names.append(_save(fig, out / "minkowski.png"))

    # morphology: WPH coefficients, coherence and ridge-length distributions, with the split's band
    wph, fil = m["wph"], m["filaments"]
    fig = Figure(figsize=(15, 4))
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [2.2, 1, 1]})
    index = np.arange(len(wph["labels"]))
    band = wph["split"]
    spread = [np.subtract(band["mean"], band["lo"]), np.subtract(band["hi"], band["mean"])]
    axes[0].errorbar(index, band["mean"], yerr=spread, fmt="s", color="k", ms=4, capsize=3, label=labels["split"])
    for shift, key in zip((-0.2, 0.2, 0.1), ("prior", "grf", "train")):
        axes[0].plot(index + shift, wph[key]["mean"], "o", ms=4, color=colours[key], label=labels[key])
    gaussian = np.array([np.nan if g is None else g for g in wph["gaussian_values"]])
    axes[0].plot(index, gaussian, "_", ms=12, color="tab:green", alpha=0.6, label="Gaussian value")
    axes[0].set_xticks(index)
    axes[0].set_xticklabels(wph["labels"], rotation=60, ha="right", fontsize=7)
    axes[0].set_title(f"wavelet phase harmonics (pywph, J={wph['scales_J']}, L={wph['orientations_L']})", fontsize=10)
    axes[0].legend(fontsize=7)
    edges = np.asarray(fil["coherence_edges"])
    lower = fil["ridge_length_lower_edges_px"]
    histograms = (("coherence_hist", (edges[1:] + edges[:-1]) / 2, "local coherence (energy-weighted)", "density"),
                  ("ridge_length_fraction", np.arange(len(lower)), "ridge length [px]", "fraction of pixels on ridges"))
    for ax, (key, centres, xlabel, ylabel) in zip(axes[1:], histograms):
        for name in ("split", "train", "prior", "grf"):
            b = fil[name][key]
            ax.plot(centres, b["mean"], color=colours[name], label=labels[name], marker=".")
            if name == "split":
                ax.fill_between(centres, b["lo"], b["hi"], color="k", alpha=0.25)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    axes[2].set_xticks(np.arange(len(lower)))
    axes[2].set_xticklabels([f"{a:g}-{b:g}" for a, b in zip(lower[:-1], lower[1:])] + [f">={lower[-1]:g}"])
    axes[1].set_title(f"structure tensor: sigma {fil['sigma_derivative_px']:g} / {fil['sigma_integration_px']:g} px",
                      fontsize=10)
    axes[2].set_title(f"Hessian ridges: sigma {fil['sigma_ridge_px']:g} px, threshold {fil['ridge_threshold_rms']:g}",
                      fontsize=10)
    names.append(_save(fig, out / "morphology.png"))

    # interpolation strip: input a, decodes along the slerp, input b
    strip = images["interpolation"]
    ends = images["interpolation_ends"]
    panels = [ends[0], *strip, ends[1]]
    lim = np.percentile(np.abs(np.stack(panels)), 99.5)
    fig = Figure(figsize=(1.3 * len(panels), 1.6))
    axes = fig.subplots(1, len(panels))
    _image_grid(axes, panels, -lim, lim, cmap="RdBu_r")
    axes[0].set_title("patch A", fontsize=8)
    axes[-1].set_title("patch B", fontsize=8)
    for i, ax in enumerate(axes[1:-1]):
        ax.set_title(f"t={i / (len(strip) - 1):.2f}", fontsize=8)
    names.append(_save(fig, out / "interpolation.png"))

    # gallery: 4x4 prior samples | 4x4 real patches, same colour scale
    samples, real = images["gallery_prior"], images["gallery_split"]
    lim = np.percentile(np.abs(real), 99.5)
    fig = Figure(figsize=(12, 6))
    left, right = fig.subfigures(1, 2)
    for sub, imgs, title in ((left, samples, "VAE prior samples"), (right, real, f"{split} patches")):
        axes = sub.subplots(4, 4)
        _image_grid(axes, imgs, -lim, lim, cmap="RdBu_r")
        sub.suptitle(title)
    names.append(_save(fig, out / "gallery.png"))
    return names


# ------------------------------------------------------------------------------ validation
def _jsonable(obj):
    """numpy/torch -> lists; non-finite floats -> None (valid JSON)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _resolve_prior(weights, prior: str) -> tuple[str, object]:
    if prior not in PRIORS:
        raise ValueError(f"prior={prior!r}: expected one of {PRIORS}")
    if prior == "flow" and weights.prior is None:
        raise ValueError(f"prior='flow' but {weights.path!r} holds no learned prior")
    if prior == "auto":  # as VAEDust: the learned prior when the weights mark it as default
        prior = "flow" if weights.prior is not None and weights.metadata.get("prior", {}).get("default", False) \
            else "standard"
    return prior, (weights.prior if prior == "flow" else None)


def validate(weights_path, split: str = "test", out="validation", n_samples: int = 512, n_recon: int = 8,
             seed: int = 0, prior: str = "auto", data_map=None, map_quantity: str | None = None,
             map_frame: str | None = None, n_boot: int = 200, device: str = "cpu",
             real_sky: str | None = None, real_sky_nside: int = 1024, log=print) -> dict:
    """Run the whole validation, write `out`/metrics.json and the PNGs; returns the metrics dict.

    weights_path: a weights file (loaded on `device`) or a loaded `Weights` (used on its own
    device); real_sky: a real map (file or IRIS plate folder) to compare a VAEDust map of nside
    `real_sky_nside` with at the split's centres (`realsky`, section "real_sky"); the other
    arguments as the command line's."""
    if split not in SPLITS + ("all",):
        raise ValueError(f"split={split!r}: expected one of {SPLITS + ('all',)}")
    if split == "all" and data_map is None:
        raise ValueError("split='all' mixes training patches in: use it with data_map=<another map>")
    if n_samples < 16 or n_recon < 0:
        raise ValueError(f"n_samples={n_samples!r}, n_recon={n_recon!r}: expected n_samples >= 16, n_recon >= 0")
    t_start = time.time()
    timing = {}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = weights_path if isinstance(weights_path, Weights) else \
        load_weights(weights_path, device=resolve_device(device))
    prior_name, prior_module = _resolve_prior(weights, prior)
    vae, meta = weights.vae, weights.metadata
    pixel_deg = float(meta["geometry"]["size_deg"]) / int(meta["geometry"]["npix"])
    edges = default_ell_edges(int(meta["geometry"]["npix"]), pixel_deg)

    # data: the training run's splits, and the reference set (same split, or another map)
    tic = time.time()
    sets, _ = build_datasets(TrainConfig.of_weights(meta))
    if data_map is not None:
        x_split, data_info = normalised_patches(data_map, meta, split, map_quantity, map_frame)
    else:
        x_split = sets[split]
        data_info = {"data": meta["data"], "split": split, "count": int(len(x_split))}
    x_train = sets["train"]
    if len(x_split) < 16:
        raise ValueError(f"split {split!r} holds {len(x_split)} patches: expected at least 16")
    timing["data_s"] = time.time() - tic
    log(f"data: {len(x_split)} {split} patches"
        + (f" of {data_info['data']['source']}" if data_map is not None else "")
        + f", {len(x_train)} train patches ({timing['data_s']:.1f} s)")

    # reconstructions and residual spectra
    tic = time.time()
    gen = torch.Generator(device=vae.device).manual_seed(seed)
    rec = reconstructions(vae, x_split, n_recon, gen)
    xs, rs = x_split[:, 0].numpy().astype(float), rec[:, 0].numpy().astype(float)
    ell, cl_x = flat_power_spectrum(xs, pixel_deg, edges)
    _, cl_cross = flat_power_spectrum(xs, pixel_deg, edges, other=xs - rs)
    _, cl_res = flat_power_spectrum(xs - rs, pixel_deg, edges)
    cross_ratio, auto_ratio = cl_cross.mean(0) / cl_x.mean(0), cl_res.mean(0) / cl_x.mean(0)
    recon = {"n_recon": n_recon, "mse": float(np.mean((xs - rs) ** 2)), "input_variance": float(xs.var()),
             "ell": ell, "cl_input": cl_x.mean(0), "cl_cross_residual": cl_cross.mean(0),
             "cl_residual": cl_res.mean(0), "cross_ratio": cross_ratio, "auto_ratio": auto_ratio,
             "level": RESIDUAL_LEVEL, "ell_cross_crosses_level": first_crossing(ell, cross_ratio),
             "ell_auto_crosses_level": first_crossing(ell, auto_ratio)}
    timing["reconstruction_s"] = time.time() - tic

    # prior samples and the Gaussian baseline
    tic = time.time()
    gen = torch.Generator(device=vae.device).manual_seed(seed + 1)
    samples, sample_means = prior_samples(vae, n_samples, gen, prior_module)
    xp, xm = samples[:, 0].numpy().astype(float), sample_means[:, 0].numpy().astype(float)
    xt = x_train[:, 0].numpy().astype(float)
    grf = gaussian_baseline(gaussian_power_2d(xt), n_samples, np.random.default_rng(seed + 2), float(xt.mean()))
    timing["sampling_s"] = time.time() - tic

    # statistics
    tic = time.time()
    sigma = xs.std()
    hist_edges = np.linspace(-HIST_RANGE_SIGMA * sigma, HIST_RANGE_SIGMA * sigma, HIST_BINS + 1) + xs.mean()
    stats = {key: set_statistics(v, pixel_deg, edges, hist_edges, n_boot, seed)
             for key, v in (("split", xs), ("train", xt), ("prior", xp), ("grf", grf))}
    _, cl_mean_only = flat_power_spectrum(xm, pixel_deg, edges)
    timing["statistics_s"] = time.time() - tic

    cl = {key: s["cl"]["mean"] for key, s in stats.items()}
    ratios = {"prior/split": cl["prior"] / cl["split"], "prior/train": cl["prior"] / cl["train"],
              "train/split": cl["train"] / cl["split"], "grf/split": cl["grf"] / cl["split"],
              "grf/train": cl["grf"] / cl["train"], "prior_mean_only/split": cl_mean_only.mean(0) / cl["split"]}
    within = {key: float(np.mean(np.abs(r - 1) <= 0.1)) for key, r in ratios.items()}
    hist_mask = stats["split"]["histogram"]["mean"] > 1e-3 * stats["split"]["histogram"]["mean"].max()
    inside = {}
    for other in ("prior", "grf", "train"):
        for ref in ("split", "train"):
            if other == ref:
                continue
            inside[f"{other}_in_{ref}_band"] = {
                "histogram": _inside_fraction(stats[other]["histogram"]["mean"], stats[ref]["histogram"], hist_mask),
                **{k: _inside_fraction(stats[other]["minkowski"][k]["mean"], stats[ref]["minkowski"][k])
                   for k in ("v0", "v1", "v2")},
                "wph": _inside_fraction(stats[other]["wph"]["mean"], stats[ref]["wph"]),
                **{k: _inside_fraction(stats[other]["filaments"][k]["mean"], stats[ref]["filaments"][k],
                                       stats[ref]["filaments"][k]["mean"] > 0 if k in FILAMENT_HISTOGRAMS else None)
                   for k in FILAMENT_KEYS}}
    npix = int(meta["geometry"]["npix"])
    labels, gaussian = wph_labels(max_wph_scales(npix))

    # latent interpolation between two encoded patches of the split
    i, j = np.random.default_rng(seed).choice(len(x_split), 2, replace=False)
    with torch.no_grad():
        z_mean, _ = vae.encode(x_split[[i, j]].to(vae.device))
        path = slerp(z_mean[0].cpu(), z_mean[1].cpu(), INTERP_STEPS)
        strip = vae.decode_data(path.to(vae.device))[:, 0].cpu().numpy()

    timing["total_s"] = time.time() - t_start
    with h5py.File(weights.path, "r") as f:
        stored_sha = str(f.attrs["sha256"])
    metrics = {
        "package_version": __version__,
        "weights": {"path": str(Path(weights.path).resolve()), "sha256_file": file_digest(weights.path),
                    "sha256_content": stored_sha, "package_version": meta.get("package_version"),
                    "training_metrics": meta.get("metrics")},
        "settings": {"split": split, "n_samples": n_samples, "n_recon": n_recon, "seed": seed,
                     "prior": prior_name, "prior_requested": prior, "data_map": None if data_map is None else str(data_map),
                     "n_boot": n_boot, "bootstrap_percentiles": [16, 84], "device": str(vae.device),
                     "pixel_size_deg": pixel_deg, "units": "normalised (see weights normalisation); "
                     "C_l in units^2 sr; v1 1/rad; v2 1/sr"},
        "data": data_info,
        "counts": {"split": len(xs), "train": len(xt), "prior": n_samples, "grf": n_samples,
                   "weights_split_counts": meta["split"]["counts"]},
        "ell": {"centres": ell, "edges": edges},
        "reconstruction": recon,
        "power_spectra": {**{key: s["cl"] for key, s in stats.items()},
                          "prior_mean_only": {"mean": cl_mean_only.mean(0)}},
        "ratios": ratios,
        "fraction_bins_within_10pct": within,
        "sky_variance_floor": {"train_split_max_abs_dev": float(np.max(np.abs(ratios["train/split"] - 1))),
                               "train_split_median_abs_dev": float(np.median(np.abs(ratios["train/split"] - 1)))},
        "histograms": {"edges": hist_edges, "centres": 0.5 * (hist_edges[1:] + hist_edges[:-1]),
                       "compared_bins": hist_mask, **{key: s["histogram"] for key, s in stats.items()}},
        "minkowski": {"nu": THRESHOLDS_NU, **{key: s["minkowski"] for key, s in stats.items()}},
        "band_inside_fraction": inside,
        "moments": {key: s["moments"] for key, s in stats.items()},
        "patch_moments": {key: s["patch_moments"] for key, s in stats.items()},
        "wph": {"labels": labels, "gaussian_values": gaussian, "scales_J": max_wph_scales(npix),
                "orientations_L": WPH_ORIENTATIONS,
                "wavelength_px": WPH_WAVELENGTH_J0_PX * 2.0 ** np.arange(max_wph_scales(npix)),
                **{key: s["wph"] for key, s in stats.items()}},
        "filaments": {"sigma_derivative_px": SIGMA_DERIVATIVE_PX, "sigma_integration_px": SIGMA_INTEGRATION_PX,
                      "sigma_ridge_px": SIGMA_RIDGE_PX, "pixel_size_arcmin": 60 * pixel_deg,
                      "ridge_threshold_rms": RIDGE_THRESHOLD, "coherence_edges": COHERENCE_EDGES,
                      "ridge_length_lower_edges_px": ridge_length_edges(npix)[:-1],  # the last bin is open
                      **{key: s["filaments"] for key, s in stats.items()}},
        "interpolation": {"indices": [int(i), int(j)], "steps": INTERP_STEPS,
                          "latent_norms": path.norm(dim=1), "method": "slerp of directions, linear norm"},
        "timing_s": timing,
    }
    metrics = _jsonable(metrics)
    tic = time.time()
    rng = np.random.default_rng(seed)
    show = rng.choice(len(xs), 4, replace=False)
    gallery = rng.choice(len(xs), min(16, len(xs)), replace=False)
    images = {"recon_input": xs[show], "recon_output": rs[show], "interpolation": strip,
              "interpolation_ends": xs[[i, j]], "gallery_prior": xp[:16], "gallery_split": xs[gallery]}
    metrics["figures"] = make_figures(out, metrics, images)
    metrics["timing_s"]["figures_s"] = time.time() - tic
    if real_sky is not None:
        from .realsky import make_figure, real_sky_validation

        tic = time.time()
        real, real_images = real_sky_validation(weights, real_sky, split, real_sky_nside, seed, prior_name, n_boot,
                                                device=device, log=log)
        metrics["real_sky"] = _jsonable(real)
        metrics["figures"].append(make_figure(out, metrics["real_sky"], real_images))
        metrics["timing_s"]["real_sky_s"] = time.time() - tic
    metrics["timing_s"]["total_s"] = time.time() - t_start
    text = json.dumps(metrics, indent=1, allow_nan=False)
    atomic_write(out / "metrics.json", lambda tmp: Path(tmp).write_text(text))
    return metrics


def summary(m: dict) -> str:
    """A short human-readable digest of the metrics."""
    split, r = m["settings"]["split"], m["reconstruction"]
    fmt = lambda v: "never" if v is None else f"{v:.0f}"  # noqa: E731
    lines = [
        f"pysm_vaedust-validate: {m['counts']['split']} {split} patches, {m['counts']['train']} train, "
        f"{m['counts']['prior']} prior samples ({m['settings']['prior']} prior); "
        f"{m['timing_s']['total_s']:.0f} s",
        f"reconstruction (mean of {r['n_recon']}): mse {r['mse']:.3f} (input var {r['input_variance']:.3f}); "
        f"residual/C_l reaches {r['level']} at ell {fmt(r['ell_cross_crosses_level'])} (cross), "
        f"{fmt(r['ell_auto_crosses_level'])} (auto)",
        f"{'ell':>6} {'prior/' + split:>11} {'prior/train':>11} {'train/' + split:>11} {'grf/' + split:>10}"
        f" {'res.cross':>9}",
    ]
    ra = m["ratios"]
    for k, ell in enumerate(m["ell"]["centres"]):
        lines.append(f"{ell:6.0f} {ra['prior/split'][k]:11.3f} {ra['prior/train'][k]:11.3f} "
                     f"{ra['train/split'][k]:11.3f} {ra['grf/split'][k]:10.3f} {r['cross_ratio'][k]:9.3f}")
    w = m["fraction_bins_within_10pct"]
    lines.append(f"bins within +-10 %: prior/{split} {w['prior/split']:.2f}, prior/train {w['prior/train']:.2f}; "
                 f"sky-variance floor max|train/{split} - 1| = {m['sky_variance_floor']['train_split_max_abs_dev']:.2f}")
    for other in ("prior", "grf"):
        b = m["band_inside_fraction"][f"{other}_in_split_band"]
        lines.append(f"{other} inside the {split} bootstrap band: histogram {b['histogram']:.2f}, "
                     f"v0 {b['v0']:.2f}, v1 {b['v1']:.2f}, v2 {b['v2']:.2f} (fraction of bins/thresholds)")
    mo = m["moments"]
    lines.append("skewness / excess kurtosis: " + ", ".join(
        f"{k if k != 'split' else split} {mo[k]['skewness']:.2f} / {mo[k]['kurtosis']:.2f}"
        for k in ("split", "train", "prior", "grf"))
        + f"  ({split} 68 % band {mo['split']['skewness_band'][0]:.2f}..{mo['split']['skewness_band'][1]:.2f}"
        f" / {mo['split']['kurtosis_band'][0]:.2f}..{mo['split']['kurtosis_band'][1]:.2f})")
    for other in ("prior", "grf"):
        b = m["band_inside_fraction"][f"{other}_in_split_band"]
        lines.append(f"{other} inside the {split} bootstrap band: WPH {b['wph']:.2f} (of {len(m['wph']['labels'])} "
                     f"coefficients), coherence histogram {b['coherence_hist']:.2f}, ridge lengths "
                     f"{b['ridge_length_fraction']:.2f} (fraction of bins)")
    fil = m["filaments"]
    for key, label in (("coherence", "structure-tensor coherence"), ("ridge_fraction", "ridge-pixel fraction")):
        band = fil["split"][key]
        lines.append(f"{label}: " + ", ".join(f"{k if k != 'split' else split} {fil[k][key]['mean']:.3f}"
                                              for k in ("split", "train", "prior", "grf"))
                     + f"  ({split} 68 % band {band['lo']:.3f}..{band['hi']:.3f})")
    pm = m["patch_moments"]
    for key, label in (("rms_cv", "patch-to-patch rms spread (std/mean)"),
                       ("skewness_mean", "mean within-patch skewness"),
                       ("kurtosis_median", "median within-patch excess kurtosis")):
        band = pm["split"][key]["band"]
        lines.append(f"{label}: " + ", ".join(f"{k if k != 'split' else split} {pm[k][key]['value']:.2f}"
                                              for k in ("split", "train", "prior", "grf"))
                     + f"  ({split} 68 % band {band[0]:.2f}..{band[1]:.2f})")
    if "real_sky" in m:
        from .realsky import table

        lines += [f"real sky {m['real_sky']['real_map']['source']} against {m['real_sky']['sim_map']['source']}:",
                  table(m["real_sky"])]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pysm_vaedust-validate",
        description="Validate a pysm_vaedust weights file against real dust patches: reconstructions, "
                    "prior samples, a Gaussian-field baseline; writes metrics.json and PNG figures.")
    parser.add_argument("--weights", default=None,
                        help=f"HDF5 weights file (default: the shipped {default_weights_path().name})")
    parser.add_argument("--split", default="test", choices=SPLITS + ("all",),
                        help="reference patches: a split of the training run's sky regions (default test); "
                             "'all' (every patch) only with --data-map")
    parser.add_argument("--out", required=True, help="output folder for metrics.json and the PNGs")
    parser.add_argument("--n-samples", type=int, default=512, help="prior samples (default 512)")
    parser.add_argument("--n-recon", type=int, default=8,
                        help="decodings of z~q(z|x) averaged per reconstruction (0: posterior mean; default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prior", default="auto", choices=PRIORS,
                        help="latent prior of the samples: standard N(0,I), the learned flow, or auto "
                             "(the weights' default)")
    parser.add_argument("--data-map", default=None,
                        help="validate on the patches of another HEALPix dust map (FITS), cut and normalised "
                             "like the training data")
    parser.add_argument("--map-quantity", default=None, choices=("ebv", "tau353", "intensity_MJysr"),
                        help="quantity of --data-map (default: from its QUANT header)")
    parser.add_argument("--map-frame", default=None, help="frame of --data-map (default: from its header)")
    parser.add_argument("--n-boot", type=int, default=200, help="bootstrap resamplings (default 200)")
    parser.add_argument("--real-sky", default=None,
                        help="compare a VAEDust map with this real map (HEALPix FITS or IRIS plate folder, e.g. "
                             "iris_100um) at the split's patch centres, by intensity class")
    parser.add_argument("--real-sky-nside", type=int, default=1024,
                        help="nside of the VAEDust map of --real-sky (default 1024: 3.4' pixels, 4x4 per 15' patch pixel)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch default")
    parser.add_argument("--quiet", action="store_true", help="print nothing")
    return parser


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    weights = Path(args.weights) if args.weights else default_weights_path()
    if not weights.is_file():
        parser.error(f"--weights {str(weights)!r}: no such file (expected a pysm_vaedust HDF5 weights file)")
    if args.split == "all" and args.data_map is None:
        parser.error("--split all is only meaningful with --data-map (it would mix training patches in)")
    if args.n_samples < 16:
        parser.error(f"--n-samples {args.n_samples}: expected >= 16")
    if args.n_recon < 0:
        parser.error(f"--n-recon {args.n_recon}: expected >= 0")
    try:
        check_seed(args.seed, "--seed")
        check_int(args.n_boot, "--n-boot", 1)
        check_int(args.threads, "--threads", 0)
        check_nside(args.real_sky_nside, "--real-sky-nside")
    except ValueError as err:
        parser.error(str(err))
    if args.real_sky is not None and (args.split == "all" or not resolve_data_path(args.real_sky).exists()):
        parser.error(f"--real-sky {args.real_sky!r} with --split {args.split}: expected an existing map or IRIS "
                     "plate folder and a stored split (train, val, test)")
    if args.data_map is not None and not resolve_data_path(args.data_map).exists():
        parser.error(f"--data-map {args.data_map!r}: no such file or IRIS plate folder")
    if args.threads:
        torch.set_num_threads(args.threads)
    log = (lambda *a, **k: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    try:
        loaded = load_weights(weights, device=resolve_device(args.device))
        _resolve_prior(loaded, args.prior)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    metrics = validate(loaded, args.split, args.out, args.n_samples, args.n_recon, args.seed,
                       args.prior, args.data_map, args.map_quantity, args.map_frame, args.n_boot,
                       args.device, args.real_sky, args.real_sky_nside, log=log)
    if not args.quiet:
        print(summary(metrics))
        print(f"wrote {Path(args.out) / 'metrics.json'} and {len(metrics['figures'])} figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
