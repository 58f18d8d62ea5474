"""Stage 7 at scale — a VAEDust map made chunk by chunk through pysm3, written as it is made.

A full-sky `pysm3.Sky.get_emission` at nside 8192 returns (3, 805M) float64 arrays (19.3 GB
each), more than a 24 GB machine holds. `write_map` makes the map instead in bands of whole rings
(`ring_chunks`), each through `pysm3.Sky(..., map_dist=MapDistribution(pixel_indices=band))` as
any pysm3 user would: the renderer computes every cascade level of a chunk on that band plus a
halo (`Renderer.bands`), so a chunk's work grows with its pixels plus the halo, not with the
number of chunks, and every chunk equals the full map at its pixels bit for bit. Each chunk goes
to an HDF5 dataset before the next one is made.

Intensity only, no full-sky array is held. With polarization the small scales of Q, U are drawn
from the full-sky ln I (spherical harmonics), so it takes two passes: the intensity at the
reference frequency rendered chunk by chunk into one full-sky float32 map (3.2 GB at 8192), its
polarization field (`VAEDust.compute_full_sky`), then I, Q, U through pysm3.Sky on the field's
fixed bands of mirror rings (`healpix.mirror_bands`), each written as it is made. Both equal the
full-sky Sky map (at float32) bit for bit.

    pysm_vaedust-map --nside 8192 --freq 353 --out dust_8192_353GHz.h5 [--polarization]

The file: dataset "map" (fields, 12 nside^2) float32, RING, Galactic, fields "I" (or "I", "Q",
"U" with polarization), attributes nside, ordering, coord, unit, fields, freq_GHz, seed, chunks
(the ring chunks the intensity was rendered in), pol_bands (with polarization: the mirror bands
I, Q, U were written in).
Read one field into healpy with ``h5py.File(path)["map"][0]`` (one float32 full-sky map).
"""

from __future__ import annotations

import argparse
import sys
import time

import h5py
import healpy as hp
import numpy as np
import pysm3
import pysm3.units as u
from tqdm import tqdm

from . import __version__
from .checks import check_bandpass, check_int, check_nside
from .data import atomic_write
from .healpix import RingBand, band_spans

#: pixels per chunk by default: 2^26 (12 chunks at nside 8192, 3 at 4096). At nside 8192 the tiles
#: that can reach 12 chunks' pixels and halos are 1.18x one map's (the last level 1.09x, the one
#: before 1.28x); 1.35x with 24 chunks
CHUNK_PIXELS = 1 << 26


def ring_chunks(nside: int, n_chunks: int) -> list[RingBand]:
    """`n_chunks` bands of whole rings of `nside`, north to south, of about equal pixel counts
    (fewer when n_chunks > 3 nside: a band holds at least one ring)."""
    nside, n_chunks = check_nside(nside), check_int(n_chunks, "n_chunks", minimum=1)
    if n_chunks > 4 * nside - 1:
        raise ValueError(f"n_chunks={n_chunks}: nside {nside} has only {4 * nside - 1} rings")
    ring_end = np.cumsum([RingBand(nside, r, r).n_pixels for r in range(1, 4 * nside)])   # pixels up to ring r
    targets = np.arange(1, n_chunks) * ring_end[-1] / n_chunks
    lasts = np.unique(np.clip(np.searchsorted(ring_end, targets) + 1, 1, 4 * nside - 2))
    firsts = np.r_[1, lasts + 1]
    return [RingBand(nside, int(a), int(b)) for a, b in zip(firsts, np.r_[lasts, 4 * nside - 1])]


#: VAEDust arguments only a polarized component takes
_POLARIZATION_ARGUMENTS = ("pol_template", "pol_template_fwhm", "pol_template_freq")


def write_map(path, nside: int, freqs, bandpass_weights=None, n_chunks: int | None = None, output_unit="uK_RJ",
              progress: bool = True, **component_kwargs):
    """Write the VAEDust map at `nside` (frequency or bandpass `freqs`, a Quantity, with
    `bandpass_weights`) to the HDF5 file `path` in `n_chunks` ring bands (default: CHUNK_PIXELS pixels
    each), each made by `pysm3.Sky(component_objects=[VAEDust(nside, map_dist=..., **component_kwargs)])`
    in `output_unit`. Intensity only by default (polarization=False, unlike VAEDust); with
    polarization=True in two passes (module doc). Returns the path; the file appears only when
    complete."""
    from .component import VAEDust

    nside = check_nside(nside)
    freqs_ghz, _ = check_bandpass(freqs, bandpass_weights, weights_name="bandpass_weights")   # fails here, before any work, on a bad bandpass
    n_chunks = max(1, -(-hp.nside2npix(nside) // CHUNK_PIXELS)) if n_chunks is None else n_chunks
    chunks = ring_chunks(nside, n_chunks)
    for key in ("nside", "map_dist", "full_sky"):
        if key in component_kwargs:
            raise ValueError(f"{key}= is set by write_map")
    polarization = bool(component_kwargs.setdefault("polarization", False))
    fields = ("I", "Q", "U") if polarization else ("I",)
    unit = u.Unit(output_unit)
    full_sky_component = VAEDust(nside=nside, **component_kwargs)   # bad arguments fail here, before any work

    def sky_chunk(pixels, **extra):
        """I (and Q, U) at `pixels` through pysm3.Sky, (fields, n)."""
        dist = pysm3.MapDistribution(pixel_indices=pixels, nside=nside)
        sky = pysm3.Sky(nside=nside, output_unit=unit, map_dist=dist, component_objects=[
            VAEDust(nside=nside, map_dist=dist, **component_kwargs, **extra)])
        return sky.get_emission(freqs, bandpass_weights).value[:len(fields)]

    def write(tmp):
        with h5py.File(tmp, "w") as handle:
            data = handle.create_dataset("map", shape=(len(fields), hp.nside2npix(nside)), dtype=np.float32,
                                         chunks=(1, min(hp.nside2npix(nside), 1 << 20)))
            handle.attrs.update({"nside": nside, "ordering": "RING", "coord": "G", "unit": unit.to_string(),
                                 "fields": ",".join(fields), "freq_GHz": freqs_ghz,
                                 "seed": int(component_kwargs.get("seed", 0)), "chunks": len(chunks),
                                 "pysm_vaedust_version": __version__})
            if bandpass_weights is not None:
                handle.attrs["bandpass_weights"] = np.asarray(bandpass_weights, dtype=np.float64)
            bar = dict(unit="chunk", disable=not progress)
            if not polarization:
                for band in tqdm(chunks, desc=f"VAEDust nside {nside} in {len(chunks)} chunks", **bar):
                    data[:, band.first_pixel:band.first_pixel + band.n_pixels] = sky_chunk(band.pixels())
                return
            intensity = np.empty(hp.nside2npix(nside), dtype=np.float32)
            unpolarized = {k: v for k, v in component_kwargs.items() if k not in _POLARIZATION_ARGUMENTS}
            unpolarized["polarization"] = False
            for band in tqdm(chunks, desc=f"VAEDust nside {nside}: intensity in {len(chunks)} chunks", **bar):
                dist = pysm3.MapDistribution(pixel_indices=band.pixels(), nside=nside)
                intensity[band.first_pixel:band.first_pixel + band.n_pixels] = VAEDust(
                    nside=nside, map_dist=dist, **unpolarized).reference_map()
            full_sky = full_sky_component.compute_full_sky(intensity)
            bands = full_sky.polarization.bands()
            handle.attrs["pol_bands"] = len(bands)
            for band in tqdm(bands, desc=f"VAEDust nside {nside}: I, Q, U on {len(bands)} bands", **bar):
                emission = sky_chunk(np.concatenate([rings.pixels() for rings in band]), full_sky=full_sky)
                for sky, own in band_spans(band):
                    data[:, sky] = emission[:, own]

    return atomic_write(path, write)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="A VAEDust map at any nside (8192 on 24 GB) made in ring-band "
                                     "chunks through pysm3 and written to HDF5 as they are made.")
    parser.add_argument("--nside", type=int, required=True)
    parser.add_argument("--freq", type=float, nargs="+", required=True,
                        help="frequency in GHz, or the frequencies of a top-hat bandpass")
    parser.add_argument("--out", required=True, help="HDF5 file to write")
    parser.add_argument("--chunks", type=int, default=None, help=f"ring-band chunks (default: {CHUNK_PIXELS} pixels each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unit", default="uK_RJ", help="output unit (as pysm3.Sky's output_unit)")
    parser.add_argument("--polarization", action="store_true", help="I, Q, U (two passes, see the module doc)")
    parser.add_argument("--weights", default=None, help="weights file (default: shipped)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    freqs = np.array(args.freq) * u.GHz
    path = write_map(args.out, args.nside, freqs[0] if len(freqs) == 1 else freqs, n_chunks=args.chunks,
                     output_unit=args.unit, seed=args.seed, polarization=args.polarization, weights=args.weights)
    print(f"wrote {path} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
