"""MPI check of VAEDust's map distribution; run as ``mpiexec -n 2 python tests/mpi_script.py``.

Every rank builds ``VAEDust(nside, map_dist=MapDistribution(mpi_comm=COMM_WORLD, nside=nside))``,
computes its own pixels (``map_dist.pixel_indices``; I, Q, U, rendering only its own), rank 0
gathers them into a full map and compares it bit for bit with a single-process
``VAEDust(nside)`` (same seed) it computes itself.
Exit code 0 when equal, 1 when not (the mismatch is printed), 2 on a usage error.

Also holds `write_test_weights`, a tiny randomly initialised weights file (seconds to use at
nside <= 64) so the distribution checks do not depend on the shipped weights.
"""

from __future__ import annotations

import argparse
import os
import sys


def write_test_weights(path, seed: int = 0):
    """Write a tiny random-init conditional VAE weights file (16x16-pixel 8-deg patches) to `path`."""
    import torch

    from pysm_vaedust.model import ConditionalVAE, VAEConfig
    from pysm_vaedust.weights import save_weights

    torch.manual_seed(seed)
    config = VAEConfig(npix=16, widths=(4, 4, 4), latent_channels=(1, 1))
    metadata = {
        "architecture": config.to_dict(),
        "geometry": {"npix": 16, "size_deg": 8.0, "pixel_size_arcmin": 30.0, "projection": "gnomonic"},
        "spectral_slope": {"slope": 2.5, "ell_range": [50.0, 200.0], "n_bins": 4},
        "normalisation": {"log_mean": 0.0, "log_scale": 0.1, "coarse_scale": 0.2, "level_mean": 1.0,
                          "level_scale": 0.5, "template_fwhm_deg": 0.5},
        "data": {"source": "random initialisation (tests/mpi_script.py)"},
    }
    return save_weights(path, {"vae": ConditionalVAE(config)}, metadata)


def counting(render, n_own):
    """`render` that fails when asked for more pixels than the rank's own `n_own` (the whole sky)."""
    def wrapped(pixels):
        if pixels is None or len(pixels) != n_own:
            raise AssertionError(f"a rank rendered {'the whole sky' if pixels is None else len(pixels)} pixels, "
                                 f"not its own {n_own}")
        return render(pixels)
    return wrapped


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="weights file (see write_test_weights)")
    parser.add_argument("--nside", type=int, default=32)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--freq_GHz", type=float, default=353.0)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    import numpy as np
    import pysm3
    import pysm3.units as u
    import torch
    from mpi4py import MPI

    from pysm_vaedust.component import VAEDust

    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    dist = pysm3.MapDistribution(mpi_comm=comm, nside=args.nside)
    pixels = np.asarray(dist.pixel_indices, dtype=np.int64)
    # I, Q, U: each rank renders its own pixels; the ranks share them for the polarization field
    comp = VAEDust(nside=args.nside, seed=args.seed, weights=args.weights, device="cpu", map_dist=dist)
    comp._render = counting(comp._render, comp.n_pixels)
    local = np.asarray(comp.get_emission(args.freq_GHz * u.GHz).to_value(u.uK_RJ))
    problems = []
    if local.shape != (3, len(pixels)):
        problems.append(f"rank {comm.rank}: map shape {local.shape}, expected (3, {len(pixels)}) "
                        "from map_dist.pixel_indices")
    gathered = comm.gather((pixels, local, problems), root=0)
    if comm.rank != 0:
        return 0

    npix = 12 * args.nside**2
    full = np.full((3, npix), np.nan)
    owner = np.zeros(npix, dtype=np.int64)
    for rank_pixels, rank_map, rank_problems in gathered:
        problems += rank_problems
        if rank_map.shape == (3, len(rank_pixels)):
            full[:, rank_pixels] = rank_map
        owner[rank_pixels] += 1
    if np.any(owner != 1):
        problems.append(f"{int(np.sum(owner == 0))} pixels on no rank, {int(np.sum(owner > 1))} on several")
    serial = VAEDust(nside=args.nside, seed=args.seed, weights=args.weights, device="cpu")
    reference = np.asarray(serial.get_emission(args.freq_GHz * u.GHz).to_value(u.uK_RJ))
    differ = ~((full == reference) | (np.isnan(full) & np.isnan(reference)))
    if np.any(differ):
        worst = np.nanmax(np.abs(full[differ] - reference[differ]) / np.abs(reference[differ]).clip(1e-30))
        problems.append(f"{int(differ.sum())} of {differ.size} values differ from the single-process "
                        f"map (largest relative difference {worst:.3g})")
    sizes = [len(p) for p, _, _ in gathered]
    if problems:
        print("MPI map != single-process map:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print(f"OK: {comm.size} ranks (pixels per rank {sizes}), nside {args.nside}, bit-identical to the "
          "single-process map")
    return 0


if __name__ == "__main__":
    # one thread per rank: the ranks share the machine's cores (set here, not on import: test_mpi
    # imports this module into pytest's process, whose numba and torch keep their threads)
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(_var, "1")
    try:
        code = main()
    except BaseException:  # an exception on one rank must not leave the others waiting in gather
        import traceback

        traceback.print_exc()
        code = 3
        from mpi4py import MPI

        MPI.COMM_WORLD.Abort(code)
    sys.exit(code)
