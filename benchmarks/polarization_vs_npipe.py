"""The product's polarized dust at 353 GHz, made as a user makes it, against Planck NPIPE (issue 23).

Per seed `pysm3.Sky(nside, component_objects=[VAEDust(nside, seed)]).get_emission(353 GHz)` (uK_RJ ->
uK_CMB; the call timed), beside PySM's d1 (the shared nside-64 file, its alm to l = 191).
- Small fields, the PySM methods paper's estimator (rwogburn/smallfield): the 176 northern 400 deg^2
  fields of `planck_npipe353_spectra/npipe353_smallfield_400deg2_north.txt`; mask 1 - exp(-x^2/2),
  x = (11.3 - r) / 2.0 * 2.355 (r deg from the nside-8 pixel centre) at nside 512; the map ud_graded
  to 512 and smoothed by Planck's 4.82' beam; per field T, Q, U minus their mean where mask > 0,
  times the mask, anafast (lmax 370) / w2; D_l averaged in bins [40, 70, 110, 160, 220, 290, 370),
  "low" = bins 0-1, "high" = 2-5. Lensed LCDM (CAMB, Planck 2018, same beam and bins) is added to
  both models' EE and BB (NPIPE holds the CMB). Per spectrum and band: median of (model + CMB) /
  NPIPE and correlation of their logs over fields with NPIPE > 3 sigma (the file's variances); the
  paper's linear Pearson over fields with NPIPE low and high > 0.
- |b| > 30 (5 deg smoothstep): pseudo-C_l TT EE BB TE of the masked map at its own nside (anafast
  iter 1, / mean mask^2; the nside/2 shortcut would not be cheaper): BB/EE and r_TE in bins, slopes
  alpha_EE, alpha_BB over l 40-600, EE and BB over that law in Delta ln l = 0.4 bands to 1.5 nside.
  A pseudo-C_l leaks E into B: the BB/EE of an E-only Gaussian field with the fitted EE law on the
  same mask is given beside it, and NaMaster's purified B when `pymaster` imports (both at nside
  min(nside, 512); NaMaster's map from the map's alm tapered from 1 to 1.5 x that nside).
- P / I of the map smoothed to 1 deg: share of |b| > 15 with P / I <= 0.25, median at |b| > 30.

    python benchmarks/polarization_vs_npipe.py --nside 2048 --seeds 0 1 \
        --json benchmarks/polarization_vs_npipe.json --figure docs/figures/polarization_vs_npipe.png \
        --spectra-figure docs/figures/polarization_spectra.png --zoom-figure docs/figures/polarization_zoom.png
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
import warnings
from pathlib import Path

import healpy as hp
import numpy as np
import pysm3
import pysm3.units as u

from pysm_vaedust import VAEDust
from pysm_vaedust.data import atomic_write, gaussian_beam, shared_data_dir, smoothstep
from pysm_vaedust.mapcheck import band_mean, log_bands
from pysm_vaedust.polarization import ALPHA_BB, ALPHA_EE, unit_alm

FIELD_FILE = "planck_npipe353_spectra/npipe353_smallfield_400deg2_north.txt"
D1_FILE = "pysm_d1_353GHz_IQU_nside64.fits"
FIELD_NSIDE, FIELD_RADIUS_DEG, FIELD_TAPER_DEG, BEAM_ARCMIN = 512, 11.3, 2.0, 4.82
FIELD_BINS = np.array([40, 70, 110, 160, 220, 290, 370])
BANDS = {"low": [0, 1], "high": [2, 3, 4, 5]}
#: anafast's iterations in the fields (healpy's default 3 changes the binned D_l by < 2e-4, 7x slower)
FIELD_ITER, D1_LMAX, CMB_LMAX = 0, 191, 600
PLANCK2018 = {"H0": 67.36, "ombh2": 0.02237, "omch2": 0.1200, "tau": 0.0544, "As": 2.0989e-9, "ns": 0.9649}
LARGE_EDGES = (40, 110, 300, 600, 1000)
LOW_NSIDE = 512  # leakage simulation, NaMaster and the 1 deg map (P / I) work at nside <= this
TARGETS = {"median_ratio": (0.8, 1.25), "log_correlation": {"low": 0.85, "high": 0.6}, "bb_ee": (0.4, 0.7),
           "bb_ee_below": 800, "alpha": {"EE": ALPHA_EE, "BB": ALPHA_BB}, "alpha_tol": 0.15,
           "law_ratio": (0.8, 1.25), "r_te": (0.2, 0.5), "r_te_ranges": ((40, 300), (300, 1000)),
           "p_max_share": 0.999, "p_median": (0.05, 0.15)}
VERDICT = {True: "PASS", False: "MISS"}
#: ridge alignment (Clark et al. 2015): 10 discs of 10 deg named before measuring, (lon, lat) deg
RIDGE_REGIONS = [(lon, lat) for lat in (60, -60) for lon in (0, 72, 144, 216, 288)]
#: ridges of ln I at this FWHM (arcmin), band-passed against twice it, on the nside-512 map
RIDGE_FWHM_ARCMIN = 20.0
#: the zoomed P and angle maps: two of the ridge regions, ZOOM_DEG wide
ZOOM_REGIONS, ZOOM_DEG = [(0, 60), (144, -60)], 8.0


def lensed_cmb_dl() -> np.ndarray:
    """Binned lensed LCDM D_l^EE, D_l^BB (2, 6) uK_CMB^2 through the 4.82' beam (CAMB, Planck 2018)."""
    try:
        import camb
    except ImportError:
        raise SystemExit("the CMB term needs CAMB: pip install camb") from None
    pars = camb.set_params(**PLANCK2018, lmax=CMB_LMAX, lens_potential_accuracy=1)
    cl = camb.get_results(pars).get_cmb_power_spectra(pars, CMB_unit="muK", raw_cl=True, lmax=CMB_LMAX)["lensed_scalar"]
    return bin_dl(cl[:, 1:3].T * gaussian_beam(CMB_LMAX, BEAM_ARCMIN) ** 2)


def bin_dl(cl: np.ndarray) -> np.ndarray:
    """(n, lmax + 1) C_l -> (n, 6) plain means of l(l+1)C_l/2pi over FIELD_BINS."""
    ell = np.arange(cl.shape[-1])
    dl = cl * ell * (ell + 1) / (2 * np.pi)
    return np.stack([dl[:, lo:hi].mean(1) for lo, hi in itertools.pairwise(FIELD_BINS)], 1)


def field_mask(theta_phi: np.ndarray, lon: float, lat: float) -> np.ndarray:
    """smallfield's GaussMask(lon, lat, 11.3, fwhm=2.0, nside=512); theta_phi: its pixels' centres."""
    r = np.degrees(hp.rotator.angdist(theta_phi, [np.radians(90 - lat), np.radians(lon)]))
    x = (FIELD_RADIUS_DEG - r) / FIELD_TAPER_DEG * 2.355
    return np.where(x >= 0, 1.0 - np.exp(-0.5 * x**2), 0.0)


def field_spectra(maps: dict, lon: np.ndarray, lat: np.ndarray) -> dict:
    """{name: (n_fields, 2, 6) binned D_l^EE, D_l^BB} of IQU maps (3, npix at FIELD_NSIDE)."""
    out = {name: np.zeros((len(lon), 2, 6)) for name in maps}
    theta_phi = np.array(hp.pix2ang(FIELD_NSIDE, np.arange(hp.nside2npix(FIELD_NSIDE))))
    for k, (lo, la) in enumerate(zip(lon, lat)):
        mask = field_mask(theta_phi, lo, la)
        inside, w2 = mask > 0, np.mean(mask**2)
        for name, m in maps.items():
            ap = np.stack([(c - c[inside].mean()) * mask for c in m])
            out[name][k] = bin_dl(hp.anafast(ap, lmax=FIELD_BINS[-1], pol=True, iter=FIELD_ITER)[1:3] / w2)
    return out


def bands(dl: np.ndarray) -> dict:
    """{band: (..., 2)} mean of the band's bins of (..., 2, 6)."""
    return {b: dl[..., idx].mean(-1) for b, idx in BANDS.items()}


def field_statistics(model: np.ndarray, cmb: np.ndarray, npipe: np.ndarray, var: np.ndarray) -> dict:
    """Median ratio and log-correlation (NPIPE > 3 sigma), the paper's linear Pearson, and NPIPE's dust
    over the model's by quintile of the model's power (`by_model_quintile`), per spectrum and band."""
    total, data, dust, cmb_band = bands(model + cmb), bands(npipe), bands(model), bands(cmb)
    sigma = {b: np.sqrt(var[..., idx].sum(-1)) / len(idx) for b, idx in BANDS.items()}
    out = {}
    for s, spec in enumerate(("EE", "BB")):
        positive = (data["low"][:, s] > 0) & (data["high"][:, s] > 0)
        for band in BANDS:
            m, d = total[band][:, s], data[band][:, s]
            sig = d > 3 * sigma[band][:, s]
            out[f"{spec}_{band}"] = {
                "median_ratio": float(np.median(m[sig] / d[sig])), "log_correlation": float(np.corrcoef(np.log(m[sig]), np.log(d[sig]))[0, 1]),
                "n_fields": int(sig.sum()), "median_ratio_all_positive": float(np.median(m[d > 0] / d[d > 0])),
                "pearson_paper": float(np.corrcoef(m[positive], d[positive])[0, 1]), "n_fields_paper": int(positive.sum()),
                "model_plus_cmb": m.tolist(),
                **by_model_quintile(dust[band][:, s], d - cmb_band[band][s])}
    return out


def by_model_quintile(model: np.ndarray, data: np.ndarray) -> dict:
    """Fields in quintiles of the model's dust power (n_fields,): mean data / mean model per quintile
    (means, so NPIPE's noise does not bias them; binning on the model, not on the noisy data), and
    the slope of ln(mean data) against ln(mean model) across quintiles (1: the data's power varies
    across fields as the model's does)."""
    quintile = np.searchsorted(np.quantile(model, [0.2, 0.4, 0.6, 0.8]), model, side="right")
    groups = [quintile == k for k in range(5)]
    m, d = np.array([model[g].mean() for g in groups]), np.array([data[g].mean() for g in groups])
    return {"npipe_over_model_by_model_quintile": (d / m).tolist(),
            "npipe_vs_model_log_slope": float(np.polyfit(np.log(m), np.log(d), 1)[0])}


def pseudo_spectra(iqu: np.ndarray, mask: np.ndarray, lmax: int) -> np.ndarray:
    """TT EE BB TE (4, lmax + 1) pseudo-C_l normalised as `data.masked_spectrum` (weighted mean off, / mean
    mask^2), here for I, Q, U together."""
    ap = np.stack([(c - np.sum(c * mask) / np.sum(mask)) * mask for c in iqu])
    return hp.anafast(ap, lmax=lmax, pol=True, iter=1, use_pixel_weights=False)[:4] / np.mean(mask**2)


def per_band(pairs, f) -> dict:
    """{"lo-hi": f(lo, hi)} over (lo, hi) pairs."""
    return {f"{lo}-{hi}": float(f(lo, hi)) for lo, hi in pairs}


def lat_mask(nside: int, lat_min: float = 30.0) -> np.ndarray:
    return smoothstep((np.abs(hp.pix2ang(nside, np.arange(hp.nside2npix(nside)), lonlat=True)[1]) - lat_min) / 5.0)


def large_mask_statistics(iqu: np.ndarray, nside: int) -> tuple[dict, dict]:
    """|b| > 30 spectra, ratios, slopes, power-law bands, leakage / NaMaster, P / I: (json, curves for the figure)."""
    lmax, nlow = int(1.5 * nside), min(nside, LOW_NSIDE)
    cl = pseudo_spectra(iqu, lat_mask(nside), lmax)
    ell = np.arange(lmax + 1)
    dl = cl * ell * (ell + 1) / (2 * np.pi)
    bins = [(lo, min(hi, lmax + 1)) for lo, hi in zip(LARGE_EDGES, LARGE_EDGES[1:] + (lmax + 1,)) if lo < lmax]

    def r_te(lo, hi):
        tt, ee, _, te = (band_mean(d, lo, hi) for d in dl)
        return te / np.sqrt(tt * ee)

    out = {"bins": bins, "bb_ee": per_band(bins, lambda lo, hi: band_mean(dl[2], lo, hi) / band_mean(dl[1], lo, hi)),
           "r_te": per_band(bins, r_te), "r_te_ranges": per_band([(lo, min(hi, lmax + 1)) for lo, hi in TARGETS["r_te_ranges"]], r_te)}
    fit_bands, all_bands = log_bands(40, min(600, lmax)), log_bands(40, lmax)
    laws = {}
    for name, c in (("EE", cl[1]), ("BB", cl[2])):
        centre = [np.exp(np.mean(np.log(np.arange(lo, hi)))) for lo, hi in fit_bands]
        alpha, log_a = np.polyfit(np.log(centre), np.log([band_mean(c, lo, hi) for lo, hi in fit_bands]), 1)
        law = np.exp(log_a) * np.maximum(ell, 1.0) ** alpha
        laws[name] = law
        out[f"alpha_{name}"] = float(alpha)
        out[f"law_ratio_{name}"] = per_band(all_bands, lambda lo, hi, c=c, law=law: band_mean(c, lo, hi) / band_mean(law, lo, hi))
    # one alm (l <= 1.5 x 512) serves the low-resolution map (leakage, NaMaster) and the 1 deg map (P / I)
    alm = hp.map2alm(iqu, lmax=min(3 * nside - 1, int(1.5 * LOW_NSIDE)), pol=True, iter=1)
    low_lmax, low_mask = int(1.5 * nlow), lat_mask(nlow)
    low_bins = [(lo, min(hi, low_lmax + 1)) for lo, hi in bins if lo < low_lmax]
    rng = np.random.default_rng(23)
    gain = np.sqrt(laws["EE"][:low_lmax + 1])
    gain[:2] = 0.0
    e_only = hp.almxfl(unit_alm(rng, low_lmax), gain)
    leak = pseudo_spectra(hp.alm2map([0 * e_only, e_only, 0 * e_only], nlow, pol=True), low_mask, low_lmax)
    out["leakage_bb_ee_e_only"] = per_band(low_bins, lambda lo, hi: band_mean(leak[2], lo, hi) / band_mean(leak[1], lo, hi))
    # a smooth band limit (1 -> 1.5 nside): a sharp one rings the Galactic plane's power into |b| > 30
    taper = 1.0 - smoothstep((np.arange(low_lmax + 1) - nlow) / (low_lmax - nlow))
    in_lmax = hp.Alm.getlmax(len(alm[0]))
    low_map = hp.alm2map([hp.almxfl(hp.resize_alm(a, in_lmax, in_lmax, low_lmax, low_lmax), taper) for a in alm], nlow,
                         pol=True)
    out["namaster"] = namaster_bb_ee(low_map, low_mask, low_bins)
    smooth = hp.alm2map([hp.almxfl(a, gaussian_beam(hp.Alm.getlmax(len(a)), 60.0)) for a in alm], nlow, pol=True)
    p_frac = np.hypot(smooth[1], smooth[2]) / smooth[0]
    lat = np.abs(hp.pix2ang(nlow, np.arange(hp.nside2npix(nlow)), lonlat=True)[1])
    out["p_over_i"] = {"share_below_0.25_b15": float(np.mean(p_frac[lat > 15] <= 0.25)), "median_b30": float(np.median(p_frac[lat > 30]))}
    return out, {"ell": ell, "dl_EE": dl[1], "dl_BB": dl[2], "law_EE": laws["EE"], "law_BB": laws["BB"]}


def namaster_bb_ee(iqu: np.ndarray, mask: np.ndarray, bins: list) -> dict:
    """NaMaster EE, BB (B purified) and BB/EE per bin, or why not."""
    try:
        import pymaster as nmt
    except ImportError:
        return {"available": False, "note": "pymaster does not import here: no purified-B spectra"}
    lmax = bins[-1][1] - 1
    field = nmt.NmtField(mask, [iqu[1], iqu[2]], purify_b=True, lmax=lmax, lmax_mask=lmax)
    binning = nmt.NmtBin.from_edges([lo for lo, _ in bins], [hi for _, hi in bins], is_Dell=True)
    ee, _, _, bb = nmt.compute_full_master(field, field, binning)
    keys = [f"{lo}-{hi}" for lo, hi in bins]
    return {"available": True, "nside": hp.npix2nside(iqu.shape[1]), "dl_ee": dict(zip(keys, ee.tolist())),
            "dl_bb": dict(zip(keys, bb.tolist())), "bb_ee": dict(zip(keys, (bb / ee).tolist()))}


def ridge_alignment(iqu: np.ndarray) -> dict:
    """Relative orientation of the field (polarization + 90 deg) and the ln-I ridges, per region of
    RIDGE_REGIONS: ridges from the Hessian spin-2 field H = eth^2 ln I (E_H = sqrt((l-1)l(l+1)(l+2)) t_lm,
    whose axis is across a ridge: checked on a synthetic meridian ridge, Q_H < 0), both fields
    smoothed by RIDGE_FWHM_ARCMIN; ridge pixels: band-passed ln I > 0 and |H| above the region's
    median. phi = (1/2) arg[(Q + iU) conj(H)], 0 = field along the ridge; projected Rayleigh
    statistic Z_x = sum cos 2 phi / sqrt(N / 2) (Jow et al. 2018), > 3 = significantly parallel."""
    nside = hp.npix2nside(iqu.shape[1])
    lmax = 2 * nside
    ell = np.arange(lmax + 1)
    smooth = gaussian_beam(lmax, RIDGE_FWHM_ARCMIN)
    t_alm = hp.map2alm(np.log(iqu[0]), lmax=lmax, iter=1)
    band = hp.alm2map(hp.almxfl(t_alm, smooth - gaussian_beam(lmax, 2 * RIDGE_FWHM_ARCMIN)), nside, lmax=lmax)
    eth2 = np.sqrt(np.maximum((ell - 1.0) * ell * (ell + 1) * (ell + 2), 0.0)) * smooth
    h = hp.alm2map_spin([hp.almxfl(t_alm, eth2), 0 * t_alm], nside, 2, lmax)
    e_alm, b_alm = hp.map2alm_spin(iqu[1:], 2, lmax=lmax)
    qu = hp.alm2map_spin([hp.almxfl(e_alm, smooth), hp.almxfl(b_alm, smooth)], nside, 2, lmax)
    product = (qu[0] + 1j * qu[1]) * (h[0] - 1j * h[1])
    cos2phi = product.real / np.maximum(np.abs(product), 1e-300)
    out = {}
    for lon, lat in RIDGE_REGIONS:
        disc = hp.query_disc(nside, hp.ang2vec(lon, lat, lonlat=True), np.radians(10.0))
        strength = np.hypot(h[0][disc], h[1][disc])
        ridge = disc[(band[disc] > 0) & (strength > np.median(strength))]
        out[f"{lon},{lat}"] = {"z_x": float(cos2phi[ridge].sum() / np.sqrt(len(ridge) / 2)),
                               "mean_cos2phi": float(cos2phi[ridge].mean()), "n_pixels": int(len(ridge)),
                               "histogram_deg": np.histogram(np.degrees(0.5 * np.arccos(np.clip(cos2phi[ridge], -1, 1))),
                                                             bins=9, range=(0, 90))[0].tolist()}
    return out


def summarise_fields(name: str, stats: dict) -> None:
    lo, hi = TARGETS["median_ratio"]
    for key, s in stats.items():
        floor = TARGETS["log_correlation"][key.split("_")[1]]
        print(f"  {name:>6} {key:8}: median ratio {s['median_ratio']:.2f} [{VERDICT[lo <= s['median_ratio'] <= hi]}], "
              f"log-corr {s['log_correlation']:.3f} [>= {floor} {VERDICT[s['log_correlation'] >= floor]}] "
              f"(n {s['n_fields']}); paper's Pearson {s['pearson_paper']:.3f} (n {s['n_fields_paper']}); NPIPE / model "
              f"by model quintile {np.round(s['npipe_over_model_by_model_quintile'], 2).tolist()}, "
              f"log slope {s['npipe_vs_model_log_slope']:.2f}")


def summarise_large(name: str, s: dict) -> None:
    def fmt(d):
        return ", ".join(f"{k} {v:.2f}" for k, v in d.items())

    def inside(values, lo_hi):
        return VERDICT[all(lo_hi[0] <= v <= lo_hi[1] for v in values)]

    below = [v for (lo, _), v in zip(s["bins"], s["bb_ee"].values()) if lo < TARGETS["bb_ee_below"]]
    nm = s["namaster"]
    print(f"  {name} |b|>30 BB/EE {fmt(s['bb_ee'])} [l < {TARGETS['bb_ee_below']}: {inside(below, TARGETS['bb_ee'])}]\n"
          f"      E->B leakage of a pseudo-C_l (E-only field): {fmt(s['leakage_bb_ee_e_only'])}\n"
          f"      NaMaster purified B/EE: {fmt(nm['bb_ee']) if nm['available'] else nm['note']}\n"
          f"      r_TE {fmt(s['r_te'])}; over {fmt(s['r_te_ranges'])} [{inside(s['r_te_ranges'].values(), TARGETS['r_te'])}]")
    for spec in ("EE", "BB"):
        a, target, ratios = s[f"alpha_{spec}"], TARGETS["alpha"][spec], s[f"law_ratio_{spec}"]
        print(f"      alpha_{spec} {a:.3f} [{target} +- {TARGETS['alpha_tol']} {VERDICT[abs(a - target) <= TARGETS['alpha_tol']]}]; "
              f"/ power law: {fmt(ratios)} [{inside(ratios.values(), TARGETS['law_ratio'])}]")
    share, median = s["p_over_i"]["share_below_0.25_b15"], s["p_over_i"]["median_b30"]
    print(f"      P/I (1 deg): share <= 0.25 at |b|>15 {100 * share:.3f} % [{VERDICT[share >= TARGETS['p_max_share']]}], "
          f"median at |b|>30 {median:.3f} [{inside([median], TARGETS['p_median'])}]")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nside", type=int, default=2048)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--json", default="benchmarks/polarization_vs_npipe.json")
    parser.add_argument("--figure", default="docs/figures/polarization_vs_npipe.png")
    parser.add_argument("--spectra-figure", default="docs/figures/polarization_spectra.png")
    parser.add_argument("--zoom-figure", default="docs/figures/polarization_zoom.png")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    t0 = time.time()
    to_cmb = (1 * u.uK_RJ).to_value(u.uK_CMB, equivalencies=u.cmb_equivalencies(353 * u.GHz))
    table = np.loadtxt(shared_data_dir() / FIELD_FILE)
    lon, lat = hp.pix2ang(8, table[:, 0].astype(int), lonlat=True)
    npipe = np.stack([table[:, 9:15], table[:, 21:27]], 1)
    var = np.stack([table[:, 15:21], table[:, 27:33]], 1)
    cmb = lensed_cmb_dl()
    beam = gaussian_beam(3 * FIELD_NSIDE - 1, BEAM_ARCMIN)
    d1_alm = hp.map2alm(to_cmb * hp.read_map(shared_data_dir() / D1_FILE, field=(0, 1, 2), dtype=np.float64), lmax=D1_LMAX, pol=True)
    field_maps = {"d1": hp.alm2map([hp.almxfl(a, beam[:D1_LMAX + 1]) for a in d1_alm], FIELD_NSIDE, pol=True)}
    out = {"nside": args.nside, "seeds": args.seeds, "uK_RJ_to_uK_CMB": to_cmb, "targets": TARGETS,
           "cmb_binned_dl": {"EE": cmb[0].tolist(), "BB": cmb[1].tolist()}, "bins": FIELD_BINS.tolist(),
           "fields": {"pix8": table[:, 0].astype(int).tolist(), "npipe": {k: v.tolist() for k, v in bands(npipe).items()}},
           "maps": {}, "low_nside": min(args.nside, LOW_NSIDE)}
    curves = {}
    for seed in args.seeds:
        sky = pysm3.Sky(nside=args.nside, component_objects=[VAEDust(nside=args.nside, seed=seed)])
        start = time.time()
        iqu = to_cmb * np.asarray(sky.get_emission(353 * u.GHz), dtype=np.float64)
        seconds = time.time() - start
        name = f"seed{seed}"
        field_maps[name] = hp.smoothing(hp.ud_grade(iqu, FIELD_NSIDE), fwhm=np.radians(BEAM_ARCMIN / 60), pol=True)
        out["maps"][name], curves[name] = large_mask_statistics(iqu, args.nside)
        out["maps"][name]["get_emission_s"] = seconds
        out["maps"][name]["ridge_alignment"] = ridge_alignment(hp.ud_grade(iqu, min(args.nside, LOW_NSIDE)))
        if seed == args.seeds[0]:
            zoom_figure(args.zoom_figure, iqu, f"VAEDust nside {args.nside} seed {seed}, 353 GHz")
        print(f"nside {args.nside} seed {seed}: map (first get_emission) {seconds:.0f} s", flush=True)
        del iqu, sky
    spectra = field_spectra(field_maps, lon, lat)
    print(f"small fields ({len(lon)} north, 400 deg^2), model + lensed LCDM vs NPIPE 353:")
    for name, dl in spectra.items():
        stats = field_statistics(dl, cmb, npipe, var)
        out["maps"].setdefault(name, {})["fields"] = stats
        summarise_fields(name, stats)
    for name in curves:
        summarise_large(name, out["maps"][name])
        ridges = out["maps"][name]["ridge_alignment"]
        z = [r["z_x"] for r in ridges.values()]
        print(f"  {name} ridge alignment Z_x per region: {', '.join(f'{v:.1f}' for v in z)}; "
              f"{sum(v > 3 for v in z)} of {len(z)} > 3 [{VERDICT[sum(v > 3 for v in z) >= 8]}]")
    atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(out, indent=1, default=float)))
    make_figures(args.figure, args.spectra_figure, out, bands(npipe), curves)
    print(f"total {time.time() - t0:.0f} s")
    return 0


def zoom_figure(path: str, iqu: np.ndarray, title: str) -> None:
    """8 deg gnomonic views, at the map's pixel, of ZOOM_REGIONS: ln I with the plane-of-sky field
    orientation (polarization angle + 90 deg, IAU sense: from north through east) as headless lines,
    P, P / I and the polarization angle. Q, U are in each pixel's own (theta, phi) basis, which at
    |b| = 60 turns from the image's axes by up to 7 deg at the east and west edges (8 deg at the
    corners): the lines are drawn in the local basis, not rotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nside = hp.npix2nside(iqu.shape[1])
    reso = hp.nside2resol(nside, arcmin=True)
    size = int(ZOOM_DEG * 60 / reso)
    fig, axes = plt.subplots(len(ZOOM_REGIONS), 4, figsize=(16, 4.1 * len(ZOOM_REGIONS)), constrained_layout=True)
    for row, (lon, lat) in zip(axes, ZOOM_REGIONS):
        i, q, u_ = (hp.gnomview(m, rot=(lon, lat), xsize=size, reso=reso, return_projected_map=True, no_plot=True,
                                flip="astro").filled(np.nan) for m in iqu)
        p = np.hypot(q, u_)
        psi = 0.5 * np.arctan2(-u_, q)   # IAU polarization angle (COSMO U = -IAU U), from north through east
        extent = [ZOOM_DEG / 2, -ZOOM_DEG / 2, -ZOOM_DEG / 2, ZOOM_DEG / 2]   # east to the left
        panels = ((np.log(i), "ln I", "magma"), (p, "P [uK_CMB]", "viridis"), (p / i, "P / I", "viridis"),
                  (np.degrees(psi), "polarization angle [deg]", "twilight"))
        for ax, (image, label, cmap) in zip(row, panels):
            limits = dict(vmin=-90, vmax=90) if cmap == "twilight" else {}
            shown = ax.imshow(image, origin="lower", extent=extent, cmap=cmap, **limits)
            fig.colorbar(shown, ax=ax, shrink=0.8, label=label)
            ax.set(xlabel="offset east [deg]", ylabel="offset north [deg]", title=f"({lon}, {lat})")
        step = max(size // 16, 1)
        y, x = np.mgrid[0:size:step, 0:size:step]
        chi = psi[::step, ::step] + np.pi / 2
        offsets = (np.linspace(-ZOOM_DEG / 2, ZOOM_DEG / 2, size))
        row[0].quiver(-offsets[x], offsets[y], -np.sin(chi), np.cos(chi), pivot="middle", headwidth=0, headlength=0,
                      headaxislength=0, color="white", scale=20, width=0.005)
    fig.suptitle(f"{title}: field orientation (lines) over ln I; P, P / I and the polarization angle")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))


def make_figures(path: str, spectra_path: str, out: dict, npipe: dict, curves: dict) -> None:
    """(1) per-field model + CMB vs NPIPE (log-log, 1:1); (2) the |b| > 30 spectra, BB/EE, r_TE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    colours = {name: f"C{k}" for k, name in enumerate(out["maps"])}
    fig, axes = plt.subplots(2, 2, figsize=(10, 10), constrained_layout=True)
    for ax, (s, key) in zip(axes.flat, [(0, "EE_low"), (0, "EE_high"), (1, "BB_low"), (1, "BB_high")]):
        d = np.asarray(npipe[key[3:]])[:, s]
        for name, res in out["maps"].items():
            st = res["fields"][key]
            ax.loglog(d[d > 0], np.asarray(st["model_plus_cmb"])[d > 0], ".", ms=4, color=colours[name], alpha=0.7,
                      label=f"{name}: median {st['median_ratio']:.2f}, r_log {st['log_correlation']:.2f} (n {st['n_fields']})")
        ax.plot([d[d > 0].min() / 2, d.max() * 2], [d[d > 0].min() / 2, d.max() * 2], "k-", lw=0.7)
        ax.set(title=f"D_l^{key[:2]}, l {'40-110' if key.endswith('low') else '110-370'} (400 deg^2 fields, b > 30)",
               xlabel="NPIPE 353 [uK_CMB^2]", ylabel="model + lensed LCDM [uK_CMB^2]")
        ax.legend(fontsize=7)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))

    def centres(keys):
        return [np.sqrt(np.prod([float(x) for x in k.split("-")])) for k in keys]

    fig, axes = plt.subplots(2, 2, figsize=(12, 9), constrained_layout=True)
    for name, c in curves.items():
        res, ell, col = out["maps"][name], c["ell"], colours[name]
        for spec, ls in (("EE", "-"), ("BB", "--")):
            axes[0, 0].loglog(ell[30:], c[f"dl_{spec}"][30:], ls, color=col, lw=0.6, label=f"{name} {spec}")
            axes[0, 0].loglog(ell[30:], (ell * (ell + 1) / (2 * np.pi) * c[f"law_{spec}"])[30:], ":", color=col, lw=1.2,
                              label=f"{spec} fit l^{res[f'alpha_{spec}']:.2f} (40-600)")
            ratios = res[f"law_ratio_{spec}"]
            axes[0, 1].semilogx(centres(ratios), list(ratios.values()), "o" + ls, color=col, label=f"{name} {spec}")
        for ax, key in ((axes[1, 0], "bb_ee"), (axes[1, 1], "r_te")):
            ax.semilogx(centres(res[key]), list(res[key].values()), "o-", color=col, label=f"{name} pseudo-C_l")
        leak, nm = res["leakage_bb_ee_e_only"], res["namaster"]
        axes[1, 0].semilogx(centres(leak), list(leak.values()), "x:", color=col, label=f"{name}: E->B leakage (E-only field)")
        if nm["available"]:
            axes[1, 0].semilogx(centres(nm["bb_ee"]), list(nm["bb_ee"].values()), "s--", color=col, label=f"{name} NaMaster purified B")
    axes[0, 0].set(title="|b| > 30: D_l (pseudo-C_l)", xlabel="l", ylabel="D_l [uK_CMB^2]")
    axes[0, 1].axhspan(*TARGETS["law_ratio"], color="g", alpha=0.15)
    axes[0, 1].set(title="C_l / power law fitted over l 40-600 (Delta ln l = 0.4 bands)", xlabel="l", ylim=(0.4, 1.6))
    axes[1, 0].fill_between([40, TARGETS["bb_ee_below"]], *TARGETS["bb_ee"], color="g", alpha=0.15)
    axes[1, 0].set(title=f"BB/EE (target {TARGETS['bb_ee']} at l 40-800)", xlabel="l", ylim=(0, 1))
    axes[1, 1].fill_between([40, 1000], *TARGETS["r_te"], color="g", alpha=0.15)
    axes[1, 1].set(title=f"r_TE = TE / sqrt(TT EE) (target {TARGETS['r_te']} at l 40-1000)", xlabel="l", ylim=(-0.2, 1))
    for ax in axes.flat:
        ax.legend(fontsize=7)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    atomic_write(spectra_path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


if __name__ == "__main__":
    raise SystemExit(main())
