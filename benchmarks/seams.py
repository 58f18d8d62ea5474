"""Seams per cascade level (issue 21): is each level's blended field uniform across its tiling?

On a constant template every tile of the first level sees the same condition, so its small-scale
field is statistically stationary, and so is every later level's (conditioned, as VAEDust renders
the map, on the field so far: the template plus what the earlier levels pass on, each level's
field at its working nside, `level_fields`): its variance must not depend on where a pixel sits in
the tiling. Per level and seed, the pixels are binned in fifths of their distance to
the centre of the tile (a tile_nside HEALPix pixel) they lie in; the variance per fifth over the
level's mean, averaged over the seeds, must lie within max(3 %, 3 standard errors of that mean)
of 1 (issue 21's target).

`--template default` runs the same measurement on the real sky (the bundled template): the level's field on |b| > 30 deg, divided by its local
rms (the square smoothed at 4 patch sizes of the level) so the bright sky does not outweigh the
rest. The tiling is placed without regard to the sky, so any trend with the distance to the tile
centre is a seam. The flat template is the condition the model sees when its training drops
the condition (`condition_dropout`): no structure at all; the real sky is what users render.

    python benchmarks/seams.py --nside 256 1024 2048 --seeds 0 1 2 3 --template flat default \
        --json benchmarks/seams.json
"""

from __future__ import annotations

import argparse
import json
import time

import healpy as hp
import numpy as np

from pysm_vaedust import VAEDust
from pysm_vaedust.renderer import working_nside

N_BINS = 5


def distance_to_tile_centre(level, nside: int) -> np.ndarray:
    """(npix,) degrees from each pixel of `nside` to the centre of the level's tile it lies in."""
    vec = np.stack(hp.pix2vec(nside, np.arange(hp.nside2npix(nside))), 1)
    tile = hp.vec2pix(level.tile_nside, *vec.T)
    centre = np.stack(hp.pix2vec(level.tile_nside, tile), 1)
    return np.degrees(np.arccos(np.clip(np.sum(vec * centre, 1), -1.0, 1.0)))


def variance_by_distance(field: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """(N_BINS,) variance of `field` per fifth of `distance` over the field's variance."""
    edges = np.quantile(distance, np.linspace(0, 1, N_BINS + 1))
    which = np.clip(np.searchsorted(edges, distance) - 1, 0, N_BINS - 1)
    field = field.astype(np.float64)
    return np.array([field[which == k].var() for k in range(N_BINS)]) / field.var()


def standardised(field: np.ndarray, level) -> np.ndarray:
    """A level's field on the real sky over its local rms: the square root of field^2 smoothed at
    4 patch sizes of the level."""
    local_power = hp.smoothing(field.astype(np.float64) ** 2, fwhm=np.radians(4 * level.geometry.size_deg))
    return field / np.sqrt(np.maximum(local_power, 1e-3 * np.mean(field.astype(np.float64) ** 2)))


def level_fields(sky: VAEDust, nside: int, seed: int) -> dict:
    """{level index: (level, working nside, its field on the whole sky)} as VAEDust renders the
    map: each level conditioned on the field so far (the template, then what the earlier levels
    pass on); an earlier level's field is what it keeps beside the next (`Renderer.earlier_levels`)."""
    renderer, out = sky.renderer, {}
    levels = renderer.levels(nside)

    def keep(level, band, own):
        out[level.index] = (level, band.nside, own.copy())

    _, coarse = renderer.earlier_levels(levels, nside, seed, None, sky.log_template, on_level=keep)
    last = levels[-1]
    work = working_nside(last, nside)
    out[last.index] = (last, work, renderer.level_field(last, work, seed, None, coarse)[0])
    return out


def seams_of_level(fields: list, nside: int, real_sky: bool, seconds: float) -> dict:
    """One level's variance per distance fifth (mean over its `fields`, one (level, working nside,
    field) per seed, and its standard error), printed; `real_sky`: the field `standardised` and cut
    to |b| > 30 deg."""
    level, work = fields[0][0], fields[0][1]
    distance = distance_to_tile_centre(level, work)
    high = np.abs(90 - np.degrees(hp.pix2ang(work, np.arange(hp.nside2npix(work)))[0])) > 30
    ratios = []
    for _, _, field in fields:
        if real_sky:
            ratios.append(variance_by_distance(standardised(field, level)[high], distance[high]))
        else:
            ratios.append(variance_by_distance(field, distance))
    ratios = np.array(ratios, dtype=np.float64)
    mean = ratios.mean(0)
    se = ratios.std(0, ddof=1) / np.sqrt(len(fields)) if len(fields) > 1 else np.zeros(N_BINS)
    tolerance = np.maximum(0.03, 3 * se)
    ok = bool(np.all(np.abs(mean - 1) <= tolerance))
    print(f"{'real sky' if real_sky else 'flat'}: nside {nside} level {level.index} (factor {level.factor}, working nside {work}): variance / mean, tile "
          f"centre -> edge {np.round(mean, 3).tolist()} (SE {np.round(se, 4).tolist()}): {'PASS' if ok else 'MISS'}",
          flush=True)
    return {"index": level.index, "factor": level.factor, "working_nside": work,
            "variance_over_mean_centre_to_edge": mean.tolist(), "standard_error": se.tolist(),
            "tolerance": tolerance.tolist(), "pass": ok, "seconds_all_levels": seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nside", type=int, nargs="+", default=[512])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--template", nargs="+", choices=["flat", "default"], default=["flat"],
                        help="flat: a constant template (issue 21's test); default: the bundled real-sky one")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    out = {"seeds": args.seeds, "target": "within max(3 %, 3 SE) of 1",
           "real_sky": "field over its local rms (square smoothed at 4 patch sizes), |b| > 30 deg; the shared part "
                       "is the same for every seed, so the seed scatter understates the sky's"}
    for template in args.template:
        key = "nside" if template == "flat" else "real_sky_nside"
        out[key] = {}
        for nside in args.nside:
            out[key][str(nside)] = levels = []
            sky = (VAEDust(nside=nside, template=np.full(hp.nside2npix(64), 100.0), template_freq="545 GHz",
                           polarization=False) if template == "flat" else VAEDust(nside=nside, polarization=False))
            start = time.time()
            per_seed = [level_fields(sky, nside, seed) for seed in args.seeds]
            seconds = time.time() - start
            for index in sorted(per_seed[0]):
                levels.append(seams_of_level([fields[index] for fields in per_seed], nside, template == "default",
                                             seconds))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
