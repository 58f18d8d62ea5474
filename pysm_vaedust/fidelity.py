"""Stage 9 — fidelity statistics: how a set of small-scale patches compares with real ones.

Plain functions on numpy arrays (no model, no files); `validate` and `realsky` build on them.
Patches are square, (N, n, n), any units unless stated; flat-sky ell of pixels of
`pixel_deg` degrees; spectra in [patch units]^2 sr (`statistics.flat_power_spectrum`).

- per-patch band powers and their sample/real ratios (local amplitude);
- Gaussian fields with a given 2D spectrum: the train split's, or each patch's own (what PySM
  d11 amounts to at best);
- set statistics with bootstrap bands (power spectrum, Minkowski functionals, wavelet phase
  harmonics, filament statistics) and the share of a set's values inside another's band;
- the windowed Fourier modes of patches and of their conditions, the per-radial-bin Wiener
  (linear-Gaussian) prediction of x from c, and the variance it and the VAE's conditional mean
  explain;
- reconstruction residual spectra and the ell where they first reach a level.
"""

from __future__ import annotations

import numpy as np

from .morphology import ridge_statistics, structure_tensor_statistics, wph_coefficients
from .statistics import apodization_window, bootstrap_band, flat_power_spectrum, minkowski_functionals

#: MF thresholds, in units of each set's pixel standard deviation about its mean.
THRESHOLDS_NU = np.linspace(-3.0, 3.0, 25)
#: per-patch band-power ratios counted as right.
RATIO_RANGE = (0.7, 1.4)
#: residual-power level whose first crossing is reported.
RESIDUAL_LEVEL = 0.1
#: per-patch filament statistics given bootstrap bands (orientation and median length are not averaged).
FILAMENT_KEYS = ("coherence", "global_coherence", "coherence_hist", "ridge_fraction", "ridge_length_fraction")
FILAMENT_HISTOGRAMS = ("coherence_hist", "ridge_length_fraction")  # compared where the reference is > 0
_FWHM_PER_SIGMA = np.sqrt(8 * np.log(2))


# ------------------------------------------------------------------------------ amplitude
def resolved_bands(bands, npix: int, pixel_deg: float) -> list[tuple[float, float]]:
    """The ell bands (lo, hi) inside a patch's [fundamental, Nyquist]."""
    fundamental, nyquist = 360.0 / (npix * pixel_deg), 180.0 / pixel_deg
    return [(float(lo), float(hi)) for lo, hi in bands if lo >= fundamental and hi <= nyquist]


def band_powers(patches, pixel_deg: float, bands) -> np.ndarray:
    """(..., nb) flat-sky band powers of patches (..., n, n) in the ell bands [(lo, hi)] (bins
    between bands are dropped)."""
    edges = np.unique(np.asarray(bands, dtype=float))
    _, cl = flat_power_spectrum(patches, pixel_deg, edges)
    return cl[..., np.searchsorted(edges, [lo for lo, _ in bands])]


def ratio_summary(ratio) -> dict:
    """Median, fraction inside RATIO_RANGE and 16/84 percentiles over axis 0 of ratios (M, nb)."""
    ratio = np.asarray(ratio, dtype=float)
    return {"median_ratio": np.median(ratio, axis=0),
            "fraction_in_range": np.mean((ratio >= RATIO_RANGE[0]) & (ratio <= RATIO_RANGE[1]), axis=0),
            "ratio_percentiles_16_84": np.percentile(ratio, [16, 84], axis=0)}


def amplitude_rows(pixel_deg: float, bands, real: dict, samples: dict) -> tuple[dict, dict]:
    """Per-patch band-power ratios of sample sets {name: (N, D, n, n)} to the real patches
    {name: (N, n, n)} of the same name (or of 'split' when absent). Returns ({name:
    ratio_summary}, {name: ratios (N D, nb)})."""
    ratios = {}
    for name, s in samples.items():
        ref = band_powers(real.get(name, real["split"]), pixel_deg, bands)
        ratios[name] = (band_powers(s, pixel_deg, bands) / ref[:, None]).reshape(-1, len(bands))
    return {name: ratio_summary(r) for name, r in ratios.items()}, ratios


def smooth_patches(patches, fwhm_arcmin: float, pixel_arcmin: float) -> np.ndarray:
    """Patches (..., n, n) convolved with a Gaussian of `fwhm_arcmin` (Fourier space, after a
    reflecting pad of n/2 on each side, so sub-pixel beams act and the edges do not wrap)."""
    x = np.asarray(patches, dtype=float)
    if fwhm_arcmin <= 0:
        return x
    n = x.shape[-1]
    pad = n // 2
    padded = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(pad, pad), (pad, pad)], mode="reflect")
    k = 2 * np.pi * np.fft.fftfreq(padded.shape[-1])  # radians per pixel
    sigma_px = fwhm_arcmin / _FWHM_PER_SIGMA / pixel_arcmin
    beam = np.exp(-0.5 * sigma_px**2 * (k[:, None] ** 2 + k[None, :] ** 2))
    return np.fft.ifft2(np.fft.fft2(padded) * beam).real[..., pad:pad + n, pad:pad + n]


# ------------------------------------------------------------------------ Gaussian fields
def gaussian_power_2d(patches: np.ndarray, window: np.ndarray | None = None, iterations: int = 100,
                      each: bool = False) -> np.ndarray:
    """(n, n) per-mode variance P (orthonormal FFT) of a periodic Gaussian field with the same mean
    power spectrum as patches (N, n, n), as `flat_power_spectrum` measures it with `window`
    (default: its cosine taper); with `each`, (N, n, n): one P per patch, its own spectrum.

    The patches' mean windowed |FFT|^2 (per-patch mean removed, / mean(window^2)) is the field's P
    circularly convolved with the window's kernel |FFT(window)|^2; P is recovered by
    Richardson-Lucy deconvolution (non-negative). Using the raw |FFT|^2 instead would turn the
    patch-edge discontinuities into high-ell power (+17 % at Nyquist on the training data).
    P[0, 0] holds the scatter of the patch means about the set's mean pixel value (0 with `each`).
    """
    x = np.asarray(patches, dtype=float)
    n = x.shape[-1]
    w = apodization_window(n, n / 8) if window is None else np.asarray(window, dtype=float)
    norm = np.mean(w**2)
    target = np.abs(np.fft.fft2((x - x.mean(axis=(-2, -1), keepdims=True)) * w, norm="ortho")) ** 2 / norm
    if not each:
        target = target.mean(axis=0)
    kernel = np.fft.rfft2(np.abs(np.fft.fft2(w, norm="ortho")) ** 2 / (n * n * norm))  # symmetric, sums to 1

    def blur(p):
        return np.fft.irfft2(np.fft.rfft2(p) * kernel, s=(n, n))

    power = target.copy()
    for _ in range(iterations):
        power *= blur(target / np.maximum(blur(power), 1e-300))
    power[..., 0, 0] = 0.0 if each else np.mean(np.abs(np.fft.fft2(x - x.mean(), norm="ortho")[:, 0, 0]) ** 2)
    return power


def gaussian_baseline(power_2d: np.ndarray, n: int, rng: np.random.Generator, mean=0.0) -> np.ndarray:
    """(n, ..., npix, npix) periodic Gaussian random fields with per-mode variance `power_2d`
    (..., npix, npix) (orthonormal FFT, e.g. from `gaussian_power_2d`) plus `mean` (broadcast):
    white noise coloured in Fourier space."""
    power_2d = np.asarray(power_2d, dtype=float)
    white = rng.standard_normal((int(n),) + power_2d.shape)
    coloured = np.fft.ifft2(np.fft.fft2(white, norm="ortho") * np.sqrt(power_2d), norm="ortho")
    return coloured.real + mean


def own_spectrum_gaussian(patches: np.ndarray, rng: np.random.Generator, draws: int = 1) -> np.ndarray:
    """(N, draws, n, n) Gaussian fields, each with its own patch's 2D power spectrum
    (`gaussian_power_2d(..., each=True)`) and mean: the best case of a Gaussian small-scale model
    such as PySM d11, whose modulation aims at the right local amplitude (d11's modulation inside a
    patch is left out)."""
    x = np.asarray(patches, dtype=float)
    fields = gaussian_baseline(gaussian_power_2d(x, each=True), draws, rng, x.mean(axis=(-2, -1))[:, None, None])
    return np.moveaxis(fields, 0, 1)


# ------------------------------------------------------------------------ set statistics
def band(samples, n_boot: int, seed: int) -> dict:
    """{"mean", "lo", "hi"}: the mean over axis 0 and its 16-84 % bootstrap band."""
    mean, lo, hi = bootstrap_band(samples, n_boot=n_boot, seed=seed)
    return {"mean": mean, "lo": lo, "hi": hi}


def inside_fraction(values, reference: dict, mask=None) -> float:
    """Share of `values` inside the reference band (dict of `band`), where `mask` (default all)."""
    inside = (values >= reference["lo"]) & (values <= reference["hi"])
    if mask is not None:
        inside = inside[mask]
    return float(np.mean(inside)) if inside.size else float("nan")


def per_patch_moments(patches: np.ndarray, n_boot: int = 200, seed: int = 0, q=(16, 84)) -> dict:
    """Statistics of the patches one by one (N, n, n), with bootstrap (over patches) bands `q`:
    rms_cv — the patch-to-patch spread of the small-scale amplitude, std / mean of the per-patch
    rms; skewness_mean — mean within-patch skewness; kurtosis_median — median within-patch excess
    kurtosis."""
    x = np.asarray(patches, dtype=float).reshape(len(patches), -1)
    c = x - x.mean(1, keepdims=True)
    var = np.mean(c**2, 1)
    rms, skew, kurt = np.sqrt(var), np.mean(c**3, 1) / var**1.5, np.mean(c**4, 1) / var**2 - 3
    boot = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))

    def entry(values, func):
        return {"value": float(func(values)), "band": np.percentile([func(values[b]) for b in boot], q)}

    return {"rms_cv": entry(rms, lambda v: v.std() / v.mean()), "skewness_mean": entry(skew, np.mean),
            "kurtosis_median": entry(kurt, np.median)}


def set_statistics(patches: np.ndarray, pixel_deg: float, ell_edges, n_boot: int, seed: int) -> dict:
    """Bootstrap bands of the binned power spectrum, the Minkowski functionals (thresholds
    THRESHOLDS_NU x the set's pixel std), the WPH coefficients and the filament statistics of one
    set of patches (N, n, n), and its per-patch moments."""
    x = np.asarray(patches, dtype=float)
    ell, cl = flat_power_spectrum(x, pixel_deg, ell_edges)
    mfs = minkowski_functionals(x - x.mean(), THRESHOLDS_NU * x.std(), pixel_deg)
    filaments = {**structure_tensor_statistics(x), **ridge_statistics(x)}
    return {"ell": ell, "count": len(x), "cl": band(cl, n_boot, seed),
            "minkowski": {k: band(v, n_boot, seed) for k, v in mfs.items()},
            "wph": band(wph_coefficients(x)[0], n_boot, seed),
            "filaments": {k: band(filaments[k], n_boot, seed) for k in FILAMENT_KEYS},
            "patch_moments": per_patch_moments(x, n_boot, seed)}


def inside_fractions(other: dict, reference: dict) -> dict:
    """Share of MF thresholds (v0, v1, v2), WPH coefficients and filament-statistic bins where the
    mean of `other` lies inside the bootstrap band of `reference` (both from `set_statistics`);
    histograms are compared where the reference is > 0."""
    out = {k: inside_fraction(other["minkowski"][k]["mean"], reference["minkowski"][k]) for k in ("v0", "v1", "v2")}
    out["wph"] = inside_fraction(other["wph"]["mean"], reference["wph"])
    for k in FILAMENT_KEYS:
        ref = reference["filaments"][k]
        out[k] = inside_fraction(other["filaments"][k]["mean"], ref, ref["mean"] > 0 if k in FILAMENT_HISTOGRAMS else None)
    return out


# --------------------------------------------------------------- conditional prediction
def modes(patches, window: bool = True) -> np.ndarray:
    """(..., n, n) complex FFT of patches (..., n, n) minus their means, times (`window`) the cosine
    taper of `flat_power_spectrum` (apodization_window(n, n / 8))."""
    x = np.asarray(patches, dtype=float)
    x = x - x.mean(axis=(-2, -1), keepdims=True)
    return np.fft.fft2(x * apodization_window(x.shape[-1], x.shape[-1] / 8) if window else x)


def windowed_modes(patches) -> np.ndarray:
    """`modes` with the taper: the Fourier modes every prediction is scored on."""
    return modes(patches, window=True)


def mirrored(patches) -> np.ndarray:
    """(..., 2n, 2n) even (mirror) extension of patches (..., n, n): periodic without edge jumps."""
    x = np.asarray(patches, dtype=float)
    row = np.concatenate([x, x[..., ::-1]], -1)
    return np.concatenate([row, row[..., ::-1, :]], -2)


def condition_modes(structure, npix: int, window: bool = True) -> np.ndarray:
    """(N, npix, npix) complex: the modes (`modes`) of conditions (N, m, m) on the half-resolution
    grid (m = npix / 2; condition pixel j is centred between patch pixels 2j and 2j + 1) at the
    same wavenumbers of the patch grid, the half-pixel offset applied as a phase; modes at or
    beyond the condition grid's Nyquist are 0."""
    small = modes(structure, window)
    m = small.shape[-1]
    if 2 * m != npix:
        raise ValueError(f"conditions of {m} px: expected npix / 2 = {npix // 2}")
    k = np.fft.fftfreq(m, d=1.0 / m).round().astype(int)
    keep = np.flatnonzero(np.abs(k) < m // 2)
    phase = np.exp(-1j * np.pi * k[keep] / npix)
    out = np.zeros(small.shape[:-2] + (npix, npix), dtype=complex)
    rows, cols = np.ix_(k[keep] % npix, k[keep] % npix)
    out[..., rows, cols] = small[..., keep[:, None], keep[None, :]] * phase[:, None] * phase[None, :]
    return out


def radial_index(npix: int) -> np.ndarray:
    """(npix, npix) int: rounded |k| of each FFT mode, in patch fundamentals."""
    k = np.fft.fftfreq(npix, d=1.0 / npix)
    return np.hypot(k[:, None], k[None, :]).round().astype(int)


def wiener_filter(x, structure, chunk: int = 256) -> np.ndarray:
    """(kmax + 1,) real regression coefficient of patches x (N, n, n) on the structure channel of
    their conditions (N, n/2, n/2) per rounded |k| of the mirrored 2n grid (`mirrored`, so that
    the filter acts like a convolution, without edge jumps): sum Re(X C*) / sum |C|^2 over all
    patches; 0 where c has no power. The best linear (Gaussian) prediction of x from c."""
    n = x.shape[-1]
    index = radial_index(2 * n).ravel()
    cross, power = 0.0, 0.0
    for s in range(0, len(x), chunk):
        X = modes(mirrored(x[s:s + chunk]), window=False)
        C = condition_modes(mirrored(structure[s:s + chunk]), 2 * n, window=False)
        cross = cross + np.bincount(index, (X * C.conj()).real.sum(0).ravel())
        power = power + np.bincount(index, (np.abs(C) ** 2).sum(0).ravel())
    return np.divide(cross, power, out=np.zeros_like(cross), where=power > 0)


def wiener_prediction(coefficients: np.ndarray, structure) -> np.ndarray:
    """(N, n, n) linear prediction of the patches from their conditions' structure (N, n/2, n/2)
    with `wiener_filter` coefficients."""
    m = structure.shape[-1]
    C = condition_modes(mirrored(structure), 4 * m, window=False)
    return np.fft.ifft2(coefficients[radial_index(4 * m)] * C).real[..., :2 * m, :2 * m]


def explained_by_bin(x_modes, prediction_modes) -> tuple[np.ndarray, np.ndarray]:
    """(sum |X - P|^2, sum |X|^2) per rounded |k| over patches (N, n, n), each (kmax + 1,)."""
    index = radial_index(x_modes.shape[-1]).ravel()
    error = np.bincount(index, (np.abs(x_modes - prediction_modes) ** 2).sum(0).ravel())
    return error, np.bincount(index, (np.abs(x_modes) ** 2).sum(0).ravel())


def fraction_explained(x_modes, prediction_modes, pixel_deg: float, ell_range) -> float:
    """1 - MSE / variance of a prediction of patches, both as windowed modes (N, n, n), over the
    modes with ell in [lo, hi): the share of that band's variance the prediction explains."""
    n = x_modes.shape[-1]
    k = np.fft.fftfreq(n, d=1.0 / n)
    ell = 360.0 / (n * pixel_deg) * np.hypot(k[:, None], k[None, :])
    sel = (ell >= ell_range[0]) & (ell < ell_range[1])
    error = np.sum(np.abs(x_modes[:, sel] - prediction_modes[:, sel]) ** 2)
    return float(1 - error / np.sum(np.abs(x_modes[:, sel]) ** 2))


def conditional_structure(x_train, c_train, x_split, c_split, mean_split, pixel_deg: float, octave) -> dict:
    """Variance of x in the `octave` (ell [lo, hi)) explained by the VAE's conditional mean and by
    the Wiener prediction from c's structure channel (`wiener_filter` fitted on the train split),
    both scored on the windowed modes of the split, in total and per rounded |k|. Patches
    (N, n, n), conditions (N, 2, n/2, n/2)."""
    n = x_split.shape[-1]
    coefficients = wiener_filter(x_train, c_train[:, 0])
    x_modes = windowed_modes(x_split)
    predictions = {"vae_conditional_mean": windowed_modes(mean_split),
                   "wiener": windowed_modes(wiener_prediction(coefficients, c_split[:, 0]))}
    ell = 360.0 / (n * pixel_deg) * np.arange(radial_index(n).max() + 1)
    out = {"octave_ell": list(octave), "fraction_explained": {}, "per_bin": {}}
    for key, p in predictions.items():
        error, var = explained_by_bin(x_modes, p)
        keep = (var > 0) & (ell > 0)
        out["fraction_explained"][key] = fraction_explained(x_modes, p, pixel_deg, octave)
        out["per_bin"][key] = 1 - error[keep] / var[keep]
    out["per_bin"]["ell"] = ell[keep]
    out["wiener_filter"] = {"ell": 180.0 / (n * pixel_deg) * np.arange(len(coefficients)), "coefficient": coefficients}
    out["definition"] = ("1 - sum |X - P|^2 / sum |X|^2 over the windowed Fourier modes of the split's patches with "
                         "ell in the octave; Wiener: P = the patches predicted by a(|k|) C on the mirrored patches, "
                         "a fitted by least squares per rounded |k| on the train split, C the modes of c's "
                         "structure channel placed on the patch grid")
    return out


# ---------------------------------------------------------------------- reconstructions
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


def residual_spectra(x: np.ndarray, reconstruction: np.ndarray, pixel_deg: float, ell_edges) -> dict:
    """Mean spectra of patches x (N, n, n), of <x, x - x_rec> and of x - x_rec, the cross and auto
    ratios to C_l(x) and the ell where each first reaches RESIDUAL_LEVEL."""
    residual = x - reconstruction
    ell, cl_x = flat_power_spectrum(x, pixel_deg, ell_edges)
    _, cl_cross = flat_power_spectrum(x, pixel_deg, ell_edges, other=residual)
    _, cl_res = flat_power_spectrum(residual, pixel_deg, ell_edges)
    cross, auto = cl_cross.mean(0) / cl_x.mean(0), cl_res.mean(0) / cl_x.mean(0)
    return {"ell": ell, "cl_input": cl_x.mean(0), "cl_cross_residual": cl_cross.mean(0),
            "cl_residual": cl_res.mean(0), "cross_ratio": cross, "auto_ratio": auto, "level": RESIDUAL_LEVEL,
            "ell_cross_crosses_level": first_crossing(ell, cross), "ell_auto_crosses_level": first_crossing(ell, auto),
            "mse": float(np.mean(residual**2)), "input_variance": float(x.var())}
