"""Non-Gaussianity recovered (NGR, issue 22) and where the samples' power comes from, for a
weights file, on a split of the IRIS patches (`pysm_vaedust.nongaussianity`).

Fields (each standardised per patch): the small-scale part of a patch, x minus the linear
(Wiener) prediction of x from its condition c (`fidelity.wiener_filter`, fitted on the train
split), at the patches' 7.5' grid and IRIS's beam. Real: the split's patches (they carry IRIS's
noise + CIB floor). Model: conditional samples given each patch's own c, with a Gaussian
realisation of IRIS's floor added (`train.floor_power`: the model carries dust only), decoder
noise on (decoded mean + noise, what the product draws) and off (decoded mean only: what the
latents make). Ceiling: the train split's real patches against the split (unpaired). Map
(`--map-nside N`): the product's intensity map (`realsky.vaedust_dust_map`, seed 0, as a user makes
it) cut at the split's centres like the training data, brought from its pixel to IRIS's effective
beam, IRIS's floor added as above (the map carries dust only), minus the Wiener prediction from
the map's own 30' condition. (PySM's d11 cannot be put beside it here: its GNILC inputs come
from the PySM data server, unreachable offline; the own-spectrum twins are the Gaussian reference.)
Departures from 4 random-phase twins per field (`nongaussianity.phase_twins`); terciles by the patch's brightness (the
condition's level); bootstrap over HEALPix nside-4 sky regions. Also the latent share per band
(`nongaussianity.band_power_budget`, 8 decodings per c).

    python benchmarks/nongaussianity.py [--weights W.h5] [--split val|test] [--draws 1]
        [--train-patches 600] [--map-nside 2048] [--sets-cache ~/.cache/pysm_vaedust/sets_0.049704.pt] [--json out.json]

Choose designs on --split val; report --split test once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time

import healpy as hp
import numpy as np
import torch

from pysm_vaedust.cutouts import PatchGeometry, condition_input, cut_patches
from pysm_vaedust.data import file_digest
from pysm_vaedust.fidelity import gaussian_baseline, smooth_patches, wiener_filter, wiener_prediction
from pysm_vaedust.nongaussianity import N_TWINS, STATISTICS, band_power_budget, departures, ngr_report
from pysm_vaedust.realsky import pixel_fwhm_arcmin, split_centres, vaedust_dust_map
from pysm_vaedust.train import datasets_of_weights, floor_power
from pysm_vaedust.validate import jsonable
from pysm_vaedust.weights import default_weights_path, load_weights

BANDS = ((300.0, 600.0), (600.0, 1000.0))
REGION_NSIDE = 4
LATENT_DRAWS = 8


def decoded_means(vae, c: torch.Tensor, draws: int, generator: torch.Generator) -> np.ndarray:
    """(N, draws, n, n) decoder means of prior latents eps ~ N(0, I) given c."""
    out = []
    with torch.no_grad():
        for s in range(0, len(c), 128):
            cb = c[s:s + 128].repeat_interleave(draws, 0)
            eps = torch.randn((len(cb), vae.latent_dim), generator=generator)
            out.append(vae.decode(eps, cb)[:, 0].reshape(-1, draws, *cb.shape[-2:]).numpy())
    return np.concatenate(out).reshape(len(c), draws, vae.config.npix, vae.config.npix).astype(float)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=str(default_weights_path()))
    parser.add_argument("--split", default="val", choices=["val", "test"])
    parser.add_argument("--draws", type=int, default=1, help="conditional samples per patch")
    parser.add_argument("--train-patches", type=int, default=600, help="train patches of the ceiling (0: all)")
    parser.add_argument("--map-nside", type=int, default=0, help="also the product's map at this nside (0: not)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sets-cache", default=None)
    parser.add_argument("--departures-cache", default=None,
                        help=".npz keeping the real and train departures (they do not depend on the weights)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    weights = load_weights(args.weights)
    vae, meta = weights.vae, weights.metadata
    vae.eval()
    sets = datasets_of_weights(meta, args.sets_cache)
    (x_train, c_train), (x, c) = sets["train"], sets[args.split]
    norm, npix = meta["normalisation"], vae.config.npix
    pixel_deg = float(meta["geometry"]["size_deg"]) / npix
    lon, lat = split_centres(meta, args.split)
    regions = hp.ang2pix(REGION_NSIDE, lon, lat, lonlat=True)
    brightness = c[:, 1].mean((-2, -1)).numpy()
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    coefficients = wiener_filter(x_train[:, 0].double().numpy(), c_train[:, 0].double().numpy())

    def small_scales(fields, conditions):  # (N, D, n, n) -> (N * D, n, n): minus the Wiener prediction
        prediction = wiener_prediction(coefficients, conditions[:, 0].double().numpy())
        return (fields - prediction[:, None]).reshape(-1, npix, npix)

    floor = floor_power(c, norm, meta["noise_floor"], npix, pixel_deg).numpy()      # (N, n, n)
    noise = vae.noise_variance(c).detach().numpy()
    decoded = decoded_means(vae, c, max(args.draws, LATENT_DRAWS), gen)
    cuts = np.quantile(brightness, [1 / 3, 2 / 3])
    budget = {"all": band_power_budget(x[:, 0].double().numpy(), decoded, noise, floor, pixel_deg, BANDS)}
    for t, name in enumerate(("faint", "intermediate", "bright")):
        rows = np.flatnonzero(np.searchsorted(cuts, brightness, side="right") == t)
        budget[name] = band_power_budget(x[rows, 0].double().numpy(), decoded[rows], noise[rows], floor[rows],
                                         pixel_deg, BANDS)
    means = decoded[:, :args.draws]
    floor_draws = np.moveaxis(gaussian_baseline(floor, args.draws, rng), 0, 1)
    noise_draws = np.moveaxis(gaussian_baseline(noise, args.draws, rng), 0, 1)
    fields = {"real": small_scales(x[:, :1].double().numpy(), c),
              "noise_on": small_scales(means + noise_draws + floor_draws, c),
              "noise_off": small_scales(means + floor_draws, c)}
    train_rows = np.arange(len(x_train))
    if 0 < args.train_patches < len(train_rows):   # a generator of its own: the same rows whatever --draws
        train_rows = np.sort(np.random.default_rng(args.seed).choice(train_rows, args.train_patches, replace=False))
    fields["train"] = small_scales(x_train[train_rows, :1].double().numpy(), c_train[train_rows])
    map_rows = {}          # {"map": the split's rows where the map holds data}, when asked for
    if args.map_nside:
        tic = time.time()
        cut = cut_patches(vaedust_dust_map(args.map_nside, args.seed, args.weights), lon, lat,
                          PatchGeometry(npix, float(meta["geometry"]["size_deg"])), float(norm["template_fwhm_deg"]))
        rows = map_rows["map"] = np.flatnonzero(np.isfinite(cut.small_scales).all(axis=(1, 2)))
        beam = float(meta["noise_floor"]["beam_fwhm_arcmin"])
        extra = np.sqrt(max(beam**2 - pixel_fwhm_arcmin(args.map_nside) ** 2, 0.0))
        small = smooth_patches(cut.small_scales[rows], extra, 60 * pixel_deg)
        small = (small - norm["log_mean"]) / norm["log_scale"] + floor_draws[rows, 0]
        fields["map"] = small_scales(small[:, None], torch.from_numpy(condition_input(cut.coarse[rows], norm)))
        print(f"map at nside {args.map_nside}: {len(rows)} of {len(x)} centres usable ({time.time() - tic:.0f} s)")
    print(f"fields ready ({time.time() - start:.0f} s); departures ...", flush=True)
    dep = {}
    data = json.dumps([meta["normalisation"], meta["geometry"], meta["split"]["counts"], N_TWINS, STATISTICS])
    base_key = f"{args.split}_seed{args.seed}_train{len(train_rows)}_{hashlib.sha256(data.encode()).hexdigest()[:12]}"
    model_key = f"{base_key}_{file_digest(args.weights)[:12]}_draws{args.draws}_nside{args.map_nside}"
    keys = {key: base_key if key in ("real", "train") else model_key for key in fields}
    cached = {}
    if args.departures_cache and os.path.isfile(args.departures_cache):
        with np.load(args.departures_cache) as blob:
            cached = {name: blob[name] for name in blob.files}
    for key in fields:
        names = [k for k in cached if k.startswith(f"{keys[key]}/{key}/")]
        if names:
            dep[key] = {k.rsplit("/", 1)[1]: cached[k] for k in names}
    for key, f in fields.items():
        if key in dep:
            continue
        tic = time.time()
        dep[key] = departures(f, args.seed)
        print(f"  {key}: {len(f)} fields, {time.time() - tic:.0f} s", flush=True)
    if args.departures_cache:
        cached.update({f"{keys[key]}/{key}/{name}": v for key in dep for name, v in dep[key].items()})
        np.savez(args.departures_cache, **cached)
    train_brightness = c_train[train_rows, 1].mean((-2, -1)).numpy()
    report = {key: ngr_report(dep[key], dep["real"], regions, brightness, seed=args.seed)
              for key in ("noise_on", "noise_off")}
    for key, rows in map_rows.items():
        report[key] = ngr_report(dep[key], {k: v[rows] for k, v in dep["real"].items()}, regions[rows],
                                 brightness[rows], seed=args.seed)
    report["train_ceiling"] = ngr_report(dep["train"], dep["real"], regions, brightness,
                                         model_brightness=train_brightness, seed=args.seed)
    print(f"\nNGR on the {args.split} split ({len(x)} patches, {args.draws} draw(s) each; tercile average "
          f"[16-84 % bootstrap]; significance of the real departure; spread ratio):")
    print(f"{'statistic':<10} {'noise on':>22} {'noise off':>22} {'train->split':>12} {'signif.':>8} "
          f"{'spread on':>9}" + "".join(f" {key:>12}" for key in map_rows))
    for name in STATISTICS:
        on, off, ceil = (report[k][name] for k in ("noise_on", "noise_off", "train_ceiling"))
        on_map = "".join(f" {report[key][name]['ngr']:>5.2f} ({report[key][name]['spread_ratio']:.2f})"
                         for key in map_rows)
        print(f"{name:<10} {on['ngr']:>7.2f} [{on['boot_lo']:5.2f},{on['boot_hi']:5.2f}] "
              f"{off['ngr']:>7.2f} [{off['boot_lo']:5.2f},{off['boot_hi']:5.2f}] {ceil['ngr']:>12.2f} "
              f"{on['significance']:>8.1f} {on['spread_ratio']:>9.2f} {on_map}")
    print("\nPower per band (normalised units^2 per mode): latents Var_z E[x|z,c], the real power about E[x|c] "
          "less the floor, decoder noise, floor")
    for tercile, rows in budget.items():
        for band, row in rows.items():
            print(f"  {tercile:<12} l {band}: latents / target {row['latents_over_target']:.3f}, decoder noise / floor "
                  f"{row['noise_over_floor']:.2f} (latents {row['latents']:.4f}, target {row['real_about_mean']:.4f}, "
                  f"noise {row['decoder_noise']:.4f}, floor {row['floor']:.4f})")
    print(f"total {time.time() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(jsonable({"weights": args.weights, "split": args.split, "draws": args.draws,
                                "train_patches": len(train_rows), "seed": args.seed,
                                "map_nside": args.map_nside, "map_patches": {k: len(v) for k, v in map_rows.items()}, "region_nside": REGION_NSIDE,
                                "latent_draws": LATENT_DRAWS, "ngr": report, "power_budget": budget,
                                "seconds": time.time() - start}), fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
