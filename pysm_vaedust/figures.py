"""Stage 9 — the validation's figures (PNG; matplotlib's Figure without pyplot: no global state).

`make_figures` draws the metrics of `validate.validate` (its JSON-able dict) and a few images:
a gallery of real patches beside conditional samples, spectra and per-patch band-power ratios,
Minkowski functionals, morphology (WPH, coherence, ridges), reconstruction residuals and the
variance explained by predictions from the condition.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data import atomic_write
from .fidelity import RATIO_RANGE
from .model import up

FIGURE_NAMES = ("gallery.png", "gallery_full.png", "power_spectra.png", "minkowski.png", "morphology.png", "residual_spectra.png")
GALLERY_ROWS, GALLERY_SAMPLES = 5, 3


def save_png(fig, path: Path) -> str:
    """Write a (constrained-layout) Figure to `path` atomically; returns the file name."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return path.name


COLOURS = {"split": "k", "train": "tab:blue", "vae": "tab:red", "gaussian": "tab:green",
           "vae_decoder_mean": "tab:orange", "vae_conditional_mean": "tab:purple", "vae_on_train": "tab:blue"}


def _labels(split: str) -> dict:
    return {"split": f"{split} (data)", "train": "train (data)", "vae": "VAE conditional samples",
            "gaussian": "Gaussian, own spectrum (d11-like)", "vae_decoder_mean": "VAE decoder mean (no noise)",
            "vae_conditional_mean": "VAE conditional mean E[x|c]", "vae_on_train": "VAE on train split"}


def make_figures(out: Path, m: dict, images: dict) -> list[str]:
    """Write FIGURE_NAMES; returns their file names."""
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas for PNG

    split = m["settings"]["split"]
    labels = _labels(split)
    names = []

    # gallery: per row the condition, the real small scales and conditional samples (one colour scale)
    g = images["gallery"]
    ncol = 2 + GALLERY_SAMPLES
    fig = Figure(figsize=(2.3 * ncol + 1, 2.3 * len(g["real"])), layout="constrained")
    axes = fig.subplots(len(g["real"]), ncol, squeeze=False)
    for row, ax_row in enumerate(axes):
        lim = np.percentile(np.abs(g["real"][row]), 99.5)
        shown_c = ax_row[0].imshow(g["condition"][row], origin="lower", cmap="inferno")
        for ax, img in zip(ax_row[1:], [g["real"][row], *g["samples"][row]]):
            shown = ax.imshow(img, origin="lower", vmin=-lim, vmax=lim, cmap="RdBu_r")
        for ax in ax_row:
            ax.set_xticks([])
            ax.set_yticks([])
        lon, lat = g["lonlat_deg"][row]
        ax_row[0].set_ylabel(f"(l, b) = ({lon:.0f}, {lat:.0f})", fontsize=9)
        fig.colorbar(shown_c, ax=ax_row[0], shrink=0.8, label="ln I (condition)")
        fig.colorbar(shown, ax=list(ax_row[1:]), shrink=0.8, label="ln I - [ln I]_c")
    for ax, title in zip(axes[0], [f"condition ({m['settings']['condition_fwhm_arcmin']:g}' FWHM)",
                                   f"real ({split})"] + [f"VAE sample {i + 1}" for i in range(GALLERY_SAMPLES)]):
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"{m['settings']['patch_deg']:g} deg patches of {m['settings']['pixel_arcmin']:g}': "
                 "real small scales and conditional samples given the same condition", fontsize=11)
    names.append(save_png(fig, out / "gallery.png"))

    # the same patches in full ln I (condition + small scales), the view of a map: one colour scale per row
    ncol = 1 + GALLERY_SAMPLES
    fig = Figure(figsize=(2.3 * ncol + 2, 2.3 * len(g["real"])), layout="constrained")   # room for the row labels
    axes = fig.subplots(len(g["real"]), ncol, squeeze=False)
    for row, ax_row in enumerate(axes):
        images_row = [g["full_real"][row], *g["full_samples"][row]]
        low, high = np.percentile(images_row[0], [0.5, 99.5])
        for ax, img in zip(ax_row, images_row):
            shown = ax.imshow(img, origin="lower", vmin=low, vmax=high, cmap="inferno")
            ax.set_xticks([])
            ax.set_yticks([])
        lon, lat = g["lonlat_deg"][row]
        ax_row[0].set_ylabel(f"(l, b) = ({lon:.0f}, {lat:.0f})", fontsize=9)
        fig.colorbar(shown, ax=list(ax_row), shrink=0.8, label="ln I (100 um MJy/sr)")
    for ax, title in zip(axes[0], [f"real ({split})"] + [f"VAE sample {i + 1}" for i in range(GALLERY_SAMPLES)]):
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"{m['settings']['patch_deg']:g} deg patches in full ln I: the condition (upsampled) plus the "
                 "real or sampled small scales", fontsize=11)
    names.append(save_png(fig, out / "gallery_full.png"))

    # power spectra, ratios to the split, and the per-patch band-power ratio distributions
    ps, ell = m["power_spectra"], np.asarray(m["power_spectra"]["ell"])
    amp = images["band_ratios"]
    fig = Figure(figsize=(14, 6.5), layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=[1.15, 1])
    top, bottom = left.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    for key in ("split", "train", "vae", "vae_decoder_mean", "vae_conditional_mean", "gaussian"):
        top.plot(ell, ps[key]["mean"], "o-" if key in ("split", "vae") else "-", color=COLOURS[key], ms=3,
                 label=labels[key])
        if key in ("split", "train"):
            top.fill_between(ell, ps[key]["lo"], ps[key]["hi"], color=COLOURS[key], alpha=0.25)
        if key != "split":
            bottom.plot(ell, ps["ratios"][f"{key}/split"], "-", color=COLOURS[key], ms=3)
    top.set_yscale("log")
    top.set_ylabel(r"$C_\ell$ [norm. units$^2$ sr]")
    top.legend(fontsize=8)
    bottom.fill_between(ell, np.divide(ps["split"]["lo"], ps["split"]["mean"]),
                        np.divide(ps["split"]["hi"], ps["split"]["mean"]), color="k", alpha=0.2)
    bottom.axhspan(0.9, 1.1, color="gray", alpha=0.1)
    bottom.axhline(1, color="gray", lw=1)
    bottom.set_yscale("log")
    bottom.set_ylim(max(bottom.get_ylim()[0], 1e-2), min(max(bottom.get_ylim()[1], 2.0), 1e2))
    bottom.set_xlabel(r"$\ell$")
    bottom.set_ylabel(f"ratio to {split}")
    axes = right.subplots(len(amp), 1, squeeze=False)[:, 0]
    bins = np.linspace(-1.5, 1.5, 91)
    for ax, (band_name, rows) in zip(axes, amp.items()):
        for key, ratio in rows.items():
            ax.hist(np.log10(np.clip(ratio, 10 ** bins[0], 10 ** bins[-1])), bins, histtype="step", color=COLOURS[key], density=True,
                    label=f"{labels[key]}: median {np.median(ratio):.2f}")
        ax.axvspan(*np.log10(RATIO_RANGE), color="gray", alpha=0.15)
        ax.set_title(f"ell {band_name}", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    axes[-1].set_xlabel(r"$\log_{10}$ per-patch band power, sample / real (shaded: 0.7-1.4; ends: clipped)")
    right.suptitle("local amplitude" + ("; * level 1, extrapolated, beam-smoothed" if any("*" in k for k in amp) else ""),
                   fontsize=10)
    names.append(save_png(fig, out / "power_spectra.png"))

    # Minkowski functionals
    mo = m["morphology"]
    mf, inside = mo["minkowski"], mo["inside_split_band"]
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, k, title in zip(axes, ("v0", "v1", "v2"), ("V0 area fraction", "V1 perimeter / 4 [1/rad]",
                                                     "V2 Euler characteristic [1/sr]")):
        for key in ("split", "train", "vae", "gaussian"):
            b = mf[key][k]
            tag = "" if key == "split" else f" ({inside[key][k]:.0%} in band)"
            ax.plot(mo["thresholds_nu"], b["mean"], color=COLOURS[key], label=labels[key] + tag)
            if key == "split":
                ax.fill_between(mo["thresholds_nu"], b["lo"], b["hi"], color="k", alpha=0.25)
        ax.set_xlabel(r"threshold $\nu$ [pixel std of each set]")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    names.append(save_png(fig, out / "minkowski.png"))

    # morphology: WPH coefficients, coherence and ridge-length distributions, with the split's band
    wph, fil = mo["wph"], mo["filaments"]
    fig = Figure(figsize=(15, 4.2), layout="constrained")
    axes = fig.subplots(1, 3, width_ratios=[2.2, 1, 1])
    index = np.arange(len(wph["labels"]))
    b = wph["split"]
    axes[0].errorbar(index, b["mean"], yerr=[np.subtract(b["mean"], b["lo"]), np.subtract(b["hi"], b["mean"])],
                     fmt="s", color="k", ms=4, capsize=3, label=labels["split"])
    for shift, key in zip((-0.2, 0.2, 0.1), ("vae", "gaussian", "train")):
        axes[0].plot(index + shift, wph[key]["mean"], "o", ms=4, color=COLOURS[key],
                     label=f"{labels[key]} ({inside[key]['wph']:.0%} in band)")
    gaussian = np.array([np.nan if v is None else v for v in wph["gaussian_values"]])
    axes[0].plot(index, gaussian, "_", ms=12, color="tab:green", alpha=0.6, label="Gaussian value")
    axes[0].set_xticks(index)
    axes[0].set_xticklabels(wph["labels"], rotation=60, ha="right", fontsize=7)
    axes[0].set_title(f"wavelet phase harmonics (pywph, J={wph['scales_J']}, L={wph['orientations_L']})", fontsize=10)
    axes[0].legend(fontsize=7)
    edges, lower = np.asarray(fil["coherence_edges"]), fil["ridge_length_lower_edges_px"]
    for ax, (key, centres, xlabel, ylabel) in zip(axes[1:], (
            ("coherence_hist", (edges[1:] + edges[:-1]) / 2, "local coherence (energy-weighted)", "density"),
            ("ridge_length_fraction", np.arange(len(lower)), "ridge length [px]", "fraction of pixels on ridges"))):
        for name in ("split", "train", "vae", "gaussian"):
            b = fil[name][key]
            ax.plot(centres, b["mean"], color=COLOURS[name], label=labels[name], marker=".")
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
    names.append(save_png(fig, out / "morphology.png"))

    # reconstruction residuals and the variance explained by predictions from c
    r, cs = m["reconstruction"], m["conditional_structure"]
    fig = Figure(figsize=(11, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    axes[0].plot(r["ell"], r["cross_ratio"], "o-", ms=3, label=r"$\langle x, x-\hat x\rangle / C_\ell$")
    axes[0].plot(r["ell"], r["auto_ratio"], "s-", ms=3, label=r"$\langle x-\hat x, x-\hat x\rangle / C_\ell$")
    axes[0].axhline(r["level"], color="gray", ls="--", lw=1)
    axes[0].set_yscale("symlog", linthresh=1e-2)  # the cross term may go negative
    axes[0].set_ylabel("residual power / input power")
    axes[0].set_title(f"reconstructions x_rec = reconstruct(x, c), {split} split", fontsize=10)
    per_bin = cs["per_bin"]
    for key, label in (("vae_conditional_mean", labels["vae_conditional_mean"]), ("wiener", "Wiener prediction from c")):
        axes[1].plot(per_bin["ell"], per_bin[key], "o-", ms=3, color=COLOURS.get(key, "tab:gray"),
                     label=f"{label}: {cs['fraction_explained'][key]:.2f} in the octave")
    axes[1].axvspan(*cs["octave_ell"], color="gray", alpha=0.15)
    axes[1].axhline(0, color="gray", lw=1)
    axes[1].set_ylim(-0.5, 1.05)
    axes[1].set_xlim(0, 1.05 * r["ell"][-1])  # the patch's Nyquist ell (beyond: its corner modes)
    axes[1].set_ylabel("fraction of the variance of x explained")
    axes[1].set_title(f"prediction of x from c (shaded: ell {cs['octave_ell'][0]:g}-{cs['octave_ell'][1]:g})",
                      fontsize=10)
    for ax in axes:
        ax.set_xlabel(r"$\ell$")
        ax.legend(fontsize=8)
    names.append(save_png(fig, out / "residual_spectra.png"))
    return names


def gallery_images(x: np.ndarray, c: np.ndarray, samples: np.ndarray, centres, norm: dict) -> dict:
    """Images of GALLERY_ROWS patches x (N, n, n) at quantiles of brightness, brightest first:
    condition c (N, 2, n/2, n/2) as coarse ln I, real and sampled (N, D, n, n) small scales in ln I,
    and both in full ln I, approximately: the coarse part on the patch's grid (`model.up`,
    bilinear: the condition grid's pixels are the patch's, 2 x 2 together; the edge ring holds
    the edge values) plus the small scales (which the cutouts took from the coarse part at the
    patch's own pixels: the sum is the data's ln I up to that interpolation)."""
    brightness = c[:, 1, 0, 0]
    rows = np.argsort(brightness)[(np.linspace(0.1, 0.9, GALLERY_ROWS) * (len(c) - 1)).astype(int)][::-1]
    coarse = (c[rows, 0] * float(norm["coarse_scale"])
              + brightness[rows, None, None] * float(norm["level_scale"]) + float(norm["level_mean"]))
    coarse_fine = up(torch.from_numpy(np.asarray(coarse, dtype=np.float64))[:, None])[:, 0].numpy()
    real = float(norm["log_scale"]) * x[rows] + float(norm["log_mean"])
    drawn = float(norm["log_scale"]) * samples[rows, :GALLERY_SAMPLES] + float(norm["log_mean"])
    return {"condition": coarse, "real": real, "samples": drawn, "full_real": coarse_fine + real,
            "full_samples": coarse_fine[:, None] + drawn, "lonlat_deg": np.asarray(centres)[rows]}
