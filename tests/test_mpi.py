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

    sky = build_sky({"components": [{"class": "pysm_vaedust.VAEDust", "seed": 7, "mbb_index": beta,
                                     "weights": str(random_weights), "device": "cpu"}]}, map_dist=dist)
    np.testing.assert_array_equal(sky.get_emission(FREQ).value, reference[:, subset])
