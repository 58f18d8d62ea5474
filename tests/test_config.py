"""pysm_vaedust.config: build_sky from dicts / TOML mixing pysm3 presets and plugin classes.

pysm3's own templates (s1's pysm_2/synch_*.fits) come from the PySM data server, unreachable
here and in CI: `pysm_data` writes small fake templates of the same names into a temporary
$PYSM_LOCAL_DATA folder, which pysm3 searches before downloading. The VAE weights are the shipped
ones when they exist, else a tiny random-init file (tests/mpi_script.write_test_weights).
"""

from __future__ import annotations

from pathlib import Path

import healpy as hp
import numpy as np
import pysm3
import pysm3.units as u
import pytest
from mpi_script import write_test_weights  # tests/ is on sys.path (pytest rootdir-relative import)

import pysm_vaedust
import pysm_vaedust.weights as weights_module
from pysm_vaedust.component import VAEDust
from pysm_vaedust.config import PRESETS, build_sky, check_keywords, load_config, resolve_class

MISSION_TOML = Path(__file__).resolve().parents[1] / "examples" / "mission.toml"
#: Fake s1 templates (uK_RJ at 408 MHz / 23 GHz; spectral index), nside 16 (pysm3 ud_grades).
S1_FILES = {"synch_t_new": 30.0, "synch_q_new": 1.0, "synch_u_new": -1.0, "synch_beta": -3.0}


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    return write_test_weights(tmp_path_factory.mktemp("weights") / "tiny.h5")


@pytest.fixture
def default_weights(random_weights, monkeypatch):
    """The shipped weights if present, else the tiny random-init file in their place."""
    if not weights_module.default_weights_path().is_file():
        monkeypatch.setattr(weights_module, "default_weights_path", lambda: Path(random_weights))
    return weights_module.default_weights_path()


@pytest.fixture
def pysm_data(tmp_path, monkeypatch):
    """$PYSM_LOCAL_DATA holding fake pysm_2/ templates of preset s1."""
    folder = tmp_path / "pysm-data" / "pysm_2"
    folder.mkdir(parents=True)
    for name, value in S1_FILES.items():
        hp.write_map(folder / f"{name}.fits", np.full(hp.nside2npix(16), value, np.float32),
                     dtype=np.float32, column_units="uK_RJ" if name != "synch_beta" else "")
    monkeypatch.setenv("PYSM_LOCAL_DATA", str(tmp_path / "pysm-data"))
    return tmp_path / "pysm-data"


def test_mission_toml_next_to_s1(default_weights, pysm_data):
    """The exact example file: VAEDust + pysm3 s1 at nside 32, in uK_CMB."""
    sky = build_sky(MISSION_TOML)
    assert sky.nside == 32 and sky.output_unit == u.uK_CMB
    dust, sync = sky.components
    assert isinstance(dust, VAEDust) and dust.seed == 3 and dust.cascade
    assert isinstance(sync, pysm3.PowerLaw)

    freq = 145 * u.GHz
    total = sky.get_emission(freq)
    assert total.shape == (3, hp.nside2npix(32)) and total.unit == u.uK_CMB
    assert np.all(np.isfinite(total.value))
    expected = (dust.get_emission(freq) + sync.get_emission(freq)).to(
        u.uK_CMB, equivalencies=u.cmb_equivalencies(freq))
    np.testing.assert_allclose(total.value, expected.value, rtol=1e-6)
    # Sky adds the other components into the first one's array in place: the dust cache must survive
    np.testing.assert_array_equal(sky.get_emission(freq).value, total.value)

    # the same sky from TOML text and from the equivalent dict
    again = build_sky(MISSION_TOML.read_text()).get_emission(freq)
    np.testing.assert_array_equal(again.value, total.value)
    as_dict = load_config(MISSION_TOML)
    assert as_dict["components"]["dust"]["class"] == "pysm_vaedust.VAEDust"


def test_list_of_presets_and_overrides(default_weights):
    sky = build_sky({"components": ["vd1", {"preset": "vd1_nocascade", "seed": 5},
                                     {"class": "pysm_vaedust.component.VAEDust", "seed": 5, "cascade": False}]},
                    nside=16)
    a, b, c = sky.components
    assert (a.seed, a.cascade) == (0, True) and (b.seed, b.cascade) == (5, False)
    assert sky.output_unit == u.uK_RJ
    assert build_sky(["vd1"], nside=16, output_unit="MJy/sr").output_unit == u.MJy / u.sr
    np.testing.assert_array_equal(b.get_emission(100 * u.GHz).value, c.get_emission(100 * u.GHz).value)


def test_pysm_preset_with_overrides(pysm_data):
    (sync,) = build_sky({"nside": 16, "components": [{"preset": "s1", "has_polarization": False}]}).components
    assert isinstance(sync, pysm3.PowerLaw) and not sync.has_polarization
    with pytest.raises(ValueError, match="max_nsid"):
        build_sky({"nside": 16, "components": [{"preset": "s1", "max_nsid": 4}]})
    with pytest.raises(ValueError, match="several sub-components"):
        build_sky({"nside": 16, "components": [{"preset": "a1", "max_nside": 512}]})


def test_presets_are_documented_and_valid():
    import pysm_vaedust.config as config

    assert not set(PRESETS) & set(pysm3.sky.PRESET_MODELS), "preset names must not shadow pysm3's"
    for name, table in PRESETS.items():
        assert f"\n    {name} " in config.__doc__, f"preset {name!r} missing from the docstring table"
        cls = resolve_class(table["class"])
        check_keywords(cls, {k: v for k, v in table.items() if k != "class"})
    assert resolve_class("ModifiedBlackBody") is pysm3.ModifiedBlackBody
    assert resolve_class("pysm_vaedust.VAEDust") is VAEDust


def test_mapsims_style_import():
    import importlib

    module, name = "pysm_vaedust.VAEDust".rsplit(".", 1)
    assert getattr(importlib.import_module(module), name) is VAEDust


@pytest.mark.parametrize("config, kwargs, message", [
    ({"components": ["vd9"]}, {"nside": 16}, "unknown preset 'vd9'"),
    ({"components": [{"preset": "d99"}]}, {"nside": 16}, "unknown preset 'd99'"),
    ({"components": [{"class": "pysm_vaedust.NoSuchDust"}]}, {"nside": 16}, "'pysm_vaedust.NoSuchDust' not found"),
    ({"components": [{"class": "no_such_package.Dust"}]}, {"nside": 16}, "'no_such_package.Dust' not found"),
    ({"components": [{"class": "NoSuchModel"}]}, {"nside": 16}, "'NoSuchModel' is not a pysm3 model"),
    ({"components": [{"class": "numpy.ndarray"}]}, {"nside": 16}, "not a pysm3.Model subclass"),
    ({"components": {"dust": {"class": "pysm_vaedust.VAEDust", "sede": 3}}}, {"nside": 16},
     r"components\.dust: pysm_vaedust\.component\.VAEDust takes no keyword 'sede'"),
    ({"components": [{"preset": "vd1", "cascde": False}]}, {"nside": 16}, "takes no keyword 'cascde'"),
    ({"components": [{"class": "pysm_vaedust.VAEDust", "nside": 64}]}, {"nside": 16}, "must not be set per component"),
    ({"components": [{"class": "pysm_vaedust.VAEDust", "preset": "vd1"}]}, {"nside": 16}, "exactly one of"),
    ({"components": [{"seed": 3}]}, {"nside": 16}, "exactly one of"),
    ({"components": [3]}, {"nside": 16}, "expected a preset name or a table"),
    ({"components": []}, {"nside": 16}, "components is empty"),
    ({"components": "vd1"}, {"nside": 16}, "expected a list of components"),
    ({"component": ["vd1"]}, {"nside": 16}, "unknown top-level keys"),
    ({"components": ["vd1"]}, {}, "no nside"),
    ({"nside": 33, "components": ["vd1"]}, {}, "config nside=33"),
    ({"nside": 16, "components": ["vd1"]}, {"output_unit": "uK_PLANCK"}, "output_unit='uK_PLANCK'"),
    ({"nside": 16, "output_unit": "m", "components": ["vd1"]}, {}, "output_unit=Unit"),
    ("no_such_file.toml", {}, "no such TOML file"),
    ("nside = \n", {}, "invalid TOML"),
])
def test_errors_name_the_culprit(config, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_sky(config, **kwargs)


def test_map_dist_nside_must_match():
    dist = pysm3.MapDistribution(pixel_indices=np.arange(10), nside=32)
    with pytest.raises(ValueError, match="map_dist.nside=32 differs from the sky's nside=16"):
        build_sky({"nside": 16, "components": ["vd1"]}, map_dist=dist)
    with pytest.raises(ValueError, match="outside the 3072 pixels"):
        build_sky({"nside": 16, "components": ["vd1"]},
                  map_dist=pysm3.MapDistribution(pixel_indices=np.array([0, 5000])))


def test_nside_from_map_dist(default_weights):
    pixels = np.arange(100, 300)
    sky = build_sky({"components": [{"preset": "vd1", "seed": 2}]},
                    map_dist=pysm3.MapDistribution(pixel_indices=pixels, nside=16))
    assert sky.nside == 16
    assert sky.get_emission(100 * u.GHz).shape == (3, len(pixels))


def test_presets_pass_their_keywords(random_weights):
    """vd1_nocascade turns the cascade off; vd1_gnilc names the GNILC template (fetched, so only
    its keyword is checked here: the loader is tested in test_sources)."""
    assert PRESETS["vd1_gnilc"]["template"] == "pysm_gnilc"
    default, base = build_sky([{"preset": name, "weights": str(random_weights)}
                               for name in ("vd1", "vd1_nocascade")], nside=8).components
    assert default.cascade and not base.cascade


