"""Data-source registry and fetcher: fast, offline (file:// URLs and local folders only)."""

from dataclasses import replace
from pathlib import Path

import healpy as hp
import numpy as np
import pytest

from pysm_vaedust import sources
from pysm_vaedust.data import shared_data_dir
from pysm_vaedust.sources import Source, fetch, load_registry, sha256_file

REPO = Path(__file__).resolve().parents[1]
SHARED = shared_data_dir()
BUNDLED = ("planck2013_ebv_nside256", "planck_dust_ngp_500px", "iris_100um")


def test_registry_loads_and_copies_identical():
    original = REPO / "data" / "sources.toml"
    assert original.read_bytes() == sources.default_registry_path().read_bytes(), (
        "pysm_vaedust/package_data/sources.toml differs from data/sources.toml: copy it over")
    registry = load_registry()
    assert registry == load_registry(original)
    assert {"planck_gnilc_545", "pysm_gnilc_dust_template", *BUNDLED} <= set(registry)
    for source in registry.values():
        assert source.frame in ("G", "C")
        assert source.nside is None or hp.isnsideok(source.nside)
        assert source.sha256 == "" or len(source.sha256) == 64
    assert registry["pysm_gnilc_dust_template"].pysm_path.startswith("dust_gnilc/")


def test_registry_rejects_unknown_keys(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text((REPO / "data" / "sources.toml").read_text() + '\n[x]\nname = "x"\nurll = ""\n')
    with pytest.raises(ValueError, match="unknown keys"):
        load_registry(bad)


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"real data folder {SHARED} is absent")
@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_checksums(name, tmp_path):
    source = load_registry()[name]
    path = SHARED / source.local_name
    assert sha256_file(path) == source.sha256
    assert path.stat().st_size == source.size_bytes
    assert fetch(name, tmp_path, data_dir=SHARED) == path


@pytest.fixture
def small_map(tmp_path):
    """A nside-8 HEALPix FITS file and a Source describing it."""
    path = tmp_path / "src" / "small.fits"
    path.parent.mkdir()
    values = np.arange(hp.nside2npix(8), dtype=np.float64)
    hp.write_map(path, values, coord="G", dtype=np.float64)
    source = Source(name="small", description="test map", url=path.as_uri(),
                    sha256=sha256_file(path), units="MJy/sr", frame="G", reference="",
                    license="", local_name="small.fits", nside=8, ordering="RING")
    return source, values


def test_download_file_url(small_map, tmp_path):
    source, values = small_map
    dest = tmp_path / "dest"
    path = fetch(source, dest, data_dir=tmp_path / "empty", progress=False)
    assert path == dest / "small.fits"
    np.testing.assert_array_equal(hp.read_map(path), values)
    assert sorted(p.name for p in dest.iterdir()) == ["small.fits"]  # no temp file left
    assert fetch(source, dest, url="http://127.0.0.1:9/none.fits") == path  # found, no download


def test_checksum_mismatch_leaves_nothing(small_map, tmp_path):
    source, _ = small_map
    wrong = replace(source, sha256="0" * 64)
    dest = tmp_path / "dest"
    with pytest.raises(ValueError, match="expected sha256 0{64}, got [0-9a-f]{64}"):
        fetch(wrong, dest, data_dir=tmp_path / "empty", progress=False)
    assert list(dest.iterdir()) == []


def test_unreachable_url_clear_error(small_map, tmp_path):
    source, _ = small_map
    dest = tmp_path / "dest"
    with pytest.raises(RuntimeError, match=r"'small'.*127\.0\.0\.1:9.*PYSM_VAEDUST_DATA"):
        fetch(source, dest, url="http://127.0.0.1:9/none.fits", data_dir=tmp_path / "empty",
              timeout=5, progress=False)
    assert list(dest.iterdir()) == []


def test_no_url_no_local_copy(tmp_path):
    source = load_registry()["planck_dust_ngp_500px"]
    with pytest.raises(RuntimeError, match="planck_dust_ngp_500px.npy"):
        fetch(source, tmp_path / "dest", data_dir=tmp_path / "empty")


def test_local_copy_with_wrong_checksum_raises(small_map, tmp_path):
    source, _ = small_map
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "small.fits").write_bytes(b"not the map")
    with pytest.raises(ValueError, match="checksum mismatch"):
        fetch(source, tmp_path / "dest", data_dir=data_dir)


def test_pysm_path(monkeypatch, tmp_path):
    """pysm3.utils.RemoteData.get looks in $PYSM_LOCAL_DATA/<pysm_path> before any download."""
    registered = load_registry()["pysm_gnilc_dust_template"]
    local = tmp_path / "pysm-data"
    fake = local / registered.pysm_path
    fake.parent.mkdir(parents=True)
    hp.write_map(fake, np.zeros((3, hp.nside2npix(1))), dtype=np.float32)
    monkeypatch.setenv("PYSM_LOCAL_DATA", str(local))
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "empty"

    with pytest.warns(UserWarning, match="no recorded checksum"):  # real entry: sha256 unknown
        assert Path(fetch(registered.name, tmp_path / "dest", data_dir=empty)) == fake
    verified = replace(registered, sha256=sha256_file(fake))
    assert Path(fetch(verified, tmp_path / "dest", data_dir=empty)) == fake
    with pytest.raises(ValueError, match="checksum mismatch"):
        fetch(replace(registered, sha256="1" * 64), tmp_path / "dest", data_dir=empty)
