"""IRIS data stage on real plates: reader, point sources, mosaic seams, cache faults."""

import json
import multiprocessing
import shutil
import signal
import subprocess
import sys

import healpy as hp
import numpy as np
import pytest
from astropy.io import fits

from pysm_vaedust import iris
from pysm_vaedust.cutouts import PatchGeometry, cut_patches
from pysm_vaedust.data import shared_data_dir
from pysm_vaedust.iris import (build_mosaic, clean_plate, diffusion_fill, find_point_sources, iris_directory,
                               iris_mosaic, plate_checksums, read_plate)
from pysm_vaedust.train import select_patches

IRIS = shared_data_dir() / iris.IRIS_DIR_NAME
pytestmark = pytest.mark.skipif(not (IRIS / iris.MANIFEST).is_file(), reason=f"no IRIS plates at {IRIS}")
#: a high-latitude plate (b = -50.5) and the two plates that overlap it along its meridian
PLATES = ("I099B4H0.fits", "I100B4H0.fits", "I101B4H0.fits")
BEAM_PIX = iris.BEAM_FWHM_ARCMIN / 3.0


def test_plate_reader_gives_galactic_coordinates_through_astropy():
    plate = read_plate(IRIS / "I100B4H0.fits")
    assert plate.values.shape == (250, 250) and plate.pixel_arcmin == pytest.approx(3.0, rel=1e-3)
    lon, lat = plate.galactic_lonlat()
    index = {r.split("\t")[0]: r.split("\t") for r in (IRIS / "plate_index.tsv").read_text().splitlines()[1:]}
    centre = hp.ang2vec(float(index[plate.name][1]), float(index[plate.name][2]), lonlat=True)
    mid = hp.ang2vec(lon[125, 125], lat[125, 125], lonlat=True)
    assert np.degrees(np.arccos(min(mid @ centre, 1.0))) < 0.1  # the plate index's centre
    col, row = plate.pixel_of(lon[[10, 200], [30, 40]], lat[[10, 200], [30, 40]])
    np.testing.assert_allclose(col, [30, 40], atol=1e-6)  # round trip Galactic -> FK4 B1950 -> pixel
    np.testing.assert_allclose(row, [10, 200], atol=1e-6)


def _write_plate(path, header_changes):
    with fits.open(IRIS / "I100B4H0.fits") as hdus:
        header, data = hdus[0].header.copy(), hdus[0].data
    for key, value in header_changes.items():
        if value is None:
            del header[key]
        else:
            header[key] = value
    fits.PrimaryHDU(data, header).writeto(path)
    return path


@pytest.mark.parametrize("changes, message", [({"RADESYS": "GAPPT"}, "unknown celestial frame"),
                                              ({"CTYPE1": "RA---SIN", "CTYPE2": "DEC--SIN"}, "gnomonic"),
                                              ({"CTYPE1": None, "CTYPE2": None}, "gnomonic"),
                                              ({"BUNIT": "K"}, "MJy/sr")])
def test_plate_without_usable_wcs_is_refused_by_name(tmp_path, changes, message):
    path = _write_plate(tmp_path / "bad_plate.fits", changes)
    with pytest.raises(ValueError, match=message) as err:
        read_plate(path)
    assert "bad_plate.fits" in str(err.value)


def test_corrupted_or_missing_plate_and_empty_request_are_refused(tmp_path):
    folder = tmp_path / "plates"
    folder.mkdir()
    for name in PLATES[:2]:
        shutil.copy(IRIS / name, folder / name)
    (folder / iris.MANIFEST).write_text("".join(line + "\n" for line in (IRIS / iris.MANIFEST).read_text().splitlines()
                                                if line.split()[1] in PLATES))
    with open(folder / PLATES[0], "r+b") as handle:  # flip one byte of the image
        handle.seek(5000)
        byte = handle.read(1)
        handle.seek(5000)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ValueError, match=f"{PLATES[0]}.*corrupted"):
        plate_checksums(folder)
    with pytest.raises(FileNotFoundError, match=PLATES[2]):
        plate_checksums(folder, [PLATES[2]])
    with pytest.raises(ValueError, match="no IRIS plates requested"):
        build_mosaic(folder, 64, names=[])
    with pytest.raises(FileNotFoundError, match="no IRIS plates"):
        iris_directory(tmp_path / "nowhere")


def _beam_source(shape, row, col, amplitude):
    sigma = BEAM_PIX / np.sqrt(8 * np.log(2))
    rr, cc = np.indices(shape)
    return amplitude * np.exp(-((rr - row) ** 2 + (cc - col) ** 2) / (2 * sigma ** 2))


def test_injected_sources_are_found_and_diffuse_pixels_untouched():
    plate = read_plate(IRIS / "I100B4H0.fits")
    base, _ = clean_plate(plate)  # a real plate with its own sources removed
    rng = np.random.default_rng(1)
    # local diffuse scatter of a beam-sized source's peak: the matched-filter residual scatter
    noise = 1.4826 * np.median(np.abs(base - np.median(base)))
    rows, cols = rng.uniform(12, 238, 60), rng.uniform(12, 238, 60)
    keep = np.ones(60, bool)
    for i in range(60):  # sources at least 8 px apart
        keep[i] = np.all(np.hypot(rows[:i][keep[:i]] - rows[i], cols[:i][keep[:i]] - cols[i]) > 8)
    rows, cols = rows[keep], cols[keep]
    injected = base.copy()
    amplitudes = rng.uniform(10, 60, len(rows)) * noise
    for r, c, a in zip(rows, cols, amplitudes):
        injected += _beam_source(base.shape, r, c, a)
    found = find_point_sources(injected, BEAM_PIX)
    # the S/N the detector assigns on the injected map, at the injected places
    distance = np.hypot(found.peaks[:, :1] - rows[None], found.peaks[:, 1:] - cols[None])
    hit = (distance < 1.5).any(0)
    snr_at = np.array([found.snr[np.argmin(d)] if h else 0 for d, h in zip(distance.T, hit)])
    bright = amplitudes / noise >= 10
    recall = hit[bright].mean()
    assert recall >= 0.95, f"recall {recall:.3f} of {bright.sum()} sources >= 10 sigma"
    assert np.median(snr_at[hit]) > 10
    # diffuse pixels away from every source are returned exactly as they were
    filled = diffusion_fill(injected, found.mask)
    far = ~found.mask
    np.testing.assert_array_equal(filled[far], injected[far])


def test_no_false_sources_on_a_gaussian_field():
    rng = np.random.default_rng(0)
    n = 250
    ky, kx = np.meshgrid(np.fft.fftfreq(n), np.fft.fftfreq(n), indexing="ij")
    k = np.hypot(kx, ky)
    amplitude = np.where(k > 0, np.maximum(k, 1 / n) ** (-2.6 / 2), 0) * np.exp(-(k * 2.3) ** 2)
    false_pixels, total = 0, 0
    for _ in range(4):
        field = np.fft.ifft2(amplitude * np.fft.fft2(rng.standard_normal((n, n)))).real
        field = field / field.std() + 0.3 * rng.standard_normal((n, n))  # dust-like field + white noise
        found = find_point_sources(10 + field, BEAM_PIX)
        false_pixels += found.mask.sum()
        total += field.size
    assert false_pixels / total < 1e-3, f"{false_pixels} of {total} pixels flagged on Gaussian fields"


@pytest.fixture(scope="module")
def small_mosaic(tmp_path_factory):
    cache = tmp_path_factory.mktemp("iris_cache")
    dust = iris_mosaic(1024, cache_dir=cache, names=PLATES, progress=False)
    return dust, cache


def test_mosaic_covers_the_plates_without_seams(small_mosaic):
    dust, _ = small_mosaic
    m = dust.intensity
    assert dust.frame == "G" and dust.nside == 1024 and m.size == hp.nside2npix(1024)
    covered = np.isfinite(m)
    assert 0.005 < covered.mean() < 0.03 and np.all(m[covered] > 0)
    plates = [read_plate(IRIS / name) for name in PLATES]
    pix = np.flatnonzero(covered)
    lon, lat = hp.pix2ang(1024, pix, lonlat=True)
    # a pixel's jump to its neighbours: |m - mean of the 8 neighbours| / local level
    neigh = hp.get_all_neighbours(1024, pix)
    neigh_vals = np.where(neigh >= 0, m[np.maximum(neigh, 0)], np.nan)
    jump = np.abs(m[pix] - np.nanmean(neigh_vals, 0)) / m[pix]
    complete = np.isfinite(neigh_vals).all(0)
    inside = np.zeros((len(plates), pix.size), bool)
    edge = np.zeros(pix.size, bool)
    for k, plate in enumerate(plates):
        col, row = plate.pixel_of(lon, lat)
        dist = np.minimum.reduce([col + 0.5, 249.5 - col, row + 0.5, 249.5 - row])
        inside[k] = dist > 0
        edge |= (np.abs(dist) < 2)
    # plate borders that another plate covers (where a seam would be) against single-plate interiors
    border = edge & (inside.sum(0) >= 1) & complete
    interior = ~edge & complete
    ratio = np.median(jump[border]) / np.median(jump[interior])
    assert border.sum() > 500 and ratio < 1.15, f"border/interior neighbour-jump ratio {ratio:.3f}"
    assert dust.extra["mosaic"]["point_sources"]["count"] > 50


def test_mosaic_cache_is_reused_and_rebuilt_when_corrupted(small_mosaic):
    dust, cache = small_mosaic
    fits_path = next(cache.glob("iris100_mosaic_nside1024_*.fits"))
    stamp = fits_path.stat().st_mtime_ns
    again = iris_mosaic(1024, cache_dir=cache, names=PLATES, progress=False)
    assert fits_path.stat().st_mtime_ns == stamp and again.sha256 == dust.sha256
    with open(fits_path, "r+b") as handle:  # truncate the cached mosaic
        handle.truncate(fits_path.stat().st_size // 2)
    with pytest.warns(UserWarning, match="truncated or corrupted"):
        rebuilt = iris_mosaic(1024, cache_dir=cache, names=PLATES, progress=False)
    assert rebuilt.sha256 == dust.sha256
    np.testing.assert_array_equal(rebuilt.intensity, dust.intensity)


def test_mosaic_rebuilt_when_inputs_change(tmp_path):
    one = iris_mosaic(64, cache_dir=tmp_path, names=PLATES[:1], progress=False)
    two = iris_mosaic(64, cache_dir=tmp_path, names=PLATES[:2], progress=False)
    assert one.extra["mosaic"]["cache_key"] != two.extra["mosaic"]["cache_key"]
    assert np.isfinite(two.intensity).sum() > np.isfinite(one.intensity).sum()
    assert len(list(tmp_path.glob("iris100_mosaic_nside64_*.json"))) == 2


def _build_in_child(cache, names, out_queue):
    dust = iris_mosaic(128, cache_dir=cache, names=names, progress=False)
    out_queue.put(dust.sha256)


def test_concurrent_builders_produce_one_valid_cache(tmp_path):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_build_in_child, args=(tmp_path, PLATES[:2], queue)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    digests = {queue.get(timeout=5) for _ in workers}
    assert len(digests) == 1
    assert len(list(tmp_path.glob("iris100_mosaic_nside128_*.fits"))) == 1
    assert not list(tmp_path.glob("*.tmp"))
    record = json.loads(next(tmp_path.glob("iris100_mosaic_nside128_*.json")).read_text())
    assert record["sha256"] == digests.pop()


def test_killed_build_leaves_nothing_trusted(tmp_path):
    script = ("import sys, time, healpy as hp\n"
              "from pysm_vaedust import iris\n"
              "def slow_write(path, *args, **kwargs):\n"
              "    open(path, 'wb').write(b'SIMPLE  = partial')\n"
              "    print('writing', flush=True); time.sleep(60)\n"
              "hp.write_map = slow_write\n"
              f"iris.iris_mosaic(64, cache_dir={str(tmp_path)!r}, names={list(PLATES[:1])!r}, progress=False)\n")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    assert not list(tmp_path.glob("iris100_mosaic_*.json"))  # nothing a later run would trust
    assert not list(tmp_path.glob("iris100_mosaic_*.fits"))
    dust = iris_mosaic(64, cache_dir=tmp_path, names=PLATES[:1], progress=False)  # builds, despite the debris
    assert np.isfinite(dust.intensity).any()


def test_mosaic_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        iris.main(["--nside", "100", "--cache-dir", str(tmp_path)])
    assert "--nside 100" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        iris.main(["--nside", "64", "--plates", str(tmp_path / "missing"), "--cache-dir", str(tmp_path)])
    assert "no IRIS plates" in capsys.readouterr().err


def test_cutouts_on_the_mosaic_skip_or_refuse_missing_data(small_mosaic):
    dust, _ = small_mosaic
    plate = read_plate(IRIS / "I100B4H0.fits")
    lon, lat = plate.galactic_lonlat()
    centres = np.array([[lon[125, 125], lat[125, 125]], [lon[0, 0], lat[0, 0]]])  # inside; on the mosaic's edge
    geometry = PatchGeometry(16, 2.0)
    cut = cut_patches(dust, centres[:, 0], centres[:, 1], geometry, 0.5)
    assert cut.usable.tolist() == [True, False] and np.isnan(cut.small_scales[1]).all()
    assert np.isfinite(cut.level[0]) and abs(float(cut.small_scales[0].mean())) < 0.05
    with pytest.raises(ValueError, match=r"\(lon, lat\) = \(.*\) deg .* falls on missing data"):
        cut_patches(dust, centres[:, 0], centres[:, 1], geometry, 0.5, missing="raise")
    with pytest.raises(ValueError, match="none of the 1 patches"):
        select_patches(dust, centres[1:, 0], centres[1:, 1], geometry, 0.5)
