"""Stages 6-7 — the PySM component: conditional VAE small scales on a large-scale template.

    ln I_nu_ref(p) = ln T(p) + R(p) + delta(p),     I_nu = I_nu_ref * MBB(nu) / MBB(nu_ref)

T: the template (uK_RJ at nu_ref), smoothed in log to the weights' conditioning FWHM F (30');
the cascade's levels k = 0..K (pixels and patches 4^k finer, self-similar): level k's patches
are decoded *given* their coarse part, the field so far sampled on the patch's condition grid,
and supply every scale finer than F / f_k, f_k its scale factor. R: what levels < K added, seen
at level K's conditioning resolution (in-patch Gaussian of FWHM F / f_K, blended like the
patches); delta: level K's blended patches. Without the cascade R = 0 and delta = level 0.
T is exp of a log-smoothed map (as the bundled template): the added scales have zero mean in
ln I, as in the data. MBB: modified black body (mbb_index beta_d, mbb_temperature T_d),
bandpass-integrated with pysm3's own utilities.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import healpy as hp
import numpy as np
import pysm3.units as u
import torch
from numba import njit
from pysm3 import utils as pysm_utils
from pysm3.models.dust import blackbody_ratio
from pysm3.models.template import Model
from tqdm import tqdm

from .checks import (check_bandpass, check_bool, check_frequency, check_int, check_nside, check_path,
                     check_pixel_indices, check_real, check_seed)
from .cutouts import PatchGeometry, condition_input, sample_patches
from .data import BETA_DUST, T_DUST_K, check_positive_finite, log_offset_to_100um
from .template import default_template_path, read_template, smooth_log_map
from .tiling import CascadeLevel, PatchSet, blended, cascade_levels, gaussian_multiplier, patch_normals, tile_centres
from .train import resolve_device
from .weights import Weights, load_weights

#: nside of the working copy of the (smoothed) log template (13.7' pixels for a 30' beam)
TEMPLATE_WORK_NSIDE = 256
#: beam of the PySM GNILC dust template (deg)
GNILC_FWHM_DEG = 21.8 / 60
#: output pixels interpolated per chunk (bounds the temporary theta/phi/weight arrays)
PIXEL_CHUNK = 1 << 22


def interpolate_at_pixels(values: np.ndarray, nside: int, pixels: np.ndarray | None) -> np.ndarray:
    """Bilinear samples (float64) of a RING map `values` (any nside) at `pixels` of `nside`
    (None = all), in chunks of PIXEL_CHUNK pixels."""
    n = hp.nside2npix(nside) if pixels is None else len(pixels)
    out = np.empty(n)
    for start in range(0, n, PIXEL_CHUNK):
        stop = min(start + PIXEL_CHUNK, n)
        pix = np.arange(start, stop) if pixels is None else pixels[start:stop]
        out[start:stop] = hp.get_interp_val(values, *hp.pix2ang(nside, pix))
    return out


def _fixed_table(tables, shape: tuple, name: str) -> dict:
    """{level: {tile: float32 array of `shape`}} from {int: {int: array-like}}; errors name `name`."""
    if tables is None:
        return {}
    if not isinstance(tables, Mapping) or not all(isinstance(v, Mapping) for v in tables.values()):
        raise TypeError(f"{name}: expected {{level: {{tile id: array {shape}}}}}, got {type(tables).__name__}")
    out = {}
    for level, table in tables.items():
        level = check_int(level, f"{name} level", minimum=0)
        out[level] = {}
        for tile, value in table.items():
            tile = check_int(tile, f"{name}[{level}] tile id", minimum=0)
            try:
                arr = np.asarray(value, dtype=np.float32)
            except (TypeError, ValueError):
                raise TypeError(f"{name}[{level}][{tile}]: expected an array of numbers") from None
            if arr.shape != shape or not np.all(np.isfinite(arr)):
                raise ValueError(f"{name}[{level}][{tile}] has shape {arr.shape}: expected finite values "
                                 f"of shape {shape}")
            out[level][tile] = arr
    return out


def _replace_rows(values: torch.Tensor, table: dict | None, ids: np.ndarray | None) -> None:
    """In place: rows r of `values` whose tile ids[r] is in `table` get table[ids[r]]."""
    if not table or ids is None:
        return
    rows = [r for r, t in enumerate(ids) if int(t) in table]
    if rows:
        values[rows] = torch.from_numpy(np.stack([table[int(ids[r])] for r in rows])).to(values)


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


class SmallScaleGenerator:
    """Decodes the patches of the cascade levels given their coarse parts and blends them onto
    HEALPix pixels. weights: loaded conditional VAE; log_offset: ln of the factor that turns the
    template's unit into 100 um MJy/sr (the unit of the condition's brightness)."""

    def __init__(self, weights: Weights, log_offset: float = 0.0, batch_size: int = 1024,
                 fixed_latents: dict | None = None, fixed_noise: dict | None = None, start_factor: float = 1.0):
        self.weights = weights
        self.vae = weights.vae.to(memory_format=torch.channels_last)  # ~1.7x faster CPU convolutions
        d, n = self.vae.latent_dim, self.vae.config.npix
        self.fixed_latents = _fixed_table(fixed_latents, (d,), "fixed_latents")
        self.fixed_noise = _fixed_table(fixed_noise, (n, n), "fixed_noise")
        self.batch_size = check_int(batch_size, "batch_size", minimum=1)
        self.log_offset = float(log_offset)
        meta = weights.metadata
        self.normalisation = meta["normalisation"]
        self.base = PatchGeometry(meta["geometry"]["npix"], meta["geometry"]["size_deg"])
        self.slope = float(meta["spectral_slope"]["slope"])
        self.start_factor = start_factor

    def levels(self, nside: int, cascade: bool = True) -> list[CascadeLevel]:
        """The cascade levels for `nside` (only the first without the cascade)."""
        levels = cascade_levels(nside, self.base, self.slope, self.start_factor)
        return levels if cascade else levels[:1]

    @property
    def normals_size(self) -> int:
        return self.vae.latent_dim + self.vae.config.npix**2

    def conditions(self, level: CascadeLevel, coarse_map: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """The model's conditions (B, 2, n/2, n/2) of tiles `ids`: the coarse field (ln I in the
        template's unit, RING, any nside) sampled on their condition grids."""
        lon, lat = tile_centres(level, ids)
        coarse = sample_patches(coarse_map, "G", lon, lat, level.geometry.halved())
        return condition_input(coarse, self.normalisation, level.amplitude, self.log_offset)

    def decode(self, level: CascadeLevel, conditions: np.ndarray, normals: np.ndarray,
               ids: np.ndarray | None = None) -> torch.Tensor:
        """Small scales (2, B, n, n) in ln I of tiles given their conditions (B, 2, n/2, n/2) and
        per-patch normals (B, D + n^2) (whitened latents, then the decoder noise's white normals):
        [decoded means (+ the normalisation's mean), decoder noise]. Tiles `ids` listed in
        `fixed_latents[level]` / `fixed_noise[level]` use their fixed latents / noise patch
        (normalised units) instead."""
        d, n = self.vae.latent_dim, self.vae.config.npix
        eps = torch.from_numpy(normals).to(self.vae.device)
        c = torch.from_numpy(conditions).to(self.vae.device).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            z = eps[:, :d].clone()
            _replace_rows(z, self.fixed_latents.get(level.index), ids)
            mean = self.vae.decode(z, c).contiguous()[:, 0]
            noise = self.vae.decoder_noise(eps[:, d:].reshape(-1, 1, n, n))[:, 0]
            _replace_rows(noise, self.fixed_noise.get(level.index), ids)
        norm = self.normalisation
        scale = level.amplitude * norm["log_scale"]
        return torch.stack([scale * mean + level.amplitude * norm["log_mean"], scale * noise])

    def level_field(self, level: CascadeLevel, nside: int, seed: int, pixels: np.ndarray | None,
                    coarse_map: np.ndarray, smooth_fwhm_deg: float | None = None, bar=None):
        """One level's blended small scales at `pixels` of `nside` (None = all), float32,
        conditioned on `coarse_map` (decoded means blended as a partition of unity, decoder noise
        variance-preserving: `tiling.blended`); with `smooth_fwhm_deg` also the blend of the same
        patches smoothed in-patch by that Gaussian (the next level's view of them), else None.

        Decoding of the next batch overlaps with the (GIL-free) reprojection of the previous one;
        a single worker keeps the accumulation order, so results are bit-reproducible."""
        n_out = hp.nside2npix(nside) if pixels is None else len(pixels)
        lookup = None
        if pixels is not None:
            lookup = np.full(hp.nside2npix(nside), -1, dtype=np.int64)
            lookup[pixels] = np.arange(len(pixels))
        sums = [np.zeros((4, n_out), dtype=np.float32) for _ in range(1 if smooth_fwhm_deg is None else 2)]
        n = self.vae.config.npix
        smoother = None if smooth_fwhm_deg is None else torch.from_numpy(
            gaussian_multiplier(n, level.geometry.pixel_size_deg, smooth_fwhm_deg)).to(self.vae.device)

        def accumulate(patches, parts):
            for total, (means, noise) in zip(sums, parts):
                patches.accumulate(means, noise, total)

        with ThreadPoolExecutor(max_workers=1) as worker:
            pending = None
            for start in range(0, level.n_tiles, self.batch_size):
                ids = np.arange(start, min(start + self.batch_size, level.n_tiles))
                patches = PatchSet(nside, level, ids, lookup)
                if len(patches.used):
                    # the whole batch of tile ids is decoded, used or not: the convolutions' numbers
                    # depend on the batch, and partial skies (MPI ranks) must equal the full sky bit for bit
                    decoded = self.decode(level, self.conditions(level, coarse_map, ids),
                                          patch_normals(seed, level.index, ids, self.normals_size), ids)
                    versions = [decoded] if smoother is None else [
                        decoded, torch.fft.ifft2(torch.fft.fft2(decoded) * smoother).real]
                    parts = [version.cpu().numpy() for version in versions]
                    if pending is not None:
                        pending.result()
                    pending = worker.submit(accumulate, patches, parts)
                if bar is not None:
                    bar.update(len(ids))
            if pending is not None:
                pending.result()
        if np.any(sums[0][2] <= 0):
            raise RuntimeError(f"cascade level {level.index}: {int(np.sum(sums[0][2] <= 0))} pixels "
                               "not covered by any patch (tiling bug)")
        return blended(sums[0]), (blended(sums[1]) if len(sums) > 1 else None)

    def field(self, nside: int, seed: int, pixels: np.ndarray | None, log_template: np.ndarray,
              cascade: bool = True, progress: bool = False) -> np.ndarray:
        """R + delta (see the module doc) at `pixels` (RING; None = full sky), float32, for the
        log template `log_template` (RING, any nside). Levels before the last are computed on the
        whole sky at their working nside (every MPI rank the same), the last on `pixels` only
        (at a lower working nside and bilinearly interpolated when the output pixel is much finer
        than the level's)."""
        pixels_out = np.arange(hp.nside2npix(nside)) if pixels is None else pixels
        levels = self.levels(nside, cascade)
        fwhm0 = float(self.normalisation["template_fwhm_deg"])
        coarse_map, residual = log_template, None   # the field so far; R at the next level's resolution
        with tqdm(total=sum(lv.n_tiles for lv in levels), desc=f"VAEDust nside {nside}", unit="patch",
                  disable=not progress) as bar:
            for level, following in zip(levels[:-1], levels[1:]):
                work = working_nside(level, nside)
                _, smoothed = self.level_field(level, work, seed, None, coarse_map, fwhm0 / following.factor, bar)
                residual = smoothed if residual is None else (
                    interpolate_at_pixels(residual, work, None).astype(np.float32) + smoothed)
                coarse_map = interpolate_at_pixels(log_template, work, None) + residual
            last = levels[-1]
            work = working_nside(last, nside)
            if work == nside:
                delta, _ = self.level_field(last, nside, seed, pixels, coarse_map, None, bar)
            else:
                delta = self.interpolated_level_field(last, work, nside, seed, pixels_out, coarse_map, bar)
        if residual is not None:
            delta += interpolate_at_pixels(residual, nside, pixels).astype(np.float32)
        return delta

    def interpolated_level_field(self, level, work_nside, nside, seed, pixels_out, coarse_map, bar):
        """A level computed at `work_nside` on the pixels bilinear interpolation needs, then
        interpolated to `pixels_out` of `nside` (float32)."""
        full = np.zeros(hp.nside2npix(work_nside), dtype=np.float32)
        if len(pixels_out) == hp.nside2npix(nside):
            full[:] = self.level_field(level, work_nside, seed, None, coarse_map, None, bar)[0]
        else:
            needed = np.zeros(len(full), dtype=bool)
            for start in range(0, len(pixels_out), PIXEL_CHUNK):
                pix = pixels_out[start:start + PIXEL_CHUNK]
                needed[hp.get_interp_weights(work_nside, *hp.pix2ang(nside, pix))[0].ravel()] = True
            full[needed] = self.level_field(level, work_nside, seed, np.flatnonzero(needed), coarse_map, None, bar)[0]
        return interpolate_at_pixels(full, nside, pixels_out).astype(np.float32)


def start_factor(beam_deg: float, fwhm_deg: float) -> float:
    """Scale factor of the cascade's first level for a template of beam `beam_deg` and weights
    conditioned at `fwhm_deg`: 1, or 1/4 (one coarser level, conditioned at 4 fwhm) when the
    template is coarser than 1.05 fwhm; a template coarser than 4.2 fwhm is refused."""
    if beam_deg <= 1.05 * fwhm_deg:
        return 1.0
    if beam_deg > 4.2 * fwhm_deg:
        raise ValueError(f"the template's beam {60 * beam_deg:.1f}' is coarser than 4x the conditioning "
                         f"resolution {60 * fwhm_deg:.1f}' (one cascade level earlier reaches {240 * fwhm_deg:.0f}')")
    return 0.25


def working_nside(level: CascadeLevel, nside: int) -> int:
    """Lowest nside <= `nside` whose pixel is at most half the level's patch pixel."""
    target = 0.5 * level.geometry.pixel_size_deg * 60
    work = 1
    while work < nside and hp.nside2resol(work, arcmin=True) > target:
        work *= 2
    return work


@njit(cache=True)
def _mbb_intensity(freqs, weights, i_ref, freq_ref, mbb_index, mbb_temperature, out):
    """Bandpass-integrated modified black body of the intensity, in place into `out` (uK_RJ)."""
    step = np.empty_like(i_ref)
    for i in range(len(freqs)):
        # -2: the black body is in flux units, the template in K_RJ (as pysm3's dust models)
        step[:] = i_ref * (freqs[i] / freq_ref) ** (mbb_index - 2.0) * blackbody_ratio(freqs[i], freq_ref, mbb_temperature)
        pysm_utils.trapz_step_inplace(freqs, weights, i, step, out)


class VAEDust(Model):
    """Thermal dust intensity: large-scale template x VAE small scales, modified black body SED.

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
    max_nside, map_dist : as every pysm3 Model.
    """

    def __init__(self, nside=2048, seed=0, template=None, template_freq=None, template_fwhm=None,
                 mbb_temperature=T_DUST_K, mbb_index=BETA_DUST, weights=None, device="auto", cascade=True, batch_size=1024, progress=False, fixed_latents=None,
                 fixed_noise=None, max_nside=8192, map_dist=None):
        nside = check_nside(nside)
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
        fwhm = None if template_fwhm is None else check_real(u.Quantity(template_fwhm, u.deg).value if isinstance(
            template_fwhm, u.Quantity) else template_fwhm, "template_fwhm", positive=True)
        self.freq_ref, self.log_template, start = self._load_template(template, template_freq, fwhm)
        self.mbb_temperature = self._spectral_parameter(mbb_temperature, "mbb_temperature", u.K)
        self.mbb_index = self._spectral_parameter(mbb_index, "mbb_index", u.dimensionless_unscaled)
        # the condition's brightness is in 100 um MJy/sr: converted with scalar SED parameters, or
        # the defaults where they are maps (a partial sky must not see another conversion)
        log_offset = log_offset_to_100um(
            self.freq_ref, float(self.mbb_temperature) if np.ndim(self.mbb_temperature) == 0 else T_DUST_K,
            float(self.mbb_index) if np.ndim(self.mbb_index) == 0 else BETA_DUST)
        self.generator = SmallScaleGenerator(self.weights, log_offset, batch_size, fixed_latents, fixed_noise, start)
        self._check_fixed_tiles()
        self._i_ref = None

    def _check_fixed_tiles(self) -> None:
        """ValueError if fixed latents / noise name a level or tile this nside and cascade lack."""
        levels = self.generator.levels(self.nside, self.cascade)
        for name, table in (("fixed_latents", self.generator.fixed_latents),
                            ("fixed_noise", self.generator.fixed_noise)):
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
            try:
                values = np.asarray(u.Quantity(template, u.uK_RJ).value if isinstance(template, u.Quantity)
                                    else template, dtype=np.float64)
            except u.UnitConversionError:
                raise ValueError(f"template has unit {template.unit}: expected uK_RJ") from None
            except (TypeError, ValueError):
                raise TypeError(f"template of type {type(template).__name__}: expected None, 'pysm_gnilc', "
                                "a FITS path or a HEALPix map (array or Quantity)") from None
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
        return float(freq), smooth_log_map(log_values, np.sqrt(max(target**2 - beam**2, 0.0)),
                                           TEMPLATE_WORK_NSIDE), start

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
        """Intensity at the reference frequency (uK_RJ, float64, own pixels); computed once, cached."""
        if self._i_ref is None:
            delta = self.generator.field(self.nside, self.seed, self.pixel_indices, self.log_template,
                                         self.cascade, self.progress)
            log_i = self.template_at_pixels()
            log_i += delta
            self._i_ref = np.exp(log_i, out=log_i)
        return self._i_ref

    def get_emission(self, freqs, weights=None) -> u.Quantity:
        """(3, npix) uK_RJ map (Q = U = 0) at a frequency or integrated over a bandpass: freqs a
        Quantity (n,), weights None (top hat) or (n,) finite, >= 0, not all zero."""
        freqs, weights = check_bandpass(freqs, weights)
        i_ref = self.reference_map()
        out = np.zeros((3, len(i_ref)), dtype=np.float64)
        try:
            if np.ndim(self.mbb_index) == 0 and np.ndim(self.mbb_temperature) == 0:
                _mbb_intensity(freqs, weights, i_ref, self.freq_ref, float(self.mbb_index),
                               float(self.mbb_temperature), out[0])
            else:
                _mbb_intensity(freqs, weights, i_ref, self.freq_ref,
                               np.ascontiguousarray(np.broadcast_to(self.mbb_index, i_ref.shape)),
                               np.ascontiguousarray(np.broadcast_to(self.mbb_temperature, i_ref.shape)), out[0])
        except ZeroDivisionError:  # numba's: a black body underflowed to 0 (reported below)
            out[0] = np.nan
        if out.shape[1] and not (out[0].min() > 0 and np.isfinite(out[0].sum())):
            raise ValueError(f"freqs={freqs} GHz: the modified black body of mbb_index / mbb_temperature "
                             "overflows or underflows float64 there; expected frequencies where it is finite > 0")
        return out << u.uK_RJ


__all__ = ["VAEDust", "SmallScaleGenerator"]
