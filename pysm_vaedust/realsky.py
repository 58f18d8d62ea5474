"""Stage 9 — the real sky region by region: a simulated sky against the real sky at the same pixels.

Both maps (any HEALPix `DustMap`s, e.g. the IRIS 100 um mosaic and a VAEDust map at 545 GHz) are
cut at the same patch centres with `cut_patches` into small-scale log contrasts
ln I - [ln I]_smooth (frequency-independent up to the template), box-averaged onto the patch
pixels. Each map has a nominal Gaussian beam (IRIS 5.1', a VAEDust map or another file: its
HEALPix pixel size); both sets are brought to the coarser one, flat-sky per patch in log space.
Patches touching missing data in either map are dropped; the rest are ranked by the real sky's
mean intensity into faint / intermediate / bright terciles. Per class, against the real patches:

- band power: per patch C_l(sim) / C_l(real) in each resolved ell band; median, fraction in 0.7-1.4;
- one-point moments per patch (std ratio, mean skewness, median excess kurtosis);
- Minkowski functionals (each patch standardised by its own mean and std: morphology, not
  amplitude), WPH coefficients and the structure-tensor coherence histogram: fraction of
  thresholds / coefficients / bins where the set's mean lies inside the real class's bootstrap band.

Each statistic is given for the simulation and for a d11-like field next to it (a Gaussian field
with each real patch's own spectrum, `fidelity.own_spectrum_gaussian`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .cutouts import PatchGeometry, cut_patches
from .data import FREQ_REF_GHZ, DustMap, MJysr_to_uK_RJ, file_digest
from .fidelity import (RATIO_RANGE, THRESHOLDS_NU, band, band_powers, inside_fraction, own_spectrum_gaussian,
                       per_patch_moments, ratio_summary, resolved_bands, smooth_patches)
from .figures import save_png
from .morphology import COHERENCE_EDGES, max_wph_scales, structure_tensor_statistics, wph_coefficients, wph_labels
from .statistics import minkowski_functionals

#: nominal beam FWHM (arcmin) of the real-sky maps known by name; other maps: their HEALPix pixel.
REAL_SKY_BEAMS_ARCMIN = {"iris_100um": 5.1}
#: ell bands of the per-patch band-power ratios; only those inside [fundamental, Nyquist] are used.
BANDS = ((100.0, 300.0), (300.0, 600.0), (600.0, 1200.0))
CLASSES = ("faint", "intermediate", "bright")
MODELS = ("vaedust", "d11_like")
#: fewest usable patches: two per class for the bootstrap bands.
MIN_PATCHES = 6
FIGURE_NAME = "real_sky.png"


def pixel_fwhm_arcmin(nside: int) -> float:
    """Nominal beam of a map without a stated one: its HEALPix pixel size, arcmin."""
    import healpy as hp

    return float(hp.nside2resol(nside, arcmin=True))


def split_centres(metadata: dict, split: str, source: str = "the weights") -> tuple[np.ndarray, np.ndarray]:
    """(lon, lat) in degrees, Galactic, of the patch centres of `split` stored in weights metadata."""
    try:
        centres = metadata["split"]["centres_lonlat_deg"][split]
    except (KeyError, TypeError):
        raise ValueError(f"{source} hold no stored split {split!r} (metadata['split']['centres_lonlat_deg']): "
                         "expected weights written by pysm_vaedust-train, which records the split's patch "
                         "centres") from None
    lon, lat = np.asarray(centres, dtype=float).reshape(-1, 2).T
    return lon, lat


def vaedust_dust_map(nside: int, seed: int, weights, device: str = "cpu") -> DustMap:
    """A full-sky VAEDust intensity map at 545 GHz as a Galactic `DustMap` (MJy/sr, RING), on the
    bundled template."""
    import pysm3.units as u

    from .component import VAEDust

    model = VAEDust(nside=nside, seed=seed, weights=weights, device=device, polarization=False)
    intensity = model.get_emission(FREQ_REF_GHZ * u.GHz)[0].value / MJysr_to_uK_RJ(FREQ_REF_GHZ)
    return DustMap(intensity=intensity, frame="G", nside=nside, source=f"VAEDust nside {nside} seed {seed}",
                   sha256=file_digest(weights), quantity="intensity_MJysr",
                   extra={"weights": str(weights), "seed": seed})


def patch_statistics(patches: np.ndarray, pixel_deg: float, bands) -> dict:
    """Per-patch statistics of patches (N, n, n): cl (N, nb) powers in the ell `bands` ([log
    units]^2 sr), std (N,), v0/v1/v2 (N, 25) of each patch standardised by its own mean and std
    (v1 1/rad, v2 1/sr), wph (N, K), coherence (N,) and coherence_hist (N, 10)."""
    x = np.asarray(patches, dtype=float)
    cl = band_powers(x, pixel_deg, bands)
    std = x.std(axis=(1, 2))
    z = (x - x.mean(axis=(1, 2), keepdims=True)) / std[:, None, None]
    tensor = structure_tensor_statistics(x)
    return {"cl": cl, "std": std, **minkowski_functionals(z, THRESHOLDS_NU, pixel_deg),
            "wph": wph_coefficients(x)[0], "coherence": tensor["coherence"], "coherence_hist": tensor["coherence_hist"]}


def _class_comparison(real: dict, model: dict, patches: np.ndarray, n_boot: int, seed: int) -> dict:
    """One model's statistics of one class against the real class's (dicts of `patch_statistics`)."""
    bands = {k: band(real[k], n_boot, seed) for k in ("v0", "v1", "v2", "wph", "coherence_hist")}
    inside_mf = [inside_fraction(model[k].mean(0), bands[k]) for k in ("v0", "v1", "v2")]
    return {"band_power": ratio_summary(model["cl"] / real["cl"]),
            "std_median_ratio": float(np.median(model["std"] / real["std"])),
            "patch_moments": per_patch_moments(patches, n_boot, seed),
            "inside_fraction": {"v0": inside_mf[0], "v1": inside_mf[1], "v2": inside_mf[2],
                                "minkowski": float(np.mean(inside_mf)),
                                "wph": inside_fraction(model["wph"].mean(0), bands["wph"]),
                                "coherence_hist": inside_fraction(model["coherence_hist"].mean(0), bands["coherence_hist"],
                                                                  bands["coherence_hist"]["mean"] > 0)},
            "coherence_mean": float(model["coherence"].mean())}


def compare(real: DustMap, sim: DustMap, lon_deg, lat_deg, geometry: PatchGeometry, template_fwhm_deg: float,
            real_fwhm_arcmin: float, sim_fwhm_arcmin: float, n_boot: int = 200, seed: int = 0) -> tuple[dict, dict]:
    """Compare `sim` with `real` at the patch centres (lon, lat) (Galactic degrees, (N,) each).

    Beams: nominal FWHM of each map, arcmin; both sets are smoothed to the larger. Returns
    (metrics dict, JSON-able after `validate.jsonable`; images {class: {"real", "vaedust",
    "d11_like": (n, n), "lonlat_deg", "intensity_MJysr"}} for the figure). ValueError when the
    patch is too small for the WPH scales, no ell band is resolved, or fewer than MIN_PATCHES
    patches hold data in both maps."""
    lon, lat = np.atleast_1d(np.asarray(lon_deg, dtype=float)), np.atleast_1d(np.asarray(lat_deg, dtype=float))
    if max_wph_scales(geometry.npix) < 2:
        raise ValueError(f"patches of {geometry.npix} px: the wavelet phase harmonics need 2 scales, 2^(J+2) <= npix, "
                         "so npix >= 16")
    pixel_deg = geometry.pixel_size_deg
    fundamental, nyquist = 360.0 / geometry.size_deg, 180.0 / pixel_deg
    bands = resolved_bands(BANDS, geometry.npix, pixel_deg)
    if not bands:
        raise ValueError(f"no ell band of {BANDS} lies inside the patch's ell {fundamental:.0f}..{nyquist:.0f} "
                         f"({geometry.npix} px over {geometry.size_deg} deg)")
    tic = time.time()
    real_cut = cut_patches(real, lon, lat, geometry, template_fwhm_deg)
    sim_cut = cut_patches(sim, lon, lat, geometry, template_fwhm_deg)
    keep = real_cut.usable & sim_cut.usable
    if keep.sum() < MIN_PATCHES:
        raise ValueError(f"{int(keep.sum())} of {len(lon)} patch centres hold data in both {real.source!r} "
                         f"({int(real_cut.usable.sum())} usable) and {sim.source!r} ({int(sim_cut.usable.sum())} "
                         f"usable): expected at least {MIN_PATCHES}; the region lies on missing data")
    common = max(real_fwhm_arcmin, sim_fwhm_arcmin)
    pixel_arcmin = 60 * pixel_deg
    fields = {"real": smooth_patches(real_cut.small_scales[keep], np.sqrt(common**2 - real_fwhm_arcmin**2), pixel_arcmin),
              "vaedust": smooth_patches(sim_cut.small_scales[keep], np.sqrt(common**2 - sim_fwhm_arcmin**2), pixel_arcmin)}
    fields["d11_like"] = own_spectrum_gaussian(fields["real"], np.random.default_rng(seed))[:, 0]
    cut_s = time.time() - tic
    stats = {name: patch_statistics(x, pixel_deg, bands) for name, x in fields.items()}

    level = real_cut.level[keep]
    rank = np.empty(len(level), dtype=int)
    rank[np.argsort(level, kind="stable")] = np.arange(len(level))
    label = rank * len(CLASSES) // len(level)
    classes = {}
    images = {}
    for k, name in enumerate(CLASSES + ("all",)):
        sel = label == k if name != "all" else np.ones(len(level), bool)
        sub = {key: {s: v[sel] for s, v in st.items()} for key, st in stats.items()}
        classes[name] = {"count": int(sel.sum()),
                         "intensity_range_MJysr": [float(level[sel].min()), float(level[sel].max())],
                         "real": {"patch_moments": per_patch_moments(fields["real"][sel], n_boot, seed),
                                  "coherence_band": band(sub["real"]["coherence"], n_boot, seed)},
                         **{m: _class_comparison(sub["real"], sub[m], fields[m][sel], n_boot, seed) for m in MODELS}}
        if name != "all":  # the patch at the class's median intensity
            i = np.flatnonzero(sel)[np.argsort(level[sel])[sel.sum() // 2]]
            images[name] = {**{key: x[i] for key, x in fields.items()},
                            "lonlat_deg": (float(lon[keep][i]), float(lat[keep][i])), "intensity_MJysr": float(level[i])}
    labels, _ = wph_labels(max_wph_scales(geometry.npix))
    metrics = {
        "real_map": real.provenance(), "sim_map": sim.provenance(),
        "beams_fwhm_arcmin": {"real": real_fwhm_arcmin, "sim": sim_fwhm_arcmin, "common": common},
        "geometry": {"npix": geometry.npix, "size_deg": geometry.size_deg, "pixel_arcmin": pixel_arcmin},
        "template_fwhm_deg": template_fwhm_deg,
        "counts": {"centres": len(lon), "usable": int(keep.sum()), "missing_real": int(np.sum(~real_cut.usable)),
                   "missing_sim": int(np.sum(~sim_cut.usable))},
        "bands_ell": bands, "ratio_range": RATIO_RANGE, "thresholds_nu": THRESHOLDS_NU, "wph_labels": labels,
        "coherence_edges": COHERENCE_EDGES, "classes": classes,
        "definitions": "classes: terciles of the real patches' mean intensity; band power: per-patch C_l(model) / "
                       "C_l(real) of the ln I contrast in each ell band; inside_fraction: share of MF thresholds "
                       "(patches standardised one by one), WPH coefficients, coherence-histogram bins where the "
                       "model's class mean lies inside the real class's 16-84 % bootstrap band of the mean; "
                       "d11_like: Gaussian field with each real patch's own 2D spectrum",
        "timing_s": {"cutouts_s": cut_s, "statistics_s": time.time() - tic - cut_s},
    }
    return metrics, images


def real_sky_validation(weights, name: str, split: str, sim_nside: int, seed: int, n_boot: int,
                        mosaic_nside: int = 2048, device: str = "cpu", log=print) -> tuple[dict, dict]:
    """The comparison for `weights` (a loaded `Weights`): VAEDust at `sim_nside` (seed)
    against the real map `name` (a HEALPix file or an IRIS plate folder such as 'iris_100um',
    whose mosaic is read at `mosaic_nside`) at the patch centres of the weights' stored `split`,
    in their patch geometry. Returns (metrics, images) as `compare`, plus the VAEDust timing."""
    from .train import load_training_map

    meta = weights.metadata
    lon, lat = split_centres(meta, split, repr(str(weights.path)))
    geometry = PatchGeometry(int(meta["geometry"]["npix"]), float(meta["geometry"]["size_deg"]))
    tic = time.time()
    real = load_training_map(str(name), mosaic_nside=mosaic_nside)
    load_s = time.time() - tic
    sim = vaedust_dust_map(sim_nside, seed, str(weights.path), device)
    sim_s = time.time() - tic - load_s
    log(f"real sky: {real.source} nside {real.nside} ({load_s:.0f} s), VAEDust nside {sim_nside} ({sim_s:.0f} s)")
    metrics, images = compare(real, sim, lon, lat, geometry, float(meta["normalisation"]["template_fwhm_deg"]),
                              REAL_SKY_BEAMS_ARCMIN.get(Path(str(name)).name, pixel_fwhm_arcmin(real.nside)),
                              pixel_fwhm_arcmin(sim_nside), n_boot, seed)
    metrics["split"] = split
    metrics["timing_s"].update({"real_map_s": load_s, "vaedust_map_s": sim_s})
    return metrics, images


def table(m: dict) -> str:
    """Markdown table of the `real_sky` metrics: per class and model, band-power median ratio and
    fraction in RATIO_RANGE per band, and the MF / WPH / coherence inside-band fractions."""
    bands = [f"{lo:.0f}-{hi:.0f}" for lo, hi in m["bands_ell"]]
    lo, hi = m["ratio_range"]
    head = (["class (patches)", "field"] + [f"C_l ratio, ell {b}: median (in {lo:g}-{hi:g})" for b in bands]
            + ["std ratio (median)", "MF in band", "WPH in band", "coherence in band"])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, c in m["classes"].items():
        for model in MODELS:
            s = c[model]
            bp = s["band_power"]
            cells = [f"{name} ({c['count']})", model.replace("_", "-")]
            cells += [f"{r:.2f} ({f:.2f})" for r, f in zip(bp["median_ratio"], bp["fraction_in_range"])]
            inside = s["inside_fraction"]
            cells += [f"{s['std_median_ratio']:.2f}", f"{inside['minkowski']:.2f}", f"{inside['wph']:.2f}",
                      f"{inside['coherence_hist']:.2f}"]
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def make_figure(out: Path, m: dict, images: dict) -> str:
    """Write FIGURE_NAME: per class (rows) the real patch, VAEDust and the d11-like field at the same
    place, one colour scale per row (ln I contrast); returns the file name."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 2.8 * len(images)), layout="constrained")
    axes = fig.subplots(len(images), 3, squeeze=False)
    titles = {"real": "real: " + m["real_map"]["source"].split(" (")[0], "vaedust": m["sim_map"]["source"],
              "d11_like": "d11-like (own spectrum)"}
    for row, (name, img) in zip(axes, images.items()):
        lim = np.percentile(np.abs(img["real"]), 99.5)
        for ax, key in zip(row, titles):
            shown = ax.imshow(img[key], origin="lower", vmin=-lim, vmax=lim, cmap="RdBu_r")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(titles[key], fontsize=9)
        lon, lat = img["lonlat_deg"]
        row[0].set_ylabel(f"{name}\n(l, b) = ({lon:.0f}, {lat:.0f}) deg\nI = {img['intensity_MJysr']:.2f} MJy/sr",
                          fontsize=9)
        fig.colorbar(shown, ax=list(row), shrink=0.8, label="ln I - smooth(ln I)")
    fig.suptitle(f"{m['geometry']['size_deg']:g} deg patches, {m['geometry']['pixel_arcmin']:g}' pixels, "
                 f"common beam {m['beams_fwhm_arcmin']['common']:.1f}'", fontsize=10)
    return save_png(fig, out / FIGURE_NAME)
