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
from .cutouts import (PatchGeometry, condition_input, cut_patches, flat_small_scales, near_extragalactic,
                      noise_floor_ell, oversampling, patch_centres, random_dihedral, region_split)
from .data import (DustMap, NGP_PIXEL_ARCMIN, atomic_write, file_digest, fit_dust_law, load_dust_map, load_ngp_image,
                   masked_spectrum, shared_data_dir)
from .iris import analysis_mask, iris_mosaic, subtract_zero_level
from .model import ConditionalVAE, PatchCritic, VAEConfig, noise_gain_features, radial_bins
from .statistics import default_ell_edges, flat_power_spectrum
from .template import default_template_path, read_template
from .tiling import box_transfer, gaussian_transfer
from .weights import resolve_device, save_weights

SPLITS = ("train", "val", "test")
#: config keys that may differ when resuming (more epochs continue on a different cosine schedule:
#: bit-identity with a straight run holds only for an unchanged `epochs`)
RESUMABLE_CHANGES = ("epochs", "output", "threads", "device", "calibrate_noise")
#: config keys that must be > 0 (other numbers: ints >= 0, floats finite)
POSITIVE_KEYS = ("npix", "size_deg", "spacing_deg", "template_fwhm_deg", "region_nside", "lr", "batch_size",
                 "epochs")


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in the weights file)."""

    data_map: str = "iris_100um"    # path of a HEALPix map, a name in $PYSM_VAEDUST_DATA, or the IRIS plate folder
    map_quantity: str = ""          # "ebv" | "tau353" | "intensity_MJysr"; "" = from FITS header
    map_frame: str = ""             # "G" | "C" | ...; "" = from FITS header
    mosaic_nside: int = 2048        # nside of the cached IRIS mosaic when data_map is the IRIS plate folder
    zero_level: str = "none"        # "template": subtract the map's zero level (iris.subtract_zero_level) before logs
    floor_ell_min: float = 0.0      # leave out patches whose power meets 2x the noise + CIB floor below this ell (0 = keep all)
    exclude_extragalactic: bool = True  # leave out patches reaching the LMC, SMC, M31, M33 (cutouts.EXTRAGALACTIC_DISCS)
    npix: int = 64                  # patch pixels across
    size_deg: float = 8.0           # patch side, degrees
    lat_min_deg: float = 15.0       # patch centres at |b| >= this
    spacing_deg: float = 3.7        # centre spacing (~2250 patches, ~50 % overlap)
    template_fwhm_deg: float = 0.5  # conditioning resolution: the coarse part c is ln I smoothed by this Gaussian
    slope_source: str = "ngp"       # cascade power-law slope from "ngp" (2.37' image), "train" or "map" (the data map's spectrum)
    slope_data: str = "planck_dust_ngp_500px.npy"
    slope_ell_range: list = field(default_factory=lambda: [300.0, 1500.0])
    split_seed: int = 0
    split_fractions: list = field(default_factory=lambda: [0.7, 0.15, 0.15])
    region_nside: int = 2           # HEALPix regions assigned whole to one split
    split_strata: str = "variance"  # "variance": regions stratified by small-scale variance; "none": random
    widths: list = field(default_factory=lambda: [8, 16, 32, 64])   # channels at n, n/2, n/4, n/8
    latent_channels: list = field(default_factory=lambda: [2, 4, 8])  # latent groups at n/2, n/4, n/8
    decoder_logvar_init: float = -2.0
    latent_flow_layers: list = field(default_factory=list)  # affine couplings of each latent group's prior flow, finest first (model.LatentFlow; [] or 0 = Gaussian prior)
    beta: float = 1.0               # KL weight of the ELBO
    free_bits: float = 0.05         # nats per latent dimension each group may use for free
    stats_weight: float = 0.0       # weight of the sample-statistics term (model.texture_statistics; 0 = plain ELBO)
    adversarial_weight: float = 0.0  # VAE-GAN: a conditional patch critic's loss on prior samples, weighted relative to the reconstruction (adversarial_term; 0 = none)
    calibrate_noise: bool = False   # after training, moment-match the decoder noise to the data's dust per patch brightness (calibrate_decoder_noise)
    decoder_noise: str = "learned"  # "learned": per-bin noise trained with the ELBO; "floor": fixed at the data's noise + CIB floor (fix_noise_at_floor)
    condition_dropout: float = 0.0  # share of training patches whose condition's structure channel is zeroed (a flat template: the model learns it too)
    kl_warmup_epochs: int = 5       # beta ramps linearly, beta * (epoch + 1) / warmup, over these epochs
    lr: float = 1e-3                # Adam, cosine-decayed to lr / 20 over the epochs
    grad_clip: float = 100.0        # gradient-norm clip (0 = none)
    batch_size: int = 32
    epochs: int = 30
    seed: int = 0
    device: str = "auto"            # "auto" | "cpu" | "cuda"
    threads: int = 2                # torch CPU threads (0 = torch default)
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
        if self.decoder_noise not in ("learned", "floor"):
            raise ValueError(f"decoder_noise={self.decoder_noise!r}: expected 'learned' or 'floor'")
        if not 0.0 <= self.condition_dropout < 1.0:
            raise ValueError(f"condition_dropout={self.condition_dropout!r}: expected a share in [0, 1)")
        if self.decoder_noise == "floor" and self.calibrate_noise:
            raise ValueError("decoder_noise='floor' fixes the noise at the data's floor: calibrate_noise must be false")
        if self.adversarial_weight < 0:
            raise ValueError(f"adversarial_weight={self.adversarial_weight!r}: expected >= 0 (0 = no critic)")
        if not any(self.latent_flow_layers):
            self.latent_flow_layers = []   # all Gaussian priors, however written
        vae_config_of(self)   # architecture errors before any data is read

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
        """The training config stored in a weights file's metadata."""
        return cls.from_dict(metadata["training_config"], source="weights metadata")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolve_data_path(name: str) -> Path:
    """A data map path as given, else under the shared data folder."""
    path = Path(name)
    return path if path.exists() else shared_data_dir() / name


def load_training_map(name: str, quantity: str = "", frame: str = "", mosaic_nside: int = 2048,
                      progress: bool = True, zero_level: str = "none") -> DustMap:
    """A HEALPix dust map file (NaN / UNSEEN pixels kept as missing data), or (a folder of IRIS
    plates, e.g. "iris_100um") the cached IRIS mosaic; with zero_level "template" its zero
    level regressed on the bundled template subtracted (`iris.subtract_zero_level`)."""
    if zero_level not in ("none", "template"):
        raise ValueError(f"zero_level={zero_level!r}: expected 'none' or 'template'")
    path = resolve_data_path(name)
    dust = (iris_mosaic(mosaic_nside, path, progress=progress) if path.is_dir() else
            load_dust_map(path, quantity=quantity or None, frame=frame or None, allow_missing=True))
    if zero_level == "template":
        return subtract_zero_level(dust, read_template(default_template_path())[0])
    return dust


def select_patches(dust: DustMap, lon, lat, geometry: PatchGeometry, template_fwhm_deg: float,
                   floor_ell_min: float = 0.0, exclude_extragalactic: bool = False
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
    """Patches at the centres that hold data everywhere (with floor_ell_min > 0: whose power stays
    above twice the noise + CIB floor up to that ell; with exclude_extragalactic: away from the
    LMC, SMC, M31 and M33). Returns (lon, lat, small scales (M, n, n) float32, coarse parts
    (M, n, n) float32, a report of what was left out and why)."""
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
    return lon[keep], lat[keep], cutouts.small_scales[keep], cutouts.coarse[keep], report


def patch_normalisation(small_scales: np.ndarray, coarse: np.ndarray, template_fwhm_deg: float) -> dict:
    """Scales of the training split that make x and c of order one (see condition_input)."""
    means = coarse.mean(axis=(1, 2))
    return {"log_mean": float(small_scales.mean()), "log_scale": float(small_scales.std()),
            "coarse_scale": float((coarse - means[:, None, None]).std()),
            "level_mean": float(means.mean()), "level_scale": float(means.std()),
            "template_fwhm_deg": template_fwhm_deg,
            "definition": "x = (ln I - [ln I]_fwhm - log_mean) / log_scale; c = condition_input([ln I]_fwhm), "
                          "I in MJy/sr at 100 um"}


def build_datasets(cfg: TrainConfig, progress: bool = True) -> tuple[dict, dict]:
    """Cut, split and normalise patches. Returns ({split: (x (N, 1, n, n), c (N, 2, n/2, n/2))
    float32 tensors}, info)."""
    dust = load_training_map(cfg.data_map, cfg.map_quantity, cfg.map_frame, cfg.mosaic_nside, progress,
                             cfg.zero_level)
    geometry = PatchGeometry(cfg.npix, cfg.size_deg)
    lon, lat, residual, coarse, selection = select_patches(
        dust, *patch_centres(cfg.lat_min_deg, cfg.spacing_deg), geometry, cfg.template_fwhm_deg,
        cfg.floor_ell_min, cfg.exclude_extragalactic)
    if cfg.split_strata not in ("variance", "none"):
        raise ValueError(f"split_strata={cfg.split_strata!r}: expected 'variance' or 'none'")
    strata = residual.reshape(len(residual), -1).var(1) if cfg.split_strata == "variance" else None
    labels = region_split(lon, lat, geometry, cfg.split_fractions, cfg.split_seed, cfg.region_nside, strata)
    norm = patch_normalisation(residual[labels == 0], coarse[labels == 0], cfg.template_fwhm_deg)
    sets = {name: (torch.from_numpy((residual[labels == k] - norm["log_mean"]) / norm["log_scale"])[:, None],
                   torch.from_numpy(condition_input(coarse[labels == k], norm)))
            for k, name in enumerate(SPLITS)}
    info = {
        "spectral_slope": cascade_slope(cfg, residual[labels == 0], geometry, dust,
                                        selection.get("effective_beam_fwhm_arcmin")),
        "geometry": {"npix": cfg.npix, "size_deg": cfg.size_deg,
                     "pixel_size_arcmin": 60 * geometry.pixel_size_deg, "projection": "gnomonic"},
        "normalisation": norm,
        "data": dust.provenance(),
        "selection": selection,
        **({"noise_floor": data_floor(dust, selection["effective_beam_fwhm_arcmin"], oversampling(dust.nside, geometry))}
           if (cfg.calibrate_noise or cfg.decoder_noise == "floor") and selection.get("effective_beam_fwhm_arcmin")
           else {}),
        "split": {"counts": {name: int(len(sets[name][0])) for name in SPLITS},
                  "dropped_border_patches": int(np.sum(labels < 0)),
                  "centres_lonlat_deg": {name: np.stack([lon[labels == k], lat[labels == k]], 1).tolist()
                                         for k, name in enumerate(SPLITS)}},
    }
    return sets, info


def datasets_of_weights(metadata: dict, cache=None, progress: bool = True) -> dict:
    """{split: (x, c)} of the recipe a weights file was trained with (`metadata`: its metadata),
    rebuilt from the recipe's data by `build_datasets` (minutes from the cached IRIS mosaic).
    `cache`: a .pt file that keeps them, reused only when its normalisation and split counts are
    the weights'. ValueError when the rebuilt normalisation is not the weights' (other data)."""
    counts = metadata.get("split", {}).get("counts")
    if cache is not None and Path(cache).is_file():
        blob = torch.load(cache, weights_only=False)
        info = blob["info"]
        if info["normalisation"] == metadata["normalisation"] and counts in (None, info["split"]["counts"]):
            return blob["sets"]
    sets, info = build_datasets(TrainConfig.of_weights(metadata), progress)
    if info["normalisation"] != metadata["normalisation"]:
        raise ValueError("the rebuilt splits' normalisation differs from the weights': not the recipe's data")
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"sets": sets, "info": {"normalisation": info["normalisation"], "split": info["split"]}}, cache)
    return sets


def spectral_slope(small_scales: np.ndarray, pixel_size_deg: float, ell_range) -> dict:
    """Fit C_ell ~ ell^-slope to the mean flat-sky spectrum of images (..., n, n) in `ell_range`."""
    npix = small_scales.shape[-1]
    ell, cl = flat_power_spectrum(small_scales, pixel_size_deg, default_ell_edges(npix, pixel_size_deg))
    cl = cl.reshape(-1, len(ell)).mean(0)
    sel = (ell >= ell_range[0]) & (ell <= ell_range[1])
    slope, _ = np.polyfit(np.log(ell[sel]), np.log(cl[sel]), 1)
    return {"slope": float(-slope), "ell_range": [float(v) for v in ell_range], "n_bins": int(sel.sum())}


def map_slope(dust: DustMap, beam_fwhm_arcmin: float, ell_range) -> dict:
    """The dust power law of a map's own spectrum: linear I on the analysis mask (|b| > 30,
    `iris.analysis_mask`) fitted as B_l^2 (A l^alpha + F) over ell_range (`data.fit_dust_law`:
    F its noise + CIB floor, B its effective beam); slope = -alpha."""
    missing = ~np.isfinite(dust.intensity)
    lmax = min(int(ell_range[1]), 3 * dust.nside - 1)
    cl = masked_spectrum(np.where(missing, 0.0, dust.intensity), analysis_mask(dust.nside, missing), lmax)
    fit = fit_dust_law(cl, beam_fwhm_arcmin, (ell_range[0], lmax))
    return {"slope": -fit["alpha"], "fit": fit, "beam_fwhm_arcmin": beam_fwhm_arcmin,
            "ell_range": [float(ell_range[0]), float(lmax)]}


def cascade_slope(cfg: "TrainConfig", train_patches: np.ndarray, geometry: PatchGeometry, dust: DustMap,
                  beam_fwhm_arcmin: float | None = None) -> dict:
    """Power-law slope that sets the cascade amplitudes (`cfg.slope_source`): from the 2.37'
    north-pole image, the training patches, or the data map's own spectrum on the analysis mask
    (`map_slope`, through the data's effective beam: IRIS's dust law continued beyond what it
    resolves)."""
    if cfg.slope_source == "ngp":
        path = resolve_data_path(cfg.slope_data)
        image = flat_small_scales(np.log(load_ngp_image(path)), NGP_PIXEL_ARCMIN, cfg.template_fwhm_deg)
        fit = spectral_slope(image, NGP_PIXEL_ARCMIN / 60, cfg.slope_ell_range)
        return {**fit, "source": path.name, "sha256": file_digest(path)}
    if cfg.slope_source == "train":
        return {**spectral_slope(train_patches, geometry.pixel_size_deg, cfg.slope_ell_range), "source": "train split"}
    if cfg.slope_source == "map":
        if not beam_fwhm_arcmin:
            raise ValueError("slope_source='map' needs the data's effective beam: set floor_ell_min > 0")
        return {**map_slope(dust, beam_fwhm_arcmin, cfg.slope_ell_range), "source": dust.source}
    raise ValueError(f"slope_source={cfg.slope_source!r}: expected 'ngp', 'train' or 'map'")


def vae_config_of(cfg: TrainConfig) -> VAEConfig:
    return VAEConfig(npix=cfg.npix, widths=tuple(cfg.widths), latent_channels=tuple(cfg.latent_channels),
                     decoder_logvar_init=cfg.decoder_logvar_init, latent_flow_layers=tuple(cfg.latent_flow_layers))


def batches(data: tuple, batch_size: int, device):
    """(x, c) of consecutive batches of a split, on `device`."""
    x, c = data
    for start in range(0, len(x), batch_size):
        yield x[start:start + batch_size].to(device), c[start:start + batch_size].to(device)


@torch.no_grad()
def evaluate(model: ConditionalVAE, data: tuple, beta: float, stats_weight: float, seed: int,
             batch_size: int = 256) -> dict:
    """Mean loss terms (nats per patch; free bits off) over a split (x, c): fixed seed, eval mode."""
    model.eval()
    gen = torch.Generator(device=model.device).manual_seed(seed)
    totals, count = {}, 0
    for x, c in batches(data, batch_size, model.device):
        terms = model.elbo_terms(x, c, beta, 0.0, stats_weight, gen)
        for key, value in terms.items():
            if key != "kl_per_group":
                totals[key] = totals.get(key, 0.0) + float(value) * len(x)
        count += len(x)
    return {key: value / count for key, value in totals.items()}


@torch.no_grad()
def power_shares(model: ConditionalVAE, data: tuple, seed: int, n_draws: int = 8, batch_size: int = 128) -> dict:
    """Where the power of conditional samples comes from, over a split: per pixel variance of the
    conditional mean E[mu | c] (the condition), of mu around it (the latents), and of the decoder
    noise, as fractions of the sample variance (normalised units; `n_draws` latents per c)."""
    model.eval()
    gen = torch.Generator(device=model.device).manual_seed(seed)
    cond, latent, noise = 0.0, 0.0, 0.0
    for x, c in batches(data, batch_size, model.device):
        means = torch.stack([model.decode(torch.randn((len(c), model.latent_dim), generator=gen,
                                                       device=c.device), c) for _ in range(n_draws)])
        centre = means.mean(0)
        cond += float(centre.var(dim=(-2, -1)).sum())
        latent += float(means.var(0).mean(dim=(-2, -1)).sum())
        noise += float(model.noise_variance(c).mean(dim=(-2, -1)).sum())   # each patch's, with its gain
    n = len(data[0])
    cond, latent, noise = cond / n, latent / n, noise / n
    total = cond + latent + noise
    return {"condition": cond / total, "latents": latent / total, "decoder_noise": noise / total,
            "sample_variance": total, "data_variance": float(data[0].var()), "n_draws": n_draws}


def floor_power(c: torch.Tensor, normalisation: dict, floor: dict, npix: int, pixel_deg: float) -> torch.Tensor:
    """(B, n, n) power per orthonormal-FFT mode (normalised units) of the data's noise + CIB floor
    in patches of conditions c: a floor C_l = F ((MJy/sr)^2 sr, white, through the data's
    effective beam and the cutouts' box average; `floor`: {"F", "beam_fwhm_arcmin", "box"}) is
    F / I^2 in ln I, I = exp(the patch-mean level)."""
    level = c[:, 1].mean((-2, -1)).double() * normalisation["level_scale"] + normalisation["level_mean"]
    freq = np.fft.fftfreq(npix)                                       # cycles per pixel
    box = box_transfer(freq, int(floor["box"]))
    beam = gaussian_transfer(np.hypot(freq[:, None], freq[None, :]), floor["beam_fwhm_arcmin"] / (60 * pixel_deg))
    window2 = torch.from_numpy((beam * box[:, None] * box[None, :]) ** 2)
    per_mode = floor["F"] / (np.radians(pixel_deg) ** 2 * normalisation["log_scale"] ** 2)
    return (per_mode * torch.exp(-2 * level)[:, None, None] * window2).to(c.device)


def radial_bin_means(power: torch.Tensor, bins: torch.Tensor, n_bins: int) -> torch.Tensor:
    """(B, n_bins) float64 on the CPU: the mean of power (B, n, n) per FFT mode over each radial
    bin of `bins` (n, n) (the model's `noise_bin`)."""
    flat, index = power.flatten(1).double().cpu(), bins.flatten().cpu()
    counts = torch.bincount(index, minlength=n_bins).double()
    return torch.zeros(len(flat), n_bins, dtype=torch.float64).index_add(1, index, flat) / counts


@torch.no_grad()
def fix_noise_at_floor(model: ConditionalVAE, floor: dict, normalisation: dict, pixel_deg: float) -> None:
    """Set the decoder noise to the data's noise + CIB floor (`floor_power`) and freeze it: per radial
    bin the floor's mean power at the level `level_mean`, times the gain exp(-2 (level - level_mean))
    on every bin (F / I^2 in ln I: the level plane is (level - level_mean) / level_scale). Nothing
    but the latents can then carry the dust's variance above the floor."""
    n = model.config.npix
    per_mode = floor_power(torch.zeros(1, 2, n // 2, n // 2), normalisation, floor, n, pixel_deg)
    per_bin = radial_bin_means(per_mode, model.noise_bin, len(model.decoder_logvar))[0]
    model.decoder_logvar.copy_(per_bin.log().to(model.decoder_logvar))
    model.decoder_logvar.requires_grad_(False)
    model.noise_gain.copy_(torch.tensor([0.0, -2.0 * normalisation["level_scale"], 0.0]))
    model.noise_gain_bins.fill_(1.0)
    model.noise_gain_range.copy_(torch.tensor([[-1e3, 1e3], [-1e3, 1e3]]))


def data_floor(dust: DustMap, beam_fwhm_arcmin: float, box: int) -> dict:
    """The training map's noise + CIB floor: F of its dust law B^2 (A l^alpha + F) fitted on the
    analysis mask over ell 100-3000 (`map_slope`), with the window the cutouts see it through."""
    fit = map_slope(dust, beam_fwhm_arcmin, (100.0, 3000.0))["fit"]
    return {"F": fit["F"], "beam_fwhm_arcmin": float(beam_fwhm_arcmin), "box": int(box), "fit": fit}


#: the decoder noise follows the condition on the radial bins where the decoded means carry less
#: than this share of the data's power (and on every finer bin). Chosen on the validation split
#: (samples / dust at l 585-1035, I^2-weighted: 0.90 with 0.5, which left bins 13-14 (l 585-630,
#: means 0.81 / 0.52 of the data) stationary, 0.94 with 0.75, 0.96 with 0.9; brightest fifth 0.89 /
#: 0.93 / 0.95, faintest 1.28 / 1.24 / 1.22)
FINE_MEAN_SHARE = 0.9


#: radial bins that never take the gain: the patch mean and its fundamental (a gain there makes
#: tile-sized offsets in the map, whatever the model's means carry)
PATCH_SCALE_BINS = 2


def fading_tail(below: torch.Tensor) -> torch.Tensor:
    """(n_bins,) bool: the bins from the first one after which `below` holds in every bin (the
    fine-scale tail where the decoded means fade), never the first PATCH_SCALE_BINS; all False
    when the finest bin does not qualify."""
    tail = torch.flip(torch.cumprod(torch.flip(below.long(), [0]), 0), [0]).bool()
    tail[:PATCH_SCALE_BINS] = False
    return tail


def _fit_log_gain(features: torch.Tensor, ratio: torch.Tensor, iterations: int = 50) -> torch.Tensor:
    """theta with sum_i phi_i (r_i - exp(phi_i theta)) = 0 (quasi-Poisson moment equations, so
    the mean of exp(phi theta) matches the mean of r, also in every feature's weighting): Newton
    from theta = 0. features (N, P) float64 with a column of ones, ratio (N,)."""
    theta = torch.zeros(features.shape[1], dtype=torch.float64)
    for _ in range(iterations):
        g = torch.exp(features @ theta)
        step = torch.linalg.solve((features * g[:, None]).T @ features, features.T @ (ratio - g))
        theta = theta + step
        if float(step.abs().max()) < 1e-10:
            break
    return theta


@torch.no_grad()
def calibrate_decoder_noise(model: ConditionalVAE, data: tuple, seed: int, floor: dict | None = None,
                            normalisation: dict | None = None, pixel_deg: float | None = None,
                            batch_size: int = 128) -> dict:
    """Moment-match the decoder noise to the data's dust, patch by patch: per radial Fourier bin
    and patch, the target power is the data's minus that of the conditional decoder mean (one
    prior draw per c) minus the data's noise + CIB floor (`floor_power`, when `floor` is given
    with the weights' `normalisation` and patch `pixel_deg`: the model then carries dust only).
    In the bins where the decoded means carry less than FINE_MEAN_SHARE of the data's power (the
    fine-scale tail, `fading_tail`; `noise_gain_bins`) the noise power of patch i is g_i N(k): log g_i =
    theta . [1, f_i] (f: `noise_gain_features` of c, the brightness and the amplitude of the
    condition's finest scales) fitted by `_fit_log_gain` to the patches' target power there,
    N(k) so that sum_i g_i N(k) = sum_i target_i(k); elsewhere N(k) is the mean target (g = 1,
    as the patch-scale modes there are the conditional mean's: a gain on them makes tile-sized
    offsets); floored at 1 % of the data's. (The ELBO alone sets one stationary noise for all patches: on
    the IRIS validation split samples then had 0.63x the real power at l 600-1000 in the
    brightest fifth of the patches, 1.3x in the next. Fitted on the train split, the brightness
    alone left the validation split's brightest fifth at 0.45x its I^2-weighted dust power at
    l 600-1440; with the structure's standard deviation 0.7x; with its Laplacian's 0.95x.)
    data: (x, c) of the train split. Returns the spectra and gains before and after."""
    model.eval()
    gen = torch.Generator(device=model.device).manual_seed(seed)
    n_bins = len(model.decoder_logvar)
    counts = torch.bincount(model.noise_bin.flatten(), minlength=n_bins).double().cpu()

    def per_bin(power):
        return radial_bin_means(power, model.noise_bin, n_bins)

    data_bins, mean_bins, floor_bins, features = [], [], [], []
    for x, c in batches(data, batch_size, model.device):
        eps = torch.randn((len(c), model.latent_dim), generator=gen, device=c.device)
        data_bins.append(per_bin(torch.fft.fft2(x[:, 0], norm="ortho").abs().square()))
        mean_bins.append(per_bin(torch.fft.fft2(model.decode(eps, c)[:, 0], norm="ortho").abs().square()))
        floor_bins.append(per_bin(floor_power(c, normalisation, floor, x.shape[-1], pixel_deg)) if floor
                          else torch.zeros(len(c), n_bins, dtype=torch.float64))
        features.append(noise_gain_features(c).double().cpu())
    data_bins, mean_bins, floor_bins, f = (torch.cat(t) for t in (data_bins, mean_bins, floor_bins, features))
    target = data_bins - mean_bins - floor_bins                        # (N, n_bins)
    fine = fading_tail(mean_bins.mean(0) < FINE_MEAN_SHARE * data_bins.mean(0))
    base = torch.clamp(target.mean(0), min=0.01 * data_bins.mean(0))
    if fine.any():
        ratio = (target[:, fine] * counts[fine]).sum(1) / (base[fine] * counts[fine]).sum()
        theta = _fit_log_gain(torch.cat([torch.ones(len(f), 1, dtype=f.dtype), f], 1), ratio)
    else:   # the means carry the finest bin: nothing for a gain to fit, one stationary noise (g = 1)
        ratio = torch.ones(len(f), dtype=torch.float64)
        theta = torch.zeros(1 + f.shape[1], dtype=torch.float64)
    gain = torch.exp(theta[0] + f @ theta[1:])
    noise = torch.maximum(target.sum(0) / torch.where(fine, gain.sum(), float(len(gain))), 0.01 * data_bins.mean(0))
    before = model.decoder_logvar.exp().clone()
    model.decoder_logvar.copy_(noise.log().to(model.decoder_logvar))
    model.noise_gain.copy_(theta.to(model.noise_gain))
    model.noise_gain_bins.copy_(fine.to(model.noise_gain_bins))
    model.noise_gain_range.copy_(torch.stack([f.min(0).values, f.max(0).values], 1).to(model.noise_gain_range))
    v = f[:, 0]
    quantiles = torch.quantile(v, torch.linspace(0, 1, 6, dtype=torch.float64))
    by_level = []
    for lo, hi in zip(quantiles[:-1], quantiles[1:]):
        sel = (v >= lo) & (v <= hi)
        by_level.append({"level_range": [float(lo), float(hi)], "gain": float(gain[sel].mean()),
                         "fine_target_over_base": float(ratio[sel].mean()),
                         "floor_share_fine": float((floor_bins[sel][:, fine] * counts[fine]).sum()
                                                   / (data_bins[sel][:, fine] * counts[fine]).sum())})
    return {"data_power_per_bin": data_bins.mean(0).tolist(), "decoded_mean_power_per_bin": mean_bins.mean(0).tolist(),
            "floor_power_per_bin": floor_bins.mean(0).tolist(), "fine_bins": fine.nonzero().flatten().tolist(),
            "noise_power_per_bin_before": before.tolist(), "noise_power_per_bin": noise.tolist(),
            "log_gain_coefficients": theta.tolist(), "feature_range": model.noise_gain_range.tolist(),
            "by_level_quintile": by_level, "floor": floor}


@torch.no_grad()
def handover_coherence(model: ConditionalVAE, data: tuple, seed: int, fwhm_pix: float, n_draws: int = 4,
                       batch_size: int = 128) -> dict:
    """How conditional samples y repeat the sky S they are conditioned on, per radial Fourier bin of
    the (Hann-windowed) patches of a split: a = Re<y S*> / <|S|^2>, s = <|y|^2> / <|S|^2>, with
    S = x / (1 - G) in the band (x the target, the sky less its G-smoothing; G the conditioning
    Gaussian of `fwhm_pix` patch pixels), bins where 1 - G >= 0.1, and kappa = 0 (a = s = 0)
    prepended. The cascade keeps of each level h = -a + sqrt(a^2 + 1 - s) where the next begins
    (`tiling.handover_gain`): a level conditioned on the previous one repeats part of it.
    Returns {"kappa" (frequency x FWHM), "coherent" (a), "power" (s), "fwhm_pix", "n_draws"}."""
    model.eval()
    gen = torch.Generator(device=model.device).manual_seed(seed)
    n = data[0].shape[-1]
    window = torch.hann_window(n, periodic=False, dtype=data[0].dtype, device=model.device)
    window = window[:, None] * window[None, :]
    freq = torch.fft.fftfreq(n, device=model.device)
    radius = torch.sqrt(freq[:, None] ** 2 + freq[None, :] ** 2).flatten()   # cycles per pixel
    bins = radial_bins(n).flatten().to(model.device)
    cross, power_y, power_x = 0.0, 0.0, 0.0
    for x, c in batches(data, batch_size, model.device):
        fx = torch.fft.fft2(x[:, 0] * window).flatten(1)
        for _ in range(n_draws):
            mean = model.decode(torch.randn((len(c), model.latent_dim), generator=gen, device=c.device), c)
            y = mean + model.decoder_noise(torch.randn(mean.shape, generator=gen, device=c.device), c)
            fy = torch.fft.fft2(y[:, 0] * window).flatten(1)
            cross = cross + (fy * fx.conj()).real.sum(0)
            power_y = power_y + fy.abs().square().sum(0)
        power_x = power_x + n_draws * fx.abs().square().sum(0)
    per_bin = [torch.zeros(int(bins.max()) + 1, dtype=torch.float64, device=model.device).index_add(
        0, bins, v.double()) for v in (cross, power_y, power_x)]
    centre = torch.zeros_like(per_bin[0]).index_add(0, bins, radius.double()) / torch.bincount(bins).double()
    kappa = centre.cpu().numpy() * fwhm_pix
    fill = 1.0 - gaussian_transfer(centre.cpu().numpy(), fwhm_pix)
    cross, power_y, power_x = (v.cpu().numpy() for v in per_bin)
    keep = fill >= 0.1
    return {"kappa": [0.0] + kappa[keep].tolist(), "coherent": [0.0] + (cross / power_x * fill)[keep].tolist(),
            "power": [0.0] + (power_y / power_x * fill**2)[keep].tolist(), "fwhm_pix": float(fwhm_pix),
            "n_draws": n_draws}


#: Adam settings of the patch critic (the usual ones of hinge-loss GANs); the cap of its adaptive weight
CRITIC_LR, CRITIC_BETAS, LAMBDA_CAP = 2e-4, (0.5, 0.9), 1e4


def adversarial_term(model: ConditionalVAE, critic: PatchCritic, critic_optimiser, x: torch.Tensor, c: torch.Tensor,
                     recon: torch.Tensor, weight: float, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """One critic step and the VAE's adversarial loss (VAE-GAN, hinge losses) on a batch x
    (B, 1, n, n) with conditions c (B, 2, n/2, n/2); `recon`: the batch-mean reconstruction term
    (scalar, nats per image). The critic learns to score real (x, c) above conditional samples
    (prior latents + decoder noise) given the same c; the returned loss (scalar, added to the
    nats of the ELBO) is lambda * (-mean critic score of those samples after the step), lambda =
    weight * |d recon / d w| / |d score / d w| at the decoder's output layer w (the adaptive
    weight of Esser et al. 2021: the critic's pull on w a fixed share of the reconstruction's,
    whatever either's scale), capped at LAMBDA_CAP (reached while the critic is still at chance
    and its gradient tiny). The critic also reaches the decoder-noise spectrum through the
    samples, a path that bypasses w and that lambda does not measure. Also returns {critic,
    adversarial, lambda}."""
    fake = model.sample(c, generator)
    critic.requires_grad_(True)
    critic_loss = torch.relu(1 - critic(x, c)).mean() + torch.relu(1 + critic(fake.detach(), c)).mean()
    critic_optimiser.zero_grad()
    critic_loss.backward()
    critic_optimiser.step()
    critic.requires_grad_(False)
    generator_loss = -critic(fake, c).mean()
    w = model.out.weight
    pull_recon = torch.autograd.grad(recon, w, retain_graph=True)[0].norm()
    pull_critic = torch.autograd.grad(generator_loss, w, retain_graph=True)[0].norm()
    lam = (weight * pull_recon / (pull_critic + 1e-8)).clamp(max=LAMBDA_CAP).detach()
    return lam * generator_loss, {"critic": critic_loss.detach(), "adversarial": generator_loss.detach(), "lambda": lam}


def _epoch_generator(seed: int, epoch: int, device) -> tuple[torch.Generator, torch.Generator]:
    """Shuffling/augmentation generator (CPU) and noise generator (model device) of one epoch."""
    cpu = torch.Generator().manual_seed(seed * 100_003 + epoch)
    noise = torch.Generator(device=device).manual_seed(seed * 100_003 + epoch + 7919)
    return cpu, noise


def learning_rate(cfg: TrainConfig, epoch: int, step: float) -> float:
    """Cosine decay from lr to lr / 20 over the epochs; step in [0, 1) within the epoch."""
    t = (epoch + step) / cfg.epochs
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Run (or resume) training and write the weights file; returns its path."""
    if cfg.adversarial_weight > 0 and cfg.kl_warmup_epochs >= cfg.epochs:
        raise ValueError(f"adversarial_weight={cfg.adversarial_weight}: the critic joins after the "
                         f"{cfg.kl_warmup_epochs} KL warm-up epochs, and the run has {cfg.epochs}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    start_time = time.time()
    sets, info = build_datasets(cfg, progress)
    data_seconds = time.time() - start_time
    torch.manual_seed(cfg.seed)  # parameter initialisation only
    model = ConditionalVAE(vae_config_of(cfg)).to(device)
    if cfg.decoder_noise == "floor":
        if "noise_floor" not in info:
            raise ValueError("decoder_noise='floor' needs the data's measured noise + CIB floor: set floor_ell_min > 0 "
                             "so that the patch selection measures the map's effective beam and floor")
        fix_noise_at_floor(model, info["noise_floor"], info["normalisation"], PatchGeometry(cfg.npix, cfg.size_deg).pixel_size_deg)
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    critic = PatchCritic().to(device) if cfg.adversarial_weight > 0 else None
    critic_optimiser = (None if critic is None else
                        torch.optim.Adam(critic.parameters(), lr=CRITIC_LR, betas=CRITIC_BETAS))
    ckpt_dir = Path(cfg.checkpoint_dir)
    last_path, best_path = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    start_epoch, best_val, history = 0, math.inf, []
    if resume:
        if not last_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint {str(last_path)!r} to resume from")
        state = torch.load(last_path, map_location=device, weights_only=False)
        defaults = TrainConfig().to_dict()   # keys added since the checkpoint was written: their defaults
        changed = sorted(k for k, v in cfg.to_dict().items()
                         if k not in RESUMABLE_CHANGES and state["config"].get(k, defaults[k]) != v)
        if changed:
            raise ValueError(f"--resume: {str(last_path)!r} was written with different {changed}")
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        if critic is not None:
            critic.load_state_dict(state["critic"])
            critic_optimiser.load_state_dict(state["critic_optimiser"])
        start_epoch, best_val, history = state["epoch"], state["best_val"], state["history"]
    x_train, c_train = sets["train"]
    n_batches = math.ceil(len(x_train) / cfg.batch_size)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        cpu_gen, noise_gen = _epoch_generator(cfg.seed, epoch, device)
        order = torch.randperm(len(x_train), generator=cpu_gen)
        bar = tqdm(range(n_batches), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress,
                   leave=False, file=sys.stderr)
        running = {}
        beta = cfg.beta * min(1.0, (epoch + 1) / max(cfg.kl_warmup_epochs, 1))
        for b in bar:
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            x, c = (t.to(device) for t in random_dihedral((x_train[idx], c_train[idx]), cpu_gen))
            if cfg.condition_dropout > 0:
                flat = torch.rand(len(c), generator=cpu_gen) < cfg.condition_dropout
                c = c.clone()
                c[flat.to(device), 0] = 0.0
            for group in optimiser.param_groups:
                group["lr"] = learning_rate(cfg, epoch, b / n_batches)
            terms = model.elbo_terms(x, c, beta, cfg.free_bits, cfg.stats_weight, noise_gen)
            loss = terms["loss"]
            if critic is not None and epoch >= cfg.kl_warmup_epochs:   # the critic joins after the KL warm-up's epochs
                adversarial, parts = adversarial_term(model, critic, critic_optimiser, x, c, terms["recon"],
                                                      cfg.adversarial_weight, noise_gen)
                loss = loss + adversarial
                terms.update(parts)
            optimiser.zero_grad()
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimiser.step()
            for key in ("loss", "recon", "kl", "stats", "critic", "adversarial", "lambda"):
                if key not in terms:
                    continue
                value = terms[key].item()
                running[key] = 0.9 * running.get(key, value) + 0.1 * value
            bar.set_postfix(elbo=f"{-running['loss']:.1f}", recon=f"{running['recon']:.1f}",
                            kl=f"{running['kl']:.1f}")
        val = evaluate(model, sets["val"], cfg.beta, cfg.stats_weight, seed=cfg.seed)
        history.append({"epoch": epoch + 1, "train_loss": running["loss"], "seconds": time.time() - start_time,
                        **{f"train_{k}": running[k] for k in ("critic", "adversarial", "lambda") if k in running},
                        "kl_per_group": terms["kl_per_group"].tolist(), **{f"val_{k}": v for k, v in val.items()}})
        if progress:
            print(f"epoch {epoch + 1}/{cfg.epochs}: train loss {running['loss']:.1f} (stats {running['stats']:.2f})  "
                  f"val -ELBO {val['recon'] + val['kl']:.1f} (stats {val['stats']:.2f}, recon {val['recon']:.1f}, KL {val['kl']:.1f}, mse {val['mse']:.4f}; KL per "
                  f"group {[round(v) for v in terms['kl_per_group'].tolist()]})"
                  + (f"; critic {running['critic']:.3f}, adversarial {running['adversarial']:.3f} x {running['lambda']:.1f}"
                     if "critic" in running else ""), file=sys.stderr)
        # with the critic the last epoch is kept: the validation ELBO does not measure what it adds
        if val["loss"] < best_val or critic is not None:
            best_val = val["loss"]
            atomic_write(best_path, lambda tmp: torch.save({"model": model.state_dict(), "epoch": epoch + 1}, tmp))
        state = {"model": model.state_dict(), "optimiser": optimiser.state_dict(), "epoch": epoch + 1,
                 "best_val": best_val, "history": history, "config": cfg.to_dict(),
                 **({} if critic is None else {"critic": critic.state_dict(),
                                               "critic_optimiser": critic_optimiser.state_dict()})}
        atomic_write(last_path, lambda tmp: torch.save(state, tmp))
    best = torch.load(best_path, map_location=device, weights_only=False)
    model.load_state_dict(best["model"])
    model.eval().requires_grad_(False)
    test = evaluate(model, sets["test"], cfg.beta, cfg.stats_weight, seed=cfg.seed)
    shares = power_shares(model, sets["test"], cfg.seed)
    noise_report = calibrate_decoder_noise(model, sets["train"], cfg.seed, info.get("noise_floor"), info["normalisation"],
                                           PatchGeometry(cfg.npix, cfg.size_deg).pixel_size_deg) if cfg.calibrate_noise else None
    metadata = {
        "package_version": __version__,
        "architecture": model.config.to_dict(),
        **info,
        "training_config": cfg.to_dict(),
        "metrics": {"best_epoch": best["epoch"], "best_val_loss": best_val,
                    "epoch_kept": "last (the critic's)" if critic is not None else "lowest validation loss",
                    **{f"test_{k}": v for k, v in test.items()},
                    "test_power_shares": shares,
                    **({} if noise_report is None else {
                        "test_calibrated_loss": evaluate(model, sets["test"], cfg.beta, cfg.stats_weight, cfg.seed)["loss"],
                        "test_calibrated_power_shares": power_shares(model, sets["test"], cfg.seed)}),
                    "data_seconds": data_seconds,
                    "seconds_to_last_epoch": history[-1]["seconds"] if history else None},
        "history": history,
        "decoder_noise": noise_report or {"calibrated": False},
        "handover_coherence": handover_coherence(model, sets["val"], cfg.seed,
                                                 cfg.template_fwhm_deg / PatchGeometry(cfg.npix, cfg.size_deg).pixel_size_deg),
    }
    out = save_weights(cfg.output, {"vae": model.cpu()}, metadata)
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
