"""Packaging: the wheel ships the weights and template and makes a map with no source tree or
shared data around.

Builds ``pip wheel . --no-deps --no-build-isolation`` from a clean copy of the project (no stale
build/ folder can leak files into the wheel), checks its package data, installs it into a fresh
venv (``--without-pip``, plus a .pth file: torch & co. come from this environment; pip
``--no-index``: a declared dependency that nothing provides fails instead of downloading), from an empty
working directory with $PYSM_VAEDUST_DATA pointing to an empty folder makes
``VAEDust(nside=64, cascade=False)`` at 353 GHz (about a minute).
"""

from __future__ import annotations

import os
import site
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DATA = ROOT / "pysm_vaedust" / "package_data"
WEIGHTS_NAME = "vaedust_default.h5"        # pysm_vaedust.weights.DEFAULT_WEIGHTS_NAME
TEMPLATE_NAME = "template_545GHz_fwhm30arcmin_nside256.fits"  # pysm_vaedust.template.DEFAULT_TEMPLATE_NAME
#: Not copied into the build: generated, large or unrelated to packaging.
IGNORE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                ".benchmarks", "runs", "out", "*.pt", "w.h5", ".pysm_fake_data",
                                ".ci-venv", ".ci-out")

def run(cmd, timeout=900, **kwargs):
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, (f"{' '.join(map(str, cmd))} exited {result.returncode}\n"
                                    f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}")
    return result


def test_names_match_the_package():
    from pysm_vaedust.template import DEFAULT_TEMPLATE_NAME
    from pysm_vaedust.weights import DEFAULT_WEIGHTS_NAME

    assert (WEIGHTS_NAME, TEMPLATE_NAME) == (DEFAULT_WEIGHTS_NAME, DEFAULT_TEMPLATE_NAME)


def test_wheel_installs_and_makes_a_map(tmp_path):
    if not (PACKAGE_DATA / WEIGHTS_NAME).is_file():
        pytest.skip(f"pysm_vaedust/package_data/{WEIGHTS_NAME} does not exist yet (the shipped weights "
                    "are being trained): nothing to package")

    # 1. build the wheel from a clean copy of the project
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=IGNORE)
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-w", dist], cwd=src)
    (wheel,) = dist.glob("pysm_vaedust-*.whl")

    # 2. it holds the package data
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    weights = [n for n in names if n.startswith("pysm_vaedust/package_data/") and n.endswith(".h5")]
    assert f"pysm_vaedust/package_data/{WEIGHTS_NAME}" in weights, sorted(names)
    assert f"pysm_vaedust/package_data/{TEMPLATE_NAME}" in names, sorted(names)
    assert "pysm_vaedust/config.py" in names and "pysm_vaedust/component.py" in names
    assert not any(n.startswith("tests/") for n in names), "tests must not be packaged"

    # 3. a fresh venv that sees this environment's packages but installs the wheel itself
    venv = tmp_path / "venv"
    # --without-pip: the venv's own (older) pip/setuptools would shadow this environment's and
    # fail torch's requirement on setuptools; this environment's pip installs into the venv instead
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    # this environment's site-packages, appended after the venv's own through a .pth file (works
    # whether this environment is the system Python or itself a venv, as in CI); .pth files of
    # appended folders are not run, so this environment's editable install stays invisible
    venv_site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (venv_site / "this_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-index",
         "--disable-pip-version-check", wheel])

    # 4. a map, away from the source tree and from ../shared/data
    work, empty = tmp_path / "work", tmp_path / "no-data"
    work.mkdir()
    empty.mkdir()
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        import numpy as np
        import pysm3.units as u
        import pysm_vaedust
        from pysm_vaedust.component import VAEDust

        venv = Path({str(venv)!r}).resolve()
        where = Path(pysm_vaedust.__file__).resolve()
        assert venv in where.parents, f"pysm_vaedust imported from {{where}}, not from the venv {{venv}}"
        dust = VAEDust(nside=64, cascade=False)
        assert venv in Path(dust.weights.path).resolve().parents, dust.weights.path
        m = dust.get_emission(353 * u.GHz)
        assert m.shape == (3, 12 * 64**2) and m.unit == u.uK_RJ, (m.shape, m.unit)
        assert np.all(np.isfinite(m.value)) and np.all(m.value[0] > 0)
        print("OK", where, float(np.median(m.value[0])))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(PYSM_VAEDUST_DATA=str(empty), OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"))
    result = run([python, "-I", "-c", script], cwd=work, env=env)
    assert result.stdout.startswith("OK"), result.stdout
