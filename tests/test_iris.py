"""IRIS data stage on real plates: reader, point sources, mosaic seams, cache faults."""

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys

import healpy as hp
import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import FK4, SkyCoord
from astropy.io import fits
from scipy import ndimage

from pysm_vaedust import iris
from pysm_vaedust.cutouts import PatchGeometry, cut_patches
from pysm_vaedust.data import shared_data_dir
from pysm_vaedust.iris import (add_plate, build_mosaic, clean_plate, diffusion_fill, find_point_sources, iris_directory,
                               iris_mosaic, matched_filter, plate_checksums, plate_coordinates, plate_edge_distance,
                               read_plate, seam_statistic)
from pysm_vaedust.train import select_patches

IRIS = shared_data_dir() / iris.IRIS_DIR_NAME
pytestmark = pytest.mark.skipif(not (IRIS / iris.MANIFEST).is_file(), reason=f"no IRIS plates at {IRIS}")
#: a high-latitude plate (b = -50.5) and the two plates that overlap it along its meridian
PLATES = ("I099B4H0.fits", "I100B4H0.fits", "I101B4H0.fits")
BEAM_PIX = iris.BEAM_FWHM_ARCMIN / 3.0


def test_plate_reader_gives_galactic_coordinates_through_astropy():
    plate = read_plate(IRIS / "I100B4H0.fits")
    assert plate.values.shape == (250, 250) and plate.pixel_arcmin == pytest.approx(3.0, rel=1e-3)
    header = fits.getheader(IRIS / "I100B4H0.fits")
    # 0-based pixel CRPIX - 1 is the reference point CRVAL (FK4 B1950), to 1 arcsec in Galactic coordinates
    ref = SkyCoord(header["CRVAL1"] * u.deg, header["CRVAL2"] * u.deg, frame=FK4(equinox="B1950")).galactic
    col, row = plate.pixel_of(ref.l.deg, ref.b.deg)
    assert abs(col - (header["CRPIX1"] - 1)) < 1 / 180 and abs(row - (header["CRPIX2"] - 1)) < 1 / 180
    # the plate index's centre is the centre of the 250 x 250 grid, 0-based (124.5, 124.5)
    index = {r.split("\t")[0]: r.split("\t") for r in (IRIS / "plate_index.tsv").read_text().splitlines()[1:]}
    col, row = plate.pixel_of(float(index[plate.name][1]), float(index[plate.name][2]))
    assert abs(col - 124.5) < 0.1 and abs(row - 124.5) < 0.1  # 0.1 px = 0.005 deg; a 1-based slip is 1 px
    lon, lat = plate.galactic_lonlat()
    col, row = plate.pixel_of(lon[[10, 200], [30, 40]], lat[[10, 200], [30, 40]])
    np.testing.assert_allclose(col, [30, 40], atol=1e-6)
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
                                              ({"RADESYS": None, "EQUINOX": None, "EPOCH": None}, "frame is unknown"),
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


def _gaussian_field(rng, n=250):
    """A dust-like (k^-2.6, beam-smoothed) Gaussian field of unit std plus white noise of 0.3."""
    ky, kx = np.meshgrid(np.fft.fftfreq(n), np.fft.fftfreq(n), indexing="ij")
    k = np.hypot(kx, ky)
    amplitude = np.where(k > 0, np.maximum(k, 1 / n) ** (-2.6 / 2), 0) * np.exp(-(k * 2.3) ** 2)
    field = np.fft.ifft2(amplitude * np.fft.fft2(rng.standard_normal((n, n)))).real
    return field / field.std() + 0.3 * rng.standard_normal((n, n))


def test_injected_sources_are_found_and_diffuse_sky_is_not_masked():
    """Sources of 10-40 sigma (sigma: the detector's local matched-filter scatter, a beam source of
    peak A giving A/2) injected into a real plate whose own sources were removed."""
    base, _ = clean_plate(read_plate(IRIS / "I100B4H0.fits"))
    _, scatter, _ = matched_filter(base, BEAM_PIX)
    rng = np.random.default_rng(1)
    rows, cols = rng.uniform(12, 238, 80), rng.uniform(12, 238, 80)
    keep = np.ones(80, bool)
    for i in range(80):  # sources at least 8 px apart
        keep[i] = np.all(np.hypot(rows[:i][keep[:i]] - rows[i], cols[:i][keep[:i]] - cols[i]) > 8)
    rows, cols = rows[keep], cols[keep]
    snr = rng.uniform(10, 40, len(rows))
    injected = base.copy()
    for r, c, s in zip(rows, cols, snr):
        injected += _beam_source(base.shape, r, c, 2 * s * scatter[int(r), int(c)])
    found = find_point_sources(injected, BEAM_PIX)
    distance = np.hypot(found.peaks[:, :1] - rows[None], found.peaks[:, 1:] - cols[None])
    hit = (distance < 1.5).any(0)
    assert len(rows) > 40 and hit.mean() >= 0.95, f"recall {hit.mean():.3f} of {len(rows)} sources of 10-40 sigma"
    measured = np.array([found.snr[np.argmin(d)] for d in distance.T])[hit]
    assert 0.7 < np.median(measured / snr[hit]) < 1.1  # the detector's S/N is the injected one
    rr, cc = np.indices(base.shape)
    far = np.all([np.hypot(rr - r, cc - c) > 6 for r, c in zip(rows, cols)], axis=0)
    assert found.mask[far].mean() < 0.005, "diffuse sky away from the injected sources is masked"
    # the fill restores the sky under the sources: residuals well below the sources themselves
    filled = diffusion_fill(injected, found.mask)
    peak_r, peak_c = np.round(rows).astype(int), np.round(cols).astype(int)
    source = (injected - base)[peak_r, peak_c]
    assert np.median(np.abs(filled - base)[peak_r, peak_c] / source) < 0.05


def test_no_false_sources_on_gaussian_fields_nor_on_ridges():
    rng = np.random.default_rng(0)
    false_pixels, total, ridge_flagged, ridge_total = 0, 0, 0, 0
    rr, cc = np.indices((250, 250))
    for trial in range(4):
        field = 10 + _gaussian_field(rng)
        false_pixels += find_point_sources(field, BEAM_PIX).mask.sum()
        total += field.size
        # elongated ridges (FWHM 2 beams, 50 px long, smooth ends) at 40x the scatter, at five angles
        _, scatter, _ = matched_filter(field, BEAM_PIX)
        ridges, on_ridge = field.copy(), np.zeros(field.shape, bool)
        for k, angle in enumerate(np.radians([0, 30, 60, 90, 135]) + trial * 0.2):
            dr, dc = rr - (25 + 50 * k), cc - 125
            along, across = dr * np.sin(angle) + dc * np.cos(angle), -dr * np.cos(angle) + dc * np.sin(angle)
            profile = (np.exp(-across ** 2 / (2 * (2 * BEAM_PIX / 2.355) ** 2))
                       * np.exp(-np.maximum(np.abs(along) - 25, 0) ** 2 / 72))
            ridges += 40 * np.median(scatter) * profile
            on_ridge |= profile > 0.5
        ridge_flagged += find_point_sources(ridges, BEAM_PIX).mask[on_ridge].sum()
        ridge_total += on_ridge.sum()
    assert false_pixels / total < 1e-3, f"{false_pixels} of {total} pixels flagged on Gaussian fields"
    assert ridge_flagged / ridge_total < 0.02, f"{ridge_flagged} of {ridge_total} ridge pixels flagged"


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
    assert dust.extra["mosaic"]["point_sources"]["count"] > 50
    plates = [read_plate(IRIS / name) for name in PLATES]
    cleaned = [clean_plate(plate)[0] for plate in plates]
    assert seam_statistic(m, plates)["ratio"] < 1.08
    # the statistic sees a seam: one plate 10 % brighter, blended with hard edges; the tapers hide it
    ratios = {}
    for taper in (1e-3, iris.EDGE_TAPER_PIX):
        sum_wv, sum_w = np.zeros(m.size), np.zeros(m.size)
        for k, (plate, values) in enumerate(zip(plates, cleaned)):
            add_plate(sum_wv, sum_w, values * (1.1 if k == 1 else 1.0), plate, taper)
        with np.errstate(invalid="ignore"):
            ratios[taper] = seam_statistic(np.where(sum_w > 0, sum_wv / sum_w, np.nan), plates)["ratio"]
    assert ratios[1e-3] > 1.25 and ratios[iris.EDGE_TAPER_PIX] < 1.08, ratios
    # the plates themselves agree where they overlap (consistent zero levels and gains)
    pix, col, row = plate_coordinates(plates[1], 1024)
    inside = plate_edge_distance(col, row, (250, 250)) > 1
    for other, other_values in ((plates[0], cleaned[0]), (plates[2], cleaned[2])):
        o_pix, o_col, o_row = plate_coordinates(other, 1024)
        o_inside = plate_edge_distance(o_col, o_row, (250, 250)) > 1
        common, i1, i2 = np.intersect1d(pix[inside], o_pix[o_inside], return_indices=True)
        a = ndimage.map_coordinates(cleaned[1], [row[inside][i1], col[inside][i1]], order=1)
        b = ndimage.map_coordinates(other_values, [o_row[o_inside][i2], o_col[o_inside][i2]], order=1)
        assert len(common) > 1000 and np.median(np.abs(a - b) / b) < 0.02


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
    build = iris._build_cache

    def counted(*args, **kwargs):  # records that this process built the cache
        with open(cache / "builds.log", "a") as log:
            log.write(f"{os.getpid()}\n")
        return build(*args, **kwargs)

    iris._build_cache = counted
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
    assert len((tmp_path / "builds.log").read_text().split()) == 1  # the lock let one process build
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
    assert "nside=100: expected a power of two" in capsys.readouterr().err
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
