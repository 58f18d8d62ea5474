"""Stage 6b — polarization: Q and U of the dust from a large-scale polarization template and
small scales tied to the map's own intensity, in PySM's log-pol-tens form (Levrier et al. 2018,
as d10-d12) with the fraction saturating at Planck's maximum p_max instead of 1:

    Q + iU = I p_max tanh(|w| / p_max) w / |w|,   w = w_L + w_s   (spin 2, HEALPix/COSMO basis)

so P < p_max I at every pixel (for |w| << p_max, P / I = |w|).
- w_L: the template's polarization-fraction tensor p_max artanh(p / p_max) (Q + iU) / P,
  p = P / I, at the template's resolution (beam FWHM b: where its Planck information ends).
- w_s: the scales the template lacks, a spin-2 field with harmonic coefficients
      E_s = A_E(l) [rho t^ + sqrt(1 - rho^2) g_E],   B_s = A_B(l) g_B,
  t^ the map's own ln I (template + VAE small scales) whitened multipole by multipole, g unit
  Gaussian draws (seeded), rho the T-E correlation of the small scales, and
  A_X(l)^2 = a_X l^alpha_X - C_l^{X}(w_L): the power law of the template's own E/B spectrum of
  w (slopes of Planck 2018 XI, amplitudes fitted where the template is real, B_l^2 > 1/2)
  continued: the small scales supply what the template lacks of it, so the sum has no break
  where the template's information ends (whatever its real transfer: d1's is not its beam's).
  A positive E coefficient that follows a positive ln-I one orients the polarization across the
  intensity ridges (the field along them), as Planck sees at high latitude (TE > 0,
  Clark et al. 2015); the Gaussian parts give B and the E that filaments do not explain.

I is not changed: polarization multiplies the intensity by the fractions (q, u) (Q = q I, U = u I),
so I is the same bit for bit with or without it, and every frequency / bandpass / SED scaling of
I applies to Q and U as well.

The bundled template is built by ``python -m pysm_vaedust.polarization`` from PySM's d1 dust at
353 GHz in ../shared/data (Planck 2015 Commander polarization, 2.6' smoothed, with PySM 2's
Gaussian small scales smoothed away here).
"""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path

import healpy as hp
import numpy as np
from astropy.io import fits
from numba import njit, prange

from . import __version__
from .checks import check_pixel_indices
from .data import atomic_write, file_digest, gaussian_beam, shared_data_dir, smoothstep
from .healpix import alm2map_spin, band_size, band_spans, map2alm, mirror_bands

POL_TEMPLATE_NAME = "pol_template_d1_353GHz_fwhm3.7deg_nside64.fits"
#: beam of PySM d1's polarization template (Planck 2015 Commander, Thorne et al. 2017), deg
D1_FWHM_DEG = 2.6
#: resolution of the bundled template: d1's 2.6 deg plus a Gaussian that removes PySM 2's
#: synthetic small scales (real Planck information at l <~ 40-70), deg
POL_TEMPLATE_FWHM_DEG = 3.7
#: polarization resolution of Planck's GNILC dust maps (Planck 2018 XII), deg
GNILC_POL_FWHM_DEG = 80 / 60
#: coarsest pol template accepted: B_l^2 must stay above 1/2 to l = 16 for the amplitude fit
MAX_FWHM_DEG = 6.0
#: slopes of the dust EE and BB C_l at 353 GHz (Planck 2018 XI, A&A 641, A11, LR71: -2.42, -2.54)
ALPHA_EE, ALPHA_BB = -2.42, -2.54
#: correlation of the small-scale E with the intensity's ln I (Planck 2018 XI: r_TE ~ 0.36 at
#: l 40-600; a literature prior, not fitted here)
TE_CORRELATION = 0.36
#: the template's fraction tensor is analysed to lmax 3 x POL_WORK_NSIDE - 1 (covers an 80' beam);
#: finer templates (GNILC at nside 2048) are brought to this nside first
POL_WORK_NSIDE = 128
#: the largest polarization fraction of dust, Planck 2018 XII (A&A 641, A12): p_max = 0.22
P_MAX = 0.22
#: template fractions are clipped at this share of P_MAX before artanh (a template's values above
#: p_max are noise: d1 reaches 0.39 at |b| > 15 deg)
MAX_TEMPLATE_SHARE = 0.95
#: the small scales are drawn to l = POL_LMAX_FACTOR nside, tapered from 0.875 of it
POL_LMAX_FACTOR = 2
#: seed stream of the polarization draws (distinct from the patches' counter streams)
POL_STREAM = 0x504F4C
#: pixels of the fixed bands w is synthesized on (`healpix.mirror_bands`): 2^24 (3 bands at nside
#: 2048, 48 at 8192; 0.27 GB of float64 Q, U each)
POL_BAND_PIXELS = 1 << 24


def default_pol_template_path() -> Path:
    """Path of the polarization template shipped as package data."""
    return Path(str(resources.files("pysm_vaedust") / "package_data" / POL_TEMPLATE_NAME))


def fraction_tensor(iqu: np.ndarray) -> np.ndarray:
    """w = p_max artanh(p / p_max) (Q, U) / P (2, npix) of an IQU map (3, npix) at one resolution,
    p = P / I clipped at MAX_TEMPLATE_SHARE p_max; w = 0 where P = 0."""
    i, q, u = np.asarray(iqu, dtype=np.float64)
    p = np.hypot(q, u)
    share = np.minimum(p / i / P_MAX, MAX_TEMPLATE_SHARE)
    scale = np.divide(P_MAX * np.arctanh(share), p, out=np.zeros_like(p), where=p > 0)
    return np.stack([q * scale, u * scale])


def fit_power_laws(e_alm: np.ndarray, b_alm: np.ndarray, fwhm_deg: float) -> dict:
    """Amplitudes a_E, a_B of C_l = a l^alpha (alpha = ALPHA_EE, ALPHA_BB) fitted to the
    full-sky E / B spectra of w_L over l = 8 .. where the template's Gaussian beam B_l^2 = 1/2
    (the median of C_l / l^alpha): {a_E, a_B, ell_range}."""
    cl_e, cl_b = hp.alm2cl(e_alm), hp.alm2cl(b_alm)
    lmax = len(cl_e) - 1
    beam2 = gaussian_beam(lmax, 60 * fwhm_deg) ** 2
    top = min(lmax, int(np.searchsorted(-beam2, -0.5)))
    if top < 16:
        raise ValueError(f"pol template beam {fwhm_deg} deg leaves no multipoles 8-16 to fit its spectrum")
    ell = np.arange(8, top)
    fit = {"ell_range": [int(ell[0]), int(ell[-1])]}
    for name, cl, alpha in (("a_E", cl_e, ALPHA_EE), ("a_B", cl_b, ALPHA_BB)):
        fit[name] = float(np.median(cl[ell] / ell.astype(float) ** alpha))
    if not (fit["a_E"] > 0 and fit["a_B"] >= 0):
        raise ValueError(f"the pol template's E/B spectra give no positive E power law: {fit}")
    return fit


class PolarizationTemplate:
    """The large-scale polarization: w_L's E/B coefficients and the power laws that continue them.

    iqu: (3, npix) map (RING, Galactic, uK_RJ at one frequency) with all three Stokes parameters
    at beam `fwhm_deg` (deg; the scale where its real information ends). `intensity`: the
    product's own I at that frequency (RING, any nside, uK_RJ, beam `intensity_fwhm_deg` <=
    fwhm_deg), smoothed to fwhm_deg and used in place of the template's I, so that the large-scale
    Q, U of the map are the template's own (P / I of the product's I, not the template's: two
    dust intensities differ, by up to 1.5x at high latitude between PySM d1 and the bundled one)."""

    def __init__(self, iqu: np.ndarray, fwhm_deg: float, intensity: np.ndarray | None = None,
                 intensity_fwhm_deg: float = 0.0):
        iqu = np.array(iqu, dtype=np.float64)
        if iqu.ndim != 2 or iqu.shape[0] != 3 or not hp.isnpixok(iqu.shape[1]):
            raise ValueError(f"pol template has shape {iqu.shape}: expected (3, 12 nside^2) I, Q, U")
        if not np.all(np.isfinite(iqu)) or not (intensity is not None or np.all(iqu[0] > 0)):
            raise ValueError("pol template: expected finite I, Q, U with I > 0 everywhere")
        if not 0 < fwhm_deg <= MAX_FWHM_DEG:
            raise ValueError(f"pol template FWHM {fwhm_deg} deg: expected 0 < FWHM <= {MAX_FWHM_DEG} deg "
                             "(its spectrum is fitted at l >= 8)")
        self.fwhm_deg = float(fwhm_deg)
        nside = hp.npix2nside(iqu.shape[1])
        lmax = min(3 * POL_WORK_NSIDE - 1, 3 * nside - 1)
        if intensity is not None:
            if not 0 <= intensity_fwhm_deg <= fwhm_deg:
                raise ValueError(f"intensity beam {intensity_fwhm_deg} deg: expected 0 <= beam <= {fwhm_deg} deg")
            alm = hp.map2alm(np.asarray(intensity, dtype=np.float64), lmax=lmax, iter=1)
            hp.smoothalm(alm, fwhm=np.radians(np.sqrt(fwhm_deg**2 - intensity_fwhm_deg**2)), inplace=True)
            iqu[0] = hp.alm2map(alm, nside, lmax=lmax)
            if not np.all(iqu[0] > 0):
                raise ValueError("the intensity smoothed to the pol template's beam is not > 0 everywhere")
        w = fraction_tensor(iqu)
        self.e_alm, self.b_alm = hp.map2alm_spin(w, 2, lmax=lmax)
        self.fit = fit_power_laws(self.e_alm, self.b_alm, self.fwhm_deg)

    def small_scale_gains(self, lmax: int, taper_from: int) -> tuple[np.ndarray, np.ndarray]:
        """A_E(l), A_B(l) (lmax + 1,): sqrt(a l^alpha - C_l^{w_L}), what the template's own
        spectrum (smoothed over 11 multipoles) lacks of the power law, tapered (smoothstep) to 0
        between `taper_from` and lmax; 0 below the fit's range (the template's own scales)."""
        ell = np.arange(lmax + 1, dtype=np.float64)
        taper = 1.0 - smoothstep((ell - taper_from) / max(lmax - taper_from, 1))
        kernel = np.ones(11) / 11
        gains = []
        for alm, a, alpha in ((self.e_alm, self.fit["a_E"], ALPHA_EE), (self.b_alm, self.fit["a_B"], ALPHA_BB)):
            template = np.zeros(lmax + 1)
            own = hp.alm2cl(alm)
            own[:2] = own[2]   # no monopole / dipole pulling the smoothed l = 2-5 down
            cl = np.convolve(np.pad(own, 5, mode="edge"), kernel, mode="valid")[:lmax + 1]
            template[:len(cl)] = cl
            start = self.fit["ell_range"][0]
            gain = np.zeros(lmax + 1)
            gain[start:] = np.sqrt(np.maximum(a * ell[start:] ** alpha - template[start:], 0.0)) * taper[start:]
            gains.append(gain)
        return gains[0], gains[1]

    def field(self, intensity: np.ndarray, seed: int, te_correlation: float = TE_CORRELATION,
              lmax: int | None = None) -> "PolarizationField":
        """w = w_L + w_s for the full-sky intensity map `intensity` (> 0, any unit; RING, npix =
        12 nside^2, float32 or float64; its ln I analysed in float64 band by band), drawn with
        `seed` up to `lmax` (default POL_LMAX_FACTOR nside). Peak beside the map: 4 x the
        coefficients' 2.1 GB at nside 8192 (the field's E and B, ln I's, one draw's normals)."""
        nside = hp.npix2nside(len(intensity))
        lmax = POL_LMAX_FACTOR * nside if lmax is None else int(lmax)
        gain_e, gain_b = self.small_scale_gains(lmax, int(0.875 * lmax))
        t_alm = map2alm(intensity, lmax, log=True)
        cl_t = hp.alm2cl(t_alm)
        hp.almxfl(t_alm, np.divide(1.0, np.sqrt(cl_t), out=np.zeros_like(cl_t), where=cl_t > 0), inplace=True)
        t_alm *= te_correlation
        rng = np.random.default_rng([int(seed), POL_STREAM])
        alms = np.empty((2, len(t_alm)), dtype=np.complex128)
        unit_alm(rng, lmax, out=alms[0])
        alms[0] *= np.sqrt(1.0 - te_correlation**2)
        alms[0] += t_alm
        del t_alm
        hp.almxfl(alms[0], gain_e, inplace=True)
        unit_alm(rng, lmax, out=alms[1])
        hp.almxfl(alms[1], gain_b, inplace=True)
        for small, large in zip(alms, (self.e_alm, self.b_alm)):
            add_alm(small, lmax, large)
        return PolarizationField(alms, nside, lmax)


class PolarizationField:
    """w = w_L + w_s of one map and seed: its E, B coefficients `alms` (2, n_alm) complex128 (healpy
    order, `lmax`), synthesized at any pixels of `nside` on the fixed bands of mirror rings
    `healpix.mirror_bands(nside, POL_BAND_PIXELS)`, so a pixel's value is the same whichever part
    of the sky asks for it (the whole sky, a chunk, an MPI rank), and a part costs its bands."""

    def __init__(self, alms: np.ndarray, nside: int, lmax: int):
        self.alms, self.nside, self.lmax = alms, int(nside), int(lmax)

    def bands(self) -> list:
        """The bands of mirror rings w is synthesized on (tuples of `healpix.RingBand`)."""
        return mirror_bands(self.nside, POL_BAND_PIXELS)

    def tensor_field(self, pixels: np.ndarray | None = None) -> np.ndarray:
        """w (2, n) float64 at RING `pixels` of nside (None: all)."""
        return self._at_pixels(pixels, np.float64, saturate=False)

    def fractions(self, pixels: np.ndarray | None = None) -> np.ndarray:
        """(q, u) = p_max tanh(|w| / p_max) w / |w| (2, n) float32 at RING `pixels` (None: all):
        Q = q I, U = u I."""
        return self._at_pixels(pixels, np.float32, saturate=True)

    def _at_pixels(self, pixels, dtype, saturate: bool) -> np.ndarray:
        npix = hp.nside2npix(self.nside)
        order = None
        if pixels is not None:
            pixels = check_pixel_indices(pixels, self.nside, "pixels").astype(np.int64, copy=False)
            if np.any(pixels[1:] < pixels[:-1]):
                order = np.argsort(pixels, kind="stable")
                pixels = pixels[order]
        out = np.empty((2, npix if pixels is None else len(pixels)), dtype=dtype)
        bands = self.bands()
        buffer = np.empty(2 * max(band_size(band) for band in bands))  # reused by every band
        for band in bands:
            # (where the band's pixels go in out, where they are in the band's synthesis)
            spans = band_spans(band)
            if pixels is not None:
                asked = [(slice(*np.searchsorted(pixels, [sky.start, sky.stop])), sky, own) for sky, own in spans]
                spans = [(into, pixels[into] - sky.start + own.start) for into, sky, own in asked
                         if into.stop > into.start]
            if not spans:
                continue
            w = alm2map_spin(self.alms, self.nside, self.lmax, band, buffer)
            if saturate:
                _saturate(w, P_MAX)
            for into, source in spans:
                out[:, into] = w[:, source]
            del w
        if order is not None:
            unsorted = np.empty_like(out)
            unsorted[:, order] = out
            out = unsorted
        return out


@njit(cache=True, parallel=True)
def _saturate(w, p_max):
    """In place: w (2, npix) -> p_max tanh(|w| / p_max) w / |w| (0 stays 0)."""
    for i in prange(w.shape[1]):
        amplitude = np.hypot(w[0, i], w[1, i])
        if amplitude > 0:
            gain = p_max * np.tanh(amplitude / p_max) / amplitude
            w[0, i] *= gain
            w[1, i] *= gain


def unit_alm(rng: np.random.Generator, lmax: int, out: np.ndarray | None = None) -> np.ndarray:
    """Harmonic coefficients (healpy order, lmax) of a unit white field: <|a_lm|^2> = 1, m = 0 real
    (into `out`, complex128, when given)."""
    size = hp.Alm.getsize(lmax)
    alm = np.empty(size, dtype=np.complex128) if out is None else out
    alm.real = rng.standard_normal(size)
    alm.imag = rng.standard_normal(size)
    alm /= np.sqrt(2.0)
    alm[:lmax + 1] = np.sqrt(2.0) * alm[:lmax + 1].real   # m = 0 comes first in healpy's order
    return alm


def add_alm(alm: np.ndarray, lmax: int, other: np.ndarray) -> None:
    """In place: alm (healpy order, lmax) += other (healpy order, its own lmax) on the (l, m)
    both hold (hp.resize_alm's zero padding or truncation, without its full-size copy)."""
    other_lmax = hp.Alm.getlmax(len(other))
    top = min(lmax, other_lmax)
    for m in range(top + 1):
        start, other_start = hp.Alm.getidx(lmax, m, m), hp.Alm.getidx(other_lmax, m, m)
        alm[start:start + top + 1 - m] += other[other_start:other_start + top + 1 - m]


def read_pol_template(path, fwhm_deg: float | None = None, freq_ghz: float | None = None
                      ) -> tuple[np.ndarray, float, float]:
    """(I, Q, U (3, npix) float64 uK_RJ, FWHM deg, frequency GHz) from a FITS map with three
    fields in uK_RJ (TUNIT1); the FWHM from `fwhm_deg`, else the file's FWHMDEG card; the
    frequency from `freq_ghz`, else its FREQREF card."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pol template {str(path)!r} does not exist")
    try:
        iqu = np.asarray(hp.read_map(path, field=(0, 1, 2), dtype=np.float64))
    except (IndexError, ValueError, OSError) as err:
        raise ValueError(f"pol template {str(path)!r}: expected a HEALPix FITS map with three fields I, Q, U "
                         f"({err})") from None
    with fits.open(path) as hdus:
        header = hdus[1].header if len(hdus) > 1 else hdus[0].header
    for column in ("TUNIT1", "TUNIT2", "TUNIT3"):
        unit = str(header.get(column, "")).strip()
        if unit not in ("uK_RJ", "uK RJ"):
            raise ValueError(f"pol template {str(path)!r} has {column} {unit!r}; expected uK_RJ")
    if str(header.get("COORDSYS", "G")).strip().upper() not in ("G", "GALACTIC"):
        raise ValueError(f"pol template {str(path)!r} has COORDSYS {header['COORDSYS']!r}; expected Galactic (G)")
    if str(header.get("POLCCONV", "COSMO")).strip().upper() == "IAU":
        iqu[2] *= -1   # IAU -> HEALPix/COSMO
    for value, card, argument in ((fwhm_deg, "FWHMDEG", "pol_template_fwhm"), (freq_ghz, "FREQREF", "pol_template_freq")):
        if value is None and header.get(card) is None:
            raise ValueError(f"pol template {str(path)!r} has no {card} card: pass {argument}=")
    return (iqu, float(header["FWHMDEG"] if fwhm_deg is None else fwhm_deg),
            float(header["FREQREF"] if freq_ghz is None else freq_ghz))


def build_pol_template(d1_path, fwhm_deg: float = POL_TEMPLATE_FWHM_DEG) -> tuple[np.ndarray, dict]:
    """The bundled polarization template from PySM's d1 at 353 GHz (nside 64, beam D1_FWHM_DEG):
    I, Q, U smoothed (spin-2 for Q, U) by sqrt(fwhm^2 - 2.6^2): ((3, npix) uK_RJ, provenance)."""
    iqu = np.asarray(hp.read_map(d1_path, field=(0, 1, 2), dtype=np.float64))
    kernel = float(np.sqrt(fwhm_deg**2 - D1_FWHM_DEG**2))
    smoothed = np.asarray(hp.smoothing(iqu, fwhm=np.radians(kernel), pol=True, iter=3))
    provenance = {"source": Path(d1_path).name, "sha256": file_digest(d1_path), "fwhm_deg": fwhm_deg,
                  "input_fwhm_deg": D1_FWHM_DEG, "smoothing_kernel_fwhm_deg": kernel,
                  "nside": hp.npix2nside(iqu.shape[1]), "frame": "G", "unit": "uK_RJ", "freq_GHz": 353.0,
                  "convention": "HEALPix/COSMO", "package_version": __version__,
                  "what": "PySM d1 dust at 353 GHz (Planck 2015 Commander polarization smoothed 2.6 deg, "
                          "PySM 2 Gaussian small scales), smoothed further so only Planck's scales remain",
                  "command": "python -m pysm_vaedust.polarization"}
    return smoothed, provenance


def write_pol_template(path, iqu: np.ndarray, provenance: dict) -> Path:
    """Write the IQU template FITS (TUNIT uK_RJ, FWHMDEG and FREQREF cards) and a JSON sidecar."""
    header = [("FREQREF", provenance["freq_GHz"], "GHz"), ("FWHMDEG", provenance["fwhm_deg"]),
              ("POLCCONV", "COSMO"), ("SRCSHA", provenance["sha256"][:64])]
    atomic_write(path, lambda tmp: hp.write_map(tmp, iqu.astype(np.float32), coord="G", column_units="uK_RJ",
                                                column_names=["I_STOKES", "Q_STOKES", "U_STOKES"],
                                                extra_header=header, overwrite=True, dtype=np.float32))
    atomic_write(Path(str(path) + ".json"), lambda tmp: Path(tmp).write_text(json.dumps(provenance, indent=1)))
    return Path(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pysm_vaedust.polarization",
                                     description="Rebuild the bundled polarization template from PySM's d1 map.")
    parser.add_argument("--input", default=str(shared_data_dir() / "pysm_d1_353GHz_IQU_nside64.fits"))
    parser.add_argument("--fwhm_deg", type=float, default=POL_TEMPLATE_FWHM_DEG)
    parser.add_argument("--output", default=str(default_pol_template_path()))
    args = parser.parse_args(argv)
    iqu, provenance = build_pol_template(args.input, args.fwhm_deg)
    print(f"wrote {write_pol_template(args.output, iqu, provenance)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
