"""Stage 6 — the PySM component: a thin pysm3 adaptor (template, SED, bandpass, units) around
the renderer (`renderer.Renderer`), which makes the small scales.

    ln I_nu_ref(p) = ln T(p) + R(p) + delta(p),     I_nu = I_nu_ref * MBB(nu) / MBB(nu_ref)

T: the template (uK_RJ at nu_ref), smoothed in log to the weights' conditioning FWHM F (30');
the cascade's levels k = 0..K (pixels and patches 2^k finer, self-similar): level k's patches
are decoded *given* their coarse part, the field so far sampled on the patch's condition grid,
and supply every scale finer than F / f_k, f_k its scale factor. R: what levels < K added (each
as much as it keeps beside the next, see `renderer`); delta: level K's blended patches. Without
the cascade R = 0 and delta = level 0.
T is exp of a log-smoothed map (as the bundled template): the added scales have zero mean in
ln I, as in the data. MBB: modified black body (mbb_index beta_d, mbb_temperature T_d),
bandpass-integrated with pysm3's trapezoid steps (`pysm3.utils.trapz_step_inplace`), on all cores.
"""

from __future__ import annotations

import gc
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import healpy as hp
import numpy as np
import pysm3.units as u
from numba import njit, prange
from pysm3 import utils as pysm_utils
from pysm3.models.dust import blackbody_ratio
from pysm3.models.template import Model

from .checks import (check_bandpass, check_bool, check_float_dtype, check_frequency, check_int, check_nside,
                     check_path, check_pixel_indices, check_real, check_seed)
from .cutouts import smoothing_lmax
from .data import BETA_DUST, T_DUST_K, check_positive_finite, log_offset_to_100um
from .polarization import (GNILC_POL_FWHM_DEG, POL_WORK_NSIDE, TE_CORRELATION, PolarizationField,
                           PolarizationTemplate, default_pol_template_path, read_pol_template)
from .healpix import interpolate_at_pixels
from .renderer import Renderer, start_factor
from .template import default_template_path, read_template, smooth_log_map
from .weights import load_weights, resolve_device

#: nside of the working copy of the (smoothed) log template: 3.4' pixels, so that bilinear samples
#: of it on a level's 15' condition grid keep the 30' template's l 300-700 tail (>= 0.94 of its power
#: at l 600) as the training conditions (sampled from the nside-2048 IRIS mosaic) do; 13.7' pixels
#: (nside 256) kept 0.4-0.6 of it, and the model, which amplifies that tail by up to 1 / G^2, then
#: left the map's l 400-550 band short
TEMPLATE_WORK_NSIDE = 1024
#: beam of the PySM GNILC dust template (deg)
GNILC_FWHM_DEG = 21.8 / 60


#: the most a scalar SED may scale the intensity, from the template's frequency to the pol
#: template's, beyond (or below) what dust's default SED does: the polarization fraction is the pol
#: template's P over this I (an SED 10^159 times brighter left Q, U at zero and no E spectrum to fit)
MAX_SED_DEPARTURE = 1e3
#: maps from this many pixels (nside 1024) collect cyclic garbage before allocating the output
LARGE_MAP_PIXELS = 12 * 1024**2
#: pixels per block of the reference map's exp(ln T + R + delta) (float64 within a block: 16 MB)
RENDER_BLOCK = 1 << 21


@dataclass(frozen=True, eq=False)
class FullSky:
    """What a VAEDust component needs of the whole sky to make any of its pixels: the intensity
    at the reference frequency, `intensity` (12 nside^2,) float32 uK_RJ, and its polarization field
    (None without polarization). Made by `VAEDust.compute_full_sky`; components of the same
    settings (`settings`: their digest) given it (`VAEDust(full_sky=...)`) take their pixels from
    it instead of rendering."""

    nside: int
    seed: int
    intensity: np.ndarray
    polarization: PolarizationField | None
    settings: str


def _scalar_frequency(value, name: str) -> float:
    """A scalar frequency (Quantity, or text such as '353 GHz') in GHz."""
    if isinstance(value, str):
        try:
            value = u.Quantity(value)
        except TypeError:
            raise ValueError(f"{name}={value!r}: expected a frequency such as '353 GHz'") from None
    freq = check_frequency(value, name)
    if freq.ndim:
        raise ValueError(f"{name} has shape {freq.shape}: expected one frequency")
    return float(freq.value)


def trapezoid_steps(freqs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(n,) weight of each frequency in pysm3's trapezoidal bandpass integral
    (`pysm3.utils.trapz_step_inplace` applied to a unit map)."""
    steps = np.zeros(len(freqs))
    for i in range(len(freqs)):
        pysm_utils.trapz_step_inplace(freqs, weights, i, np.ones(1), steps[i:i + 1])
    return steps


@njit(cache=True, parallel=True)
def _mbb_intensity(freqs, steps, i_ref, freq_ref, mbb_index, mbb_temperature, out):
    """Bandpass-integrated modified black body of the intensity, in place into `out` (uK_RJ):
    sum over frequencies of `steps` (`trapezoid_steps`) x the MBB; mbb_index / mbb_temperature
    arrays of one value (the whole sky) or one per pixel."""
    for i in range(len(freqs)):
        step = steps[i]
        # -2: the black body is in flux units, the template in K_RJ (as pysm3's dust models)
        if mbb_index.size == 1 and mbb_temperature.size == 1:
            gain = step * (freqs[i] / freq_ref) ** (mbb_index[0] - 2.0) * blackbody_ratio(freqs[i], freq_ref,
                                                                                         mbb_temperature[0])
            for p in prange(i_ref.size):
                out[p] += gain * i_ref[p]
        else:   # serial: a black body that underflows raises ZeroDivisionError, which prange would not pass on
            for p in range(i_ref.size):
                index = mbb_index[0] if mbb_index.size == 1 else mbb_index[p]
                temperature = mbb_temperature[0] if mbb_temperature.size == 1 else mbb_temperature[p]
                out[p] += step * i_ref[p] * (freqs[i] / freq_ref) ** (index - 2.0) * blackbody_ratio(
                    freqs[i], freq_ref, temperature)


def _degrees(value, name: str) -> float | None:
    """An FWHM (number in deg or angle Quantity) in deg, or None."""
    if value is None:
        return None
    return check_real(u.Quantity(value, u.deg).value if isinstance(value, u.Quantity) else value, name, positive=True)


def _uk_rj_array(value, name: str, what: str) -> np.ndarray:
    """float64 array of an array or Quantity in uK_RJ; errors name `name` and what it expects."""
    try:
        return np.asarray(u.Quantity(value, u.uK_RJ).value if isinstance(value, u.Quantity) else value,
                          dtype=np.float64)
    except u.UnitConversionError:
        raise ValueError(f"{name} has unit {value.unit}: expected uK_RJ") from None
    except (TypeError, ValueError):
        raise TypeError(f"{name} of type {type(value).__name__}: expected None, 'pysm_gnilc', a FITS path "
                        f"or {what}") from None


def _load_pol_template(pol_template, fwhm_deg: float | None, freq_ghz: float | None) -> tuple[np.ndarray, float, float]:
    """(I, Q, U (3, npix) uK_RJ, beam FWHM deg, frequency GHz) of the large-scale polarization from
    None (bundled), 'pysm_gnilc', a FITS path or an array / Quantity (3, npix)."""
    if pol_template is None:
        return read_pol_template(default_pol_template_path(), fwhm_deg, freq_ghz)
    if isinstance(pol_template, str) and pol_template == "pysm_gnilc":
        from .sources import fetch

        # PySM's file holds fixed-seed synthetic small scales: smoothed (spin 2) to GNILC's
        # polarization beam and brought to POL_WORK_NSIDE, like the bundled template
        fwhm = fwhm_deg or GNILC_POL_FWHM_DEG
        lmax = 3 * POL_WORK_NSIDE - 1
        alm = hp.map2alm(hp.read_map(fetch("pysm_gnilc_dust_template"), field=(0, 1, 2), dtype=np.float64),
                         lmax=lmax, pol=True, iter=0)
        hp.smoothalm(alm, fwhm=np.radians(fwhm), pol=True, inplace=True)
        return np.asarray(hp.alm2map(alm, POL_WORK_NSIDE, lmax=lmax, pol=True)), fwhm, freq_ghz or 353.0
    if isinstance(pol_template, (str, Path)):
        return read_pol_template(pol_template, fwhm_deg, freq_ghz)
    iqu = _uk_rj_array(pol_template, "pol_template", "an (3, npix) I, Q, U map")
    if fwhm_deg is None or freq_ghz is None:
        raise ValueError("an array pol_template needs pol_template_fwhm= (its beam, deg) and pol_template_freq=")
    return iqu, fwhm_deg, freq_ghz


class VAEDust(Model):
    """Thermal dust I, Q, U: large-scale templates x VAE small scales, modified black body SED.

    Parameters
    ----------
    nside : int, power of two <= max_nside. seed : int in 0..2**32-1, seeds every patch's latents.
    template : None (bundled 545 GHz Planck-derived template at the conditioning resolution),
        "pysm_gnilc" (PySM GNILC template via pysm3's data loader), a FITS path, or an
        array/Quantity (RING, Galactic, uK_RJ); smoothed in log to the weights' conditioning FWHM.
    template_freq : reference frequency of an array template (Quantity or "353 GHz").
    template_fwhm : the template's beam FWHM (deg or Quantity; default: its FWHMDEG card, 21.8'
        for GNILC, else 0). Coarser than the conditioning FWHM F (30'), up to 4 F: the cascade
        starts one level earlier, with 4x larger patches conditioned at 4 F.
    mbb_temperature, mbb_index : T_d (K) and beta_d: scalars, arrays (RING) or FITS paths.
    weights : path of a weights file (default: shipped weights).
    device : 'auto' | 'cpu' | 'cuda'. cascade : add the finer levels needed by nside.
    fixed_latents : {level: {tile id: eps (latent_dim,)}} whitened latents replacing the prior
        draws of those tiles (constrained realizations, see pysm_vaedust.conditioning).
    fixed_noise : {level: {tile id: (npix, npix)}} decoder-noise patches replacing the draws of
        those tiles (normalised units).
    polarization : return Q, U (`pysm_vaedust.polarization`); False: Q = U = 0. I is the same
        either way.
    pol_template : the large-scale Q, U: None (bundled, from PySM's d1 / Planck 2015 at 3.7 deg),
        "pysm_gnilc" (PySM's GNILC IQU template, 80' in Q/U), a FITS path with I, Q, U, or an
        array (3, npix) (RING, Galactic, uK_RJ, COSMO convention). The map's large-scale Q, U are
        the template's; their ratio to the map's own I sets the polarization fraction.
    pol_template_fwhm, pol_template_freq : its beam FWHM (deg or Quantity) and frequency (default:
        FWHMDEG / FREQREF cards, or the known values of the bundled and GNILC templates).
    te_correlation : correlation (0..1) of the small-scale E with the map's own ln I.
    dtype : float64 (default) or float32, the dtype of get_emission's (3, npix) map: float32 halves
        it (pysm3.Sky's unit conversion still returns float64: at nside 4096 its peak holds 2.4 GB
        less).
    max_nside, map_dist : as every pysm3 Model. With polarization, the small scales of Q, U are
        drawn on the whole sky (spherical harmonics of its ln I): a partial sky computes the
        full-sky intensity once and keeps its pixels, unless given `full_sky`; MPI ranks
        (map_dist.mpi_comm) each render their own pixels and share them.
    full_sky : a `FullSky` of a component with the same settings (`compute_full_sky`; what
        `pysm_vaedust.chunked.write_map` hands its chunks): the pixels are taken from it, nothing
        is rendered.
    """

    def __init__(self, nside=2048, seed=0, template=None, template_freq=None, template_fwhm=None,
                 mbb_temperature=T_DUST_K, mbb_index=BETA_DUST, weights=None, device="auto", cascade=True, batch_size=64, progress=False, fixed_latents=None,
                 fixed_noise=None, polarization=True, pol_template=None, pol_template_fwhm=None,
                 pol_template_freq=None, te_correlation=TE_CORRELATION, dtype=np.float64, max_nside=8192, map_dist=None,
                 full_sky=None):
        nside = check_nside(nside)
        self.dtype = check_float_dtype(dtype)
        max_nside = check_int(max_nside, "max_nside", minimum=1)
        if nside > max_nside:
            raise ValueError(f"nside={nside} exceeds max_nside={max_nside}")
        pixel_indices = None
        if map_dist is not None:
            if not hasattr(map_dist, "pixel_indices"):
                raise TypeError(f"map_dist={map_dist!r}: expected a pysm3.MapDistribution")
            if map_dist.nside is not None and map_dist.nside != nside:
                raise ValueError(f"map_dist.nside={map_dist.nside} differs from the component's nside={nside}")
            if map_dist.pixel_indices is not None:
                pixel_indices = check_pixel_indices(map_dist.pixel_indices, nside)
        super().__init__(nside=nside, max_nside=max_nside, map_dist=map_dist)
        self.seed = check_seed(seed)
        self.cascade = check_bool(cascade, "cascade")
        self.progress = check_bool(progress, "progress")
        self.weights = load_weights(check_path(weights, "weights"), device=resolve_device(device))
        self.pixel_indices = pixel_indices
        self.freq_ref, self.log_template, start = self._load_template(template, template_freq,
                                                                      _degrees(template_fwhm, "template_fwhm"))
        self.polarization = check_bool(polarization, "polarization")
        self.te_correlation = check_real(te_correlation, "te_correlation")
        if not 0 <= self.te_correlation <= 1:
            raise ValueError(f"te_correlation={te_correlation!r}: expected a number in [0, 1]")
        self.mbb_temperature = self._spectral_parameter(mbb_temperature, "mbb_temperature", u.K)
        self.mbb_index = self._spectral_parameter(mbb_index, "mbb_index", u.dimensionless_unscaled)
        # the condition's brightness is in 100 um MJy/sr: converted with scalar SED parameters, or
        # the defaults where they are maps (a partial sky must not see another conversion)
        sed = (float(self.mbb_temperature) if np.ndim(self.mbb_temperature) == 0 else T_DUST_K,
               float(self.mbb_index) if np.ndim(self.mbb_index) == 0 else BETA_DUST)
        log_offset = log_offset_to_100um(self.freq_ref, *sed)
        self.pol_template = None
        if not self.polarization and not all(v is None for v in (pol_template, pol_template_fwhm, pol_template_freq)):
            raise ValueError("pol_template / pol_template_fwhm / pol_template_freq given with polarization=False")
        if self.polarization:
            iqu, pol_fwhm, pol_freq = _load_pol_template(
                pol_template, _degrees(pol_template_fwhm, "pol_template_fwhm"),
                None if pol_template_freq is None else _scalar_frequency(pol_template_freq, "pol_template_freq"))
            # the product's I at the pol template's frequency (the modified black body of the
            # condition's conversion), at the template's resolution F / start
            intensity_fwhm = float(self.weights.metadata["normalisation"]["template_fwhm_deg"]) / start
            if pol_fwhm < intensity_fwhm:
                raise ValueError(f"pol_template_fwhm {pol_fwhm} deg is finer than the template's resolution "
                                 f"{intensity_fwhm} deg (template / template_fwhm): expected a coarser pol template")
            log_scaling = log_offset - log_offset_to_100um(pol_freq, *sed)
            dust_like = log_offset_to_100um(self.freq_ref) - log_offset_to_100um(pol_freq)
            if abs(log_scaling - dust_like) > np.log(MAX_SED_DEPARTURE):
                raise ValueError(f"mbb_index={sed[1]!r} / mbb_temperature={sed[0]!r} scale the intensity from "
                                 f"{self.freq_ref} GHz to the pol template's {pol_freq} GHz by "
                                 f"{np.exp(log_scaling - dust_like):.3g} times what dust's (beta_d {BETA_DUST}, "
                                 f"T_d {T_DUST_K} K) does: expected within 1/{MAX_SED_DEPARTURE:g} .. {MAX_SED_DEPARTURE:g} "
                                 "(the polarization fraction is the template's P over this I)")
            intensity = np.exp(self.log_template + log_scaling)
            self.pol_template = PolarizationTemplate(iqu, pol_fwhm, intensity, intensity_fwhm)
        self.renderer = Renderer(self.weights, log_offset, batch_size, fixed_latents, fixed_noise, start)
        self._check_fixed_tiles()
        if full_sky is not None:
            if not isinstance(full_sky, FullSky):
                raise TypeError(f"full_sky of type {type(full_sky).__name__}: expected a FullSky (compute_full_sky)")
            if (full_sky.nside, full_sky.seed) != (self.nside, self.seed) or (
                    (full_sky.polarization is None) == self.polarization):
                raise ValueError(f"full_sky of nside {full_sky.nside}, seed {full_sky.seed}, polarization "
                                 f"{full_sky.polarization is not None}: expected this component's nside {self.nside}, "
                                 f"seed {self.seed}, polarization {self.polarization}")
            if full_sky.settings != self.settings_digest():
                raise ValueError("full_sky was made by a component with other settings (template, weights, cascade, "
                                 "fixed latents / noise, polarization template or te_correlation): expected this "
                                 "component's")
        self.full_sky = full_sky
        self._i_ref = None
        self._pol_fractions = None

    def _check_fixed_tiles(self) -> None:
        """ValueError if fixed latents / noise name a level or tile this nside and cascade lack."""
        levels = self.renderer.levels(self.nside, self.cascade)
        for name, table in (("fixed_latents", self.renderer.fixed_latents),
                            ("fixed_noise", self.renderer.fixed_noise)):
            for level, tiles in table.items():
                if level >= len(levels):
                    raise ValueError(f"{name} has level {level}; nside={self.nside}, cascade={self.cascade} "
                                     f"has levels 0..{len(levels) - 1}")
                if tiles and max(tiles) >= levels[level].n_tiles:
                    raise ValueError(f"{name}[{level}] has tile id {max(tiles)}; level {level} has "
                                     f"{levels[level].n_tiles} tiles")

    @property
    def n_pixels(self) -> int:
        return hp.nside2npix(self.nside) if self.pixel_indices is None else len(self.pixel_indices)

    def _load_template(self, template, template_freq, template_fwhm):
        """(reference frequency GHz, log template at the first level's conditioning resolution,
        Galactic RING at TEMPLATE_WORK_NSIDE, the cascade's start factor). A map of beam b
        (`template_fwhm`, else its FWHMDEG card; GNILC's 21.8'; else 0) is smoothed by
        sqrt(F'^2 - b^2): F' the conditioning FWHM F, or 4 F when b > 1.05 F (the cascade then
        starts one level earlier, see `start_factor`)."""
        fwhm = float(self.weights.metadata["normalisation"]["template_fwhm_deg"])
        beam = 0.0
        if template is None:
            values, freq, beam = read_template(default_template_path())
        elif isinstance(template, str) and template == "pysm_gnilc":
            from .sources import fetch

            values = hp.read_map(fetch("pysm_gnilc_dust_template"), field=0, dtype=np.float64)
            freq, beam = 353.0, GNILC_FWHM_DEG
        elif isinstance(template, (str, Path)):
            values, freq, beam = read_template(template)
            if freq is None and template_freq is None:
                raise ValueError(f"template {str(template)!r} has no FREQREF header: pass template_freq=")
        else:
            if template_freq is None:
                raise ValueError("an array template needs template_freq= (e.g. '545 GHz')")
            values = _uk_rj_array(template, "template", "a HEALPix map (array or Quantity)")
            freq = None
        if values.ndim != 1 or not hp.isnpixok(values.size):
            raise ValueError(f"template has shape {values.shape}; expected a HEALPix map (12 nside^2,)")
        check_positive_finite(values, "template")
        if template_freq is not None:
            freq = _scalar_frequency(template_freq, "template_freq")
        log_values = np.log(values)
        beam = float(template_fwhm if template_fwhm is not None else beam or 0.0)
        start = start_factor(beam, fwhm)
        target = fwhm / start
        if beam >= 0.99 * target and hp.npix2nside(values.size) == TEMPLATE_WORK_NSIDE:
            return float(freq), log_values, start
        # multipoles where the working resolution's Gaussian has fallen below 1e-8 (l 1640 at 30')
        # carry nothing the conditions can see: an nside-2048 template then costs 5 s, not 12
        lmax = smoothing_lmax(hp.npix2nside(values.size), target)
        return float(freq), smooth_log_map(log_values, np.sqrt(max(target**2 - beam**2, 0.0)),
                                           TEMPLATE_WORK_NSIDE, lmax=lmax), start

    def _spectral_parameter(self, value, name, unit):
        """A scalar or a map at this component's pixels (float64) of T_d (K, > 0) or beta_d, from a
        number, an array, a Quantity or a FITS path."""
        positive = unit == u.K
        wrong_type = TypeError(f"{name} of type {type(value).__name__}: expected a number, a RING map "
                               "array or a FITS path")
        if isinstance(value, (str, Path)):
            arr = np.asarray(self.read_map(str(value), unit=unit).value, dtype=np.float64)
        elif isinstance(value, (bool, np.bool_)):
            raise wrong_type
        else:
            try:
                arr = np.asarray(u.Quantity(value, unit).value, dtype=np.float64)
            except u.UnitConversionError:
                raise ValueError(f"{name} has unit {value.unit}: expected {unit or 'no unit'}") from None
            except (TypeError, ValueError):
                raise wrong_type from None
        bad = ~np.isfinite(arr) | ((arr <= 0) if positive else False)
        if np.any(bad):
            raise ValueError(f"{name} has {int(np.sum(bad))} non-finite{' or non-positive' if positive else ''} "
                             f"values (e.g. {float(arr[bad].flat[0])!r}): expected finite numbers{' > 0' if positive else ''}")
        if arr.ndim == 0:
            return float(arr)
        full = hp.nside2npix(self.nside)
        if arr.shape == (full,) and self.pixel_indices is not None:
            arr = arr[self.pixel_indices]
        if arr.shape != (self.n_pixels,):
            raise ValueError(f"{name} has shape {arr.shape}; expected a scalar or ({self.n_pixels},)")
        return arr

    def template_at_pixels(self) -> np.ndarray:
        """log T at this component's pixels (float64)."""
        return interpolate_at_pixels(self.log_template, self.nside, self.pixel_indices)

    def reference_map(self) -> np.ndarray:
        """Intensity at the reference frequency (uK_RJ, float32, own pixels); computed once, cached
        (with the polarization fractions, which need the full-sky ln I: `compute_full_sky`)."""
        if self._i_ref is None:
            full = self.full_sky
            if full is None and self.polarization:
                full = self._shared_full_sky()
            if full is None:
                self._i_ref = self._render(self.pixel_indices)
            else:
                pixels = self.pixel_indices
                self._i_ref = full.intensity if pixels is None else full.intensity[pixels]
                if self.polarization:
                    self._pol_fractions = full.polarization.fractions(pixels)
        return self._i_ref

    def _shared_full_sky(self) -> FullSky:
        """The FullSky of this component: rendered on the whole sky, or, with an MPI map_dist of
        several ranks, each rank rendering its own pixels and every rank assembling the whole
        sky's intensity from all of them (allgather) and computing its polarization field."""
        comm = getattr(self.map_dist, "mpi_comm", None)
        if comm is None or comm.size == 1 or any(comm.allgather(self.pixel_indices is None)):
            return self.compute_full_sky()
        intensity = np.zeros(hp.nside2npix(self.nside), dtype=np.float32)   # exp(...) > 0 where written
        # pixel indices travel as runs of consecutive pixels (a ring distribution: a few per rank)
        own = np.asarray(self.pixel_indices, dtype=np.int64)
        breaks = np.flatnonzero(np.diff(own) != 1) + 1
        starts, ends = (own[np.r_[0, breaks]], own[np.r_[breaks - 1, -1]] + 1) if len(own) else (own, own)
        for run_starts, run_ends, values in comm.allgather((starts, ends, self._render(self.pixel_indices))):
            offset = 0
            for a, b in zip(run_starts.tolist(), run_ends.tolist()):
                intensity[a:b] = values[offset:offset + b - a]
                offset += b - a
            del values
        uncovered = int(np.count_nonzero(intensity == 0))
        if uncovered:
            raise ValueError(f"map_dist: the MPI ranks' pixel_indices leave {uncovered} pixels on no rank; "
                             "polarization needs the whole sky's intensity")
        return self.compute_full_sky(intensity)

    def _render(self, pixels) -> np.ndarray:
        """exp(ln T + R + delta) (float32: PySM's templates' precision) at `pixels` (None: all)."""
        small_scales = self.renderer.field(self.nside, self.seed, pixels, self.log_template, self.cascade,
                                           self.progress)
        # in blocks, into small_scales itself: no full-sky float64 temporaries (2.4 GB at nside 4096)
        for start in range(0, len(small_scales), RENDER_BLOCK):
            stop = min(start + RENDER_BLOCK, len(small_scales))
            block = np.arange(start, stop) if pixels is None else pixels[start:stop]
            log_i = interpolate_at_pixels(self.log_template, self.nside, block)
            log_i += small_scales[start:stop]
            small_scales[start:stop] = np.exp(log_i, out=log_i)
        return small_scales

    def compute_full_sky(self, intensity: np.ndarray | None = None) -> FullSky:
        """The `FullSky` of this component's settings: the intensity at the reference frequency
        rendered on the whole sky, or `intensity` ((12 nside^2,) float32: this component's own,
        e.g. assembled chunk by chunk), and the polarization field of its ln I."""
        npix = hp.nside2npix(self.nside)
        if intensity is None:
            intensity = self._render(None)
        elif not (isinstance(intensity, np.ndarray) and intensity.dtype == np.float32):
            raise TypeError(f"intensity of type {type(intensity).__name__}: expected a float32 array (this "
                            "component's reference_map on the whole sky)")
        elif intensity.shape != (npix,) or not (np.all(np.isfinite(intensity)) and intensity.min() > 0):
            raise ValueError(f"intensity of shape {intensity.shape}: expected ({npix},) finite values > 0")
        field = self.pol_template.field(intensity, self.seed, self.te_correlation) if self.polarization else None
        return FullSky(self.nside, self.seed, intensity, field, self.settings_digest())

    def settings_digest(self) -> str:
        """sha256 of everything but the pixels the full-sky intensity and polarization field
        depend on: nside, seed, cascade, template, weights, their device and batch size (the
        rounding of the convolutions), fixed latents / noise, the polarization template and
        te_correlation (not dtype, progress or the SED, applied after)."""
        digest = hashlib.sha256(repr((self.nside, self.seed, self.cascade, self.polarization, self.te_correlation,
                                      self.renderer.log_offset, self.renderer.start_factor,
                                      self.renderer.batch_size, self.weights.vae.device.type)).encode())
        digest.update(np.ascontiguousarray(self.log_template).tobytes())
        digest.update(json.dumps(self.weights.metadata, sort_keys=True, default=str).encode())
        for name, tensor in self.weights.vae.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().numpy().tobytes())
        for table in (self.renderer.fixed_latents, self.renderer.fixed_noise):
            for level in sorted(table):
                for tile in sorted(table[level]):
                    digest.update(repr((level, tile)).encode())
                    digest.update(table[level][tile].tobytes())
        if self.polarization:
            digest.update(repr((self.pol_template.fwhm_deg, sorted(self.pol_template.fit.items()))).encode())
            digest.update(self.pol_template.e_alm.tobytes())
            digest.update(self.pol_template.b_alm.tobytes())
        return digest.hexdigest()

    def polarization_fractions(self) -> np.ndarray | None:
        """(Q / I, U / I) (2, npix) float32 at own pixels (None without polarization): the same at
        every frequency (Q and U share I's modified black body)."""
        self.reference_map()
        return self._pol_fractions

    def get_emission(self, freqs, weights=None) -> u.Quantity:
        """(3, npix) uK_RJ map (`dtype`; I, Q, U; Q = U = 0 without polarization) at a frequency or integrated over a bandpass: freqs a
        Quantity (n,), weights None (top hat) or (n,) finite, >= 0, not all zero."""
        freqs, weights = check_bandpass(freqs, weights)
        i_ref = self.reference_map()
        if len(i_ref) >= LARGE_MAP_PIXELS:
            # pysm3.Sky's unit conversion leaves astropy UnitsError tracebacks whose frames hold the
            # previous call's (3, npix) output until the cyclic collector runs: free it first
            gc.collect()
        out = np.zeros((3, len(i_ref)), dtype=self.dtype)
        try:
            _mbb_intensity(freqs, trapezoid_steps(freqs, weights), i_ref, self.freq_ref, np.atleast_1d(np.asarray(self.mbb_index, dtype=np.float64)),
                           np.atleast_1d(np.asarray(self.mbb_temperature, dtype=np.float64)), out[0])
        except ZeroDivisionError:  # numba's: a black body underflowed to 0 (reported below)
            out[0] = np.nan
        if out.shape[1] and not (out[0].min() > 0 and np.isfinite(out[0].sum())):
            raise ValueError(f"freqs={freqs} GHz: the modified black body of mbb_index / mbb_temperature "
                             "overflows or underflows float64 there; expected frequencies where it is finite > 0")
        if self._pol_fractions is not None:
            np.multiply(out[0], self._pol_fractions, out=out[1:])
        return out << u.uK_RJ


__all__ = ["FullSky", "VAEDust"]
