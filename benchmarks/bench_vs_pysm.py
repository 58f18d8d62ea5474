#!/usr/bin/env python
"""Wall time and peak memory of VAEDust against PySM's d10 and d11 dust, same machine, same run.

    python benchmarks/bench_vs_pysm.py --nside 512 2048 --weights /path/to/weights.h5

For each nside and each case (d10, d11, vaedust) a fresh child process (this script with
--case) builds `pysm3.Sky` and times:
  first  = Sky construction + get_emission(first frequency)   (d11 draws its small scales,
           VAEDust decodes its patches here; d10 reads its templates and JIT-compiles its kernel)
  second = get_emission(second frequency)                      (everything cached)
Peak memory is the child's peak resident set size (ru_maxrss of the rusage that os.wait4
returns for that child: one child per case, so cases never see each other's peak).

The PySM data server is unreachable offline: the d10/d11 input files are written once, with
their real names, HDUs, units, dtypes and shapes and random but realistic content, under
benchmarks/.pysm_fake_data/ (about 2.2 GB) and PYSM_LOCAL_DATA points there. Only timing
and memory mean anything with fake content.

Writes benchmarks/results.json and benchmarks/results.md and prints PASS/FAIL per target.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gzip
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DATA_DIR = HERE / ".pysm_fake_data"
DEFAULT_JSON = HERE / "results.json"
DEFAULT_MD = HERE / "results.md"
ALL_CASES = ("d10", "d11", "vaedust", "vaedust_maps", "vaedust_float32")
DEFAULT_CASES = ("d10", "d11", "vaedust")
DEFAULT_FREQS_GHZ = (143.0, 217.0)  # neither is d10's reference (353 GHz, where it skips the SED)
TEMPLATE_NSIDE = 2048  # d10's smallest available_nside: every nside <= 2048 reads the 2048 files

# Bump when the fake files change (names, shapes, units, content): forces a rewrite.
FAKE_DATA_VERSION = 2

# Targets (../shared/DESIGN.md, "Targets"), checked at nside 2048.
TARGET_NSIDE = 2048
TARGET_SECOND_RATIO = 1.2  # VAEDust further frequency <= 1.2 x d10
TARGET_PEAK_GB = 4.0       # GB = 1e9 bytes
GB = 1e9

# ---------------------------------------------------------------------------------------------
# Fake PySM input files. Names from pysm3 3.4.6 data/presets.cfg ([d10] and [d11]); what is read
# from them from pysm3/models/dust.py (ModifiedBlackBody), dust_realization.py
# (ModifiedBlackBodyRealization) and template.py (read_map / read_alm / read_cl).
# ---------------------------------------------------------------------------------------------
D10_FILES = {
    # read_map(field=[0,1,2]), unit from TUNIT1, converted to uK_RJ
    "template": "dust_gnilc/gnilc_dust_template_nside{nside}_2023.02.10.fits",
    # read_map(unit="") -> TUNIT ignored, dimensionless
    "beta": "dust_gnilc/gnilc_dust_beta_nside{nside}_2023.06.06.fits",
    # read_map(unit=None) -> TUNIT1 must convert to K
    "Td": "dust_gnilc/gnilc_dust_Td_nside{nside}_2023.06.06.fits",
}
D11_RAW = "dust_gnilc/raw/"
D11_FILES = {
    # read_alm(hdu=(1,2,3)) .to(uK_RJ): logpoltens large scales, lmax 1024, complex64
    "largescale_alm": D11_RAW + "gnilc_dust_largescale_template_logpoltens_alm_nside2048_lmax1024_complex64.fits.gz",
    # read_alm(hdu=1), value used only (dimensionless)
    "modulation_temp_alm": D11_RAW + "gnilc_dust_temperature_modulation_alms_lmax768.fits.gz",
    "modulation_pol_alm": D11_RAW + "gnilc_dust_polarization_modulation_alms_lmax768.fits.gz",
    # read_cl .to(uK_RJ^2): TT, EE, BB, TE of the logpoltens small scales, lmax 16384
    "small_scale_cl": D11_RAW + "gnilc_dust_small_scales_logpoltens_cl_lmax16384.fits.gz",
    # read_alm(hdu=1) .to(dimensionless) / read_cl .to(dimensionless)
    "beta_alm": D11_RAW + "gnilc_dust_largescale_template_beta_alm_nside2048_lmax1024.fits.gz",
    "beta_cl": D11_RAW + "gnilc_dust_small_scales_beta_cl_lmax16384_2023.06.06.fits.gz",
    # read_alm(hdu=1) .to(K) / read_cl .to(K^2)
    "Td_alm": D11_RAW + "gnilc_dust_largescale_template_Td_alm_nside2048_lmax1024.fits.gz",
    "Td_cl": D11_RAW + "gnilc_dust_small_scales_Td_cl_lmax16384_2023.06.06.fits.gz",
    # read_map(field=(0,1,2,3)): I, Q, U (uK_RJ, unit from TUNIT1) + apodised GAL mask
    "galplane": D11_RAW + "gnilc_dust_galplane.fits.gz",
    # read_map(field=0) beta (TUNIT1 dimensionless), read_map(field=1) Td (TUNIT2 K)
    "galplane_beta_Td": D11_RAW + "gnilc_dust_beta_Td_galplane.fits.gz",
}


def _atomic_path(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".tmp-{os.getpid()}-{path.name}")


def _write_map(path: Path, maps, units, compress: bool) -> None:
    """HEALPix RING map(s) (float32) with TUNITn = units, written to a temp name then renamed."""
    import healpy as hp
    import numpy as np

    tmp = _atomic_path(path)
    plain = tmp.with_name(tmp.name.removesuffix(".gz") + ".plain.fits") if compress else tmp
    hp.write_map(str(plain), maps, dtype=np.float32, overwrite=True)
    _set_units(plain, units, hdu=1)  # every TUNITn, also the empty (dimensionless) ones
    if compress:  # real d11 files are gzipped; level 1: fast to write, decompression cost is alike
        with open(plain, "rb") as src, gzip.open(tmp, "wb", compresslevel=1) as dst:
            shutil.copyfileobj(src, dst, 1 << 24)
        plain.unlink()
    tmp.replace(path)


def _set_units(path: Path, units: list[str], hdu: int | None = None) -> None:
    """hdu=None: TUNIT1 of HDU 1..n = units (hp.write_alm writes TUNIT1 'l*l+l+m+1', which
    pysm3 cannot parse); hdu=k: TUNIT1..n of HDU k = units (map columns)."""
    from astropy.io import fits

    with fits.open(path, mode="update") as hdul:
        for i, unit in enumerate(units, start=1):
            if hdu is None:
                hdul[i].header["TUNIT1"] = unit
            else:
                hdul[hdu].header[f"TUNIT{i}"] = unit


def _write_alm(path: Path, alms, units: list[str], out_dtype) -> None:
    import healpy as hp

    tmp = _atomic_path(path)
    plain = tmp.with_name(tmp.name.removesuffix(".gz") + ".plain.fits")
    hp.write_alm(str(plain), alms, out_dtype=out_dtype, overwrite=True)
    _set_units(plain, units)
    with open(plain, "rb") as src, gzip.open(tmp, "wb", compresslevel=6) as dst:
        shutil.copyfileobj(src, dst)
    plain.unlink()
    tmp.replace(path)


def _write_cl(path: Path, cls, unit: str) -> None:
    import healpy as hp

    tmp = _atomic_path(path)
    plain = tmp.with_name(tmp.name.removesuffix(".gz") + ".plain.fits")
    hp.write_cl(str(plain), cls, overwrite=True)
    _set_units(plain, [unit])
    with open(plain, "rb") as src, gzip.open(tmp, "wb", compresslevel=6) as dst:
        shutil.copyfileobj(src, dst)
    plain.unlink()
    tmp.replace(path)


def _random_alm(rng, lmax: int, monopole: float, rms: float, slope: float = -2.5):
    """alm with a00 = monopole sqrt(4 pi) and Gaussian l>=1 power ~ rms^2 ell^slope (complex128)."""
    import healpy as hp
    import numpy as np

    ell = np.arange(lmax + 1, dtype=np.float64)
    cl = np.zeros(lmax + 1)
    cl[1:] = ell[1:] ** slope
    cl *= rms**2 / np.sum((2 * ell + 1) * cl / (4 * np.pi))  # map variance = rms^2
    alm = hp.synalm(cl, lmax=lmax)
    alm[0] = monopole * np.sqrt(4 * np.pi)
    return alm


def _small_scale_cl(lmax: int, rms: float, ell_min: int = 100, slope: float = -2.5):
    """Power law C_ell ~ ell^slope for ell >= ell_min, normalised so that the full-lmax map rms = rms."""
    import numpy as np

    ell = np.arange(lmax + 1, dtype=np.float64)
    cl = np.zeros(lmax + 1)
    cl[ell_min:] = ell[ell_min:] ** slope
    return cl * rms**2 / np.sum((2 * ell + 1) * cl / (4 * np.pi))


def fake_file_list(cases) -> dict[str, str]:
    """{key: relative path} of the fake files the given cases need."""
    files = {}
    if any(c in ("d10", "vaedust_maps") for c in cases):
        files.update({k: v.format(nside=TEMPLATE_NSIDE) for k, v in D10_FILES.items()})
    if "d11" in cases:
        files.update(D11_FILES)
    return files


def ensure_fake_data(data_dir: Path, cases, force: bool = False) -> None:
    """Write the missing fake PySM files under data_dir (once; cached across runs)."""
    import numpy as np

    manifest_path = data_dir / "MANIFEST.json"
    manifest = {}
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
    if force or manifest.get("version") != FAKE_DATA_VERSION:
        manifest = {"version": FAKE_DATA_VERSION, "files": {}}
    needed = fake_file_list(cases)
    missing = {k: p for k, p in needed.items()
               if k not in manifest["files"] or not (data_dir / p).exists()}
    if not missing:
        return
    print(f"writing fake PySM inputs under {data_dir} (once): {', '.join(missing)}", flush=True)
    npix = 12 * TEMPLATE_NSIDE**2
    for key, rel in missing.items():
        t0 = time.perf_counter()
        path = data_dir / rel
        rng = np.random.default_rng(zlib.crc32(key.encode()))
        np.random.seed(zlib.crc32(key.encode()))  # hp.synalm draws from numpy's global state
        if key == "template":  # IQU at 353 GHz, I log-normal around 100 uK_RJ, |P| ~ 5 %
            i = np.exp(np.log(100.0) + 1.0 * rng.standard_normal(npix, dtype=np.float32))
            q = 0.05 * i * rng.standard_normal(npix, dtype=np.float32)
            u = 0.05 * i * rng.standard_normal(npix, dtype=np.float32)
            _write_map(path, [i, q, u], ["uK_RJ"] * 3, compress=False)
            del i, q, u
        elif key == "beta":
            _write_map(path, 1.5 + 0.1 * rng.standard_normal(npix, dtype=np.float32), [""], compress=False)
        elif key == "Td":
            _write_map(path, 20.0 + 2.0 * rng.standard_normal(npix, dtype=np.float32), ["K"], compress=False)
        elif key == "largescale_alm":  # logpoltens i ~ log(100 uK_RJ); q, u small
            alms = [_random_alm(rng, 1024, np.log(100.0), 1.0), _random_alm(rng, 1024, 0.0, 0.05),
                    _random_alm(rng, 1024, 0.0, 0.05)]
            _write_alm(path, alms, ["uK_RJ"] * 3, np.float32)  # "complex64"
        elif key in ("modulation_temp_alm", "modulation_pol_alm"):
            _write_alm(path, _random_alm(rng, 768, 1.0, 0.3), [""], np.float64)
        elif key == "small_scale_cl":  # TT, EE, BB, TE of the logpoltens small scales
            tt = _small_scale_cl(16384, 0.3)
            _write_cl(path, [tt, 0.05 * tt, 0.03 * tt, 0.1 * tt], "uK_RJ^2")
        elif key == "beta_alm":
            _write_alm(path, _random_alm(rng, 1024, 1.5, 0.1), [""], np.float64)
        elif key == "beta_cl":
            _write_cl(path, _small_scale_cl(16384, 0.05), "")
        elif key == "Td_alm":
            _write_alm(path, _random_alm(rng, 1024, 20.0, 2.0), ["K"], np.float64)
        elif key == "Td_cl":
            _write_cl(path, _small_scale_cl(16384, 1.0), "K^2")
        elif key == "galplane":  # I, Q, U (uK_RJ) + apodised mask in [0, 1] (1 = keep the model)
            i = np.exp(np.log(300.0) + 1.0 * rng.standard_normal(npix, dtype=np.float32))
            q = 0.05 * i * rng.standard_normal(npix, dtype=np.float32)
            u = 0.05 * i * rng.standard_normal(npix, dtype=np.float32)
            mask = rng.uniform(0.0, 1.0, npix).astype(np.float32)
            _write_map(path, [i, q, u, mask], ["uK_RJ"] * 3 + [""], compress=True)
            del i, q, u, mask
        elif key == "galplane_beta_Td":
            _write_map(path, [1.5 + 0.1 * rng.standard_normal(npix, dtype=np.float32),
                              20.0 + 2.0 * rng.standard_normal(npix, dtype=np.float32)], ["", "K"],
                       compress=True)
        else:
            raise AssertionError(key)
        manifest["files"][key] = rel
        tmp = _atomic_path(manifest_path)
        tmp.write_text(json.dumps(manifest, indent=1))
        tmp.replace(manifest_path)
        print(f"  {rel}: {path.stat().st_size / GB:.2f} GB in {time.perf_counter() - t0:.0f} s", flush=True)


# ---------------------------------------------------------------------------------------------
# One case, in a child process
# ---------------------------------------------------------------------------------------------
def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _vmhwm_bytes() -> int | None:
    """Peak RSS of this process's own address space (Linux /proc; unlike ru_maxrss it cannot
    inherit the parent's high-water mark across fork + exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_case(case: str, nside: int, freqs_ghz, weights: str | None, seed: int, data_dir: Path,
             device: str = "auto") -> dict:
    """Build the Sky and time the two frequencies; returns a result record (in this process)."""
    os.environ["PYSM_LOCAL_DATA"] = str(data_dir)
    import pysm3  # noqa: F401  (imports are not timed)
    import pysm3.units as u

    if case.startswith("vaedust"):
        from pysm_vaedust.component import VAEDust
    rss_imports = _vmhwm_bytes() or _maxrss_bytes()
    f1, f2 = (f * u.GHz for f in freqs_ghz)

    t0 = time.perf_counter()
    if case in ("d10", "d11"):
        sky = pysm3.Sky(nside=nside, preset_strings=[case])
    else:
        kwargs = {}
        if case == "vaedust_maps":  # per-pixel beta_d, T_d: d10's maps (as d10 itself uses)
            kwargs = dict(mbb_index=D10_FILES["beta"].format(nside=TEMPLATE_NSIDE),
                          mbb_temperature=D10_FILES["Td"].format(nside=TEMPLATE_NSIDE))
        if case == "vaedust_float32":   # VAEDust's (3, npix) output in float32 (pysm3.Sky still returns float64)
            kwargs = dict(dtype="float32")
        component = VAEDust(nside=nside, weights=weights, seed=seed, device=device, **kwargs)
        sky = pysm3.Sky(nside=nside, component_objects=[component])
    t_build = time.perf_counter() - t0
    m1 = sky.get_emission(f1)
    t_first = time.perf_counter() - t0
    shape = list(m1.shape)
    finite = bool(__import__("numpy").isfinite(m1.value[0]).all())
    del m1
    t1 = time.perf_counter()
    m2 = sky.get_emission(f2)
    t_second = time.perf_counter() - t1
    del m2
    return {
        "case": case, "nside": nside, "build_s": t_build, "first_s": t_first,
        "first_emission_s": t_first - t_build, "second_s": t_second,
        "rss_after_imports_gb": rss_imports / GB, "peak_self_maxrss_gb": _maxrss_bytes() / GB,
        "peak_self_vmhwm_gb": None if _vmhwm_bytes() is None else _vmhwm_bytes() / GB,
        "output_shape": shape, "output_I_finite": finite,
        "decode_device": None if case in ("d10", "d11") else _device_name(component.renderer.vae.device),
    }


def _device_name(device) -> str:
    """'cpu', or the CUDA device's name."""
    import torch

    return "cpu" if device.type == "cpu" else f"cuda ({torch.cuda.get_device_name(device)})"


def spawn_case(case: str, nside: int, args) -> dict:
    """Run one case in a fresh child; its peak RSS comes from os.wait4's rusage of that child."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        result_file = Path(fh.name)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", case, "--nside", str(nside),
           "--freqs", *map(str, args.freqs), "--seed", str(args.seed), "--data-dir", str(args.data_dir),
           "--result-file", str(result_file)]
    if args.weights:
        cmd += ["--weights", str(args.weights)]
    cmd += ["--device", args.device]
    env = dict(os.environ, PYSM_LOCAL_DATA=str(args.data_dir))
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    record = {"case": case, "nside": nside}
    try:
        record.update(json.loads(result_file.read_text()))
    except (OSError, ValueError):
        pass
    result_file.unlink(missing_ok=True)
    peak = rusage.ru_maxrss * 1024 / GB  # Linux: KiB
    vmhwm = record.get("peak_self_vmhwm_gb")
    if vmhwm is not None and abs(peak - vmhwm) > 0.05 * vmhwm + 0.05:
        print(f"  warning: wait4 ru_maxrss {peak:.2f} GB != child's VmHWM {vmhwm:.2f} GB", flush=True)
    record.update({
        "returncode": proc.returncode, "ok": proc.returncode == 0 and "first_s" in record,
        "peak_gb": peak, "child_wall_s": wall,
        "child_cpu_s": rusage.ru_utime + rusage.ru_stime,
        "loadavg_1min_before": load_before[0], "loadavg_1min_after": os.getloadavg()[0],
    })
    return record


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _get(results, case, nside, key):
    for r in results:
        if r["case"] == case and r["nside"] == nside and r.get("ok"):
            return r.get(key)
    return None


def ratios(results, nside, case="vaedust"):
    """(case/d11 first-frequency time, case/d10 second-frequency time) at nside, None if missing."""
    v1, d11 = _get(results, case, nside, "first_s"), _get(results, "d11", nside, "first_s")
    v2, d10 = _get(results, case, nside, "second_s"), _get(results, "d10", nside, "second_s")
    return (v1 / d11 if v1 and d11 else None), (v2 / d10 if v2 and d10 else None)


def targets(results, nsides):
    """[(name, status, detail)]; status PASS / FAIL / NOT MEASURED. Official at nside 2048;
    other nsides are reported as 'indicative' rows."""
    rows = []
    for nside in sorted(set(nsides) | {TARGET_NSIDE}):
        tag = "" if nside == TARGET_NSIDE else " (indicative: the target is set at nside 2048)"
        r1, r2 = ratios(results, nside)
        peak = _get(results, "vaedust", nside, "peak_gb")
        failed_vae = any(r["case"] == "vaedust" and r["nside"] == nside and not r.get("ok") for r in results)
        def status(ok, value):
            if value is None:
                return "FAIL" if failed_vae else "NOT MEASURED"
            return "PASS" if ok else "FAIL"
        if nside != TARGET_NSIDE and nside not in nsides:
            continue
        rows.append((f"nside {nside}: first frequency VAEDust <= d11{tag}",
                     status(r1 is not None and r1 <= 1.0, r1),
                     "ratio n/a" if r1 is None else f"VAEDust/d11 = {r1:.2f}"))
        rows.append((f"nside {nside}: further frequency VAEDust <= {TARGET_SECOND_RATIO} x d10{tag}",
                     status(r2 is not None and r2 <= TARGET_SECOND_RATIO, r2),
                     "ratio n/a" if r2 is None else f"VAEDust/d10 = {r2:.2f}"))
        rows.append((f"nside {nside}: VAEDust peak memory <= {TARGET_PEAK_GB:g} GB{tag}",
                     status(peak is not None and peak <= TARGET_PEAK_GB, peak),
                     "n/a" if peak is None else f"{peak:.2f} GB"))
    return rows


def _fmt(x, nd=3):
    return "-" if x is None else f"{x:.{nd}f}"


def table_rows(results):
    rows = []
    for r in results:
        r1, r2 = ratios(results, r["nside"], r["case"])
        is_vae = r["case"].startswith("vaedust")
        rows.append([r["case"], str(r["nside"]),
                     _fmt(r.get("build_s") if r.get("ok") else None),
                     _fmt(r.get("first_s") if r.get("ok") else None),
                     _fmt(r.get("second_s") if r.get("ok") else None),
                     _fmt(r.get("peak_gb"), 2), _fmt(r.get("child_cpu_s"), 1),
                     _fmt(r1, 2) if is_vae else "", _fmt(r2, 2) if is_vae else "",
                     "ok" if r.get("ok") else f"FAILED (rc {r.get('returncode')})"])
    return rows


HEADER = ["case", "nside", "build s", "first freq s", "second freq s", "peak GB", "child CPU s",
          "VAEDust/d11 first", "VAEDust/d10 second", "status"]


def print_report(results, target_rows):
    rows = table_rows(results)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADER)]
    line = "  ".join(h.rjust(w) for h, w in zip(HEADER, widths))
    print("\n" + line + "\n" + "-" * len(line))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    print()
    for name, st, detail in target_rows:
        print(f"[{st}] {name}: {detail}")


def markdown(results, target_rows, meta) -> str:
    out = ["# VAEDust vs PySM d10 / d11: wall time and peak memory", "",
           f"- command: `{meta['command']}`",
           f"- date: {meta['date']}; host: {meta['cpu_count']} CPUs ({meta['machine']}); "
           f"pysm3 {meta['pysm3']}; weights: `{meta['weights']}`",
           f"- frequencies: first {meta['freqs_ghz'][0]:g} GHz, second {meta['freqs_ghz'][1]:g} GHz; "
           "first = Sky construction + first get_emission; second = next get_emission (cached)",
           "- peak = peak RSS of a fresh child process per case (os.wait4 rusage, ru_maxrss); GB = 1e9 bytes; "
           "child CPU s = user + system CPU time of that child (imports included)",
           "- d10/d11 inputs are fake files with the real names/shapes (content random)", "",
           "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    out += ["| " + " | ".join(r) + " |" for r in table_rows(results)]
    out += ["", "## Targets", ""]
    out += [f"- **{st}** {name}: {detail}" for name, st, detail in target_rows]
    load = [f"{r['case']}@{r['nside']}: {r['loadavg_1min_before']:.1f}->{r['loadavg_1min_after']:.1f}"
            for r in results if "loadavg_1min_before" in r]
    out += ["", "1-min load average before -> after each case (the machine is shared): " + ", ".join(load), ""]
    return "\n".join(out)


def default_weights() -> str | None:
    spec = importlib.util.find_spec("pysm_vaedust")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "package_data" / "vaedust_default.h5"
    return str(path) if path.exists() else None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nside", type=int, nargs="+", default=[512, 2048], help="nside values (default 512 2048)")
    p.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), choices=ALL_CASES,
                   help="cases (default d10 d11 vaedust; vaedust_maps = VAEDust with d10's beta/Td maps)")
    p.add_argument("--weights", default=None,
                   help="VAEDust weights file (default: pysm_vaedust/package_data/vaedust_default.h5)")
    p.add_argument("--freqs", type=float, nargs=2, default=list(DEFAULT_FREQS_GHZ), metavar=("F1", "F2"),
                   help="first and second frequency in GHz (default 143 217)")
    p.add_argument("--seed", type=int, default=0, help="VAEDust seed")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="VAEDust's decoding device (default auto: CUDA when present)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="fake PySM data folder (cached)")
    p.add_argument("--regenerate-fake-data", action="store_true", help="rewrite the fake PySM files")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="JSON output")
    p.add_argument("--markdown", type=Path, default=DEFAULT_MD, help="Markdown output")
    p.add_argument("--case", choices=ALL_CASES, help=argparse.SUPPRESS)  # child mode
    p.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--write-fake-data", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.data_dir = args.data_dir.resolve()
    if args.write_fake_data:  # child: fake PySM inputs
        ensure_fake_data(args.data_dir, args.cases, args.regenerate_fake_data)
        return 0
    if args.case:  # child: one case, one nside
        rec = run_case(args.case, args.nside[0], args.freqs, args.weights, args.seed, args.data_dir, args.device)
        args.result_file.write_text(json.dumps(rec))
        return 0

    if any(c.startswith("vaedust") for c in args.cases):
        args.weights = args.weights or default_weights()
        if args.weights is None:
            sys.exit("no weights: pysm_vaedust/package_data/vaedust_default.h5 does not exist, pass --weights")
        args.weights = str(Path(args.weights).resolve())
        if not Path(args.weights).exists():
            sys.exit(f"--weights {args.weights}: no such file")
    # In a child: on Linux a child's ru_maxrss starts from its parent's RSS at fork, so the parent
    # must stay small (writing the fake files peaks at ~3.4 GB).
    cmd = [sys.executable, str(Path(__file__).resolve()), "--write-fake-data", "--data-dir",
           str(args.data_dir), "--cases", *args.cases] + (["--regenerate-fake-data"] if args.regenerate_fake_data else [])
    if subprocess.run(cmd).returncode != 0:
        sys.exit("writing the fake PySM inputs failed")

    results = []
    for nside in args.nside:
        for case in args.cases:
            print(f"running {case} at nside {nside} ...", flush=True)
            rec = spawn_case(case, nside, args)
            results.append(rec)
            if rec["ok"]:
                print(f"  first {rec['first_s']:.2f} s (build {rec['build_s']:.2f} s), "
                      f"second {rec['second_s']:.2f} s, peak {rec['peak_gb']:.2f} GB", flush=True)
            else:
                print(f"  FAILED: exit code {rec['returncode']} (see the traceback above)", flush=True)

    target_rows = targets(results, args.nside)
    print_report(results, target_rows)
    meta = {
        "command": " ".join(["python", *sys.argv]),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(), "machine": platform.platform(), "python": platform.python_version(),
        "pysm3": importlib.metadata.version("pysm3"),
        "torch": importlib.metadata.version("torch"), "weights": args.weights, "freqs_ghz": list(args.freqs),
        "seed": args.seed, "device": args.device, "fake_data_dir": str(args.data_dir),
        "peak_memory_method": "peak RSS (ru_maxrss) of one fresh child process per case, "
                              "from the rusage os.wait4 returns for that child",
    }
    for path in (args.json, args.markdown):
        path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "results": results,
               "targets": [{"target": n, "status": s, "detail": d} for n, s, d in target_rows]}
    tmp = _atomic_path(args.json)
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(args.json)
    tmp = _atomic_path(args.markdown)
    tmp.write_text(markdown(results, target_rows, meta))
    tmp.replace(args.markdown)
    print(f"\nwrote {args.json} and {args.markdown}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
