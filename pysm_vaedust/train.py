"""Stage 4 — training: config (dataclass <-> TOML), dataset, ELBO loop, checkpoints, weights.

``pysm_vaedust-train --config training/default.toml [--epochs 3 ...] [--resume]`` rebuilds a
weights file. Every config field is also a command-line option (see --help).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import __version__
from .checks import check_bool, check_int, check_real, check_seed
from .cutouts import (PatchGeometry, cut_patches, dihedral, flat_small_scales, near_extragalactic, noise_floor_ell,
                      patch_centres, random_dihedral, region_split)
from .data import DustMap, NGP_PIXEL_ARCMIN, atomic_write, file_digest, load_dust_map, load_ngp_image, shared_data_dir
from .iris import iris_mosaic
from .model import VAE, VAEConfig
from .prior import train_prior
from .statistics import default_ell_edges, flat_power_spectrum
from .weights import save_weights

SPLITS = ("train", "val", "test")
#: what a stored training config that predates a key meant by its absence (the old behaviour)
LEGACY_DEFAULTS = {"split_strata": "none", "marginal_knots": 0, "exclude_extragalactic": False}
#: config keys that may differ when resuming (e.g. continue to more epochs)
RESUMABLE_CHANGES = ("epochs", "output", "threads", "device")
#: config keys that must be > 0 (other numbers: ints >= 0, floats finite)
POSITIVE_KEYS = ("npix", "size_deg", "spacing_deg", "template_fwhm_deg", "region_nside", "latent_dim", "hidden",
                 "lr", "batch_size", "epochs", "prior_layers", "prior_hidden", "prior_lr")


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in the weights file)."""

    data_map: str = "planck_ebv_nside256_ring_icrs.fits.gz"  # path, or a name in $PYSM_VAEDUST_DATA
    map_quantity: str = ""          # "ebv" | "tau353" | "intensity_MJysr"; "" = from FITS header
    map_frame: str = ""             # "G" | "C" | ...; "" = from FITS header
    mosaic_nside: int = 2048        # nside of the cached IRIS mosaic when data_map is the IRIS plate folder
    floor_ell_min: float = 0.0      # leave out patches whose power meets 2x the noise + CIB floor below this ell (0 = keep all)
    exclude_extragalactic: bool = True  # leave out patches reaching the LMC, SMC, M31, M33 (cutouts.EXTRAGALACTIC_DISCS)
    npix: int = 32                  # patch pixels across (32 x 15' matches the 13.7' source pixels)
    size_deg: float = 8.0           # patch side, degrees
    lat_min_deg: float = 15.0       # patch centres at |b| >= this
    spacing_deg: float = 3.7        # centre spacing (~2250 patches, ~50 % overlap)
    template_fwhm_deg: float = 2.0  # resolution of the large-scale template the VAE complements
    slope_source: str = "ngp"       # cascade power-law slope from "ngp" (2.37' image) or "train"
    slope_data: str = "planck_dust_ngp_500px.npy"
    slope_ell_range: list = field(default_factory=lambda: [300.0, 1500.0])
    split_seed: int = 0
    split_fractions: list = field(default_factory=lambda: [0.7, 0.15, 0.15])
    region_nside: int = 2           # HEALPix regions assigned whole to one split
    split_strata: str = "variance"  # "variance": regions stratified by small-scale variance; "none": random
    latent_dim: int = 256
    channels: list = field(default_factory=lambda: [16, 32, 64])
    hidden: int = 256
    decoder_variance: str = "fourier"
    decoder_logvar_init: float = -2.0
    noise_modulation: int = 8       # g x g grid of the z-dependent decoder-noise log-amplitude (0 = stationary)
    marginal_knots: int = 161       # knots of the data <-> Gaussian one-point transform (0 = none)
    pca_init: bool = True           # start from the probabilistic-PCA solution (linear branches)
    beta: float = 1.0               # KL weight of the ELBO
    kl_warmup_epochs: int = 0       # beta ramps linearly, beta * (epoch + 1) / warmup, over these epochs
    lr: float = 1e-3
    batch_size: int = 64
    epochs: int = 30
    seed: int = 0
    prior_epochs: int = 30          # epochs of the latent flow prior (0 = no learned prior)
    prior_layers: int = 6
    prior_hidden: int = 128
    prior_lr: float = 2e-4
    device: str = "auto"            # "auto" | "cpu" | "cuda"
    threads: int = 1                # torch CPU threads (0 = torch default; 2 oversubscribes busy cores)
    checkpoint_dir: str = "runs/default"
    output: str = "runs/default/vaedust.h5"

    def __post_init__(self):
        """Each key has its default's type (a float key takes an int); ranges as POSITIVE_KEYS."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            like = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            positive = f.name in POSITIVE_KEYS
            if f.name in ("seed", "split_seed"):
                check_seed(value, f.name)
            elif isinstance(like, bool):
                check_bool(value, f.name)
            elif isinstance(like, int):
                check_int(value, f.name, 1 if positive else 0)
            elif isinstance(like, float):
                check_real(value, f.name, positive=positive)
            elif not isinstance(value, type(like)):
                raise TypeError(f"{f.name}={value!r}: expected a {type(like).__name__} like {like!r}")

    @classmethod
    def from_toml(cls, path, overrides: dict | None = None) -> "TrainConfig":
        """Read a TOML file (flat table) and apply overrides; unknown keys raise ValueError."""
        with open(path, "rb") as handle:
            values = tomllib.load(handle)
        return cls.from_dict({**values, **(overrides or {})}, source=str(path))

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    @classmethod
    def of_weights(cls, metadata: dict) -> "TrainConfig":
        """The training config stored in a weights file's metadata; keys it predates take their
        old behaviour (LEGACY_DEFAULTS), so older weights rebuild their own split."""
        return cls.from_dict({**LEGACY_DEFAULTS, **metadata["training_config"]}, source="weights metadata")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when available, else CPU; 'cuda' without a GPU raises ValueError."""
    if not isinstance(name, str):
        raise TypeError(f"device={name!r}: expected 'auto', 'cpu' or 'cuda[:n]'")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} requested but no CUDA GPU is available; use 'cpu' or 'auto'")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"device={name!r}: expected 'auto', 'cpu' or 'cuda[:n]'")
    return torch.device(name)


def resolve_data_path(name: str) -> Path:
    """A data map path as given, else under the shared data folder."""
    path = Path(name)
    return path if path.exists() else shared_data_dir() / name


def load_training_map(name: str, quantity: str = "", frame: str = "", mosaic_nside: int = 2048,
                      progress: bool = True) -> DustMap:
    """A HEALPix dust map file (NaN / UNSEEN pixels kept as missing data), or (a folder of IRIS
    plates, e.g. "iris_100um") the cached IRIS mosaic."""
    path = resolve_data_path(name)
    if path.is_dir():
        return iris_mosaic(mosaic_nside, path, progress=progress)
    return load_dust_map(path, quantity=quantity or None, frame=frame or None, allow_missing=True)


def select_patches(dust: DustMap, lon, lat, geometry: PatchGeometry, template_fwhm_deg: float,
                   floor_ell_min: float = 0.0, exclude_extragalactic: bool = False
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Small-scale patches at the centres that hold data everywhere (with floor_ell_min > 0: whose
    power stays above twice the noise + CIB floor up to that ell; with exclude_extragalactic:
    away from the LMC, SMC, M31 and M33). Returns (lon, lat, patches (M, n, n) float32, a report
    of what was left out and why)."""
    galactic = ~near_extragalactic(lon, lat, geometry) if exclude_extragalactic else np.ones(len(lon), bool)
    report = {"candidates": int(len(lon)), "extragalactic": int(np.sum(~galactic))}
    lon, lat = lon[galactic], lat[galactic]
    cutouts = cut_patches(dust, lon, lat, geometry, template_fwhm_deg, fine_spectra=floor_ell_min > 0)
    usable = cutouts.usable
    if not usable.any():
        raise ValueError(f"none of the {len(lon)} patches of {dust.source!r} holds data everywhere")
    keep = usable.copy()
    report.update({"missing_data": int(np.sum(~usable)), "floor_ell_min": floor_ell_min})
    if floor_ell_min > 0:
        floor = noise_floor_ell(cutouts)
        keep &= floor["ell_floor"] >= floor_ell_min
        report.update({"noise_floor": int(np.sum(usable & ~keep)),
                       "noise_floor_fraction": float(np.mean(~keep[usable])),
                       "ell_floor_percentiles_5_16_50_84": np.nanpercentile(floor["ell_floor"][usable],
                                                                            [5, 16, 50, 84]).tolist(),
                       "effective_beam_fwhm_arcmin": floor["beam_fwhm_arcmin"]})
    return lon[keep], lat[keep], cutouts.small_scales[keep], report


def build_datasets(cfg: TrainConfig, progress: bool = True) -> tuple[dict, dict]:
    """Cut, split and normalise patches. Returns ({split: (N, 1, n, n) float32 tensor}, info)."""
    dust = load_training_map(cfg.data_map, cfg.map_quantity, cfg.map_frame, cfg.mosaic_nside, progress)
    geometry = PatchGeometry(cfg.npix, cfg.size_deg)
    lon, lat, residual, selection = select_patches(dust, *patch_centres(cfg.lat_min_deg, cfg.spacing_deg),
                                                   geometry, cfg.template_fwhm_deg, cfg.floor_ell_min,
                                                   cfg.exclude_extragalactic)
    if cfg.split_strata not in ("variance", "none"):
        raise ValueError(f"split_strata={cfg.split_strata!r}: expected 'variance' or 'none'")
    strata = residual.reshape(len(residual), -1).var(1) if cfg.split_strata == "variance" else None
    labels = region_split(lon, lat, geometry, cfg.split_fractions, cfg.split_seed, cfg.region_nside, strata)
    train = residual[labels == 0]
    log_mean, log_scale = float(train.mean()), float(train.std())
    sets = {name: torch.from_numpy((residual[labels == k] - log_mean) / log_scale)[:, None]
            for k, name in enumerate(SPLITS)}
    info = {
        "spectral_slope": cascade_slope(cfg, train, geometry),
        "geometry": {"npix": cfg.npix, "size_deg": cfg.size_deg,
                     "pixel_size_arcmin": 60 * geometry.pixel_size_deg, "projection": "gnomonic"},
        "normalisation": {"log_mean": log_mean, "log_scale": log_scale,
                          "template_fwhm_deg": cfg.template_fwhm_deg,
                          "definition": "x = (ln(I/MJy sr^-1) - smooth_fwhm[ln I] - log_mean) / log_scale"},
        "data": dust.provenance(),
        "selection": selection,
        "split": {"counts": {name: int(len(sets[name])) for name in SPLITS},
                  "dropped_border_patches": int(np.sum(labels < 0)),
                  "centres_lonlat_deg": {name: np.stack([lon[labels == k], lat[labels == k]], 1).tolist()
                                         for k, name in enumerate(SPLITS)}},
    }
    return sets, info


def spectral_slope(small_scales: np.ndarray, pixel_size_deg: float, ell_range) -> dict:
    """Fit C_ell ~ ell^-slope to the mean flat-sky spectrum of images (..., n, n) in `ell_range`."""
    npix = small_scales.shape[-1]
    ell, cl = flat_power_spectrum(small_scales, pixel_size_deg, default_ell_edges(npix, pixel_size_deg))
    cl = cl.reshape(-1, len(ell)).mean(0)
    sel = (ell >= ell_range[0]) & (ell <= ell_range[1])
    slope, _ = np.polyfit(np.log(ell[sel]), np.log(cl[sel]), 1)
    return {"slope": float(-slope), "ell_range": [float(v) for v in ell_range], "n_bins": int(sel.sum())}


def cascade_slope(cfg: "TrainConfig", train_patches: np.ndarray, geometry: PatchGeometry) -> dict:
    """Power-law slope that sets the cascade amplitudes: from the 2.37' north-pole image (the only
    real data resolving ell > 600 here) or from the training patches (`cfg.slope_source`)."""
    if cfg.slope_source == "ngp":
        path = resolve_data_path(cfg.slope_data)
        image = flat_small_scales(np.log(load_ngp_image(path)), NGP_PIXEL_ARCMIN, cfg.template_fwhm_deg)
        fit = spectral_slope(image, NGP_PIXEL_ARCMIN / 60, cfg.slope_ell_range)
        return {**fit, "source": path.name, "sha256": file_digest(path)}
    if cfg.slope_source == "train":
        return {**spectral_slope(train_patches, geometry.pixel_size_deg, cfg.slope_ell_range), "source": "train split"}
    raise ValueError(f"slope_source={cfg.slope_source!r}: expected 'ngp' or 'train'")


@torch.no_grad()
def calibrate_decoder_noise(model: VAE, latents: torch.Tensor, data: torch.Tensor, iterations: int = 3) -> dict:
    """Moment-match the decoder noise to the data: per radial Fourier bin, noise power = data
    power - power of the decoded prior latents (floored at 1 % of the data power), so prior
    samples mu(z) + exp(a(z)/2) e have the data's mean 2D power spectrum. With a noise modulation
    the power of the modulated noise is measured on fixed draws and the stationary spectrum
    rescaled per bin (`iterations` fixed-point steps); with a marginal transform, the same steps
    then match the data-space samples f(mu + e) to the data-space power.

    latents: (M, D) draws of the prior in use; data: training images (N, 1, n, n) in data space
    (matched in the model's Gaussian space; the radial-bin power is the same for the dihedral
    augmentations, so the unaugmented set suffices)."""
    if model.config.decoder_variance != "fourier":
        return {"calibrated": False}
    bins = model.noise_bin.flatten()

    def per_bin(images):
        power = torch.cat([torch.fft.fft2(images[i:i + 1024], norm="ortho").abs().square().flatten(1)
                           for i in range(0, len(images), 1024)]).mean(0)
        return (torch.zeros(len(model.decoder_logvar), device=power.device).index_add(0, bins, power)
                / torch.bincount(bins))

    data_power = per_bin(model.marginal.to_gaussian(data))
    means = torch.cat([model.decode(latents[i:i + 1024]) for i in range(0, len(latents), 1024)])
    mean_power = per_bin(means)

    def fixed_white(seed):  # standard normals shaped like `means`, the same at every call with `seed`
        return torch.randn(means.shape, generator=torch.Generator(device=model.device).manual_seed(seed),
                           device=model.device)

    target = torch.maximum(data_power - mean_power, 0.01 * data_power)
    before = model.decoder_logvar.exp().clone()
    model.decoder_logvar.copy_(target.log())
    log_amplitude = model.noise_log_amplitude(latents, means)
    if log_amplitude is not None:
        white = fixed_white(0)
        for _ in range(int(iterations)):
            modulated = per_bin(model.decoder_noise(len(white), white=white, log_amplitude=log_amplitude))
            model.decoder_logvar.add_((target / modulated).log())
    report = {}
    if model.marginal.active:
        # the marginal transform reshapes the spectrum: match the data-space power of the samples
        # f(mu + e) to the data's, rescaling the noise per bin (fixed point; bins where the decoded
        # mean dominates hardly move)
        white = fixed_white(2)

        def data_space_power():
            return per_bin(model.to_data(means + model.decoder_noise(len(white), white=white,
                                                                     log_amplitude=log_amplitude)))

        data_space_target = per_bin(data)
        for _ in range(int(iterations)):
            model.decoder_logvar.add_((data_space_target / data_space_power()).log().clamp(-1.0, 1.0))
        report = {"data_space_power_per_bin": data_space_target.tolist(),
                  "reached_data_space_power_per_bin": data_space_power().tolist()}
    reached = per_bin(model.decoder_noise(len(means), white=fixed_white(1), log_amplitude=log_amplitude))  # final noise
    return {"calibrated": True, "n_latents": len(latents), **report,
            "noise_power_per_bin_before": before.tolist(), "noise_power_per_bin": model.decoder_logvar.exp().tolist(),
            "target_noise_power_per_bin": target.tolist(), "reached_noise_power_per_bin": reached.tolist(),
            "data_power_per_bin": data_power.tolist(), "decoded_prior_power_per_bin": mean_power.tolist()}


def vae_config_of(cfg: TrainConfig) -> VAEConfig:
    return VAEConfig(npix=cfg.npix, latent_dim=cfg.latent_dim, channels=tuple(cfg.channels),
                     hidden=cfg.hidden, decoder_variance=cfg.decoder_variance,
                     decoder_logvar_init=cfg.decoder_logvar_init, noise_modulation=cfg.noise_modulation,
                     marginal_knots=cfg.marginal_knots)


@torch.no_grad()
def evaluate(model: VAE, data: torch.Tensor, beta: float, seed: int, batch_size: int = 256) -> dict:
    """Mean negative-ELBO terms over a split (fixed noise seed, eval mode)."""
    model.eval()
    gen = torch.Generator(device=model.device).manual_seed(seed)
    totals, count = {}, 0
    for start in range(0, len(data), batch_size):
        batch = data[start:start + batch_size].to(model.device)
        terms = model.elbo_terms(batch, beta, gen)
        for key, value in terms.items():
            totals[key] = totals.get(key, 0.0) + float(value) * len(batch)
        count += len(batch)
    return {key: value / count for key, value in totals.items()}


def _epoch_generator(seed: int, epoch: int, device) -> tuple[torch.Generator, torch.Generator]:
    """Shuffling/augmentation generator (CPU) and noise generator (model device) of one epoch."""
    cpu = torch.Generator().manual_seed(seed * 100_003 + epoch)
    noise = torch.Generator(device=device).manual_seed(seed * 100_003 + epoch + 7919)
    return cpu, noise


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Run (or resume) training and write the weights file; returns its path."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    sets, info = build_datasets(cfg, progress)
    augmented = torch.cat([dihedral(sets["train"], k) for k in range(8)]).to(device)  # all 8 symmetries
    torch.manual_seed(cfg.seed)  # parameter initialisation only
    model = VAE(vae_config_of(cfg)).to(device)
    model.marginal.fit(sets["train"])
    if cfg.pca_init:
        model.init_from_pca(augmented)
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    ckpt_dir = Path(cfg.checkpoint_dir)
    last_path, best_path = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    start_epoch, best_val, history = 0, math.inf, []
    if resume:
        if not last_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint {str(last_path)!r} to resume from")
        state = torch.load(last_path, map_location=device, weights_only=False)
        changed = sorted(k for k, v in cfg.to_dict().items()
                         if k not in RESUMABLE_CHANGES and state["config"].get(k) != v)
        if changed:
            raise ValueError(f"--resume: {str(last_path)!r} was written with different {changed}")
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        start_epoch, best_val, history = state["epoch"], state["best_val"], state["history"]
    train_set = sets["train"]
    n_batches = math.ceil(len(train_set) / cfg.batch_size)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        cpu_gen, noise_gen = _epoch_generator(cfg.seed, epoch, device)
        order = torch.randperm(len(train_set), generator=cpu_gen)
        bar = tqdm(range(n_batches), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress,
                   leave=False, file=sys.stderr)
        running = {}
        beta = cfg.beta * min(1.0, (epoch + 1) / max(cfg.kl_warmup_epochs, 1))
        for b in bar:
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            batch = random_dihedral(train_set[idx], cpu_gen).to(device)
            terms = model.elbo_terms(batch, beta, noise_gen)
            optimiser.zero_grad()
            terms["loss"].backward()
            optimiser.step()
            for key, value in terms.items():
                value = value.item()
                running[key] = 0.9 * running.get(key, value) + 0.1 * value
            bar.set_postfix(elbo=f"{-running['loss']:.1f}", recon=f"{running['recon']:.1f}",
                            kl=f"{running['kl']:.1f}")
        val = evaluate(model, sets["val"], cfg.beta, seed=cfg.seed)
        history.append({"epoch": epoch + 1, "train_loss": running["loss"], **{f"val_{k}": v for k, v in val.items()}})
        if progress:
            print(f"epoch {epoch + 1}/{cfg.epochs}: train -ELBO {running['loss']:.2f}  val -ELBO "
                  f"{val['loss']:.2f} (recon {val['recon']:.2f}, KL {val['kl']:.2f}, mse {val['mse']:.4f})",
                  file=sys.stderr)
        if val["loss"] < best_val:
            best_val = val["loss"]
            atomic_write(best_path, lambda tmp: torch.save({"model": model.state_dict(), "epoch": epoch + 1}, tmp))
        state = {"model": model.state_dict(), "optimiser": optimiser.state_dict(), "epoch": epoch + 1,
                 "best_val": best_val, "history": history, "config": cfg.to_dict()}
        atomic_write(last_path, lambda tmp: torch.save(state, tmp))
    best = torch.load(best_path, map_location=device, weights_only=False)
    model.load_state_dict(best["model"])
    test = evaluate(model, sets["test"], cfg.beta, seed=cfg.seed)
    modules = {"vae": model}
    prior_report = None
    model.eval().requires_grad_(False)
    if cfg.prior_epochs > 0:
        flow, prior_report = train_prior(model, augmented, sets["val"], cfg.prior_epochs, cfg.seed,
                                         cfg.prior_layers, cfg.prior_hidden, cfg.prior_lr, progress=progress)
        modules["prior"] = flow
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    normals = torch.randn((8192, cfg.latent_dim), generator=gen, device=device)
    use_flow = prior_report is not None and prior_report["default"]
    with torch.no_grad():
        latents = modules["prior"].sample_from_normals(normals) if use_flow else normals
    noise_report = calibrate_decoder_noise(model, latents, sets["train"].to(device))
    test_calibrated = evaluate(model, sets["test"], cfg.beta, seed=cfg.seed)
    metadata = {
        "package_version": __version__,
        "architecture": model.config.to_dict(),
        **info,
        "training_config": cfg.to_dict(),
        "metrics": {"best_epoch": best["epoch"], "best_val_loss": best_val,
                    **{f"test_{k}": v for k, v in test.items()},
                    **{f"test_calibrated_{k}": v for k, v in test_calibrated.items()}},
        "decoder_noise": noise_report,
        "history": history,
    }
    if prior_report is not None:
        metadata["prior"] = prior_report
    out = save_weights(cfg.output, {k: m.cpu() for k, m in modules.items()}, metadata)
    if progress:
        print(f"wrote {out} (best epoch {best['epoch']}, test -ELBO {test['loss']:.2f})", file=sys.stderr)
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pysm_vaedust-train",
        description="Train the pysm_vaedust VAE on real dust data and write an HDF5 weights file. "
                    "Options override the TOML config; lists are given as JSON (e.g. --channels '[32,64,128]').")
    parser.add_argument("--config", help="TOML file with TrainConfig keys (default: built-in defaults)")
    parser.add_argument("--resume", action="store_true", help="continue from <checkpoint_dir>/last.pt")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        parser.add_argument(f"--{f.name}", dest=f.name, default=None, metavar=type(default).__name__.upper(),
                            help=f"(default {default!r})")
    return parser


def _parse_value(key: str, text: str, like):
    """A command-line value converted to the type of the field's default; ValueError naming it."""
    try:
        if isinstance(like, bool):
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return text.lower() in ("1", "true", "yes")
        if isinstance(like, (list, tuple)):
            return json.loads(text)
        return type(like)(text)
    except ValueError:
        raise ValueError(f"--{key}={text!r}: expected a {type(like).__name__} like {like!r}") from None


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    defaults = TrainConfig().to_dict()
    start = time.time()
    try:
        overrides = {key: _parse_value(key, getattr(args, key), defaults[key])
                     for key in defaults if getattr(args, key) is not None}
        cfg = TrainConfig.from_toml(args.config, overrides) if args.config else TrainConfig.from_dict(overrides)
        train(cfg, resume=args.resume, progress=not args.quiet)
    except (ValueError, TypeError, FileNotFoundError, tomllib.TOMLDecodeError) as err:
        parser.error(str(err))  # one line, exit code 2
    print(f"training took {time.time() - start:.0f} s", file=sys.stderr)
    return 0
