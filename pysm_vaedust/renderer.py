"""Stages 6-7 — the renderer: the cascade's small scales on HEALPix pixels.

levels -> conditions -> decode -> reproject -> blend, for any subset of pixels (the work grows
with the subset plus a halo of the patches touching it, not with the sky):

- levels (`tiling.cascade_levels`): k = 0..K, pixels and patches 2^k finer (self-similar);
  level k supplies every scale finer than F / f_k (F the weights' conditioning FWHM, 30'), as
  (1 - G_k) of the sky, G_k the Gaussian of FWHM F / f_k; below it keeps h of its own patches
  (`tiling.handover_gain` from the model's measured coherence with the field it is conditioned
  on), so the levels' powers sum to the sky's across every handover (no dip where they meet).
- conditions: level k's tiles read the field so far (log template + what levels < k added, the
  last of them seen at F / f_k) on their condition grids (`Renderer.conditions`).
- decode: whitened latents and decoder-noise normals from a counter keyed by (seed, level, tile)
  (`tiling.patch_normals`), decoded given the conditions (`Renderer.decode`).
- reproject: each decoded patch resampled band-limited onto a grid UPSAMPLE times finer, the
  training targets' window (IRIS's effective beam, the cutouts' box average) divided out
  (`tiling.resampling_matrix`) and tapered above l = 2 nside of the pixels it is sampled at
  (`BAND_LIMIT`), then sampled bilinearly at the HEALPix pixels of its footprint.
- blend: what overlapping tiles share as a partition of unity, the rest of each decoded patch
  (what its latents and decoder noise draw on their own) variance-preserving (`tiling.BlendWindow`:
  the sums slide with the tiles in RING order, so no full-sky sums are held).
  Averaging the latents' part as a partition of unity would halve its variance where tiles
  overlap; preserving the variance of the shared part would inflate it. On the first level,
  conditioned on the template alone (which may hold no structure), the shared part is the
  decoded mean at zero latents (the prediction from the condition: a second decoding); on the
  later ones, conditioned on the field so far (which always holds the earlier levels' drawn
  structure), it is the band of the decoded patch where that prediction carries most of the
  power (`tiling.shared_band`, per axis: 84-98 % below kappa = 0.55 and 1-16 % above 0.8 cycles
  per conditioning FWHM in radial bins on level-1 tiles of the bundled template, the least
  structured 5 % alike).

The result, `Renderer.field`, is R + delta of `component`: ln I_nu_ref = ln T + R + delta.
"""

from __future__ import annotations

from collections.abc import Mapping

import healpy as hp
import numpy as np
import torch
from tqdm import tqdm

from .checks import check_int
from .cutouts import PatchGeometry, condition_input, oversampling, sample_patches
from .healpix import BandMap, RingBand, interpolate_at_pixels, interpolation_pixels
from .tiling import (BlendWindow, CascadeLevel, PatchSet, Resampler, cascade_levels, footprint_radius, patch_normals,
                     resampling_matrix, tile_centres, tiles_near)
from .weights import Weights

#: multipole (in units of nside) where the reprojection's band limit starts (ends at 1.5x):
#: HEALPix pixels of nside N resolve l ~ 2 N; power above it would alias when point-sampled
BAND_LIMIT = 2.0


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


def decoded_window(metadata: dict) -> tuple[float, int]:
    """The window the weights' training targets carry, in patch pixels (the same at every
    cascade level, which is self-similar): (Gaussian FWHM, sub-samples per pixel of the box
    average). The FWHM is the data's effective beam measured by the noise-floor selection
    (`cutouts.noise_floor_ell`; 0 when it did not run), the box the cutouts' oversampling of
    the training map (`cutouts.oversampling`; 1 when the weights do not name the map's nside)."""
    geometry = PatchGeometry(int(metadata["geometry"]["npix"]), float(metadata["geometry"]["size_deg"]))
    beam_arcmin = float(metadata.get("selection", {}).get("effective_beam_fwhm_arcmin") or 0.0)
    data_nside = metadata.get("data", {}).get("nside")
    return beam_arcmin / (60 * geometry.pixel_size_deg), (1 if data_nside is None else
                                                          oversampling(int(data_nside), geometry))


class Renderer:
    """Decodes the patches of the cascade levels given their coarse parts, reprojects and blends
    them onto HEALPix pixels. weights: loaded conditional VAE; log_offset: ln of the factor that
    turns the template's unit into 100 um MJy/sr (the unit of the condition's brightness)."""

    def __init__(self, weights: Weights, log_offset: float = 0.0, batch_size: int = 64,
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
        self.window = decoded_window(meta)
        #: how the model's samples repeat the field they are conditioned on (`tiling.handover_gain`)
        self.coherence = meta.get("handover_coherence")
        #: the map carries dust only: a decoder noise fixed at the data's noise + CIB floor
        #: (`train.fix_noise_at_floor`) stands for that floor alone and is left out
        self.noise_is_floor = meta.get("training_config", {}).get("decoder_noise") == "floor"

    def resampler(self, level: CascadeLevel, nside: int, smooth_fwhm_deg: float = 0.0,
                  handover_fwhm_deg: float = 0.0, shared: bool = False) -> Resampler:
        """The reprojection's resampling of `level`'s decoded patches (the training window
        divided out) for pixels of `nside`: seen through a Gaussian of `smooth_fwhm_deg` (0:
        none), or (`handover_fwhm_deg`, the next level's conditioning FWHM) as much of them as the
        level keeps beside the next one (`tiling.handover_gain`); with `shared` only the band
        overlapping tiles share (`tiling.shared_band` of the level's conditioning FWHM). Scales the
        pixels cannot hold are tapered away from l = BAND_LIMIT nside (point sampling would alias
        them onto larger scales)."""
        pixel_deg = level.geometry.pixel_size_deg
        condition_fwhm_pix = float(self.normalisation["template_fwhm_deg"]) / level.factor / pixel_deg
        return Resampler(resampling_matrix(self.vae.config.npix, *self.window, smooth_fwhm_deg / pixel_deg,
                                           handover_fwhm_deg / pixel_deg,
                                           limit_cycles=BAND_LIMIT * nside * np.radians(pixel_deg) / (2 * np.pi),
                                           coherence=self.coherence,
                                           shared_fwhm_pix=condition_fwhm_pix if shared else 0.0),
                         self.vae.device)

    def views(self, level: CascadeLevel, nside: int, next_fwhm_deg: float | None = None) -> list:
        """[(whole, shared)] resamplings (`resampler`) of each view `level_field` blends: the
        level, or what it keeps beside the next level and the next level's view of it; `shared`
        takes what the tiles share from `decode`'s second part: all of it on the first level,
        the shared band on the later ones."""
        views = ([{}] if next_fwhm_deg is None else
                 [{"handover_fwhm_deg": next_fwhm_deg}, {"smooth_fwhm_deg": next_fwhm_deg}])
        pairs = []
        for view in views:
            whole = self.resampler(level, nside, **view)
            pairs.append((whole, self.resampler(level, nside, **view, shared=True) if shares_band(level) else whole))
        return pairs

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
        [the patch: decoded mean + decoder noise, what the tiles share comes from: the decoded
        mean at zero latents on the first level, the decoded mean on the later ones] (each + the
        normalisation's mean; see the module doc's blend). Tiles `ids` listed in
        `fixed_latents[level]` / `fixed_noise[level]` use their fixed latents / noise patch
        (normalised units) instead."""
        d, n = self.vae.latent_dim, self.vae.config.npix
        eps = torch.from_numpy(normals).to(self.vae.device)
        c = torch.from_numpy(conditions).to(self.vae.device)
        with torch.no_grad():
            z = eps[:, :d].clone()
            _replace_rows(z, self.fixed_latents.get(level.index), ids)
            c = c.contiguous(memory_format=torch.channels_last)
            if shares_band(level):
                mean = basis = self.vae.decode(z, c).contiguous()[:, 0]
            else:
                mean, basis = (m.contiguous()[:, 0] for m in self.vae.decode_with_prediction(z, c))
            noise = (torch.zeros_like(mean) if self.noise_is_floor else
                     self.vae.decoder_noise(eps[:, d:].reshape(-1, 1, n, n), c)[:, 0])
            _replace_rows(noise, self.fixed_noise.get(level.index), ids)
        norm = self.normalisation
        scale, offset = level.amplitude * norm["log_scale"], level.amplitude * norm["log_mean"]
        return torch.stack([scale * (mean + noise) + offset, scale * basis + offset])

    def level_field(self, level: CascadeLevel, nside: int, seed: int, pixels, coarse_map, next_fwhm_deg: float | None = None,
                    bar=None):
        """One level's blended small scales at `pixels` of `nside` (None = all, a `RingBand`, or
        RING pixel indices), float32, conditioned on `coarse_map` (a map or `BandMap` holding
        every pixel the touching tiles' condition grids read; what the tiles share of `decode`'s
        parts (`views`) and the rest blended by `tiling.BlendWindow`), and None; with
        `next_fwhm_deg` (the next level's conditioning FWHM) instead what this level keeps beside
        the next one, and the next level's view of it (seen through that Gaussian). Both come
        from `resampler`. Only the batches of `batch_size` tiles that can reach the pixels are
        decoded, in order; each batch whole (bit-reproducible whatever the pixels)."""
        pixels = RingBand.full(nside) if pixels is None else pixels
        order = None
        if isinstance(pixels, RingBand):
            lookup, first, n_out = None, pixels.first_pixel, pixels.n_pixels
            theta_min, theta_max = pixels.colatitudes
        else:
            pixels = np.asarray(pixels, dtype=np.int64)
            if np.any(pixels[1:] < pixels[:-1]):   # computed in RING order (the blend window's), then put back
                order = np.argsort(pixels, kind="stable")
                pixels = pixels[order]
            if np.any(pixels[1:] == pixels[:-1]):
                raise ValueError("pixels: duplicate pixel indices")
            first, last, n_out = int(pixels[0]), int(pixels[-1]), len(pixels)
            lookup = None   # a range of pixels (a chunk of whole rings) needs no lookup table
            if n_out != last - first + 1:
                lookup = np.full(last - first + 1, -1, dtype=np.int64)
                lookup[pixels - first] = np.arange(n_out)
            theta_min, theta_max = colatitude_range(nside, first, last)
        views = self.views(level, nside, next_fwhm_deg)
        near_start, near_stop = tiles_near(level, theta_min, theta_max)
        batches = range(near_start - near_start % self.batch_size, near_stop, self.batch_size)
        if bar is not None:
            bar.update(level.n_tiles - sum(min(self.batch_size, level.n_tiles - b) for b in batches))  # out of reach
        sets = [PatchSet(nside, level, np.arange(start, min(start + self.batch_size, level.n_tiles)), lookup,
                         first, n_out) for start in batches]
        reach = np.array([s.pixel_reach() for s in sets], dtype=np.int64).reshape(-1, 2)
        reach = reach - first if lookup is None else np.searchsorted(pixels, reach)   # output positions
        bounds, widest = BlendWindow.bounds(np.clip(reach, 0, n_out))
        window = BlendWindow(len(views), n_out, 2 * widest, f"cascade level {level.index}: ")
        for patches, (lo, hi) in zip(sets, bounds):
            ids = patches.ids
            if len(patches.used):
                # the whole batch of tile ids is decoded (the convolutions' numbers depend on the
                # batch's size, not on the other rows' values): the tiles touching no pixel get
                # zero conditions and normals, so partial skies equal the full sky bit for bit
                # (tested on the CPU)
                used = patches.used
                m = self.vae.config.condition_npix
                conditions = np.zeros((len(ids), 2, m, m), dtype=np.float32)
                conditions[used] = self.conditions(level, coarse_map, ids[used])
                if not np.all(np.isfinite(conditions[used])):   # NaN: a band lacked pixels a condition grid reads
                    raise RuntimeError(f"cascade level {level.index}: conditions read outside the field computed "
                                       "so far (the halo of Renderer.bands is too small: a bug)")
                normals = np.zeros((len(ids), self.normals_size), dtype=np.float32)
                normals[used] = patch_normals(seed, level.index, ids[used], self.normals_size)
                patch, basis = self.decode(level, conditions, normals, ids)
                with torch.no_grad():
                    fields = []
                    for whole, shared in views:
                        common = shared(basis)
                        fields += [common, whole(patch) - common]
                    fields = torch.stack(fields).cpu().numpy()
                window.reserve(int(lo), int(hi))
                window.add(patches, fields)
            if bar is not None:
                bar.update(len(ids))
        out = window.finish()
        if order is not None:
            for view in out:
                view[order] = view.copy()
        return out[0], (out[1] if len(views) > 1 else None)

    def bands(self, levels: list[CascadeLevel], nside: int, pixels: np.ndarray | None) -> list[RingBand]:
        """The pixels each level before the last computes, as bands of whole rings at its working
        nside: what the next level's tiles touching the pixels it computes read (their condition
        grids, within two footprint radii), down to the last level's `pixels` of `nside` (None =
        all): the whole sky for a full map, the chunk plus a halo for a chunk."""
        if pixels is None:
            theta_min, theta_max = 0.0, np.pi
        else:
            theta_min, theta_max = colatitude_range(nside, int(np.min(pixels)), int(np.max(pixels)))
            theta_min -= np.pi / working_nside(levels[-1], nside)   # the last level's neighbours when interpolated
            theta_max += np.pi / working_nside(levels[-1], nside)
        bands = []
        for level, following in zip(levels[-2::-1], levels[:0:-1]):
            reach = 2 * footprint_radius(following.geometry)
            band = RingBand.covering(working_nside(level, nside), theta_min - reach, theta_max + reach)
            theta_min, theta_max = band.colatitudes
            bands.insert(0, band)
        return bands

    def earlier_levels(self, levels: list[CascadeLevel], nside: int, seed: int, pixels: np.ndarray | None,
                       log_template: np.ndarray, bar=None, on_level=None):
        """The levels before the last of `levels`, on their `bands`, each conditioned on the field
        so far: (what they keep, summed (a `BandMap`; None without such levels), the field so far
        as the last level sees it (`log_template` or a `BandMap`)). `on_level(level, band, own)`,
        if given, sees each level's own kept field (float32 over the band) first."""
        fwhm0 = float(self.normalisation["template_fwhm_deg"])
        coarse_map, kept = log_template, None   # the field so far as the next level sees it; R
        for level, following, band in zip(levels[:-1], levels[1:], self.bands(levels, nside, pixels)):
            own, seen = self.level_field(level, band.nside, seed, band, coarse_map, fwhm0 / following.factor, bar)
            if on_level is not None:
                on_level(level, band, own)
            if kept is not None:
                previous = interpolate_at_pixels(kept, band.nside, band, np.float32)
                own += previous
                seen += previous
                del previous
            kept = BandMap(own, band.nside, band.first_pixel)
            coarse = interpolate_at_pixels(log_template, band.nside, band)
            coarse += seen
            coarse_map = BandMap(coarse, band.nside, band.first_pixel)
            del seen, coarse
        return kept, coarse_map

    def field(self, nside: int, seed: int, pixels: np.ndarray | None, log_template: np.ndarray,
              cascade: bool = True, progress: bool = False) -> np.ndarray:
        """R + delta (see the module doc) at `pixels` (RING; None = full sky), float32, for the
        log template `log_template` (RING, any nside). Levels before the last are computed on
        bands of whole rings at their working nside (`bands`: the chunk and a halo), the last on
        `pixels` only (at a lower working nside and bilinearly interpolated when the output pixel
        is much finer than the level's)."""
        if pixels is not None and len(pixels) == 0:   # e.g. an MPI rank without pixels
            return np.zeros(0, dtype=np.float32)
        levels = self.levels(nside, cascade)
        with tqdm(total=sum(lv.n_tiles for lv in levels), desc=f"VAEDust nside {nside}", unit="patch",
                  disable=not progress) as bar:
            kept, coarse_map = self.earlier_levels(levels, nside, seed, pixels, log_template, bar)
            last = levels[-1]
            work = working_nside(last, nside)
            if work == nside:
                delta, _ = self.level_field(last, nside, seed, pixels, coarse_map, None, bar)
            else:
                delta = self.interpolated_level_field(last, work, nside, seed, pixels, coarse_map, bar)
        if kept is not None:
            delta += interpolate_at_pixels(kept, nside, pixels, np.float32)
        if not np.all(np.isfinite(delta)):   # NaN: a band lacked pixels the interpolations read
            raise RuntimeError(f"nside {nside}: the small scales read outside the bands computed (a bug)")
        return delta

    def interpolated_level_field(self, level, work_nside, nside, seed, pixels, coarse_map, bar):
        """A level computed at `work_nside` on the pixels bilinear interpolation needs, then
        interpolated to `pixels` of `nside` (None = all; float32)."""
        if pixels is None:
            field = self.level_field(level, work_nside, seed, None, coarse_map, None, bar)[0]
            return interpolate_at_pixels(field, nside, None, np.float32)
        needed = interpolation_pixels(work_nside, nside, pixels)
        span = np.zeros(needed[-1] - needed[0] + 1, dtype=np.float32)
        span[needed - needed[0]] = self.level_field(level, work_nside, seed, needed, coarse_map, None, bar)[0]
        return interpolate_at_pixels(BandMap(span, work_nside, int(needed[0])), nside, pixels, np.float32)


def shares_band(level: CascadeLevel) -> bool:
    """Whether `level`'s tiles share a band of their one decoded patch (the levels after the
    first, conditioned on the field so far) rather than a second decoding at zero latents (the
    first, conditioned on the template alone; see the module doc's blend)."""
    return level.index > 0


def colatitude_range(nside: int, first_pixel: int, last_pixel: int) -> tuple[float, float]:
    """Colatitudes (rad) of RING pixels `first_pixel` <= `last_pixel` of `nside`: the range of every
    pixel between them (RING order is by ring)."""
    theta = hp.pix2ang(nside, [first_pixel, last_pixel])[0]
    return float(theta[0]), float(theta[1])


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


__all__ = ["Renderer"]
