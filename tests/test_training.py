"""Stages 3-5: the conditional VAE's pieces, ELBO training on real data, resume, weights file
integrity, config errors."""

import math

import h5py
import numpy as np
import pytest
from scipy import ndimage
import torch

from pysm_vaedust.cutouts import condition_input, random_dihedral
from pysm_vaedust.model import (ConditionalVAE, LatentFlow, PatchCritic, VAEConfig, gaussian_kl, texture_pairs,
                                texture_statistics, wavelet_filters)
from pysm_vaedust.train import (CRITIC_BETAS, CRITIC_LR, TrainConfig, adversarial_term, build_datasets, evaluate, main,
                                train, vae_config_of)
from pysm_vaedust.weights import load_weights, read_weights_file, save_weights

from conftest import TINY


def tiny_config(tmp_path, **changes):
    values = dict(TINY, checkpoint_dir=str(tmp_path / "ckpt"), output=str(tmp_path / "w.h5"))
    values.update(changes)
    return TrainConfig(**values)


def small_model(seed=0, **changes) -> ConditionalVAE:
    torch.manual_seed(seed)
    model = ConditionalVAE(VAEConfig(**{"npix": 16, "widths": (4, 6, 8), "latent_channels": (2, 3), **changes}))
    for p in model.parameters():  # move the zero-initialised heads away from the identity start
        p.data.add_(0.05 * torch.randn_like(p))
    return model.double()


def test_training_lowers_the_loss_and_conditions_the_samples(tmp_path, data_dir):
    cfg = tiny_config(tmp_path, epochs=3, lr=2e-3)
    sets, info = build_datasets(cfg)
    x, c = sets["train"]
    assert x.shape[1:] == (1, 32, 32) and c.shape[1:] == (2, 16, 16)
    assert abs(float(x.mean())) < 1e-3 and float(x.std()) == pytest.approx(1.0, rel=1e-3)
    torch.manual_seed(cfg.seed)
    untrained = evaluate(ConditionalVAE(vae_config_of(cfg)), sets["val"], cfg.beta, 0.0, seed=0)["loss"]
    weights = load_weights(train(cfg, progress=False))
    history = [h["val_loss"] for h in weights.metadata["history"]]
    assert history[-1] < history[0] < untrained
    metrics = weights.metadata["metrics"]
    assert metrics["test_loss"] < untrained
    shares = metrics["test_power_shares"]
    assert sum(shares[k] for k in ("condition", "latents", "decoder_noise")) == pytest.approx(1.0)
    assert shares["condition"] > 0  # the conditional mean changes with c


@pytest.mark.parametrize("changes", [{}, {"adversarial_weight": 0.5, "kl_warmup_epochs": 0}],
                         ids=["elbo", "with_critic"])
def test_resume_after_interruption_gives_identical_weights(tmp_path, data_dir, monkeypatch, changes):
    """With the critic (in play from epoch 1) its state and optimiser resume with the VAE's."""
    import pysm_vaedust.train as train_module

    straight = tiny_config(tmp_path / "a", epochs=2, **changes)
    path_a = train(straight, progress=False)
    calls = {"n": 0}
    evaluate_once = train_module.evaluate

    def interrupted(*args, **kwargs):  # the run dies during epoch 2's validation: last.pt holds epoch 1
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return evaluate_once(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path / "b", epochs=2, **changes), progress=False)
    monkeypatch.setattr(train_module, "evaluate", evaluate_once)
    path_b = train(tiny_config(tmp_path / "b", epochs=2, **changes), resume=True, progress=False)
    assert ("train_critic" in load_weights(path_a).metadata["history"][0]) == bool(changes)   # the critic ran
    _, tensors_a = read_weights_file(path_a)
    _, tensors_b = read_weights_file(path_b)
    assert tensors_a.keys() == tensors_b.keys()
    for name in tensors_a:
        assert np.array_equal(tensors_a[name], tensors_b[name]), name


def test_weights_round_trip_and_tampering_is_refused(tiny_weights, tmp_path):
    weights = load_weights(tiny_weights)
    meta = weights.metadata
    assert meta["data"]["sha256"] and meta["geometry"]["pixel_size_arcmin"] == pytest.approx(15.0)
    assert meta["normalisation"]["log_scale"] > 0 and meta["normalisation"]["template_fwhm_deg"] == 0.5
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(3, weights.vae.latent_dim, generator=gen)
    c = torch.randn(3, 2, 16, 16, generator=gen)
    again = load_weights(tiny_weights)
    assert torch.equal(weights.vae.decode(eps, c), again.vae.decode(eps, c))
    tampered = tmp_path / "tampered.h5"
    tampered.write_bytes(tiny_weights.read_bytes())
    with h5py.File(tampered, "r+") as f:
        name = "tensors/vae/out.bias"
        f[name][0] = f[name][0] + 1e-3
    with pytest.raises(ValueError, match="fails its checksum"):
        load_weights(tampered)
    with h5py.File(tampered, "r+") as f:
        f.attrs["format_version"] = 2
    with pytest.raises(ValueError, match="format version 2 .*unconditional VAE.*retrain"):
        load_weights(tampered)
    with pytest.raises(FileNotFoundError):
        load_weights(tmp_path / "none.h5")


def test_config_errors_and_cli(tmp_path, data_dir):
    bad = tmp_path / "bad.toml"
    bad.write_text('epochs = 1\nlearning_rate = 3\n')
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['learning_rate'\]"):
        TrainConfig.from_toml(bad)
    with pytest.raises(ValueError, match="latent_channels"):
        VAEConfig(widths=(4, 8, 8), latent_channels=(1,))
    with pytest.raises(ValueError, match="latent_channels"):
        VAEConfig(widths=(4, 8, 8), latent_channels=(0, 0))
    with pytest.raises(ValueError, match="npix"):
        VAEConfig(npix=18, widths=(4, 8, 8), latent_channels=(1, 1))
    with pytest.raises(ValueError, match="no CUDA GPU|device"):
        train(tiny_config(tmp_path, device="tpu"), progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(tiny_config(tmp_path / "fresh"), resume=True, progress=False)
    with pytest.raises(SystemExit):
        main(["--help"])
    with pytest.raises(SystemExit):  # one argparse error (exit 2) naming the bad value
        main(["--epochs", "abc"])


def test_whitened_latents_round_trip_through_the_hierarchy():
    """encode gives the whitened posterior means: decoding them reproduces the decoder mean of the
    posterior-mean pass, and the flat latent has the groups' sizes."""
    model = small_model()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 16, 16, generator=gen, dtype=torch.float64)
    c = torch.randn(4, 2, 8, 8, generator=gen, dtype=torch.float64)
    assert model.latent_dim == 2 * 8 * 8 + 3 * 4 * 4
    with torch.no_grad():
        mean, _, eps = model._top_down(c, enc=model.encoder_features(x, c), use_mean=True)
        assert eps.shape == (4, model.latent_dim)
        assert torch.allclose(model.decode(eps, c), mean, atol=1e-10)
        assert torch.allclose(model.reconstruct(x, c), mean, atol=1e-10)
        other = model.decode(eps, c + 1.0)
    assert not torch.allclose(other, mean)  # the decoder depends on the condition


def test_no_group_at_a_scale():
    model = ConditionalVAE(VAEConfig(npix=16, widths=(4, 4, 4), latent_channels=(0, 2)))
    assert model.latent_dim == 2 * 4 * 4
    eps = torch.randn(2, model.latent_dim)
    assert model.decode(eps, torch.zeros(2, 2, 8, 8)).shape == (2, 1, 16, 16)


def test_latent_flow_inverts_and_its_log_jacobian_is_exact():
    """g^-1(g(eps)) = eps, and the elementwise log |d eps / d u| sums to the log determinant of
    the full Jacobian (autograd); a coupling moves only its checkerboard colour, from its neighbours."""
    torch.manual_seed(3)
    flow = LatentFlow(channels=2, width=3, layers=3).double()
    for p in flow.parameters():
        p.data.add_(0.3 * torch.randn_like(p))
    h, eps = torch.randn(1, 3, 6, 6, dtype=torch.float64), torch.randn(1, 2, 6, 6, dtype=torch.float64)
    u = flow(eps, h)
    back, log_det = flow.inverse(u, h)
    assert torch.allclose(back, eps, atol=1e-12) and not torch.allclose(u, eps)
    jacobian = torch.autograd.functional.jacobian(lambda v: flow.inverse(v.reshape(u.shape), h)[0].flatten(),
                                                  u.flatten())
    assert float(log_det.sum()) == pytest.approx(float(torch.linalg.slogdet(jacobian)[1]), abs=1e-10)
    one = LatentFlow(channels=2, width=3, layers=1).double()
    one.load_state_dict({k: v for k, v in flow.state_dict().items() if k.startswith("nets.0.")})
    kept = LatentFlow._mask(0, eps).bool()
    assert torch.equal(one(eps, h)[..., kept], eps[..., kept])
    def moved_by(i, j):
        poked = eps.clone()
        poked[0, 0, i, j] += 1.0
        return (one(poked, h) - one(eps, h)).abs().amax(1)[0] > 0

    assert kept[2, 3] and not kept[2, 2]
    moved = moved_by(2, 3)  # a kept latent shapes its changed neighbours (and passes through itself)
    assert moved[2, 3] and moved[2, 2] and moved[1, 3] and not moved[0, 0] and int(moved.sum()) <= 1 + 12
    assert int(moved_by(2, 2).sum()) == 1  # a changed latent shapes nothing else


def test_flow_prior_keeps_whitened_latents_and_its_kl_is_unbiased(tmp_path):
    """With a flow on a group the whitened latents still round-trip (encode, decode); the one-sample
    KL is log q - log p: with the posterior equal to the prior's Gaussian part, E_q[exp(-KL)] =
    integral of p = 1 for any flow (a wrong sign or scale of its log Jacobian misses by orders of
    magnitude); the architecture survives the weights file; bad flow settings are refused."""
    model = small_model(seed=4, latent_flow_layers=(2, 0))
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 1, 16, 16, generator=gen, dtype=torch.float64)
    c = torch.randn(3, 2, 8, 8, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        mean, _, eps = model._top_down(c, enc=model.encoder_features(x, c), use_mean=True)
        assert torch.allclose(model.decode(eps, c), mean, atol=1e-10)
        for head in model.post_head:   # q = the prior's Gaussian part; the flow makes p differ from it
            if isinstance(head, torch.nn.Conv2d):
                head.weight.zero_()
                head.bias.zero_()
        draws = 4000
        _, kl_maps, _ = model._top_down(c[:1].repeat(draws, 1, 1, 1), enc=[None if f is None else f.repeat(draws, 1, 1, 1)
                                        for f in model.encoder_features(x[:1], c[:1])], generator=gen)
        ratio = torch.exp(-sum(m.flatten(1).sum(1) for m in kl_maps))
        assert float(kl_maps[0].abs().max()) < 1e-12   # the Gaussian group (coarsest first): q = p exactly
    assert float(ratio.mean()) == pytest.approx(1.0, abs=4 * float(ratio.std()) / math.sqrt(draws))
    assert float(ratio.std()) > 0.05   # the flow is far enough from the identity for the check to bite
    path = save_weights(tmp_path / "flow.h5", {"vae": model}, {"architecture": model.config.to_dict()})
    again = load_weights(path)
    assert again.vae.config.latent_flow_layers == (2, 0)
    with torch.no_grad():
        assert torch.allclose(again.vae.decode(eps.float(), c.float()).double(), model.decode(eps, c), atol=1e-5)
    assert "latent_flow_layers" not in small_model().config.to_dict()   # files without flows read as before
    for bad in ((2,), (-1, 0)):
        with pytest.raises(ValueError, match="latent_flow_layers"):
            VAEConfig(npix=16, widths=(4, 6, 8), latent_channels=(2, 3), latent_flow_layers=bad)
    with pytest.raises(ValueError, match="latent_flow_layers"):
        VAEConfig(npix=16, widths=(4, 6, 8), latent_channels=(0, 3), latent_flow_layers=(2, 0))
    with pytest.raises(ValueError, match="latent_flow_layers"):   # refused before any data is read
        tiny_config(tmp_path, latent_flow_layers=[1])
    assert tiny_config(tmp_path, latent_flow_layers=[0, 0]).latent_flow_layers == []


def test_elbo_kl_and_free_bits():
    """The KL of a group is the analytic Gaussian one (checked against torch.distributions); free
    bits raise the loss to free_bits per dimension when the KL is below it."""
    gen = torch.Generator().manual_seed(2)
    mq, mp = torch.randn(5, generator=gen), torch.randn(5, generator=gen)
    lq, lp = torch.randn(5, generator=gen), torch.randn(5, generator=gen)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mq, (0.5 * lq).exp()),
                                            torch.distributions.Normal(mp, (0.5 * lp).exp()))
    assert torch.allclose(gaussian_kl(mq, lq, mp, lp), ref, atol=1e-6)
    model = ConditionalVAE(VAEConfig(npix=16, widths=(4, 4, 4), latent_channels=(1, 1)))  # heads at zero: KL = 0
    x, c = torch.randn(3, 1, 16, 16, generator=gen), torch.randn(3, 2, 8, 8, generator=gen)
    plain = model.elbo_terms(x, c, free_bits=0.0, generator=torch.Generator().manual_seed(0))
    floored = model.elbo_terms(x, c, free_bits=0.5, generator=torch.Generator().manual_seed(0))
    assert float(plain["kl"]) == pytest.approx(0.0, abs=1e-6)
    assert float(floored["loss"] - plain["loss"]) == pytest.approx(0.5 * model.latent_dim, rel=1e-5)


def test_decoder_noise_likelihood_is_the_dense_gaussian_density():
    """-log p(x | mean, c) equals the density of N(mean, g(c) C), C the circulant covariance of the
    learned per-bin spectrum with the condition's gain g on the bins it applies to (g log-linear in
    the level and the log amplitude of the structure's finest scales, clamped to its range), and
    noise draws have that covariance's pixel variance."""
    model = small_model(npix=8, widths=(2, 2, 2), latent_channels=(1, 1)).double()
    with torch.no_grad():
        model.decoder_logvar.copy_(torch.linspace(-1.0, 0.5, len(model.decoder_logvar)))
        model.noise_gain.copy_(torch.tensor([0.1, 0.5, 0.3]))
        model.noise_gain_range.copy_(torch.tensor([[-1.0, 1.0], [-3.0, 3.0]]))
        model.noise_gain_bins.copy_((torch.arange(len(model.noise_gain_bins)) >= 3).double())  # the gain on bins 3+
    n = 8
    eye = torch.eye(n * n, dtype=torch.float64).reshape(n * n, 1, n, n)

    def covariance(gain):   # circulant covariance of the per-bin spectrum, bins >= 3 scaled by gain
        spectrum = model.noise_logvar().exp() * torch.where(model.noise_bin >= 3, gain, 1.0)
        return torch.fft.ifft2(torch.fft.fft2(eye, norm="ortho") * spectrum, norm="ortho").real.reshape(n * n, n * n)

    gen = torch.Generator().manual_seed(3)
    x, mean = torch.randn(3, 1, n, n, generator=gen, dtype=torch.float64), torch.randn(3, 1, n, n, generator=gen,
                                                                                     dtype=torch.float64)
    c = torch.randn(3, 2, n // 2, n // 2, generator=gen, dtype=torch.float64)
    c[:, 1] = torch.tensor([-0.5, 0.2, 4.0])[:, None, None]     # the last level beyond the range: clamped to 1
    fine = torch.stack([torch.from_numpy(ndimage.laplace(s.numpy(), mode="constant")[1:-1, 1:-1]) for s in c[:, 0]])
    fine = torch.log(fine.flatten(1).std(1)).clamp(-3.0, 3.0)     # the 5-point Laplacian of the structure
    gain = torch.exp(0.1 + 0.5 * torch.tensor([-0.5, 0.2, 1.0], dtype=torch.float64) + 0.3 * fine)
    for i in range(3):
        dense = torch.distributions.MultivariateNormal(mean[i].flatten(), covariance_matrix=covariance(gain[i]))
        nll = model.neg_log_likelihood(x[i:i + 1], mean[i:i + 1], c[i:i + 1]).detach()
        assert torch.allclose(nll, -dense.log_prob(x[i].flatten())[None], rtol=1e-6)   # the feature is log(std + 1e-6)
    white = torch.randn(20000, 1, n, n, generator=gen, dtype=torch.float64)
    draws = model.decoder_noise(white, c[2:].expand(20000, -1, -1, -1)).detach()
    assert float(draws.var()) == pytest.approx(float(torch.diagonal(covariance(gain[2])).mean()), rel=0.03)


def test_texture_statistics_tell_lines_from_a_gaussian_field():
    """First-order statistics rotate with the image (90 deg permutes the angles); the second
    order differs between straight lines and a Gaussian field of similar power."""
    n = 32
    filters, pairs = wavelet_filters(n), texture_pairs()
    gen = torch.Generator().manual_seed(4)
    field = torch.randn(1, 1, n, n, generator=gen, dtype=torch.float64)
    stats = texture_statistics(field, filters.double(), pairs)
    rotated = texture_statistics(field.rot90(1, dims=(-2, -1)), filters.double(), pairs)
    order = torch.tensor([4 * j + (a + 2) % 4 for j in range(4) for a in range(4)])
    # scales j >= 1 (the finest scale's diagonal filters meet the grid's one-sided Nyquist row)
    assert torch.allclose(rotated[0, 4:16], stats[0, order[4:]], atol=1e-6)
    lines = torch.zeros(1, 1, n, n, dtype=torch.float64)
    lines[..., 10, 4:28] = 1.0
    lines[..., 4:28, 20] = 1.0
    lines -= lines.mean()
    s_lines = texture_statistics(lines, filters.double(), pairs)
    for seed in range(3):  # the same Fourier amplitudes with random phases: a Gaussian-like field
        phases = torch.fft.fft2(torch.randn(1, 1, n, n, generator=gen, dtype=torch.float64))
        gaussian = torch.fft.ifft2(torch.fft.fft2(lines).abs() * phases / phases.abs()).real
        s_gauss = texture_statistics(gaussian, filters.double(), pairs)
        assert float((s_lines[0, 16:] - s_gauss[0, 16:]).mean()) > 0.3  # envelopes organised along the lines


def test_condition_input_and_joint_augmentation():
    norm = {"coarse_scale": 0.2, "level_mean": 1.0, "level_scale": 0.5}
    coarse = np.random.default_rng(0).normal(2.0, 0.3, (3, 8, 8))
    c = condition_input(coarse, norm)
    assert c.shape == (3, 2, 8, 8) and c.dtype == np.float32
    assert np.allclose(c[:, 0].mean(axis=(1, 2)), 0, atol=1e-6)
    assert np.allclose(c[:, 1], ((coarse.mean(axis=(1, 2)) - 1.0) / 0.5)[:, None, None])
    halved = condition_input(coarse, norm, amplitude=2.0, log_offset=math.log(3.0))
    assert np.allclose(halved[:, 0], c[:, 0] / 2, atol=1e-6)
    assert np.allclose(halved[:, 1], c[:, 1] + math.log(3.0) / 0.5, atol=1e-5)
    x = torch.arange(2 * 16 * 16, dtype=torch.float32).reshape(2, 1, 16, 16)
    cc = torch.nn.functional.avg_pool2d(x, 2).expand(2, 2, 8, 8)
    xt, ct = random_dihedral((x, cc), torch.Generator().manual_seed(5))
    assert torch.allclose(torch.nn.functional.avg_pool2d(xt, 2), ct[:, :1])  # same transform on both


def test_noise_calibration_gives_samples_the_data_power_per_bin(tiny_weights, tmp_path, data_dir):
    """After calibrate_decoder_noise, conditional samples of the train split have its mean power
    per radial Fourier bin (within 10 % in every bin where the noise is not floored)."""
    from pysm_vaedust.train import calibrate_decoder_noise

    weights = load_weights(tiny_weights)
    sets, _ = build_datasets(TrainConfig.of_weights(weights.metadata))
    x, c = sets["train"]
    model = weights.vae
    report = calibrate_decoder_noise(model, (x, c), seed=3)
    with torch.no_grad():
        samples = model.sample(c, torch.Generator().manual_seed(4))
    bins = model.noise_bin.flatten()
    counts = torch.bincount(bins).double()

    def per_bin(images):
        power = torch.fft.fft2(images.double(), norm="ortho").abs().square().flatten(1).mean(0)
        return torch.zeros(len(counts), dtype=torch.float64).index_add(0, bins, power) / counts

    data, drawn = per_bin(x), per_bin(samples)
    free = torch.tensor(report["noise_power_per_bin"]) > 0.011 * torch.tensor(report["data_power_per_bin"])
    assert free[1:].all()
    ratio = (drawn / data)[1:]
    assert float((ratio - 1).abs().max()) < 0.1, ratio
    gains = [q["gain"] for q in report["by_level_quintile"]]
    assert len(gains) == 5 and report["floor"] is None


def test_log_gain_fit_recovers_a_known_law_and_matches_the_mean():
    """_fit_log_gain on ratios drawn as exp(theta . phi) times a chi^2 scatter recovers theta, and
    its gains sum to the ratios' sum (the moment the calibration keeps)."""
    from pysm_vaedust.train import _fit_log_gain

    rng = np.random.default_rng(2)
    phi = np.stack([np.ones(4000), rng.normal(0, 1, 4000), rng.normal(0, 0.5, 4000)], 1)
    theta = np.array([-0.2, 0.6, 0.9])
    ratio = np.exp(phi @ theta) * rng.chisquare(20, 4000) / 20
    fitted = _fit_log_gain(torch.from_numpy(phi), torch.from_numpy(ratio)).numpy()
    np.testing.assert_allclose(fitted, theta, atol=0.03)
    assert np.exp(phi @ fitted).sum() == pytest.approx(ratio.sum(), rel=1e-8)


def test_floor_power_is_the_white_floor_in_ln_i_through_the_window():
    """floor_power: a white floor C_l = F in intensity is F / (I^2 Omega_pix log_scale^2) per
    orthonormal-FFT mode in normalised ln I, at every mode without a window; the beam and the
    box average take it down at high frequency, never at the mean."""
    from pysm_vaedust.train import floor_power

    norm = {"level_mean": 1.0, "level_scale": 0.5, "log_scale": 0.05}
    c = torch.zeros(2, 2, 8, 8)
    c[:, 1] = torch.tensor([0.0, 2.0])[:, None, None]            # ln I = 1 and 2
    pixel_deg = 0.125
    expect = 1e-8 / (np.radians(pixel_deg) ** 2 * 0.05**2) * np.exp(-2 * np.array([1.0, 2.0]))
    flat = floor_power(c, norm, {"F": 1e-8, "beam_fwhm_arcmin": 0.0, "box": 1}, 16, pixel_deg)
    assert flat.shape == (2, 16, 16)
    np.testing.assert_allclose(flat.flatten(1).numpy(), np.repeat(expect[:, None], 256, 1), rtol=1e-6)
    seen = floor_power(c, norm, {"F": 1e-8, "beam_fwhm_arcmin": 5.0, "box": 4}, 16, pixel_deg)
    np.testing.assert_allclose(seen[:, 0, 0].numpy(), expect, rtol=1e-6)
    assert float(seen[0, 8, 8]) < 0.3 * float(flat[0, 8, 8])


def test_handover_coherence_tells_a_copy_from_an_independent_draw(tiny_weights, data_dir):
    """handover_coherence on stand-in models: samples that copy the target (what an exact
    conditional mean does where the condition holds the scales) give a = 1 - G, s = (1 - G)^2, so
    the cascade keeps G of the coarser level; samples drawn independently of it (another patch)
    give a ~ 0, so it keeps sqrt(1 - s). The recipe stores the measurement in the weights."""
    from pysm_vaedust.tiling import gaussian_transfer, handover_gain
    from pysm_vaedust.train import handover_coherence

    sets, _ = build_datasets(TrainConfig.of_weights(load_weights(tiny_weights).metadata))
    x = sets["train"][0]

    class StandIn:
        latent_dim, device = 1, torch.device("cpu")

        def __init__(self, shift):
            self.shift = shift

        def eval(self):
            return self

        def decode(self, z, c):
            return torch.roll(c, self.shift, dims=0)

        def decoder_noise(self, eps, c):
            return torch.zeros_like(eps)

    fwhm = 4.0
    copy = handover_coherence(StandIn(0), (x, x), seed=0, fwhm_pix=fwhm, n_draws=1)
    kappa = np.array(copy["kappa"])
    fill = 1 - gaussian_transfer(kappa / fwhm, fwhm)
    np.testing.assert_allclose(copy["coherent"], fill, atol=1e-6)
    np.testing.assert_allclose(handover_gain(kappa / fwhm, fwhm, copy), 1 - fill, atol=1e-6)
    other = handover_coherence(StandIn(1), (x, x), seed=0, fwhm_pix=fwhm, n_draws=1)
    assert np.all(np.abs(other["coherent"][1:]) < 0.25 * fill[1:] + 0.05)
    stored = load_weights(tiny_weights).metadata["handover_coherence"]
    assert stored["kappa"][0] == 0 and np.all(np.diff(stored["kappa"]) > 0) and stored["fwhm_pix"] > 0


def test_fading_tail_is_the_fine_scale_run_that_reaches_the_last_bin():
    """The gain's bins: the run of qualifying bins that ends at the finest one, never the patch
    mean or its fundamental; none when the finest bin does not qualify."""
    from pysm_vaedust.train import PATCH_SCALE_BINS, fading_tail

    def tail(flags):
        return fading_tail(torch.tensor(flags, dtype=torch.bool)).tolist()

    assert tail([0, 0, 1, 0, 1, 1, 1]) == [False] * 4 + [True] * 3      # a gap: only the run to the end
    assert tail([0, 0, 1, 1, 1, 1, 0]) == [False] * 7                    # the finest bin does not qualify
    assert tail([1] * 7) == [False] * PATCH_SCALE_BINS + [True] * (7 - PATCH_SCALE_BINS)
    assert tail([0] * 7) == [False] * 7


def test_decoder_noise_fixed_at_the_floor_stays_there(tmp_path, data_dir):
    """decoder_noise='floor': the noise power per radial bin is the data's floor (F / I^2 through
    the window) at every brightness, and training does not move it; configs that cannot have it
    are refused."""
    from pysm_vaedust.train import fix_noise_at_floor, floor_power

    norm = {"level_mean": 1.0, "level_scale": 0.5, "log_scale": 0.05}
    floor = {"F": 1e-8, "beam_fwhm_arcmin": 5.0, "box": 4}
    model = ConditionalVAE(VAEConfig(npix=16, widths=(4, 6, 8), latent_channels=(2, 3)))
    fix_noise_at_floor(model, floor, norm, 0.5)
    c = 0.3 * torch.randn(3, 2, 8, 8)
    c[:, 1] = torch.tensor([-2.0, 0.0, 3.0])[:, None, None]
    bins = model.noise_bin.flatten()
    counts = torch.bincount(bins).double()

    def per_bin(power):
        return torch.zeros(len(power), len(counts), dtype=torch.float64).index_add(1, bins, power.flatten(1).double()) / counts

    np.testing.assert_allclose(per_bin(model.noise_variance(c)).numpy(),
                               per_bin(floor_power(c, norm, floor, 16, 0.5)).numpy(), rtol=1e-5)
    before = model.decoder_logvar.clone()
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(3, 1, 16, 16)
    model.elbo_terms(x, c)["loss"].backward()
    optimiser.step()
    assert torch.equal(model.decoder_logvar, before) and not model.decoder_logvar.requires_grad
    with pytest.raises(ValueError, match="calibrate_noise must be false"):
        TrainConfig(decoder_noise="floor", calibrate_noise=True)
    with pytest.raises(ValueError, match="'learned' or 'floor'"):
        TrainConfig(decoder_noise="white")
    with pytest.raises(ValueError, match="floor_ell_min > 0"):   # the E(B-V) map's selection measures no floor
        train(tiny_config(tmp_path, decoder_noise="floor"), progress=False)


def test_condition_dropout_trains_on_flat_conditions_reproducibly(tmp_path, data_dir):
    """condition_dropout: a share of the training patches sees a flat condition (structure channel
    zeroed); the masks come from the epoch's generator, so a run repeats bit for bit, and it
    differs from a run without them. Shares outside [0, 1) are refused."""
    runs = [load_weights(train(tiny_config(tmp_path / name, epochs=1, condition_dropout=share), progress=False))
            for name, share in (("a", 0.5), ("b", 0.5), ("c", 0.0))]
    states = [w.vae.state_dict() for w in runs]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])
    with pytest.raises(ValueError, match="condition_dropout"):
        TrainConfig(condition_dropout=1.0)


def test_checkpoint_written_before_a_config_key_existed_resumes(tmp_path, data_dir):
    """A key the checkpoint's config lacks counts as its default (the run that wrote it had it)."""
    first = tiny_config(tmp_path, epochs=1)
    train(first, progress=False)
    last = tmp_path / "ckpt" / "last.pt"
    state = torch.load(last, weights_only=False)
    del state["config"]["adversarial_weight"]
    torch.save(state, last)
    weights = load_weights(train(tiny_config(tmp_path, epochs=2), resume=True, progress=False))
    assert [h["epoch"] for h in weights.metadata["history"]] == [1, 2]
    state["config"]["condition_dropout"] = 0.5          # a real difference is still refused
    torch.save(state, last)
    with pytest.raises(ValueError, match="condition_dropout"):
        train(tiny_config(tmp_path, epochs=3), resume=True, progress=False)


def test_adversarial_settings_that_cannot_run_are_refused(tmp_path):
    with pytest.raises(ValueError, match="adversarial_weight"):
        TrainConfig(adversarial_weight=-0.1)
    with pytest.raises(ValueError, match="critic joins after"):   # before any data is read
        train(tiny_config(tmp_path, adversarial_weight=0.5, kl_warmup_epochs=2, epochs=2), progress=False)


def test_adversarial_term_trains_the_critic_and_scales_its_pull():
    """adversarial_term: each call is one hinge-loss step of the critic, which learns to score real
    line patterns above the model's samples; the VAE's loss is lambda times minus the critic's
    score of the samples, lambda = weight x the ratio of the reconstruction's and the critic's
    gradient norms at the decoder's output layer."""
    model = small_model().float()
    torch.manual_seed(1)
    critic = PatchCritic(widths=(4, 8, 8))
    optimiser = torch.optim.Adam(critic.parameters(), lr=10 * CRITIC_LR, betas=CRITIC_BETAS)
    generator = torch.Generator().manual_seed(0)
    rows = torch.arange(16.0)
    x = torch.sin(rows[:, None] * torch.linspace(0.5, 2.5, 8)[:, None, None, None]).expand(8, 1, 16, 16) * 2.0
    x = x.transpose(-1, -2).contiguous()   # stripes: no Gaussian field looks like them
    c = torch.randn(8, 2, 8, 8, generator=generator)

    def gap():
        with torch.no_grad():
            return float(critic(x, c).mean() - critic(model.sample(c, generator), c).mean())

    before = gap()
    for _ in range(20):
        recon = model.neg_log_likelihood(x, model.decode(torch.zeros(8, model.latent_dim), c), c).mean()
        loss, parts = adversarial_term(model, critic, optimiser, x, c, recon, 0.3, generator)
    assert gap() > before + 0.5
    # the critic's step leaves no gradient in the VAE; the VAE's backward none in the (frozen) critic
    assert all(p.grad is None for p in model.parameters())
    critic_grads = [p.grad.clone() for p in critic.parameters()]
    loss.backward()
    assert all(not p.requires_grad for p in critic.parameters())
    assert all(torch.equal(p.grad, g) for p, g in zip(critic.parameters(), critic_grads))
    assert model.out.weight.grad is not None
    model.zero_grad(set_to_none=True)
    w = model.out.weight
    recon = model.neg_log_likelihood(x, model.decode(torch.zeros(8, model.latent_dim), c), c).mean()
    state = generator.get_state()
    _, parts = adversarial_term(model, critic, optimiser, x, c, recon, 0.3, generator)
    generator.set_state(state)
    fake = model.sample(c, generator)   # the same draw, scored by the critic after its step
    critic.eval()                        # (no further power iteration of the spectral norms)
    pull_critic = torch.autograd.grad(-critic(fake, c).mean(), w)[0].norm()
    pull_recon = torch.autograd.grad(recon, w)[0].norm()
    assert float(parts["lambda"]) == pytest.approx(0.3 * float(pull_recon / pull_critic), rel=1e-4)
