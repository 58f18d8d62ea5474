"""Does the conjugate-gradient preconditioner of `condition_sky` work? (issue 14, item 3)

`condition_sky` solves each Gauss-Newton step's linear system
(L_m J J^T L_m^T + L C L^T + N) a = rhs in data space by conjugate gradients, preconditioned by
its diagonal (the white noise plus the decoder-noise variance seen through the blend). This runs
the same fit on the IRIS observation of `condition_sky.py` twice — with that preconditioner and
with none (`conditioning._cg` wrapped to drop it) — and prints the CG iterations and relative
residuals of every Gauss-Newton step, and the wall time, for each.

    python benchmarks/cg_preconditioner.py [--nside 256] [--patches 8] [--steps 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

import numpy as np
import pysm3.units as u
import torch

from condition_sky import FREQ_100UM, iris_observation
from pysm_vaedust import conditioning
from pysm_vaedust.weights import default_weights_path, load_weights


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=str(default_weights_path()))
    parser.add_argument("--nside", type=int, default=256)
    parser.add_argument("--patches", type=int, default=8, help="test patches observed (0: all)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--noise", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    meta = load_weights(args.weights).metadata
    _, obs, sigma, mask, _, n_patches = iris_observation(meta, args.weights, args.nside, args.patches, 20.0,
                                                         args.noise, np.random.default_rng(0))
    plain_cg = conditioning._cg
    out = {"command": "python benchmarks/cg_preconditioner.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "nside": args.nside, "test_patches": n_patches, "observed_pixels": int(mask.sum()), "runs": {}}
    for label in ("diagonal", "none"):
        conditioning._cg = plain_cg if label == "diagonal" else (
            lambda apply_a, b, precond=None, **kw: plain_cg(apply_a, b, None, **kw))
        tic = time.time()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fitted = conditioning.condition_sky(obs * u.uK_RJ, mask, sigma * u.uK_RJ, FREQ_100UM, args.nside,
                                                    weights=args.weights, steps=args.steps, progress=True)
        finally:
            conditioning._cg = plain_cg
        history = fitted.metadata["gauss_newton"][1:]
        out["runs"][label] = {"seconds": time.time() - tic, "chi2_per_pixel": fitted.metadata["chi2_per_pixel"],
                              "cg": [(h["cg_iterations"], h["cg_residual"]) for h in history]}
        print(f"preconditioner {label:>8}: CG iterations per Gauss-Newton step "
              f"{[h['cg_iterations'] for h in history]}, relative residuals "
              f"{[round(h['cg_residual'], 7) for h in history]}, chi2/pixel {fitted.metadata['chi2_per_pixel']:.3f}, "
              f"{out['runs'][label]['seconds']:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
