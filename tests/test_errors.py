"""Bad input at the public boundary and atomic outputs (issue 15).

Every entry point either works (a finite positive map) or raises one ValueError / TypeError
raised by pysm_vaedust itself whose message names the argument; property-based with hypothesis
(shipped weights, nside <= 32). Outputs go through data.atomic_write: a failure or a kill
mid-write leaves no file under the final name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import healpy as hp
import numpy as np
import pysm3.units as u
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import pysm_vaedust
import pysm_vaedust.data as data_module
from pysm_vaedust import VAEDust, demo
from pysm_vaedust.conditioning import FittedLatents, condition_sky, map_fit, posterior_samples
from pysm_vaedust.config import build_sky
from pysm_vaedust.data import atomic_write
from pysm_vaedust.train import TrainConfig
from pysm_vaedust.train import main as train_main
from pysm_vaedust.validate import main as validate_main
from pysm_vaedust.weights import load_weights

NSIDE = 16
PACKAGE = Path(pysm_vaedust.__file__).resolve().parent


def quick(n: int) -> settings:
    """n examples, no deadline, no example database on disk (module fixtures are shared)."""
    return settings(max_examples=n, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def dust():
    component = VAEDust(nside=NSIDE, seed=1)
    component.reference_map()
    return component


def assert_clear_error(err: Exception, names) -> None:
    """A ValueError/TypeError raised inside pysm_vaedust whose message names one of `names`."""
    assert isinstance(err, (ValueError, TypeError)), repr(err)
    assert any(name in str(err) for name in names), f"{names} not in {err}"
    tb = err.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    assert Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE), \
        f"raised in {tb.tb_frame.f_code.co_filename}: {err!r}"


def assert_good_map(m, npix) -> None:
    assert m.unit == u.uK_RJ and m.shape == (3, npix)
    assert np.all(np.isfinite(m.value)) and np.all(m[0].value > 0)
    assert np.all(np.hypot(m[1].value, m[2].value) < m[0].value)


# ----------------------------------------------------------------------------- the slips of the issue

@pytest.mark.parametrize("kwargs, error, message", [
    ({"seed": 1.5}, TypeError, "seed=1.5: expected an integer, got float"),
    ({"seed": True}, TypeError, "seed=True: expected an integer, got bool"),
    ({"seed": -1}, ValueError, r"seed=-1: expected an integer in 0\.\.4294967295"),
    ({"seed": 2**32}, ValueError, "seed=4294967296"),
    ({"batch_size": 0}, ValueError, "batch_size=0: expected an integer >= 1"),
    ({"nside": 8192, "max_nside": 4096}, ValueError, "nside=8192 exceeds max_nside=4096"),
    ({"cascade": "no"}, TypeError, "cascade='no': expected True or False"),
    ({"mbb_index": np.r_[np.nan, np.ones(hp.nside2npix(NSIDE) - 1)]}, ValueError, "mbb_index has 1 non-finite"),
    ({"mbb_temperature": 20 * u.GHz}, ValueError, "mbb_temperature has unit GHz: expected K"),
    ({"fixed_latents": {0: {0: np.zeros(3)}}}, ValueError, r"fixed_latents\[0\]\[0\] has shape \(3,\)"),
    ({"fixed_latents": {0: {10**6: np.zeros(6144)}}}, ValueError, r"fixed_latents\[0\] has tile id 1000000"),  # shipped latent_dim
])
def test_constructor_slips(kwargs, error, message):
    with pytest.raises(error, match=message) as info:
        VAEDust(**{"nside": NSIDE, **kwargs})
    assert_clear_error(info.value, list(kwargs))


def test_numpy_integers_are_integers(dust):
    assert VAEDust(nside=np.int64(NSIDE), seed=np.uint32(1)).seed == 1


@pytest.mark.parametrize("weights, message", [
    (np.zeros(3), r"weights=array\(\[0., 0., 0.\]\): expected finite weights >= 0, not all zero"),
    (np.ones(2), r"weights has shape \(2,\); expected \(3,\), one weight per frequency of freqs"),
    (np.ones(1), r"weights has shape \(1,\); expected \(3,\)"),
    ([np.nan, 1, 1], "expected finite weights >= 0"),
    ([np.inf, 1, 1], "expected finite weights >= 0"),
    ([-1, 1, 1], "expected finite weights >= 0"),
])
def test_bandpass_weight_slips(dust, weights, message):
    with pytest.raises(ValueError, match=message):
        dust.get_emission([100, 143, 217] * u.GHz, weights)


@pytest.mark.parametrize("freqs, error, message", [
    (545.0, TypeError, "freqs=545.0 has no units"),
    (-5 * u.GHz, ValueError, "expected finite positive values"),
    (0 * u.GHz, ValueError, "expected finite positive values"),
    (5 * u.kg, ValueError, r"expected a frequency \(e.g. u.GHz\)"),
    ([100, 90, 95] * u.GHz, ValueError, "strictly increasing"),
    (1e7 * u.GHz, ValueError, "overflows or underflows float64"),
])
def test_frequency_slips(dust, freqs, error, message):
    with pytest.raises(error, match=message):
        dust.get_emission(freqs)


def test_a_black_body_underflow_with_per_pixel_temperatures_is_reported():
    per_pixel = VAEDust(nside=NSIDE, seed=1, polarization=False,
                        mbb_temperature=np.full(hp.nside2npix(NSIDE), 0.02))
    with pytest.raises(ValueError, match="overflows or underflows float64"):
        per_pixel.get_emission(3000 * u.GHz)


# ----------------------------------------------------------------------------- property-based

numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**6, 10**15), st.just(0.0))
arrays = st.lists(numbers, min_size=0, max_size=4)
plain = st.one_of(numbers, arrays, st.lists(arrays, min_size=1, max_size=2), st.text(max_size=3), st.none(),
                  st.booleans())
units = st.sampled_from([u.GHz, u.MHz, u.um, u.m, u.K, u.kg, u.dimensionless_unscaled])


@st.composite
def quantities(draw):
    """Random values, with a random unit when numeric (ragged lists stay plain)."""
    value = draw(plain)
    if draw(st.booleans()):
        try:
            return np.asarray(value, dtype=np.float64) * draw(units)
        except (TypeError, ValueError):
            pass
    return value


@quick(40)
@given(freqs=quantities(), weights=st.one_of(st.none(), quantities()))
def test_get_emission_on_random_input(dust, freqs, weights):
    try:
        m = dust.get_emission(freqs, weights)
    except Exception as err:  # noqa: BLE001 - the property is about which errors
        assert_clear_error(err, ("freqs", "weights"))
    else:
        assert_good_map(m, hp.nside2npix(NSIDE))


@quick(20)
@given(index=st.one_of(numbers, arrays.map(np.array)),
       temperature=st.one_of(numbers, st.floats(0.1, 1e4).map(lambda t: t * u.K)),
       freq=st.floats(1, 5000).map(lambda f: f * u.GHz))
@example(index=-823, temperature=1.0, freq=1.0 * u.GHz)   # finite, but 1e159 x dust's I at the pol template
def test_spectral_parameters_on_random_input(dust, index, temperature, freq):
    """The SED parameters only enter get_emission: the small scales of `dust` are reused."""
    try:
        component = VAEDust(nside=NSIDE, seed=1, mbb_index=index, mbb_temperature=temperature)
        component._i_ref = dust.reference_map()
        m = component.get_emission(freq)
    except Exception as err:  # noqa: BLE001
        assert_clear_error(err, ("mbb_index", "mbb_temperature"))
    else:
        assert_good_map(m, hp.nside2npix(NSIDE))


#: valid values of VAEDust keywords (max_nside=16 with nside=32 is an error, rightly)
CONSTRUCTOR = {
    "nside": st.sampled_from([1, 4, 16, 32]),
    "seed": st.integers(0, 2**32 - 1),
    "batch_size": st.integers(1, 4096),
    "max_nside": st.sampled_from([16, 8192]),
    "cascade": st.booleans(),
    "device": st.just("cpu"),
    "template_freq": st.just("545 GHz"),
}


@quick(20)
@given(valid=st.fixed_dictionaries({}, optional=CONSTRUCTOR), key=st.sampled_from(sorted(CONSTRUCTOR)), value=plain)
def test_constructor_on_random_input(valid, key, value):
    """Valid keywords and one random value (often wrong; when right, the map is computed)."""
    kwargs = {"nside": NSIDE, **valid, key: value}
    try:
        component = VAEDust(**kwargs)
    except Exception as err:  # noqa: BLE001
        assert_clear_error(err, list(kwargs))
        return
    assert component.seed == kwargs.get("seed", 0) and type(component.seed) is int
    assert_good_map(component.get_emission(100 * u.GHz), hp.nside2npix(kwargs["nside"]))


@quick(25)
@given(key=st.sampled_from(sorted(set(CONSTRUCTOR) - {"nside"})), value=plain)
def test_build_sky_names_the_entry_and_keyword(key, value):
    try:
        build_sky({"nside": NSIDE, "components": [{"class": "pysm_vaedust.VAEDust", key: value}]})
    except Exception as err:  # noqa: BLE001
        assert_clear_error(err, [key])
        assert str(err).startswith("components[0]")


@pytest.fixture(scope="module")
def vae():
    return load_weights().vae


BAD_SCALARS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**6, 0), st.text(max_size=2),
                        st.booleans(), st.none())


def valid_scalar(key, value) -> bool:
    """Values of BAD_SCALARS that `key` accepts (those examples would run a whole fit)."""
    if key in ("sample", "decoder_noise"):
        return isinstance(value, bool)
    if key in ("cg_tol", "gtol", "lr", "step_size"):
        return (value is None and key == "step_size") or (
            not isinstance(value, (bool, str, type(None))) and np.isfinite(value) and value > 0)
    if key in ("steps", "mala_steps", "seed"):
        return type(value) is int and value == 0
    return key == "bandpass_weights" and value is None


@quick(40)
@given(key=st.sampled_from(["seed", "steps", "cg_max_iter", "chunk", "cg_tol", "sample", "decoder_noise",
                            "freq", "bandpass_weights"]), value=BAD_SCALARS)
def test_condition_sky_refuses_bad_scalars(key, value):
    assume(not valid_scalar(key, value))
    npix = hp.nside2npix(NSIDE)
    kwargs = {"observed_map": np.ones(npix), "mask": np.ones(npix, bool), "noise": 0.1,
              "freq": [500, 545, 600] * u.GHz, "nside": NSIDE, key: value}
    with pytest.raises((ValueError, TypeError)) as info:
        condition_sky(**kwargs)
    assert_clear_error(info.value, ["freq" if key == "freq" else key])


@quick(30)
@given(key=st.sampled_from(["n_restarts", "steps", "gtol", "lr", "n_samples", "mala_steps", "step_size"]),
       value=BAD_SCALARS)
def test_patch_fits_refuse_bad_scalars(vae, key, value):
    assume(not valid_scalar(key, value))
    n = vae.config.npix
    args = (vae, np.zeros((n, n)), np.ones((n, n), bool), 0.1, np.zeros((2, n // 2, n // 2)))
    call = posterior_samples if key in ("n_samples", "mala_steps", "step_size") else map_fit
    with pytest.raises((ValueError, TypeError)) as info:
        call(*args, **{key: value})
    assert_clear_error(info.value, [key])


@quick(40)
@given(key=st.sampled_from(sorted(TrainConfig().to_dict())), value=plain)
def test_train_config_on_random_input(key, value):
    try:
        TrainConfig.from_dict({key: value})
    except Exception as err:  # noqa: BLE001
        assert_clear_error(err, [key])


@quick(15)
@given(argv=st.one_of(
    st.tuples(st.just("--seed"), st.sampled_from(["-1", "4294967296", "1.5", "x"])),
    st.tuples(st.just("--nside"), st.sampled_from(["0", "33", "-16", "16.0"])),
    st.tuples(st.just("--freq"), st.sampled_from(["0", "-100", "nan", "inf", "GHz"]))))
def test_demo_cli_refuses_bad_arguments(tmp_path, capsys, argv):
    out = tmp_path / "demo"
    with pytest.raises(SystemExit) as info:
        demo.main(["--nside", "16", "--no-plot", "--output-dir", str(out), *argv])
    assert info.value.code == 2
    assert argv[0].strip("-") in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("main, argv, message", [
    (train_main, ["--seed", "-1"], "seed=-1"),
    (train_main, ["--batch_size", "0"], "batch_size=0"),
    (train_main, ["--lr", "nan"], "lr=nan"),
    (validate_main, ["--seed", "-1"], "--seed=-1"),
    (validate_main, ["--n-boot", "0"], "--n-boot=0"),
])
def test_train_and_validate_cli_refuse_bad_arguments(tmp_path, capsys, main, argv, message):
    with pytest.raises(SystemExit) as info:
        main([*argv, "--out" if main is validate_main else "--output", str(tmp_path / "x")])
    assert info.value.code == 2 and message in capsys.readouterr().err


# ----------------------------------------------------------------------------- atomic outputs

class _FailingRename:
    """The os module, but os.replace fails."""

    def __getattr__(self, name):
        return getattr(os, name)

    @staticmethod
    def replace(*args):
        raise OSError("disk full (test)")


@pytest.fixture
def failing_rename(monkeypatch):
    """Every write through atomic_write fails after its data was written (at the rename)."""
    monkeypatch.setattr(data_module, "os", _FailingRename())


def test_atomic_write_leaves_nothing_when_the_writer_fails(tmp_path):
    def half(tmp):
        Path(tmp).write_bytes(b"partial")
        raise RuntimeError("killed half-way")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "out.fits", half)
    assert list(tmp_path.iterdir()) == []


def test_outputs_are_written_atomically(tmp_path, failing_rename):
    fitted = FittedLatents(tile_ids=[0, 1], eps=np.zeros((2, 4)), metadata={"a": 1})
    from mpi_script import write_test_weights  # tests/ is on sys.path

    npix = hp.nside2npix(NSIDE)
    emission = np.random.default_rng(0).lognormal(size=npix)
    writers = {
        "fitted latents": lambda: fitted.save(tmp_path / "fit.h5"),
        "weights": lambda: write_test_weights(tmp_path / "w.h5"),
        "demo PNG": lambda: demo.plot_map(tmp_path / "m.png", np.stack([emission, 0.1 * emission, 0.05 * emission]),
                                          emission, NSIDE, 545.0),
        "demo FITS": lambda: demo.main(["--nside", "16", "--no-plot", "--output-dir", str(tmp_path / "d")]),
    }
    for what, write in writers.items():
        with pytest.raises(OSError, match="disk full"):
            write()
        left = [p for p in tmp_path.rglob("*") if p.is_file()]
        assert left == [], f"{what} left {left}"


def test_killed_writer_leaves_no_file(tmp_path):
    target = tmp_path / "metrics.json"
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from pysm_vaedust.data import atomic_write

        def slow(tmp):
            Path(tmp).write_text("{{partial")
            print("writing", flush=True)
            time.sleep(60)

        atomic_write({str(target)!r}, slow)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert not target.exists()  # the hidden temporary remains; nothing reads it
    assert all(p.name.startswith(".metrics.json.") for p in tmp_path.iterdir())
