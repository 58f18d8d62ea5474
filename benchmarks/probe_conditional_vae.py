"""Probe for issue 12: what buys filaments in a small conditional VAE on IRIS 100 um (CPU, minutes).

Data: the IRIS recipe's patches (training/iris.toml: 64 x 64 px of 7.5', ln I minus its 2-degree
smoothing, normalised), split into a condition c and the part x = patch - c the model draws:
c = the patch smoothed to 30' FWHM (Gaussian) and band-limited at ell <= 384 (what a 30' template on
an nside-128 grid holds, 3 nside), by FFT of the patch's mirror extension (no edge wrap-around).
Above ell 384 the Wiener prediction of x from c is exactly zero; below, x = (1 - b) / b c.

Variants (each trained for --minutes, then measured on the test split, 2 samples per patch given
its own c): a spatial latent 16x16x4, a global latent of 64, and the spatial latent plus a small
sample-statistics term (per-patch log band powers and structure-tensor coherence of decoded prior
samples matched to the real x). All: encoder q(z|x,c), decoder p(x|z,c) with c resized into every
decoder scale, nearest upsample + conv, N(0, I) prior, one learned scalar decoder variance, free
bits + KL warm-up, dihedral augmentation. Statistics are of x (the scales the model adds).

    python benchmarks/probe_conditional_vae.py [--minutes 5.5] [--seed 0] [--variants spatial global stats]
Writes benchmarks/probe_conditional_vae.json and /tmp/probe_gallery.png.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pysm_vaedust.morphology import ridge_statistics, structure_tensor_statistics, wph_coefficients
from pysm_vaedust.statistics import bootstrap_band, flat_power_spectrum, minkowski_functionals

PIX_DEG = 7.5 / 60
FWHM_ARCMIN = 30.0
ELL_C = 384.0                      # condition band limit
OCTAVE = (384.0, 768.0)            # the octave just above the conditioning scale
BANDS = [300.0, 600.0, 1200.0]     # per-patch band-power ratio bands
NU = np.linspace(-3.0, 3.0, 25)    # MF thresholds in units of each set's pixel std


# ------------------------------------------------------------------------------------- data
def ell_grid(n2: int) -> np.ndarray:
    """|ell| of the FFT modes of an (n2, n2) grid of PIX_DEG pixels."""
    f = np.fft.fftfreq(n2)
    return 2 * np.pi * np.hypot(*np.meshgrid(f, f, indexing="ij")) / np.radians(PIX_DEG)


def mirror_filter(p: np.ndarray, transfer) -> np.ndarray:
    """Filter patches (B, n, n) by transfer(ell) on their even (mirror) extension to 2n x 2n."""
    n = p.shape[-1]
    row = np.concatenate([p, p[..., ::-1]], -1)
    ext = np.concatenate([row, row[..., ::-1, :]], -2)
    out = np.fft.ifft2(np.fft.fft2(ext) * transfer(ell_grid(2 * n))).real
    return out[..., :n, :n]


def beam(ell):
    """30' Gaussian beam, cut at ELL_C."""
    sigma = np.radians(FWHM_ARCMIN / 60) / np.sqrt(8 * np.log(2))
    return np.exp(-0.5 * (ell * sigma) ** 2) * (ell <= ELL_C)


def bandpass(p, lo, hi):
    return mirror_filter(p, lambda ell: ((ell >= lo) & (ell < hi)).astype(float))


def load_splits() -> dict:
    """{'train'|'val'|'test': (c, x)} float32 arrays (N, 64, 64)."""
    from pysm_vaedust.train import TrainConfig, build_datasets
    sets, _ = build_datasets(TrainConfig.from_toml("training/iris.toml"), progress=False)
    out = {}
    for k, v in sets.items():
        p = v[:, 0].numpy().astype(float)
        c = mirror_filter(p, beam)
        out[k] = (c.astype(np.float32), (p - c).astype(np.float32))
    return out


def wiener_transfer(c: np.ndarray, x: np.ndarray) -> np.ndarray:
    """W(k) = <X C*> / <|C|^2> on the 2n mirror grid from the train split's 2D spectra (0 where c has none)."""
    def ext(p):
        row = np.concatenate([p, p[..., ::-1]], -1)
        return np.fft.fft2(np.concatenate([row, row[..., ::-1, :]], -2))
    C, X = ext(c.astype(float)), ext(x.astype(float))
    ccc, cxc = (np.abs(C) ** 2).mean(0), (X * C.conj()).real.mean(0)
    return np.where(ccc > 1e-12 * ccc.max(), cxc / np.maximum(ccc, 1e-300), 0.0)


def wiener_predict(c: np.ndarray, W: np.ndarray) -> np.ndarray:
    n = c.shape[-1]
    row = np.concatenate([c, c[..., ::-1]], -1)
    ext = np.concatenate([row, row[..., ::-1, :]], -2)
    return np.fft.ifft2(np.fft.fft2(ext) * W).real[..., :n, :n]


def phase_randomised(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian field with each patch's own 2D power spectrum (the d11-like baseline)."""
    phase = np.fft.fft2(rng.standard_normal(x.shape))
    phase /= np.maximum(np.abs(phase), 1e-12)
    return np.fft.ifft2(np.fft.fft2(x) * phase).real


def dihedral(t: torch.Tensor, k: int) -> torch.Tensor:
    t = torch.rot90(t, k % 4, dims=(-2, -1))
    return t.flip(-1) if k >= 4 else t


# ------------------------------------------------------------------------------------ model
class Block(nn.Module):
    """Two 3x3 convs with SiLU and a residual 1x1 skip."""
    def __init__(self, cin, cout):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(cin, cout, 3, padding=1), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1)

    def forward(self, h):
        return self.skip(h) + self.c2(F.silu(self.c1(F.silu(h))))


class CVAE(nn.Module):
    """q(z|x,c), p(x|z,c) on 64x64 patches. latent='spatial' (zc x 16 x 16) or 'global' (zdim)."""
    def __init__(self, latent="spatial", zc=4, zdim=64, ch=(16, 32, 48)):
        super().__init__()
        self.latent, self.zc, self.zdim = latent, zc, zdim
        # encoder: 64 -> 32 -> 16 (-> 8 -> dense for the global latent)
        self.e0, self.e1, self.e2 = Block(2, ch[0]), Block(ch[0], ch[1]), Block(ch[1], ch[2])
        if latent == "spatial":
            self.ehead = nn.Conv2d(ch[2], 2 * zc, 1)
            self.dz = nn.Conv2d(zc, ch[2], 3, padding=1)
        else:
            self.e3 = Block(ch[2], ch[2])
            self.ehead = nn.Linear(ch[2] * 64, 2 * zdim)
            self.dz = nn.Linear(zdim, 16 * 16 * 16)
        # decoder: 16 -> 32 -> 64, c concatenated at every scale
        zin = ch[2] if latent == "spatial" else 16
        self.d2 = Block(zin + 1, ch[2])
        self.d1 = Block(ch[2] + 1, ch[1])
        self.d0 = Block(ch[1] + 1, ch[0])
        self.out = nn.Conv2d(ch[0] + 1, 1, 3, padding=1)
        self.log_sigma = nn.Parameter(torch.zeros(()))

    def encode(self, x, c):
        h = self.e0(torch.cat([x, c], 1))
        h = self.e1(F.avg_pool2d(h, 2))
        h = self.e2(F.avg_pool2d(h, 2))
        if self.latent == "spatial":
            mu, logvar = self.ehead(h).chunk(2, 1)
        else:
            mu, logvar = self.ehead(self.e3(F.avg_pool2d(h, 2)).flatten(1)).chunk(2, 1)
        return mu, logvar.clamp(-12, 6)

    def decode(self, z, c):
        cs = {s: F.adaptive_avg_pool2d(c, s) for s in (16, 32)}
        h = F.silu(self.dz(z)) if self.latent == "spatial" else F.silu(self.dz(z)).view(-1, 16, 16, 16)
        h = self.d2(torch.cat([h, cs[16]], 1))
        h = self.d1(torch.cat([F.interpolate(h, scale_factor=2, mode="nearest"), cs[32]], 1))
        h = self.d0(torch.cat([F.interpolate(h, scale_factor=2, mode="nearest"), c], 1))
        return self.out(torch.cat([F.silu(h), c], 1))

    def zshape(self, b):
        return (b, self.zc, 16, 16) if self.latent == "spatial" else (b, self.zdim)

    def nll(self, x, mean):
        """-log N(x; mean, sigma^2) summed over pixels, (B,) nats."""
        s2 = torch.exp(2 * self.log_sigma)
        return (0.5 * (x - mean) ** 2 / s2 + self.log_sigma + 0.5 * np.log(2 * np.pi)).flatten(1).sum(1)


def kl_terms(mu, logvar):
    """KL(q || N(0, I)) per latent dimension, (B, D)."""
    return (0.5 * (mu**2 + logvar.exp() - 1 - logvar)).flatten(1)


# ------------------------------------------------- differentiable sample statistics (variant 'stats')
_EDGES_T = [90.0, 180.0, 360.0, 720.0, 1440.1]
_ELL64 = torch.tensor(ell_grid(64), dtype=torch.float32)
_WIN = torch.tensor(np.outer(*(2 * [np.hanning(64)])), dtype=torch.float32)


def _gauss_kernels(sigma):
    r = int(np.ceil(3 * sigma))
    u = torch.arange(-r, r + 1, dtype=torch.float32)
    g = torch.exp(-0.5 * (u / sigma) ** 2)
    g = g / g.sum()
    return g, -u / sigma**2 * g


def _sep(x, kx, ky):
    x = F.conv2d(x, kx.view(1, 1, 1, -1), padding=(0, len(kx) // 2))
    return F.conv2d(x, ky.view(1, 1, -1, 1), padding=(len(ky) // 2, 0))


def torch_stats(x):
    """(log band powers (B, 4), energy-weighted structure-tensor coherence (B,)) of (B, 1, 64, 64)."""
    P = torch.fft.fft2((x[:, 0] - x.mean((-2, -1))[:, 0, None, None]) * _WIN).abs() ** 2
    logp = torch.stack([torch.log(P[:, (_ELL64 >= a) & (_ELL64 < b)].mean(1) + 1e-8)
                        for a, b in zip(_EDGES_T[:-1], _EDGES_T[1:])], 1)
    g1, d1 = _gauss_kernels(1.0)
    g2, _ = _gauss_kernels(2.0)
    gx, gy = _sep(x, d1, g1), _sep(x, g1, d1)
    jxx, jyy, jxy = (_sep(t, g2, g2) for t in (gx * gx, gy * gy, gx * gy))
    jxx, jyy, jxy = (t[..., 6:-6, 6:-6] for t in (jxx, jyy, jxy))
    tr = jxx + jyy
    diff = torch.sqrt((jxx - jyy) ** 2 + 4 * jxy**2 + 1e-12)
    coh = diff.flatten(1).sum(1) / (tr.flatten(1).sum(1) + 1e-12)   # energy-weighted mean of diff / tr
    return logp, coh


# --------------------------------------------------------------------------------- training
def train(variant, data, minutes, seed, free_bits=0.1, warmup=0.3, lam_stats=1.0, log=print):
    """Train one variant for ~minutes (steps fixed after timing the first 20); returns (model, info)."""
    torch.manual_seed(seed)
    model = CVAE("global" if variant == "global" else "spatial")
    with torch.no_grad():
        model.log_sigma.fill_(float(np.log(data["train"][1].std())))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    c_tr, x_tr = (torch.from_numpy(a)[:, None] for a in data["train"])
    g = torch.Generator().manual_seed(seed)
    batch, step, total, tic, hist = 32, 0, None, time.time(), []
    while total is None or step < total:
        idx = torch.randint(0, len(x_tr), (batch,), generator=g)
        k = int(torch.randint(0, 8, (1,), generator=g))
        c, x = dihedral(c_tr[idx], k), dihedral(x_tr[idx], k)
        beta = min(1.0, step / (warmup * total)) if total else 0.0
        mu, logvar = model.encode(x, c)
        z = mu + torch.randn(mu.shape, generator=g) * (0.5 * logvar).exp()
        mean = model.decode(z, c)
        nll = model.nll(x, mean).mean()
        kl_d = kl_terms(mu, logvar).mean(0)
        loss = (nll + beta * torch.clamp(kl_d, min=free_bits).sum()) / x[0].numel()
        if variant == "stats":
            zs = torch.randn(model.zshape(batch), generator=g)
            ps, cs = torch_stats(model.decode(zs, c))
            with torch.no_grad():
                pr, cr = torch_stats(x)
            loss = loss + lam_stats * (((ps - pr) ** 2).mean() + 10 * ((cs - cr) ** 2).mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if total is None and step == 20:
            total = max(40, int(minutes * 60 / ((time.time() - tic) / 20)))
            log(f"  {variant}: {(time.time() - tic) / 20:.2f} s/step -> {total} steps")
        if step % 200 == 0 or step == total:
            hist.append({"step": step, "nll_px": nll.item() / x[0].numel(), "kl": kl_d.sum().item(),
                         "sigma": model.log_sigma.exp().item()})
            log(f"  {variant} step {step}/{total}: nll/px {hist[-1]['nll_px']:.3f} KL {hist[-1]['kl']:.1f} "
                f"sigma {hist[-1]['sigma']:.3f}  {time.time() - tic:.0f} s")
    n_params = sum(p.numel() for p in model.parameters())
    return model.eval(), {"steps": total, "train_s": time.time() - tic, "params": n_params, "history": hist}


# ------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def model_passes(model, c, x, seed, n_samples=2, n_mean=4):
    """Test ELBO, KL per dim, conditional samples (with and without decoder noise), conditional mean."""
    g = torch.Generator().manual_seed(seed + 1)
    c, x = torch.from_numpy(c)[:, None], torch.from_numpy(x)[:, None]
    mu, logvar = model.encode(x, c)
    kl = kl_terms(mu, logvar)
    rec = [model.nll(x, model.decode(mu + torch.randn(mu.shape, generator=g) * (0.5 * logvar).exp(), c))
           for _ in range(2)]
    elbo = -(torch.stack(rec).mean(0) + kl.sum(1))
    means, samples = [], []
    for _ in range(n_samples):
        m = model.decode(torch.randn(model.zshape(len(x)), generator=g), c)
        means.append(m)
        samples.append(m + model.log_sigma.exp() * torch.randn(m.shape, generator=g))
    m0 = model.decode(torch.zeros(model.zshape(len(x))), c)
    cond_mean = torch.stack([model.decode(torch.randn(model.zshape(len(x)), generator=g), c)
                             for _ in range(n_mean)]).mean(0)
    mstack, sstack = torch.stack(means), torch.stack(samples)
    latent_power = float(((mstack - m0) ** 2).mean())
    return {"elbo_per_px": float(elbo.mean()) / x[0].numel(), "elbo_per_patch": float(elbo.mean()),
            "kl_total": float(kl.sum(1).mean()), "kl_per_dim": float(kl.mean()),
            "active_dims": int((kl.mean(0) > 0.01).sum()), "latent_dims": int(kl.shape[1]),
            "sigma": float(model.log_sigma.exp()),
            "latent_share_of_decoded_mean": latent_power / float((mstack**2).mean()),
            "latent_share_of_sample": latent_power / float((sstack**2).mean()),
            "noise_share_of_sample": float(model.log_sigma.exp() ** 2) / float((sstack**2).mean()),
            }, sstack[:, :, 0].numpy(), mstack[:, :, 0].numpy(), cond_mean[:, 0].numpy()


def set_stats(p: np.ndarray) -> dict:
    """Per-patch statistics of x patches (N, 64, 64): MFs (thresholds in the set's std), WPH, filaments."""
    p = np.asarray(p, float)
    mf = minkowski_functionals(p - p.mean(), NU * p.std())
    st, rd = structure_tensor_statistics(p), ridge_statistics(p)
    return {"v0": mf["v0"], "v1": mf["v1"], "v2": mf["v2"], "wph": wph_coefficients(p)[0],
            "coherence": st["coherence"], "ridge_fraction": rd["ridge_fraction"],
            "ridge_length_fraction": rd["ridge_length_fraction"]}


def compare(stats: dict, ref: dict) -> dict:
    """Means of `stats` and the fraction of entries inside `ref`'s 68 % bootstrap band of the mean."""
    def inside(key, mask_ref_positive=False):
        _, lo, hi = bootstrap_band(ref[key], n_boot=200, seed=0)
        m = stats[key].mean(0)
        ok = (m >= lo) & (m <= hi)
        if mask_ref_positive:
            ok = ok[ref[key].mean(0) > 0]
        return float(np.mean(ok))
    _, clo, chi = bootstrap_band(ref["coherence"], n_boot=200, seed=0)
    _, rlo, rhi = bootstrap_band(ref["ridge_fraction"], n_boot=200, seed=0)
    return {"coherence": float(stats["coherence"].mean()), "coherence_band": [float(clo), float(chi)],
            "ridge_fraction": float(stats["ridge_fraction"].mean()), "ridge_fraction_band": [float(rlo), float(rhi)],
            "ridge_length_bins_inside": inside("ridge_length_fraction", True),
            "ridge_length_fraction": stats["ridge_length_fraction"].mean(0).round(4).tolist(),
            "wph_inside": inside("wph"), "v0_inside": inside("v0"), "v1_inside": inside("v1"),
            "v2_inside": inside("v2")}


def band_ratio(samples: np.ndarray, real: np.ndarray) -> dict:
    """Per test patch: mean over samples of its band power / the real patch's, in BANDS."""
    _, cr = flat_power_spectrum(real, PIX_DEG, BANDS)
    _, cs = flat_power_spectrum(samples, PIX_DEG, BANDS)
    r = cs.mean(0) / cr
    return {f"{lo:.0f}-{hi:.0f}": {"median": float(np.median(r[:, i])),
                                   "in_0.7_1.4": float(np.mean((r[:, i] > 0.7) & (r[:, i] < 1.4)))}
            for i, (lo, hi) in enumerate(zip(BANDS[:-1], BANDS[1:]))}


def explained(pred: np.ndarray, x: np.ndarray, lo: float, hi: float) -> float:
    """Fraction of the variance of x in ell [lo, hi) explained by pred (1 - residual / total)."""
    bx, br = bandpass(x.astype(float), lo, hi), bandpass((x - pred).astype(float), lo, hi)
    return float(1 - (br**2).sum() / (bx**2).sum())


def gallery(x, c, rows: dict, path, n=6):
    """Real test x beside 2 conditional samples of each variant, same colour scale per patch row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    idx = np.linspace(0, len(x) - 1, n + 2).astype(int)[1:-1]
    cols = [("c (30')", lambda i: c[i]), ("real x", lambda i: x[i])]
    for name, s in rows.items():
        cols += [(f"{name} #1", lambda i, s=s: s[0, i]), (f"{name} #2", lambda i, s=s: s[1, i])]
    fig, axes = plt.subplots(n, len(cols), figsize=(1.6 * len(cols), 1.6 * n))
    for r, i in enumerate(idx):
        v = 2.5 * x[i].std()
        for k, (title, get) in enumerate(cols):
            ax = axes[r, k]
            if k == 0:
                ax.imshow(get(i), origin="lower", cmap="inferno")
            else:
                ax.imshow(get(i), origin="lower", cmap="RdBu_r", vmin=-v, vmax=v)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.5, help="training minutes per variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=["spatial", "global", "stats"])
    parser.add_argument("--json", default="benchmarks/probe_conditional_vae.json")
    parser.add_argument("--gallery", default="/tmp/probe_gallery.png")
    parser.add_argument("--data-cache", default=None, help="optional .npz of the (c, x) splits (speed only)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    np.random.seed(args.seed)
    start = time.time()
    if args.data_cache:
        try:
            z = np.load(args.data_cache)
            data = {k: (z[f"{k}_c"], z[f"{k}_x"]) for k in ("train", "val", "test")}
        except FileNotFoundError:
            data = load_splits()
            np.savez(args.data_cache, **{f"{k}_{n}": a for k, v in data.items() for n, a in zip("cx", v)})
    else:
        data = load_splits()
    c_te, x_te = data["test"]
    print({k: v[1].shape for k, v in data.items()}, f"x std {x_te.std():.3f}, c std {c_te.std():.3f}")
    out = {"setup": {"condition": f"{FWHM_ARCMIN:.0f}' FWHM Gaussian, band-limited at ell <= {ELL_C:.0f}, mirror FFT",
                     "octave": OCTAVE, "bands": BANDS, "seed": args.seed, "minutes": args.minutes,
                     "statistics_of": "x = patch - c (the scales the model adds); MF thresholds in each set's std",
                     "n_test": len(x_te), "samples_per_patch": 2}}

    # references: the test split itself, the train split (sky variance), the Gaussian baseline
    ref = set_stats(x_te)
    rng = np.random.default_rng(args.seed)
    grf = np.stack([phase_randomised(x_te, rng) for _ in range(2)])
    W = wiener_transfer(*data["train"])
    wiener = wiener_predict(c_te.astype(float), W)
    rows = {"train split": compare(set_stats(data["train"][1]), ref),
            "gaussian (own 2D spectrum)": {**compare(set_stats(grf.reshape(-1, 64, 64)), ref),
                                           "band_ratio": band_ratio(grf, x_te)},
            "wiener": {"explained_octave": explained(wiener, x_te, *OCTAVE),
                       "explained_300_600": explained(wiener, x_te, 300, 600)}}
    rows["test split"] = compare(ref, ref)
    print(f"references done {time.time() - start:.0f} s")

    galleries = {}
    for variant in args.variants:
        model, info = train(variant, data, args.minutes, args.seed)
        passes, samples, means, cond_mean = model_passes(model, c_te, x_te, args.seed)
        rows[variant] = {**info, **passes,
                         "band_ratio": band_ratio(samples, x_te),
                         "band_ratio_noise_free": band_ratio(means, x_te),
                         "explained_octave": explained(cond_mean, x_te, *OCTAVE),
                         "explained_300_600": explained(cond_mean, x_te, 300, 600),
                         "sample": compare(set_stats(samples.reshape(-1, 64, 64)), ref),
                         "noise_free": compare(set_stats(means.reshape(-1, 64, 64)), ref)}
        galleries[variant] = samples
        galleries[variant + " mean"] = means
        print(json.dumps({k: v for k, v in rows[variant].items() if k != "history"}, indent=None)[:1500])
        print(f"{variant} done {time.time() - start:.0f} s")
    gallery(x_te, c_te, galleries, args.gallery)
    out["rows"] = rows
    out["seconds"] = time.time() - start
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1)
    import os
    os.replace(tmp, args.json)
    print_table(rows)
    return 0


def print_table(rows):
    print(f"{'row':<28} {'ELBO/px':>8} {'KL/dim':>7} {'lat%':>5} {'r300':>5} {'in':>4} {'r600':>5} {'in':>4} "
          f"{'expl':>6} {'coh':>6} {'ridge':>6} {'Lbin':>5} {'WPH':>5} {'V2':>5}")
    for name, r in rows.items():
        if name == "wiener":
            print(f"{name:<28} explained octave {r['explained_octave']:.3f}, 300-600 {r['explained_300_600']:.3f}")
            continue
        for kind in (("sample", "noise_free") if "sample" in r else (None,)):
            s = r[kind] if kind else r
            br = r.get("band_ratio" if kind != "noise_free" else "band_ratio_noise_free", {})
            b1, b2 = br.get("300-600", {}), br.get("600-1200", {})
            f = lambda v, fmt: format(v, fmt) if v is not None else "-"
            print(f"{(name + (' ' + kind if kind else '')):<28} {f(r.get('elbo_per_px'), '8.3f'):>8} "
                  f"{f(r.get('kl_per_dim'), '7.3f'):>7} {f(r.get('latent_share_of_decoded_mean'), '5.2f'):>5} "
                  f"{f(b1.get('median'), '5.2f'):>5} {f(b1.get('in_0.7_1.4'), '4.2f'):>4} "
                  f"{f(b2.get('median'), '5.2f'):>5} {f(b2.get('in_0.7_1.4'), '4.2f'):>4} "
                  f"{f(r.get('explained_octave'), '6.3f'):>6} {s['coherence']:6.3f} {s['ridge_fraction']:6.3f} "
                  f"{s['ridge_length_bins_inside']:5.2f} {s['wph_inside']:5.2f} {s['v2_inside']:5.2f}")
    t = rows["test split"]
    print(f"test band: coherence {t['coherence_band']}, ridge fraction {t['ridge_fraction_band']}")


if __name__ == "__main__":
    raise SystemExit(main())
