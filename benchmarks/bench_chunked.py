#!/usr/bin/env python
"""VAEDust at nside 4096-8192 made in ring-band chunks through pysm3 and written to HDF5 as they
are made (`pysm_vaedust.chunked.write_map`, `pysm_vaedust-map`): wall time, peak memory, time
per output pixel.

    python benchmarks/bench_chunked.py --nside 4096 8192 --json benchmarks/chunked.json [--polarization]

Each nside runs in a fresh child process (peak RSS from os.wait4's rusage of that child, as
bench_vs_pysm.py); the map goes to a temporary HDF5 file that is deleted afterwards. Checks the
issue's nside-8192 targets: <= 45 min, peak <= 20 GB, time per output pixel within 1.5x of
nside 4096's in the same run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGET_MINUTES_8192, TARGET_PEAK_GB_8192, TARGET_PER_PIXEL_RATIO = 45.0, 20.0, 1.5
GB = 1e9


def run_child(nside: int, chunks: int | None, freq_ghz: float, seed: int, polarization: bool) -> dict:
    """In this process: write the map, return timings (the parent measures the peak)."""
    import h5py
    import numpy as np
    import pysm3.units as u

    from pysm_vaedust.chunked import CHUNK_PIXELS, write_map

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        start = time.perf_counter()
        path = write_map(Path(tmp) / "map.h5", nside, freq_ghz * u.GHz, n_chunks=chunks, seed=seed, progress=True,
                         polarization=polarization)
        wall = time.perf_counter() - start
        with h5py.File(path) as handle:
            n_chunks = int(handle.attrs["chunks"])
            values = handle["map"][:, ::997]
        finite_positive = bool(np.all(np.isfinite(values)) and values[0].min() > 0)
        polarized_below_intensity = bool(np.all(np.hypot(*values[1:]) < values[0])) if polarization else None
    npix = 12 * nside**2
    return {"nside": nside, "polarization": polarization, "chunks": n_chunks, "chunk_pixels": CHUNK_PIXELS if chunks is None else npix // chunks,
            "wall_s": wall, "ns_per_pixel": 1e9 * wall / npix, "sampled_pixels_finite_positive": finite_positive,
            "sampled_pixels_p_below_i": polarized_below_intensity}


def spawn(nside: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", "--nside", str(nside), "--freq", str(args.freq), "--seed", str(args.seed)]
    if args.chunks:
        cmd += ["--chunks", str(args.chunks)]
    if args.polarization:
        cmd.append("--polarization")
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        proc = subprocess.Popen(cmd + ["--json", out.name])
        _, status, usage = os.wait4(proc.pid, 0)
        record = {"nside": nside, "ok": status == 0, "peak_gb": usage.ru_maxrss * 1024 / GB,
                  "child_cpu_s": usage.ru_utime + usage.ru_stime}
        if status == 0:
            record.update(json.loads(Path(out.name).read_text()))
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nside", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--chunks", type=int, default=None, help="ring-band chunks (default: write_map's)")
    parser.add_argument("--freq", type=float, default=353.0, help="GHz")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--polarization", action="store_true", help="I, Q, U (write_map's two passes)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        Path(args.json).write_text(json.dumps(run_child(args.nside[0], args.chunks, args.freq, args.seed, args.polarization)))
        return 0
    records = []
    for nside in args.nside:
        record = spawn(nside, args)
        records.append(record)
        print(json.dumps(record), flush=True)
    by_nside = {r["nside"]: r for r in records if r["ok"]}
    checks = []
    if 8192 in by_nside:
        r = by_nside[8192]
        checks += [("nside 8192 <= 45 min", r["wall_s"] / 60, r["wall_s"] / 60 <= TARGET_MINUTES_8192),
                   ("nside 8192 peak <= 20 GB", r["peak_gb"], r["peak_gb"] <= TARGET_PEAK_GB_8192)]
        if 4096 in by_nside:
            ratio = r["ns_per_pixel"] / by_nside[4096]["ns_per_pixel"]
            checks.append(("time per pixel 8192 / 4096 <= 1.5", ratio, ratio <= TARGET_PER_PIXEL_RATIO))
    for name, value, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'} {name}: {value:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": "python benchmarks/bench_chunked.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "host": f"{os.cpu_count()} CPUs ({platform.platform()})", "records": records,
            "targets": [{"name": n, "value": v, "pass": ok} for n, v, ok in checks]}, indent=1) + "\n")
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
