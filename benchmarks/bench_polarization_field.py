#!/usr/bin/env python
"""The polarization field's step of the chunked I, Q, U writer alone: `VAEDust.compute_full_sky`
given a full-sky float32 intensity (a random log-normal stand-in, 12 nside^2 pixels, made in
pieces), then one mirror band's fractions: wall times and the process's peak RSS.

    python benchmarks/bench_polarization_field.py --nside 8192

Peak RSS includes the 3.2 GB intensity at nside 8192 and the component's templates; the
writer's intensity pass (the renderer) is not run (benchmarks/bench_chunked.py runs both).
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from pysm_vaedust import VAEDust

PIECE = 1 << 26


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nside", type=int, default=8192)
    args = parser.parse_args(argv)
    component = VAEDust(nside=args.nside)
    rng = np.random.default_rng(0)
    intensity = np.empty(12 * args.nside**2, dtype=np.float32)
    for start in range(0, len(intensity), PIECE):
        stop = min(start + PIECE, len(intensity))
        intensity[start:stop] = np.exp(4 + 0.3 * rng.standard_normal(stop - start))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    start = time.perf_counter()
    full_sky = component.compute_full_sky(intensity)
    field_s = time.perf_counter() - start
    band = full_sky.polarization.bands()[len(full_sky.polarization.bands()) // 4]
    start = time.perf_counter()
    full_sky.polarization.fractions(np.concatenate([rings.pixels() for rings in band]))
    band_s = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"nside {args.nside}: field {field_s:.1f} s, one band's fractions {band_s:.1f} s; "
          f"peak RSS {before:.2f} GB before the field, {peak:.2f} GB after (GB = 1e9 bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
