"""Stage 9 — validation: conditional samples of the VAE against held-out real dust.

``pysm_vaedust-validate --weights W.h5 --split test --out DIR`` cuts the training map at the
patch centres of the split and of the train split stored with the weights (or another map,
``--data-map``), with their geometry, conditioning FWHM and normalisation, draws conditional
samples (decoder mean + decoder noise, eps ~ N(0, I)) given each patch's own coarse part c, and
writes ``DIR/metrics.json``, PNG figures and a summary:

1. local amplitude: per patch, sample/real band power in ell 300-600 and 600-1200 at the trained
   level; median ratio and share of (patch, draw) pairs in 0.7-1.4, for the VAE, for a Gaussian
   field with each patch's own 2D spectrum (PySM d11 at best) and, as a reference, for the VAE on
   the train split. ell 1200-2000 lies beyond the trained pixel's Nyquist: the same centres are
   cut at the cascade level of factor 4 (patches 4x smaller, condition at FWHM / 4, the level's
   amplitude), the model is sampled there (an extrapolated level) and smoothed by the map's effective beam; the
   real power there holds IRIS noise and CIB too;
2. morphology: Minkowski functionals, wavelet phase harmonics and filament statistics of the
   samples (one per patch), the Gaussian field and the train split: share inside the split's
   68 % bootstrap band;
3. conditional structure: the share of the variance of x in the octave above the conditioning
   scale (ell 384-768 for a 30' condition) explained by the VAE's conditional mean E[x | c] (mean
   of `n_mean` decodings) and by the Wiener prediction from c (per-radial-bin regression of x on
   c's structure channel fitted on the train split);
4. reconstructions: residual spectra of x_rec = reconstruct(x, c) relative to C_l(x), and the ell
   where they first reach 0.1;
5. figures: gallery, power spectra and band-power ratios, Minkowski functionals, morphology,
   residual spectra (and real_sky.png with ``--real-sky``).

Patches are in normalised units (the weights' ``normalisation``), level-1 patches in ln I;
spectra in [units]^2 sr with flat-sky ell of the patch geometry.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .checks import check_int, check_nside, check_seed
from .cutouts import PatchGeometry, condition_input, cut_patches, patch_centres
from .data import atomic_write, file_digest
from .fidelity import (RATIO_RANGE, THRESHOLDS_NU, amplitude_rows, conditional_structure, inside_fractions,
                       own_spectrum_gaussian, per_patch_moments, resolved_bands, residual_spectra, set_statistics,
                       smooth_patches)
from .figures import GALLERY_SAMPLES, gallery_images, make_figures
from .morphology import (COHERENCE_EDGES, RIDGE_THRESHOLD, SIGMA_DERIVATIVE_PX, SIGMA_INTEGRATION_PX,
                         SIGMA_RIDGE_PX, WPH_ORIENTATIONS, WPH_WAVELENGTH_J0_PX, max_wph_scales,
                         ridge_length_edges, wph_labels)
from .realsky import REAL_SKY_BEAMS_ARCMIN, pixel_fwhm_arcmin, split_centres
from .statistics import default_ell_edges, flat_power_spectrum
from .tiling import cascade_levels
from .train import SPLITS, TrainConfig, load_training_map, resolve_data_path, select_patches
from .weights import default_weights_path, load_weights, resolve_device

__all__ = ["validate", "summary", "main", "per_patch_moments"]

#: ell bands of the per-patch band-power ratios at the trained level, and at the cascade level of factor 4.
BANDS = ((300.0, 600.0), (600.0, 1200.0))
EXTRAPOLATED_BANDS = ((1200.0, 2000.0),)
#: the octave above a 30' conditioning scale (scaled by 30' / FWHM for other conditions).
OCTAVE_ELL_30ARCMIN = (384.0, 768.0)
SETS = ("split", "train", "vae", "gaussian")


# --------------------------------------------------------------------------------------- data
def split_patches(dust, metadata: dict, split: str = "all") -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(x (N, 1, n, n), c (N, 2, n/2, n/2), info) of any dust map (`DustMap`) cut and normalised
    exactly like the training data of `metadata` (geometry, conditioning FWHM, normalisation): at
    the stored centres of `split` ('train' | 'val' | 'test'; patches on missing data dropped), or
    at every centre ('all') with the training run's selection (noise floor, extragalactic discs)."""
    if split not in SPLITS + ("all",):
        raise ValueError(f"split={split!r}: expected one of {SPLITS + ('all',)}")
    cfg = TrainConfig.of_weights(metadata)
    norm, geo = metadata["normalisation"], metadata["geometry"]
    if split == "all":
        lon, lat = patch_centres(cfg.lat_min_deg, cfg.spacing_deg)
        floor_ell_min, extragalactic = cfg.floor_ell_min, cfg.exclude_extragalactic
    else:
        lon, lat = split_centres(metadata, split)
        floor_ell_min, extragalactic = 0.0, False  # selected when the split was made
    lon, lat, residual, coarse, selection = select_patches(
        dust, lon, lat, PatchGeometry(int(geo["npix"]), float(geo["size_deg"])), float(norm["template_fwhm_deg"]),
        floor_ell_min, extragalactic)
    x = (residual - float(norm["log_mean"])) / float(norm["log_scale"])
    return torch.from_numpy(x)[:, None], torch.from_numpy(condition_input(coarse, norm)), {
        "data": dust.provenance(), "split": split, "count": int(len(x)), "selection": selection,
        "centres_lonlat_deg": np.stack([lon, lat], 1)}


def map_beam_arcmin(dust, name: str, selection: dict) -> float:
    """Effective beam FWHM of a map, arcmin: measured by the noise-floor selection when it ran,
    else the nominal beam of a known map (IRIS 5.1'), else its HEALPix pixel."""
    return float(selection.get("effective_beam_fwhm_arcmin")
                 or REAL_SKY_BEAMS_ARCMIN.get(Path(str(name)).name, pixel_fwhm_arcmin(dust.nside)))


def extrapolated_level(metadata: dict):
    """The cascade level of factor 4 of the weights' geometry (`tiling.cascade_levels`: patches
    4x smaller, two octaves beyond the trained pixel)."""
    base = PatchGeometry(int(metadata["geometry"]["npix"]), float(metadata["geometry"]["size_deg"]))
    for level in cascade_levels(8192, base, float(metadata["spectral_slope"]["slope"])):
        if level.factor == 4:
            return level
    raise ValueError(f"the cascade of base pixel {base.pixel_size_deg} deg has no level of factor 4")


# ----------------------------------------------------------------------------- model passes
def _batched(fn, tensors, device, batch_size: int = 256) -> torch.Tensor:
    """fn applied to consecutive batches of `tensors` (same length) on `device`, concatenated on CPU."""
    with torch.no_grad():
        return torch.cat([fn(*(t[s:s + batch_size].to(device) for t in tensors)).cpu()
                          for s in range(0, len(tensors[0]), batch_size)])


def _prior_mean(vae, c: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Decoder means (B, 1, n, n) of eps ~ N(0, I) given conditions c (B, 2, n/2, n/2)."""
    return vae.decode(torch.randn((len(c), vae.latent_dim), generator=generator, device=c.device), c)


def conditional_samples(vae, c: torch.Tensor, draws: int, generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(samples, decoder means), each (N, draws, n, n) float32: `draws` conditional samples of
    each condition c (N, 2, n/2, n/2), eps ~ N(0, I), samples = decoder mean + decoder noise."""
    def draw(cb):
        mean = _prior_mean(vae, cb, generator)
        return torch.cat([mean + vae.decoder_noise(torch.randn(mean.shape, generator=generator, device=cb.device), cb),
                          mean], 1)

    out = _batched(draw, (c.repeat_interleave(draws, 0),), vae.device).numpy()
    out = out.reshape(len(c), draws, 2, *out.shape[-2:])
    return out[:, :, 0], out[:, :, 1]


def conditional_mean(vae, c: torch.Tensor, n_mean: int, generator: torch.Generator) -> np.ndarray:
    """(N, n, n) float64: E[x | c] estimated by the mean of `n_mean` decoder means, eps ~ N(0, I)."""
    total = 0.0
    for _ in range(n_mean):
        total = total + _batched(lambda cb: _prior_mean(vae, cb, generator), (c,), vae.device)
    return (total / n_mean)[:, 0].double().numpy()


def reconstructions(vae, x: torch.Tensor, c: torch.Tensor) -> np.ndarray:
    """(N, n, n) float64: vae.reconstruct(x, c), the decoder mean at the posterior-mean latents."""
    return _batched(vae.reconstruct, (x, c), vae.device)[:, 0].double().numpy()


# ------------------------------------------------------------------------------ validation
def jsonable(obj):
    """numpy/torch -> lists; non-finite floats -> None (valid JSON)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def extrapolated_amplitude(vae, dust, centres, metadata: dict, beam_arcmin: float, draws: int,
                           generator: torch.Generator, seed: int) -> tuple[dict, dict]:
    """Local amplitude at the cascade level of factor 4, beyond the trained pixel's Nyquist: `dust` cut at the
    centres (M, 2) (Galactic degrees) in that level's geometry, the condition at FWHM / 4 in the
    level's amplitude, `draws` samples per patch in ln I smoothed by the map's beam, against the
    real patches (and the own-spectrum Gaussian field). Returns (section, {row: ratios})."""
    norm = metadata["normalisation"]
    level = extrapolated_level(metadata)
    geo, fwhm_deg = level.geometry, float(norm["template_fwhm_deg"]) / level.factor
    cut = cut_patches(dust, centres[:, 0], centres[:, 1], geo, fwhm_deg)
    bands = resolved_bands(EXTRAPOLATED_BANDS, geo.npix, geo.pixel_size_deg)
    section = {"bands_ell": bands, "extrapolated": True, "factor": level.factor, "amplitude": level.amplitude,
               "patch_deg": geo.size_deg, "pixel_arcmin": 60 * geo.pixel_size_deg, "condition_fwhm_arcmin": 60 * fwhm_deg,
               "beam_fwhm_arcmin": beam_arcmin, "count": int(cut.usable.sum()),
               "centres_missing_data": int(np.sum(~cut.usable)),
               "note": f"cascade level of factor 4: the model applied beyond the scales it was trained on (extrapolated by "
                       f"scale invariance); samples smoothed by the map's effective {beam_arcmin:.1f}' beam; the real "
                       f"power there holds the map's noise and the CIB too"}
    if section["count"] < 2 or not bands:
        return {**section, "note": section["note"] + "; not measured: too few patches hold data at this resolution "
                                                     "or no band is resolved"}, {}
    real = cut.small_scales[cut.usable].astype(float)
    c = torch.from_numpy(condition_input(cut.coarse[cut.usable], norm, level.amplitude))
    x, _ = conditional_samples(vae, c, draws, generator)
    sim = smooth_patches(level.amplitude * (float(norm["log_scale"]) * x + float(norm["log_mean"])), beam_arcmin,
                         section["pixel_arcmin"])
    gaussian = own_spectrum_gaussian(real, np.random.default_rng(seed + 1), draws)
    rows, ratios = amplitude_rows(geo.pixel_size_deg, bands, {"split": real}, {"vae": sim, "gaussian": gaussian})
    return {**section, **rows}, ratios


def validate(weights_path, split: str = "test", out="validation", n_draws: int = 4, n_mean: int = 32,
             seed: int = 0, train_patches: int = 0, data_map=None, map_quantity: str | None = None,
             map_frame: str | None = None, n_boot: int = 200, device: str = "cpu", real_sky: str | None = None,
             real_sky_nside: int = 1024, log=print) -> dict:
    """Run the whole validation, write `out`/metrics.json and the PNGs; returns the metrics dict.

    weights_path: a weights file (loaded on `device`) or a loaded `Weights`; n_draws: conditional
    samples per patch (>= 3, the gallery shows 3); n_mean: decodings averaged for E[x | c];
    train_patches: random train patches of the reference rows (0 = all; the Wiener fit uses all);
    real_sky: a real map (file or IRIS plate folder) to compare a VAEDust map of nside
    `real_sky_nside` with at the split's centres (`realsky`); the rest as the command line's."""
    if split not in SPLITS + ("all",):
        raise ValueError(f"split={split!r}: expected one of {SPLITS + ('all',)}")
    if split == "all" and data_map is None:
        raise ValueError("split='all' mixes training patches in: use it with data_map=<another map>")
    if n_draws < GALLERY_SAMPLES or n_mean < 2:
        raise ValueError(f"n_draws={n_draws!r}, n_mean={n_mean!r}: expected n_draws >= {GALLERY_SAMPLES}, n_mean >= 2")
    t_start, timing = time.time(), {}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = weights_path if hasattr(weights_path, "vae") else load_weights(weights_path, device=resolve_device(device))
    vae, meta = weights.vae, weights.metadata
    cfg = TrainConfig.of_weights(meta)
    norm, npix = meta["normalisation"], int(meta["geometry"]["npix"])
    pixel_deg = float(meta["geometry"]["size_deg"]) / npix
    fwhm_deg = float(norm["template_fwhm_deg"])
    edges = default_ell_edges(npix, pixel_deg)

    # data: the train split and the reference patches (the split, of the training map or another map)
    tic = time.time()
    name = cfg.data_map if data_map is None else str(data_map)
    dust = load_training_map(cfg.data_map, cfg.map_quantity, cfg.map_frame, cfg.mosaic_nside, progress=False)
    x_train, c_train, _ = split_patches(dust, meta, "train")
    if data_map is not None:
        dust = load_training_map(name, map_quantity or "", map_frame or "", cfg.mosaic_nside, progress=False)
    x_split, c_split, data_info = split_patches(dust, meta, split)
    centres = data_info.pop("centres_lonlat_deg")
    selection = data_info["selection"]
    if "effective_beam_fwhm_arcmin" not in selection and data_map is None:
        selection = meta.get("selection", {})  # measured when the training run selected its patches
    beam = map_beam_arcmin(dust, name, selection)
    if len(x_split) < 16:
        raise ValueError(f"split {split!r} holds {len(x_split)} patches: expected at least 16")
    timing["data_s"] = time.time() - tic
    rows = np.arange(len(x_train))
    if 0 < train_patches < len(rows):
        rows = np.sort(np.random.default_rng(seed).choice(rows, train_patches, replace=False))
    log(f"data: {len(x_split)} {split} patches, {len(x_train)} train patches ({timing['data_s']:.0f} s)")

    # conditional samples, the own-spectrum Gaussian field, and the amplitude at the trained level
    tic = time.time()
    gen = torch.Generator(device=vae.device).manual_seed(seed)
    samples, decoder_means = conditional_samples(vae, c_split, n_draws, gen)
    train_samples, _ = conditional_samples(vae, c_train[rows], n_draws, gen)
    xs, xt = x_split[:, 0].double().numpy(), x_train[:, 0].double().numpy()
    gaussian = own_spectrum_gaussian(xs, np.random.default_rng(seed), n_draws)
    bands = resolved_bands(BANDS, npix, pixel_deg)
    trained, ratios = amplitude_rows(pixel_deg, bands, {"split": xs, "vae_on_train": xt[rows]},
                                     {"vae": samples, "gaussian": gaussian, "vae_on_train": train_samples})
    del train_samples
    timing["samples_s"] = time.time() - tic

    # the cascade level of factor 4 (extrapolated): the same centres, 4x smaller patches, beam-smoothed samples
    tic = time.time()
    level1, ratios1 = extrapolated_amplitude(vae, dust, centres, meta, beam, n_draws, gen, seed)
    del dust
    timing["extrapolated_level_s"] = time.time() - tic

    # conditional mean against the Wiener prediction; reconstructions
    tic = time.time()
    mean_split = conditional_mean(vae, c_split, n_mean, gen)
    octave = tuple(v * 0.5 / fwhm_deg for v in OCTAVE_ELL_30ARCMIN)
    cs, ct = c_split.double().numpy(), c_train.double().numpy()
    structure = conditional_structure(xt, ct, xs, cs, mean_split, pixel_deg, octave)
    recon = residual_spectra(xs, reconstructions(vae, x_split, c_split), pixel_deg, edges)
    timing["prediction_s"] = time.time() - tic
    log(f"samples, factor-4 level, predictions: {time.time() - t_start - timing['data_s']:.0f} s")

    # set statistics: the split, the train split, one sample per patch, one Gaussian field per patch
    tic = time.time()
    stats = {key: set_statistics(v, pixel_deg, edges, n_boot, seed)
             for key, v in (("split", xs), ("train", xt[rows]), ("vae", samples[:, 0]), ("gaussian", gaussian[:, 0]))}
    ell = stats["split"]["ell"]
    spectra = {key: s["cl"] for key, s in stats.items()}
    for key, v in (("vae_decoder_mean", decoder_means[:, 0]), ("vae_conditional_mean", mean_split)):
        spectra[key] = {"mean": flat_power_spectrum(v, pixel_deg, edges)[1].mean(0)}
    spectra["ratios"] = {f"{key}/split": spectra[key]["mean"] / spectra["split"]["mean"]
                         for key in spectra if key != "split"}
    inside = {key: inside_fractions(stats[key], stats["split"]) for key in ("vae", "gaussian", "train")}
    timing["statistics_s"] = time.time() - tic
    log(f"statistics: {timing['statistics_s']:.0f} s")

    J = max_wph_scales(npix)
    wph_names, wph_gauss = wph_labels(J)
    metrics = {
        "package_version": __version__,
        "weights": {"path": str(Path(weights.path).resolve()), "sha256_file": file_digest(weights.path),
                    "package_version": meta.get("package_version"), "training_metrics": meta.get("metrics")},
        "settings": {"split": split, "n_draws": n_draws, "n_mean": n_mean, "seed": seed, "n_boot": n_boot,
                     "bootstrap_percentiles": [16, 84], "device": str(vae.device),
                     "data_map": None if data_map is None else str(data_map), "pixel_size_deg": pixel_deg,
                     "pixel_arcmin": 60 * pixel_deg, "patch_deg": npix * pixel_deg,
                     "condition_fwhm_arcmin": 60 * fwhm_deg,
                     "units": "normalised (see weights normalisation); the factor-4 level in ln I; C_l in units^2 sr; "
                              "v1 1/rad; v2 1/sr"},
        "data": data_info,
        "counts": {"split": len(xs), "train": len(rows), "train_wiener_fit": len(xt), "samples_per_patch": n_draws,
                   "weights_split_counts": meta["split"]["counts"]},
        "amplitude": {
            "definition": "per (patch, draw): band power of a sample given the patch's own c / band power of the "
                          "real patch (flat-sky, cosine-tapered); median and share in ratio_range",
            "ratio_range": RATIO_RANGE,
            "trained_level": {"bands_ell": bands, "pixel_arcmin": 60 * pixel_deg, **trained},
            "extrapolated_level": level1},
        "power_spectra": {"ell": ell, "edges": edges, **spectra},
        "morphology": {
            "thresholds_nu": THRESHOLDS_NU,
            "definition": "inside_split_band: share of thresholds / coefficients / bins where a set's mean lies in "
                          "the 16-84 % bootstrap band of the split's mean; vae: one conditional sample per patch, "
                          "gaussian: one own-spectrum field per patch, train: the train split's real patches",
            "inside_split_band": inside,
            "minkowski": {key: s["minkowski"] for key, s in stats.items()},
            "wph": {"labels": wph_names, "gaussian_values": wph_gauss, "scales_J": J, "orientations_L": WPH_ORIENTATIONS,
                    "wavelength_px": WPH_WAVELENGTH_J0_PX * 2.0 ** np.arange(J),
                    **{key: s["wph"] for key, s in stats.items()}},
            "filaments": {"sigma_derivative_px": SIGMA_DERIVATIVE_PX, "sigma_integration_px": SIGMA_INTEGRATION_PX,
                          "sigma_ridge_px": SIGMA_RIDGE_PX, "ridge_threshold_rms": RIDGE_THRESHOLD,
                          "coherence_edges": COHERENCE_EDGES,
                          "ridge_length_lower_edges_px": ridge_length_edges(npix)[:-1],  # the last bin is open
                          **{key: s["filaments"] for key, s in stats.items()}}},
        "patch_moments": {key: s["patch_moments"] for key, s in stats.items()},
        "conditional_structure": {"n_mean": n_mean, **structure},
        "reconstruction": recon,
    }
    metrics = jsonable(metrics)
    tic = time.time()
    band_ratios = {f"{lo:.0f}-{hi:.0f}": {k: r[:, b] for k, r in ratios.items()} for b, (lo, hi) in enumerate(bands)}
    if ratios1:
        band_ratios.update({f"{lo:.0f}-{hi:.0f} *": {k: r[:, b] for k, r in ratios1.items()}
                            for b, (lo, hi) in enumerate(level1["bands_ell"])})
    images = {"gallery": gallery_images(xs, cs, samples, centres, norm), "band_ratios": band_ratios}
    metrics["figures"] = make_figures(out, metrics, images)
    timing["figures_s"] = time.time() - tic
    if real_sky is not None:
        from .realsky import make_figure, real_sky_validation

        tic = time.time()
        real, real_images = real_sky_validation(weights, real_sky, split, real_sky_nside, seed, n_boot,
                                                device=device, log=log)
        metrics["real_sky"] = jsonable(real)
        metrics["figures"].append(make_figure(out, metrics["real_sky"], real_images))
        timing["real_sky_s"] = time.time() - tic
    timing["total_s"] = time.time() - t_start
    metrics["timing_s"] = timing
    text = json.dumps(metrics, indent=1, allow_nan=False)
    atomic_write(out / "metrics.json", lambda tmp: Path(tmp).write_text(text))
    return metrics


def summary(m: dict) -> str:
    """A short human-readable digest of the metrics."""
    split, amp = m["settings"]["split"], m["amplitude"]
    fmt = lambda v: "never" if v is None else f"{v:.0f}"  # noqa: E731
    lo, hi = amp["ratio_range"]
    lines = [f"pysm_vaedust-validate: {m['counts']['split']} {split} patches, {m['counts']['train']} train; "
             f"{m['counts']['samples_per_patch']} conditional samples per patch; {m['timing_s']['total_s']:.0f} s",
             f"local amplitude, per-patch sample/real band power: median (share in {lo:g}-{hi:g})",
             f"  {'ell':<12}{'VAE | ' + split + ' c':>18}{'Gaussian, own spectrum':>24}{'VAE | train c':>18}"]
    for level, mark in ((amp["trained_level"], ""), (amp["extrapolated_level"], " *")):
        for b, (b_lo, b_hi) in enumerate(level["bands_ell"]):
            cells = [f"{level[k]['median_ratio'][b]:.2f} ({level[k]['fraction_in_range'][b]:.2f})" if k in level
                     else "-" for k in ("vae", "gaussian", "vae_on_train")]
            lines.append(f"  {f'{b_lo:.0f}-{b_hi:.0f}{mark}':<12}{cells[0]:>18}{cells[1]:>24}{cells[2]:>18}")
    ex = amp["extrapolated_level"]
    lines.append(f"  * {ex['count']} patches of {ex['patch_deg']:g} deg, {ex['pixel_arcmin']:g}' pixels, condition "
                 f"{ex['condition_fwhm_arcmin']:g}' FWHM: {ex['note']}")
    inside = m["morphology"]["inside_split_band"]
    lines.append(f"morphology, share inside the {split} 68 % bootstrap band:")
    columns = {"v0": "V0", "v1": "V1", "v2": "V2", "wph": "WPH", "coherence": "coherence",
               "coherence_hist": "coh. hist", "ridge_fraction": "ridges", "ridge_length_fraction": "ridge len."}
    lines.append(f"  {'':<10}" + "".join(f"{v:>11}" for v in columns.values()))
    for name, label in (("vae", "VAE"), ("gaussian", "Gaussian"), ("train", "train")):
        lines.append(f"  {label:<10}" + "".join(f"{inside[name][k]:>11.2f}" for k in columns))
    cs = m["conditional_structure"]
    lines.append(f"conditional structure, ell {cs['octave_ell'][0]:g}-{cs['octave_ell'][1]:g}: variance explained by the "
                 f"VAE conditional mean ({cs['n_mean']} decodings) {cs['fraction_explained']['vae_conditional_mean']:.3f}, "
                 f"by the Wiener prediction from c {cs['fraction_explained']['wiener']:.3f}")
    r = m["reconstruction"]
    lines.append(f"reconstructions: mse {r['mse']:.3f} (input variance {r['input_variance']:.3f}); residual/C_l reaches "
                 f"{r['level']} at ell {fmt(r['ell_cross_crosses_level'])} (cross), {fmt(r['ell_auto_crosses_level'])} (auto)")
    fil = m["morphology"]["filaments"]
    for key, label in (("coherence", "structure-tensor coherence"), ("ridge_fraction", "ridge-pixel fraction")):
        band = fil["split"][key]
        lines.append(f"{label}: " + ", ".join(f"{k} {fil[k][key]['mean']:.3f}" for k in SETS)
                     + f"  ({split} 68 % band {band['lo']:.3f}..{band['hi']:.3f})")
    pm = m["patch_moments"]
    for key, label in (("rms_cv", "patch-to-patch rms spread (std/mean)"), ("skewness_mean", "mean within-patch skewness"),
                       ("kurtosis_median", "median within-patch excess kurtosis")):
        band = pm["split"][key]["band"]
        lines.append(f"{label}: " + ", ".join(f"{k} {pm[k][key]['value']:.2f}" for k in SETS)
                     + f"  ({split} 68 % band {band[0]:.2f}..{band[1]:.2f})")
    trained = m["weights"].get("training_metrics") or {}
    shares = trained.get("test_calibrated_power_shares") or trained.get("test_power_shares")
    if shares:
        lines.append("sample variance by source (weights' training metrics, test split): " + ", ".join(
            f"{k.replace('_', ' ')} {shares[k]:.2f}" for k in ("condition", "latents", "decoder_noise")))
    ratios = m["power_spectra"]["ratios"]
    lines.append("mean C_l ratio to the split (median over ell bins): "
                 + ", ".join(f"{k.split('/')[0]} {np.median(v):.2f}" for k, v in ratios.items()))
    if "real_sky" in m:
        from .realsky import table

        lines += [f"real sky {m['real_sky']['real_map']['source']} against {m['real_sky']['sim_map']['source']}:",
                  table(m["real_sky"])]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pysm_vaedust-validate",
        description="Validate a pysm_vaedust weights file against held-out real dust patches with conditional "
                    "samples given each patch's own coarse part: local amplitude, morphology, prediction from the "
                    "condition against the Wiener filter, reconstructions; writes metrics.json and PNG figures.")
    parser.add_argument("--weights", default=None,
                        help=f"HDF5 weights file (default: the shipped {default_weights_path().name})")
    parser.add_argument("--split", default="test", choices=SPLITS + ("all",),
                        help="reference patches: a split of the training run's sky regions (default test); "
                             "'all' (every patch) only with --data-map")
    parser.add_argument("--out", required=True, help="output folder for metrics.json and the PNGs")
    parser.add_argument("--n-draws", type=int, default=4,
                        help=f"conditional samples per patch (default 4, at least {GALLERY_SAMPLES})")
    parser.add_argument("--n-mean", type=int, default=32,
                        help="decodings averaged for the conditional mean E[x|c] (default 32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-patches", type=int, default=0,
                        help="random train patches in the train reference rows (default 0: all; faster with fewer)")
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
                        help="nside of the VAEDust map of --real-sky (default 1024)")
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
    if args.n_draws < GALLERY_SAMPLES:
        parser.error(f"--n-draws {args.n_draws}: expected >= {GALLERY_SAMPLES}")
    if args.n_mean < 2:
        parser.error(f"--n-mean {args.n_mean}: expected >= 2")
    try:
        check_seed(args.seed, "--seed")
        check_int(args.n_boot, "--n-boot", 1)
        check_int(args.train_patches, "--train-patches", 0)
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
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    metrics = validate(loaded, args.split, args.out, args.n_draws, args.n_mean, args.seed, args.train_patches,
                       args.data_map, args.map_quantity, args.map_frame, args.n_boot, args.device, args.real_sky,
                       args.real_sky_nside, log=log)
    if not args.quiet:
        print(summary(metrics))
        print(f"wrote {Path(args.out) / 'metrics.json'} and {len(metrics['figures'])} figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
