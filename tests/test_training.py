"""Stages 3-5 on real data: ELBO training, resume, weights file integrity, config errors."""

import math

import h5py
import numpy as np
import pytest
import torch

from pysm_vaedust.model import VAE, VAEConfig
from pysm_vaedust.train import TrainConfig, build_datasets, evaluate, main, train
from pysm_vaedust.weights import load_weights, read_weights_file

from conftest import TINY


def tiny_config(tmp_path, **changes):
    values = dict(TINY, prior_epochs=0, checkpoint_dir=str(tmp_path / "ckpt"), output=str(tmp_path / "w.h5"))
    values.update(changes)
    return TrainConfig(**values)


def test_training_lowers_the_negative_elbo(tmp_path, data_dir):
    cfg = tiny_config(tmp_path, pca_init=False, epochs=3, lr=2e-3)
    sets, _ = build_datasets(cfg)
    torch.manual_seed(cfg.seed)
    from pysm_vaedust.train import vae_config_of

    untrained = evaluate(VAE(vae_config_of(cfg)), sets["val"], cfg.beta, seed=0)["loss"]
    weights = load_weights(train(cfg, progress=False))
    history = [h["val_loss"] for h in weights.metadata["history"]]
    assert history[-1] < history[0] < untrained
    assert weights.metadata["metrics"]["test_loss"] < untrained


def test_pca_initialisation_is_the_probabilistic_pca_solution(data_dir, tmp_path):
    sets, _ = build_datasets(tiny_config(tmp_path))
    data = sets["train"]
    vae = VAE(VAEConfig(npix=32, latent_dim=16, channels=(8, 16, 32), hidden=32))
    vae.init_from_pca(data)
    with torch.no_grad():
        mean, _ = vae.encode(data)
        recon = vae.decode(mean).flatten(1).double()
        flat = data.flatten(1).double()
        centred = flat - flat.mean(0)
        _, s, vt = torch.linalg.svd(centred, full_matrices=False)
        eigen = s**2 / (len(flat) - 1)
        projection = centred @ vt[:16].T @ vt[:16] + flat.mean(0)
        w = vae.decoder_linear.weight.double()
    # W = V_16 (Lambda_16 - sigma^2)^(1/2): orthogonal columns with those norms (Tipping & Bishop)
    gram = w.T @ w
    assert torch.allclose(gram, torch.diag(torch.diagonal(gram)), atol=1e-3 * float(gram.max()))
    assert torch.allclose(torch.diagonal(gram), eigen[:16] - eigen[16:].mean(), rtol=1e-3)
    # the posterior-mean reconstruction is the PCA projection shrunk toward the mean
    err_ppca = (recon - flat).square().mean()
    err_pca = (projection - flat).square().mean()
    assert err_pca <= err_ppca < 1.2 * err_pca


def test_resume_after_interruption_gives_identical_weights(tmp_path, data_dir):
    straight = tiny_config(tmp_path / "a", epochs=2)
    path_a = train(straight, progress=False)
    first = tiny_config(tmp_path / "b", epochs=1)
    train(first, progress=False)  # "killed" after one epoch: last.pt holds epoch 1
    resumed = tiny_config(tmp_path / "b", epochs=2)
    path_b = train(resumed, resume=True, progress=False)
    _, tensors_a = read_weights_file(path_a)
    _, tensors_b = read_weights_file(path_b)
    assert tensors_a.keys() == tensors_b.keys()
    for name in tensors_a:
        assert np.array_equal(tensors_a[name], tensors_b[name]), name


def test_weights_round_trip_and_tampering_is_refused(tiny_weights, tmp_path):
    weights = load_weights(tiny_weights)
    meta = weights.metadata
    assert meta["data"]["sha256"] and meta["geometry"]["pixel_size_arcmin"] == pytest.approx(15.0)
    assert meta["normalisation"]["log_scale"] > 0 and 2 < meta["spectral_slope"]["slope"] < 4
    assert weights.prior is not None and "val_nll_per_dim_flow" in meta["prior"]
    z = torch.randn(3, weights.vae.config.latent_dim, generator=torch.Generator().manual_seed(0))
    again = load_weights(tiny_weights)
    assert torch.equal(weights.vae.decode(z), again.vae.decode(z))
    tampered = tmp_path / "tampered.h5"
    tampered.write_bytes(tiny_weights.read_bytes())
    with h5py.File(tampered, "r+") as f:
        name = "tensors/vae/decoder_linear.bias"
        f[name][0] = f[name][0] + 1e-3
    with pytest.raises(ValueError, match="fails its checksum"):
        load_weights(tampered)
    with h5py.File(tampered, "r+") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(ValueError, match="format version 99"):
        load_weights(tampered)
    with pytest.raises(FileNotFoundError):
        load_weights(tmp_path / "none.h5")


def test_config_errors_and_cli(tmp_path, data_dir):
    bad = tmp_path / "bad.toml"
    bad.write_text('epochs = 1\nlearning_rate = 3\n')
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['learning_rate'\]"):
        TrainConfig.from_toml(bad)
    with pytest.raises(ValueError, match="decoder_variance"):
        VAEConfig(decoder_variance="magic")
    with pytest.raises(ValueError, match="no CUDA GPU|device"):
        train(tiny_config(tmp_path, device="tpu"), progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(tiny_config(tmp_path / "fresh"), resume=True, progress=False)
    with pytest.raises(SystemExit):
        main(["--help"])
    with pytest.raises(SystemExit):  # one argparse error (exit 2) naming the bad value
        main(["--epochs", "abc"])


def test_modulated_decoder_noise_likelihood_and_draws():
    """-log p(x | mu, a) of the modulated noise equals the dense Gaussian density with covariance
    C_pq exp((a_p + a_q) / 2) (C circulant from the learned spectrum), and draws have its variances."""
    from pysm_vaedust.conditioning import decoder_noise_covariance

    torch.manual_seed(0)
    vae = VAE(VAEConfig(npix=8, latent_dim=4, channels=(4,), hidden=8, noise_modulation=2)).double()
    with torch.no_grad():
        vae.decoder_logvar.copy_(torch.linspace(-1.0, -3.0, len(vae.decoder_logvar)))
        for p in list(vae.modulation_global.parameters()) + list(vae.modulation_local.parameters()):
            p.normal_(0, 0.3)
        z = torch.randn(3, 4, dtype=torch.float64)
        mean = vae.decode(z)
        a = vae.noise_log_amplitude(z, mean)
        assert a.shape == (3, 1, 8, 8) and float(a.std()) > 0.05   # varies inside and between patches
        x = mean + torch.randn_like(mean)
        for i in range(3):
            cov = decoder_noise_covariance(vae, a[i], periodic=True)
            dense = -torch.distributions.MultivariateNormal(mean[i].flatten(), cov).log_prob(x[i].flatten())
            assert float(vae.neg_log_likelihood(x[i:i + 1], mean[i:i + 1], a[i:i + 1])) == pytest.approx(float(dense), rel=1e-9)
        draws = vae.decoder_noise(20000, torch.Generator().manual_seed(1), log_amplitude=a[:1].expand(20000, 1, 8, 8))
        predicted = torch.diagonal(decoder_noise_covariance(vae, a[0], periodic=True))
        assert torch.allclose(draws.flatten(1).var(0), predicted, rtol=0.05)
        # aperiodic noise (conditioning): same spectrum, no correlation across the patch edges
        flat = vae.decoder_noise(20000, torch.Generator().manual_seed(2), periodic=False).flatten(1).double()
        aperiodic = decoder_noise_covariance(vae, periodic=False)
        assert torch.allclose(flat.T @ flat / len(flat), aperiodic, atol=0.03 * float(aperiodic.max()))
        periodic = decoder_noise_covariance(vae, periodic=True)
        assert float(periodic[0, 7]) > 2 * float(aperiodic[0, 7])   # pixels 0 and 7 of a row: neighbours only with wrap
        assert float(torch.linalg.eigvalsh(aperiodic).min()) > 0
    with pytest.raises(ValueError, match="noise_modulation"):
        VAEConfig(npix=8, channels=(4,), noise_modulation=9)


def test_marginal_transform_round_trip_and_gaussianises():
    from pysm_vaedust.marginal import MarginalTransform

    gen = torch.Generator().manual_seed(0)
    data = torch.randn(20000, generator=gen).mul(0.8).exp() - 1.3     # skewed, like log-dust filaments
    transform = MarginalTransform(81)
    transform.fit(data)
    y = transform.to_gaussian(data)
    assert abs(float(y.mean())) < 0.02 and abs(float(y.std()) - 1) < 0.02
    assert abs(float(((y - y.mean()) ** 3).mean() / y.std() ** 3)) < 0.05    # skewness removed
    x = torch.linspace(-3.0, 40.0, 2001)                                    # beyond the end knots too
    assert torch.allclose(transform.to_data(transform.to_gaussian(x)), x, atol=1e-4)
    assert bool(torch.all(torch.diff(transform.to_gaussian(x)) > 0))
    step = 1e-6                                 # f is C1: finite differences match everywhere
    inner = x[(x > -1.2) & (x < 8)].double()
    finite = (transform.to_gaussian(inner + step) - transform.to_gaussian(inner - step)) / (2 * step)
    assert torch.allclose(transform.to_gaussian(inner, log_derivative=True)[1].exp(), finite, rtol=2e-3)
    identity = MarginalTransform(0)
    identity.fit(data)
    assert torch.equal(identity.to_gaussian(data), data) and torch.equal(identity.to_data(data), data)


def test_marginal_likelihood_is_the_density_of_the_samples():
    """With a fitted marginal transform, samples are x = f(mu + e): the histogram of one pixel's
    draws follows exp(-neg_log_likelihood) as that pixel varies (white noise: pixels independent)."""
    torch.manual_seed(0)
    vae = VAE(VAEConfig(npix=4, latent_dim=2, channels=(2,), hidden=4, decoder_variance="learned",
                        noise_modulation=0, marginal_knots=41)).double()
    with torch.no_grad():
        vae.decoder_logvar.fill_(math.log(0.3))
        vae.marginal.fit(torch.randn(50000, generator=torch.Generator().manual_seed(1)).exp())
        z = torch.zeros(1, 2, dtype=torch.float64)
        draws = vae.sample(200000, torch.Generator().manual_seed(2), z=z.expand(200000, 2))[:, 0, 0, 0]
        mean = vae.decode(z)
        edges = torch.quantile(draws.float(), torch.linspace(0.02, 0.98, 13)).double()
        mass = torch.histogram(draws.float(), edges.float()).hist.double() / len(draws)
        fine = edges[:-1, None] + torch.diff(edges)[:, None] * (torch.arange(64) + 0.5) / 64   # (12, 64)
        x = vae.to_data(mean).repeat(fine.numel(), 1, 1, 1)
        x[:, 0, 0, 0] = fine.flatten()
        log_p = -vae.neg_log_likelihood(x, mean.expand_as(x))
    # the pixel's density up to the (free) factor of the other pixels, integrated over each bin
    predicted = (log_p - log_p.max()).exp().reshape(fine.shape).mean(1) * torch.diff(edges)
    predicted *= float(mass.sum() / predicted.sum())
    assert torch.allclose(mass, predicted, rtol=0.03), (mass, predicted)


def test_older_weights_metadata_keeps_its_split_and_transform():
    """A training config stored before split_strata / marginal_knots existed means the old
    behaviour (random region split, no transform), not today's defaults."""
    old = {k: v for k, v in TrainConfig().to_dict().items() if k not in ("split_strata", "marginal_knots")}
    cfg = TrainConfig.of_weights({"training_config": old})
    assert cfg.split_strata == "none" and cfg.marginal_knots == 0
    assert TrainConfig().split_strata == "variance" and TrainConfig().marginal_knots == 161
    stored = TrainConfig.of_weights({"training_config": TrainConfig().to_dict()})
    assert stored == TrainConfig()
