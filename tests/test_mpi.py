"""Distributed and partial-sky VAEDust maps equal the single-process full-sky map, bit for bit.

test_mpi_two_ranks runs ``mpiexec -n 2 python tests/mpi_script.py`` (needs mpi4py and an MPI
launcher: ``pip install mpi4py mpich``); it is skipped, saying why, when either is missing.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pysm3
import pysm3.units as u
import pytest
from mpi_script import write_test_weights  # tests/ is on sys.path (pytest rootdir-relative import)

from pysm_vaedust.component import VAEDust
from pysm_vaedust.config import build_sky

TESTS = Path(__file__).resolve().parent
NSIDE = 32
FREQ = 353 * u.GHz


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    return write_test_weights(tmp_path_factory.mktemp("weights") / "tiny.h5")


def mpiexec() -> str | None:
    """The MPI launcher next to this Python (the `mpich` wheel installs one there), else on PATH."""
    local = Path(sys.executable).parent / "mpiexec"
    return str(local) if local.exists() else shutil.which("mpiexec")


def test_mpi_two_ranks(random_weights):
    # find_spec only: importing mpi4py.MPI here would initialise MPI inside the pytest process
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed (pip install mpi4py mpich)")
    launcher = mpiexec()
    if launcher is None:
        pytest.skip("no mpiexec launcher found (pip install mpich)")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [launcher, "-n", "2", sys.executable, str(TESTS / "mpi_script.py"),
           "--weights", str(random_weights), "--nside", str(NSIDE), "--seed", "7"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=TESTS.parent)
    assert result.returncode == 0, (f"{' '.join(cmd)} exited {result.returncode}\n"
                                    f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    assert "bit-identical" in result.stdout


class _TwoRanks:
    """An MPI communicator of two ranks in one process: allgather returns this rank's object and
    the other rank's `other` (False for the collective pixel_indices-is-None question)."""

    size = 2

    def __init__(self, other):
        self.other = other

    def allgather(self, obj):
        return [obj, False if isinstance(obj, bool) else self.other]


def test_mpi_ranks_assemble_the_polarization_field_from_runs_of_pixels(random_weights):
    """With polarization, an MPI rank renders only its own pixels (several runs, unsorted, or none)
    and assembles the sky from the ranks' runs: its I, Q, U equal the single-process map bit for
    bit; pixels on no rank are refused."""
    nside = 16
    settings = dict(seed=3, weights=random_weights, device="cpu")
    serial = VAEDust(nside=nside, **settings)
    reference, intensity = serial.get_emission(FREQ).value, serial.reference_map()
    npix = 12 * nside**2
    mine = np.random.default_rng(0).permutation(np.r_[np.arange(100, 300), np.arange(1000, 1100), [5, 7]])

    def rank(own, other_pixels):
        other = (other_pixels, other_pixels + 1, intensity[other_pixels])   # one-pixel runs
        return VAEDust(nside=nside, map_dist=type("D", (), {"pixel_indices": own, "nside": nside,
                                                            "mpi_comm": _TwoRanks(other)})(), **settings)

    for own, other_pixels in ((mine, np.setdiff1d(np.arange(npix), mine)), (np.zeros(0, dtype=int), np.arange(npix))):
        component = rank(own, other_pixels)
        component.renderer.field = lambda nside, seed, pixels, *args, render=component.renderer.field: (
            render(nside, seed, pixels, *args) if pixels is not None and len(pixels) == len(own) else
            pytest.fail("a rank rendered more than its own pixels"))
        np.testing.assert_array_equal(component.get_emission(FREQ).value, reference[:, own])
    with pytest.raises(ValueError, match="no rank"):
        rank(mine, np.setdiff1d(np.arange(npix), mine)[10:]).get_emission(FREQ)


def test_partial_sky_equals_full_sky(random_weights):
    """MapDistribution(pixel_indices=subset): exactly the full map's values at those pixels,
    in the subset's (unsorted) order, also with a per-pixel spectral index map."""
    rng = np.random.default_rng(0)
    npix = 12 * NSIDE**2
    subset = np.concatenate([np.arange(2000, 2600), rng.choice(np.arange(5000, npix), 300, replace=False)])
    rng.shuffle(subset)
    beta = 1.5 + 0.2 * rng.random(npix)

    dist = pysm3.MapDistribution(pixel_indices=subset, nside=NSIDE)
    for polarization in (False, True):   # False: the renderer's own pixel-subset path
        full = VAEDust(nside=NSIDE, seed=7, weights=random_weights, mbb_index=beta, device="cpu",
                       polarization=polarization)
        reference = full.get_emission(FREQ).value
        part = VAEDust(nside=NSIDE, seed=7, weights=random_weights, mbb_index=beta, device="cpu", map_dist=dist,
                       polarization=polarization)
        values = part.get_emission(FREQ).value
        assert values.shape == (3, len(subset))
        np.testing.assert_array_equal(values, reference[:, subset])

    empty = pysm3.MapDistribution(pixel_indices=np.zeros(0, dtype=np.int64), nside=NSIDE)   # a rank without pixels
    assert VAEDust(nside=NSIDE, seed=7, weights=random_weights, device="cpu", polarization=False,
                   map_dist=empty).get_emission(FREQ).shape == (3, 0)

    sky = build_sky({"components": [{"class": "pysm_vaedust.VAEDust", "seed": 7, "mbb_index": beta,
                                     "weights": str(random_weights), "device": "cpu"}]}, map_dist=dist)
    np.testing.assert_array_equal(sky.get_emission(FREQ).value, reference[:, subset])


def test_ring_band_chunks_equal_the_full_sky_with_work_near_one_map(random_weights, monkeypatch):
    """A map made in chunks of whole rings (how nside 8192 fits in memory) equals the full map bit
    for bit through three cascade levels, each chunk computing the levels before the last on its
    bands plus a halo; the last level, most of the work, decodes within 10 % of the full map's
    patches over all chunks together."""
    from pysm_vaedust.healpix import RingBand
    from pysm_vaedust.renderer import Renderer

    nside = 512
    decoded, computed = [], []
    original_decode, original_level_field = Renderer.decode, Renderer.level_field

    def counting(self, level, conditions, normals, ids=None):
        decoded.append((level.index, len(ids)))
        return original_decode(self, level, conditions, normals, ids)

    def recording(self, level, nside, seed, pixels, *args, **kwargs):
        computed.append((level.index, nside, pixels))
        return original_level_field(self, level, nside, seed, pixels, *args, **kwargs)

    monkeypatch.setattr(Renderer, "decode", counting)
    monkeypatch.setattr(Renderer, "level_field", recording)

    def make(map_dist=None):
        return VAEDust(nside=nside, seed=3, weights=random_weights, device="cpu", polarization=False,
                       map_dist=map_dist).get_emission(FREQ).value[0]

    full = make()
    levels = {level for level, _ in decoded}
    assert levels == {0, 1, 2}
    full_last = sum(n for level, n in decoded if level == 2)
    decoded.clear()
    computed.clear()
    chunked = np.full_like(full, np.nan)
    edges = np.linspace(1, 4 * nside, 5).astype(int)
    for first, stop in zip(edges[:-1], edges[1:]):
        band = RingBand(nside, int(first), int(stop) - 1)
        chunked[band.pixels()] = make(pysm3.MapDistribution(pixel_indices=band.pixels(), nside=nside))
    np.testing.assert_array_equal(chunked, full)
    assert sum(n for level, n in decoded if level == 2) <= 1.1 * full_last
    for index, bound in ((0, 1.5), (1, 1.25)):   # the earlier levels: bands plus halos, not the sky per chunk
        bands = [(work, pixels) for level, work, pixels in computed if level == index]
        assert len(bands) == 4 and all(isinstance(p, RingBand) for _, p in bands)
        assert sum(p.n_pixels for _, p in bands) <= bound * 12 * bands[0][0] ** 2


def test_a_level_interpolated_to_finer_pixels_equals_the_full_sky_on_any_subset(random_weights):
    """Without the cascade at nside 512 the level is computed at nside 256 on the pixels the
    interpolation reads and interpolated: any pixel subset gives the full map's values."""
    rng = np.random.default_rng(1)
    nside = 512
    subset = np.concatenate([np.arange(4 * nside), rng.choice(12 * nside**2, 500, replace=False)])
    rng.shuffle(subset)

    def make(map_dist=None):
        return VAEDust(nside=nside, seed=2, weights=random_weights, device="cpu", polarization=False, cascade=False,
                       map_dist=map_dist).get_emission(FREQ).value[0]

    full = make()
    np.testing.assert_array_equal(make(pysm3.MapDistribution(pixel_indices=subset, nside=nside)), full[subset])


def test_write_map_in_chunks_equals_the_full_sky(random_weights, tmp_path):
    """`write_map` (the nside-8192 path: ring-band chunks through pysm3.Sky, written to HDF5 as
    they are made) writes the full-sky Sky map at float32, with its metadata; bad requests fail
    before anything is written."""
    import h5py

    from pysm_vaedust.chunked import ring_chunks, write_map

    nside = 64
    chunks = ring_chunks(nside, 5)
    assert [c.first_ring for c in chunks][0] == 1 and chunks[-1].last_ring == 4 * nside - 1
    assert all(a.last_ring + 1 == b.first_ring for a, b in zip(chunks[:-1], chunks[1:]))
    sizes = [c.n_pixels for c in chunks]
    assert max(sizes) < 1.3 * min(sizes)
    path = write_map(tmp_path / "map.h5", nside, FREQ, n_chunks=5, output_unit="MJy/sr", progress=False,
                     seed=7, weights=str(random_weights), device="cpu")
    full = pysm3.Sky(nside=nside, output_unit="MJy/sr", component_objects=[
        VAEDust(nside=nside, seed=7, weights=random_weights, device="cpu", polarization=False)]).get_emission(FREQ)
    with h5py.File(path) as handle:
        np.testing.assert_array_equal(handle["map"][:], full.value[:1].astype(np.float32))
        assert handle.attrs["unit"] == "MJy / sr" and handle.attrs["fields"] == "I" and handle.attrs["chunks"] == 5
    with pytest.raises(ValueError, match="set by write_map"):
        write_map(tmp_path / "bad.h5", nside, FREQ, map_dist=None)
    with pytest.raises(ValueError, match="pol_template"):
        write_map(tmp_path / "bad.h5", nside, FREQ, pol_template_fwhm=2.0)   # polarization=False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.h5"]


def test_write_map_with_polarization_equals_the_full_sky(random_weights, tmp_path, monkeypatch):
    """With polarization, `write_map`'s two passes (the intensity in ring chunks, then I, Q, U
    through pysm3.Sky on the polarization field's bands of mirror rings) write the full-sky Sky
    map at float32 bit for bit; a partial sky given the FullSky equals it too."""
    import h5py

    import pysm_vaedust.polarization as polarization
    from pysm_vaedust.chunked import write_map

    nside = 32
    monkeypatch.setattr(polarization, "POL_BAND_PIXELS", 2000)   # 7 bands
    settings = dict(seed=7, weights=random_weights, device="cpu", te_correlation=0.5)
    component = VAEDust(nside=nside, **settings)
    full = pysm3.Sky(nside=nside, output_unit="MJy/sr", component_objects=[component]).get_emission(FREQ)
    path = write_map(tmp_path / "pol.h5", nside, FREQ, n_chunks=3, output_unit="MJy/sr", progress=False,
                     polarization=True, **settings)
    with h5py.File(path) as handle:
        np.testing.assert_array_equal(handle["map"][:], full.value.astype(np.float32))
        assert handle.attrs["fields"] == "I,Q,U" and handle.attrs["chunks"] == 3 and handle.attrs["pol_bands"] == 7
    full_sky = component.compute_full_sky(component.reference_map())
    pixels = np.arange(3000, 9000, 7)
    part = VAEDust(nside=nside, map_dist=pysm3.MapDistribution(pixel_indices=pixels, nside=nside),
                   full_sky=full_sky, **settings)

    def no_rendering(*args, **kwargs):
        raise AssertionError("a component given full_sky rendered")

    monkeypatch.setattr(part.renderer, "field", no_rendering)
    np.testing.assert_array_equal(part.get_emission(FREQ).value, component.get_emission(FREQ).value[:, pixels])
    for other, match in ((dict(seed=8), "seed"), (dict(te_correlation=0.4), "other settings"),
                         (dict(cascade=False), "other settings"), (dict(batch_size=5), "other settings"),
                         (dict(fixed_latents={0: {0: np.ones(component.weights.vae.latent_dim)}}), "other settings"),
                         (dict(full_sky=component), "FullSky")):
        with pytest.raises((ValueError, TypeError), match=match):
            VAEDust(nside=nside, **{**settings, "full_sky": full_sky, **other})
    for intensity, error in ((component.reference_map().astype(float), TypeError),
                             (component.reference_map()[:100], ValueError),
                             (np.zeros(12 * nside**2, np.float32), ValueError)):
        with pytest.raises(error, match="intensity"):
            component.compute_full_sky(intensity)
