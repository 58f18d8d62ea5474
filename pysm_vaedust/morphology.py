"""Stage 9 — morphology: wavelet phase harmonics (pywph) and filament statistics of square patches.

Both take patches (B, n, n) (or one (n, n)), pixel units throughout; rows are y, columns x, and
angles are counter-clockwise from the +x (column) axis, in degrees, as `imshow(origin="lower")`
shows them.

Wavelet phase harmonics (Allys+ 2020, Regaldo-Saint Blancard+ 2021): w_{j,t} = x * psi_{j,t} with
pywph's bump-steerable wavelets, scales j = 0..J-1 (wavelength ~ 2.35 * 2^j px) and L orientations
t * 180 deg / L. The coefficients are computed without periodic boundaries (pywph's pbc=False: the
2^(J-1) px next to each edge are cut) and reduced here, per patch, to orientation averages that do
not depend on the patch's amplitude or mean:

- power_fraction[j]: S11(j) / sum_j S11, S11 = <|w_j|^2> — the shape of the power spectrum;
- modulus_ratio[j]: <|w_j|>^2 / <|w_j|^2> = 1 - S00/S11 — sparsity / intermittency; pi/4 for a
  Gaussian field (Rayleigh-distributed modulus), lower for sparse structure;
- s01[j]: Re S01 / sqrt(S00 S11), S01 = Cov(|w_j|, w_j) — the sign of sparse features; 0 Gauss;
- c01[j1 < j2]: Re Cov(|w_j1|, w_j2) / sqrt(S00(j1) S11(j2)) at the same orientation — phase
  coupling across scales (sharp, aligned structure); 0 Gauss;
- c00[j]: the correlation of |w_{j,t}| and |w_{j,t+1}| (adjacent orientations) minus its Gaussian
  value (pi/4)(2F1(-1/2,-1/2;1;|rho|^2) - 1)/(1 - pi/4), rho the patch's own correlation of w_{j,t}
  and w_{j,t+1} — envelopes shared across orientations (isolated features); 0 Gauss.

The odd reductions (s01, c01: x -> -x flips their sign) vanish for any Gaussian field at any patch
size. The even ones reach their Gaussian values when a patch holds many wavelet footprints: at the
coarsest scale the per-patch ratio is biased by ~(1 - pi/4) / N_eff (N_eff independent footprints
in the cut patch), and at j = 0 the wavelet reaches past Nyquist and aliases, so a Gaussian value
there depends on the spectrum (modulus_ratio 0.74 for white noise; reported as NaN).

Filament statistics: the structure tensor (Gaussian derivatives at `sigma_derivative` px,
integrated over `sigma_integration` px) gives the local coherence (lambda1 - lambda2) /
(lambda1 + lambda2) in [0, 1] and the filament orientation (perpendicular to the mean gradient);
the Hessian at `sigma_ridge` px gives ridge pixels and the lengths of connected ridges.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import ndimage
from scipy.special import hyp2f1

#: the WPH reductions, in the order of `wph_coefficients`' columns.
WPH_GROUPS = ("power_fraction", "modulus_ratio", "s01", "c01", "c00")
#: their values for a Gaussian random field (power_fraction depends on the spectrum: None).
WPH_GAUSSIAN_VALUES = {"power_fraction": None, "modulus_ratio": np.pi / 4, "s01": 0.0, "c01": 0.0, "c00": 0.0}
#: even reductions whose Gaussian value at j = 0 depends on the spectrum (the wavelet aliases there).
ALIASED_AT_J0 = ("modulus_ratio", "c00")
WPH_ORIENTATIONS = 4
#: wavelength of the j = 0 bump-steerable wavelet, px (pywph's central wavenumber 0.85 pi); x 2^j.
WPH_WAVELENGTH_J0_PX = 2 / 0.85
COHERENCE_EDGES = np.linspace(0.0, 1.0, 11)
SIGMA_DERIVATIVE_PX, SIGMA_INTEGRATION_PX, SIGMA_RIDGE_PX = 1.0, 2.0, 1.0
#: ridge pixels: most negative Hessian eigenvalue below -RIDGE_THRESHOLD x the patch's rms eigenvalue.
RIDGE_THRESHOLD = 1.5


def _as_patches(patches) -> np.ndarray:
    x = np.asarray(patches, dtype=float)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[1] != x.shape[2]:
        raise ValueError(f"patches shape {np.shape(patches)}: expected square patches (B, n, n) or (n, n)")
    if not np.all(np.isfinite(x)):
        raise ValueError("patches: expected finite values (no NaN or inf)")
    return x


# ----------------------------------------------------------------------- wavelet phase harmonics
def max_wph_scales(npix: int) -> int:
    """Largest J whose wavelets fit an npix patch: 2^(J+2) <= npix (the coarsest wavelength,
    ~2.35 * 2^(J-1) px, then spans at most 0.4 of what the 2^(J-1) px edge cuts leave)."""
    return int(np.floor(np.log2(npix))) - 2


def _check_wph_geometry(npix: int, J: int, L: int) -> None:
    if int(J) != J or not 2 <= J <= max_wph_scales(npix):
        raise ValueError(f"J={J!r}: {npix}x{npix} patches fit 2 <= J <= {max_wph_scales(npix)} "
                         f"wavelet scales (2^(J+2) <= npix, so npix >= 16)")
    if int(L) != L or L < 2:
        raise ValueError(f"L={L!r}: expected an integer number of orientations >= 2")


@lru_cache(maxsize=8)
def _wph_operator(npix: int, J: int, L: int):
    """(pywph.WPHOp with the moments used here, {moment index tuple: column})."""
    import pywph  # torch-based; imported here so that the rest of the package does without it

    op = pywph.WPHOp(npix, npix, J, L=L, precision="double", device="cpu")
    extra = []  # [j1, t1, p1, j2, t2, p2, n, alpha, pseudo]; p = 0: modulus, p = 1: w itself
    for j in range(J):
        for t in range(L - 1):
            extra += [[j, t, 0, j, t + 1, 0, 0, 0, 0], [j, t, 1, j, t + 1, 1, 0, 0, 0]]
    for j1 in range(J):
        for j2 in range(j1 + 1, J):
            extra += [[j1, t, 0, j2, t, 1, 0, 0, 0] for t in range(L)]
    op.load_model(["S11", "S00", "S01"], extra_wph_moments=extra)
    columns = {tuple(int(v) for v in row): k for k, row in enumerate(op.wph_moments_indices.cpu().numpy())}
    return op, columns


def wph_coefficients(patches, J: int | None = None, L: int = WPH_ORIENTATIONS, batch_size: int = 256):
    """Reduced wavelet-phase-harmonic coefficients of each patch (see the module docstring).

    patches: (B, n, n) or (n, n), any units; J: number of dyadic scales (default the largest that
    fits, `max_wph_scales(n)`); L: orientations in [0, 180) deg. Returns (coefficients (B, K),
    labels (K,) like 'modulus_ratio j=1', gaussian (K,) the Gaussian-field value or NaN), with K =
    4 J + J (J - 1) / 2 in the order of WPH_GROUPS. Raises ValueError when J does not fit n.
    """
    x = _as_patches(patches)
    npix = x.shape[-1]
    J = max_wph_scales(npix) if J is None else J
    _check_wph_geometry(npix, J, L)
    op, col = _wph_operator(npix, int(J), int(L))
    raw = np.concatenate([op.apply(x[s:s + batch_size], norm=None, pbc=False).numpy()
                          for s in range(0, len(x), batch_size)])  # (B, n_moments) complex

    def moment(j1, t1, p1, j2, t2, p2):
        return raw[:, col[(j1, t1, p1, j2, t2, p2, 0, 0, 0)]]

    def per_scale(p1, p2):  # (B, J, L) real part of the same-wavelet moment
        return np.array([[moment(j, t, p1, j, t, p2).real for t in range(L)] for j in range(J)]).transpose(2, 0, 1)

    s11, s00, s01 = per_scale(1, 1), per_scale(0, 0), per_scale(0, 1)
    tiny = np.finfo(float).tiny
    groups = {"power_fraction": s11.mean(2) / s11.mean(2).sum(1, keepdims=True),
              "modulus_ratio": np.mean(1 - s00 / np.maximum(s11, tiny), 2),
              "s01": np.mean(s01 / np.sqrt(np.maximum(s00 * s11, tiny)), 2)}
    pairs = [(j1, j2) for j1 in range(J) for j2 in range(j1 + 1, J)]
    groups["c01"] = np.stack([np.mean([moment(j1, t, 0, j2, t, 1).real
                                       / np.sqrt(np.maximum(s00[:, j1, t] * s11[:, j2, t], tiny))
                                       for t in range(L)], 0) for j1, j2 in pairs], 1)
    c00 = []
    for j in range(J):
        excess = []
        for t in range(L - 1):
            norm00, norm11 = (np.sqrt(np.maximum(s[:, j, t] * s[:, j, t + 1], tiny)) for s in (s00, s11))
            rho2 = np.minimum(np.abs(moment(j, t, 1, j, t + 1, 1)) ** 2 / norm11**2, 1.0)
            gauss = (np.pi / 4) * (hyp2f1(-0.5, -0.5, 1.0, rho2) - 1) / (1 - np.pi / 4)
            excess.append(moment(j, t, 0, j, t + 1, 0).real / norm00 - gauss)
        c00.append(np.mean(excess, 0))
    groups["c00"] = np.stack(c00, 1)

    return (np.concatenate([groups[g] for g in WPH_GROUPS], 1), *wph_labels(J))


def wph_labels(J: int) -> tuple[list[str], np.ndarray]:
    """(labels (K,), Gaussian-field values (K,), NaN where spectrum-dependent) of the columns of
    `wph_coefficients` with J scales."""
    labels = [f"{g} j={j}" for g in ("power_fraction", "modulus_ratio", "s01") for j in range(J)]
    labels += [f"c01 j={j1},{j2}" for j1 in range(J) for j2 in range(j1 + 1, J)] + [f"c00 j={j}" for j in range(J)]
    gaussian = np.array([WPH_GAUSSIAN_VALUES[label.split()[0]] for label in labels], dtype=float)  # None -> NaN
    gaussian[[labels.index(f"{g} j=0") for g in ALIASED_AT_J0]] = np.nan
    return labels, gaussian


# -------------------------------------------------------------------------- filament statistics
def _derivatives(x: np.ndarray, sigma: float, orders) -> list[np.ndarray]:
    """Gaussian derivatives d^(oy+ox) / dy^oy dx^ox of patches (B, n, n) at `sigma` px, each (B, n, n)."""
    return [ndimage.gaussian_filter(x, (0, sigma, sigma), order=(0, oy, ox), mode="reflect") for oy, ox in orders]


def _interior(a: np.ndarray, border: int) -> np.ndarray:
    return a[:, border:a.shape[1] - border, border:a.shape[2] - border]


def structure_tensor_statistics(patches, sigma_derivative: float = SIGMA_DERIVATIVE_PX,
                                sigma_integration: float = SIGMA_INTEGRATION_PX) -> dict:
    """Orientation statistics of patches (B, n, n) from the structure tensor.

    Gradients are Gaussian derivatives at `sigma_derivative` px; the tensor g g^T is smoothed by a
    Gaussian of `sigma_integration` px. Pixels within ceil(3 sigma_derivative + sigma_integration)
    of the edge are left out. Returns, each over the remaining pixels:
    coherence (B,): local (lambda1 - lambda2) / (lambda1 + lambda2) weighted by the gradient energy
    lambda1 + lambda2 (1: one orientation locally, ~0: isotropic);
    coherence_hist (B, 10): its energy-weighted density on COHERENCE_EDGES;
    orientation_deg (B,): dominant filament orientation in [0, 180), perpendicular to the mean
    gradient (of the patch-summed tensor); global_coherence (B,): that tensor's coherence.
    """
    x = _as_patches(patches)
    border = int(np.ceil(3 * sigma_derivative + sigma_integration))
    if x.shape[-1] <= 2 * border + 1:
        raise ValueError(f"patches of {x.shape[-1]} px: sigma_derivative={sigma_derivative}, sigma_integration="
                         f"{sigma_integration} leave no interior (needs > {2 * border + 1} px)")
    gy, gx = _derivatives(x, sigma_derivative, ((1, 0), (0, 1)))
    jxx, jyy, jxy = (_interior(ndimage.gaussian_filter(g, (0, sigma_integration, sigma_integration), mode="reflect"),
                               border) for g in (gx * gx, gy * gy, gx * gy))
    energy = jxx + jyy
    anisotropy = np.hypot(jxx - jyy, 2 * jxy)  # lambda1 - lambda2
    local = np.divide(anisotropy, energy, out=np.zeros_like(energy), where=energy > 0)
    weight = energy.reshape(len(x), -1)
    total = np.maximum(weight.sum(1), np.finfo(float).tiny)
    index = np.clip(np.searchsorted(COHERENCE_EDGES, local.reshape(len(x), -1), side="right") - 1,
                    0, len(COHERENCE_EDGES) - 2)
    hist = np.stack([np.bincount(i, w, minlength=len(COHERENCE_EDGES) - 1) for i, w in zip(index, weight)])
    sxx, syy, sxy = (a.sum((1, 2)) for a in (jxx, jyy, jxy))
    gradient_deg = 0.5 * np.degrees(np.arctan2(2 * sxy, sxx - syy))
    return {"coherence": anisotropy.sum((1, 2)) / total,
            "coherence_hist": hist / total[:, None] / np.diff(COHERENCE_EDGES),
            "orientation_deg": np.mod(gradient_deg + 90.0, 180.0),
            "global_coherence": np.hypot(sxx - syy, 2 * sxy) / np.maximum(sxx + syy, np.finfo(float).tiny)}


def ridge_length_edges(npix: int) -> np.ndarray:
    """Ridge-length bin edges in px: 1, 2, 4, ... up to npix, the last bin open (inf)."""
    return np.append(2.0 ** np.arange(0, int(np.log2(npix)) + 1)[:-1], np.inf)


def ridge_statistics(patches, sigma_ridge: float = SIGMA_RIDGE_PX, threshold: float = RIDGE_THRESHOLD) -> dict:
    """Hessian ridge statistics of patches (B, n, n) (bright filaments).

    H = sigma_ridge^2 (Gaussian second derivatives at `sigma_ridge` px), eigenvalues l1 <= l2. Ridge
    pixels: l1 < -threshold * s, s the rms eigenvalue sqrt(mean(l1^2 + l2^2) / 2) of the patch
    (amplitude-free), and elongated, l2 > l1 / 2 (blobs, l2 ~ l1, are not ridges); pixels within
    ceil(3 sigma_ridge) of the edge are left out. Ridges are 8-connected components of ridge pixels;
    a ridge's length is sqrt(12 var_major + 1) px, var_major its pixels' variance along their major
    axis (k px for a straight 1-px line of k pixels). Returns ridge_fraction (B,): share of pixels
    on ridges; ridge_length_fraction (B, nbins): share of pixels on ridges of each length bin
    (`ridge_length_edges`); median_ridge_length_px (B,): pixel-weighted median length (NaN: none).
    """
    x = _as_patches(patches)
    border = int(np.ceil(3 * sigma_ridge))
    if x.shape[-1] <= 2 * border + 1:
        raise ValueError(f"patches of {x.shape[-1]} px: sigma_ridge={sigma_ridge} leaves no interior")
    hyy, hxx, hxy = (_interior(sigma_ridge**2 * h, border)
                     for h in _derivatives(x, sigma_ridge, ((2, 0), (0, 2), (1, 1))))
    half_trace, radius = (hxx + hyy) / 2, np.hypot((hxx - hyy) / 2, hxy)
    low, high = half_trace - radius, half_trace + radius
    scatter = np.sqrt(np.mean(low**2 + high**2, axis=(1, 2), keepdims=True) / 2)
    ridge = (low < -threshold * scatter) & (high > low / 2)
    edges = ridge_length_edges(x.shape[-1])
    length_fraction = np.zeros((len(x), len(edges) - 1))
    median = np.full(len(x), np.nan)
    for b, mask in enumerate(ridge):
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        if count == 0:
            continue
        iy, ix = np.nonzero(labels)
        lab = labels[iy, ix] - 1
        size = np.bincount(lab, minlength=count)
        my, mx = np.bincount(lab, iy, count) / size, np.bincount(lab, ix, count) / size
        vyy = np.bincount(lab, iy * iy, count) / size - my**2
        vxx = np.bincount(lab, ix * ix, count) / size - mx**2
        vxy = np.bincount(lab, iy * ix, count) / size - my * mx
        major = (vxx + vyy) / 2 + np.hypot((vxx - vyy) / 2, vxy)
        length = np.sqrt(12 * np.maximum(major, 0) + 1)
        length_fraction[b] = np.bincount(np.searchsorted(edges, length, side="right") - 1, size,
                                         len(edges) - 1) / mask.size
        order = np.argsort(length)
        median[b] = length[order][np.searchsorted(np.cumsum(size[order]), size.sum() / 2)]
    return {"ridge_fraction": ridge.mean((1, 2)), "ridge_length_fraction": length_fraction,
            "median_ridge_length_px": median}
