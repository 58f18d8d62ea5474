"""The renderer's reprojection (stage 6-7) on synthetic patches in place of the decoded ones:
what the map's spectrum and geometry must be, whatever the model draws."""

import healpy as hp
import numpy as np
import pytest
import torch

from pysm_vaedust import VAEDust
from pysm_vaedust.cutouts import sample_patches
from pysm_vaedust.healpix import RingBand
from pysm_vaedust.renderer import BAND_LIMIT, Renderer
from pysm_vaedust.tiling import SHARED_KAPPA, gaussian_transfer, handover_gain, resampling_matrix, shared_band, tile_centres
from pysm_vaedust.weights import load_weights

NSIDE = 512


@pytest.mark.parametrize("fwhm, box, upsample", [(0.0, 1, 1), (0.7, 4, 2), (1.3, 3, 2)])
def test_resampling_undoes_the_window_of_each_mode(fwhm, box, upsample):
    """A cosine of a DCT frequency f sampled through the training window (Gaussian of `fwhm`
    pixels, mean of `box` sub-samples) comes back on the fine grid as the bare cosine, up to
    the bilinear step's compensation 1 / sinc^2(f / upsample)."""
    n = 16
    matrix = resampling_matrix(n, fwhm, box, upsample=upsample)
    x = np.arange(n) + 0.5                      # pixel centres in pixel units (from the edge)
    fine = (np.arange(upsample * n) + 0.5) / upsample
    offsets = (np.arange(box) + 0.5) / box - 0.5
    for k in range(n):
        f = k / (2 * n)
        windowed = gaussian_transfer(f, fwhm) * np.mean([np.cos(2 * np.pi * f * (x + o)) for o in offsets], 0)
        expected = np.cos(2 * np.pi * f * fine) / np.sinc(f / upsample) ** 2
        np.testing.assert_allclose(matrix @ windowed, expected, atol=1e-9)


def test_handover_keeps_the_power_the_next_level_leaves():
    f = np.linspace(0, 0.5, 50)
    g = gaussian_transfer(f, 2.0)
    np.testing.assert_allclose(handover_gain(f, 2.0) ** 2 + (1 - g) ** 2, 1.0)
    np.testing.assert_allclose(handover_gain(f, 0.0), 1.0)


def test_handover_keeps_only_what_a_coherent_next_level_does_not_repeat():
    """A next level that repeats the coarser field where its condition holds it (a = 1 - G, the
    exact conditional mean of a Gaussian field) leaves the coarser level G: the partition of
    unity; in general h solves (h + a)^2 + s - a^2 = 1."""
    f = np.linspace(0, 0.5, 50)
    fwhm = 2.0
    g = gaussian_transfer(f, fwhm)
    ideal = {"kappa": f * fwhm, "coherent": 1 - g, "power": (1 - g) ** 2}
    np.testing.assert_allclose(handover_gain(f, fwhm, ideal), g, atol=1e-12)
    partial = {"kappa": f * fwhm, "coherent": 0.5 * (1 - g), "power": 0.5 * (1 - g) ** 2 + 0.1 * (1 - g)}
    h = handover_gain(f, fwhm, partial)
    a, s = partial["coherent"], partial["power"]
    np.testing.assert_allclose((h + a) ** 2 + s - a**2, 1.0, atol=1e-12)


def windowed_white(rng, count, n, fwhm_pix, box):
    """(count, n, n) white noise (unit variance per sub-sample) seen through the training
    window: a Gaussian of `fwhm_pix` pixels, then the mean of box x box sub-samples."""
    fine = rng.standard_normal((count, n * box, n * box))
    freq = np.fft.fftfreq(n * box) * box                  # cycles per patch pixel
    gain = gaussian_transfer(np.hypot(*np.meshgrid(freq, freq, indexing="ij")), fwhm_pix)
    fine = np.fft.ifft2(np.fft.fft2(fine) * gain).real
    return fine.reshape(count, n, box, n, box).mean(axis=(2, 4))


def render(monkeypatch, decoded, **kwargs):
    """The small-scale field of VAEDust(nside=NSIDE, cascade=False) with `decoded(renderer,
    level, ids)` -> (means, noise) each (B, n, n) in ln I in place of the model's decoding (the
    means what the tiles share, as the decoded means at zero latents on this single level)."""
    def decode(self, level, conditions, normals, ids=None):
        means, noise = decoded(self, level, np.asarray(ids))
        return torch.from_numpy(np.stack([means + noise, means]).astype(np.float32))

    monkeypatch.setattr(Renderer, "decode", decode)
    component = VAEDust(nside=NSIDE, seed=0, cascade=False, **kwargs)
    return np.log(component.reference_map()) - component.template_at_pixels(), component


def test_white_patches_come_out_white_up_to_their_band(monkeypatch):
    """Independent white patches carrying the training window, as decoder noise: the map's C_l
    is flat (every Delta l = 50 band from 100 to 1.5 nside within 4 % of the mean) at the level
    of the bare white field (variance x sub-sample solid angle, within 4 %): the reprojection
    neither low-passes (the bilinear map of the last session kept 0.28 at l 1200) nor leaks."""
    def decoded(renderer, level, ids):
        noise = windowed_white(np.random.default_rng(int(ids[0])), len(ids), renderer.vae.config.npix,
                               *renderer.window)
        return np.zeros_like(noise), noise

    field, component = render(monkeypatch, decoded)
    cl = hp.anafast(field, lmax=int(1.5 * NSIDE))
    bands = np.array([cl[lo:lo + 50].mean() for lo in range(100, int(1.5 * NSIDE) - 49, 50)])
    sub_pixel = np.radians(component.renderer.base.pixel_size_deg) / component.renderer.window[1]
    expected = sub_pixel**2          # white of unit variance per sub-sample: C_l = its solid angle
    assert np.all(np.abs(bands / bands.mean() - 1) < 0.04), bands / bands.mean()
    assert abs(bands.mean() / expected - 1) < 0.04, bands.mean() / expected


def test_a_field_the_patches_share_is_reproduced_where_it_is(monkeypatch):
    """Patches that all show the same smooth sky (l <= 96), as decoded means: the blend puts it
    back at every pixel (rms error < 1 % of the field's): positions, orientation and the
    partition of unity are right everywhere, poles included."""
    ell = np.arange(97)
    np.random.seed(3)   # healpy's synfast draws from numpy's global generator
    sky = hp.synfast(np.where(ell > 1, 1.0 / np.maximum(ell, 1) ** 2, 0.0), 128, lmax=96, pixwin=False)
    sky *= 0.3 / sky.std()

    def decoded(renderer, level, ids):
        means = sample_patches(sky, "G", *tile_centres(level, ids), level.geometry)
        return means, np.zeros_like(means)

    field, _ = render(monkeypatch, decoded)
    truth = hp.get_interp_val(sky, *hp.pix2ang(NSIDE, np.arange(hp.nside2npix(NSIDE))))
    assert np.sqrt(np.mean((field - truth) ** 2)) < 0.01 * truth.std()


def test_blend_sums_do_not_depend_on_threads_or_on_the_pixels_computed():
    """The blend kernel splits rings between parallel tasks; every pixel still adds its patches in
    order, so any number of tasks and a pixel subset give the same sums bit for bit (polar tiles,
    whose discs hold whole rings, included)."""
    from pysm_vaedust.cutouts import PatchGeometry
    from pysm_vaedust.tiling import PatchSet, _blend_kernel, cascade_levels

    level = cascade_levels(64, PatchGeometry(16, 8.0), 2.5)[0]
    ids = np.r_[0:4, 40:140, level.n_tiles - 4:level.n_tiles]
    fields = np.random.default_rng(0).normal(size=(4, len(ids), 32, 32)).astype(np.float32)
    nside = 64
    patches = PatchSet(nside, level, ids)
    results = []
    for n_parts in (1, 2, 3, 7):
        sums = np.zeros((6, hp.nside2npix(nside)), dtype=np.float32)
        _blend_kernel(nside, patches.basis, patches.radius, patches.half, patches.pix_rad, 0, patches.lookup,
                      patches.n_range, fields, sums, 0, n_parts)
        results.append(sums)
    for other in results[1:]:
        np.testing.assert_array_equal(results[0], other)
    assert np.count_nonzero(results[0][4]) > 1000
    assert results[0][4, 0] > 0 and results[0][4, -1] > 0   # the polar pixels are covered
    centre = hp.ang2vec(*tile_centres(level, np.array([90])), lonlat=True)[0]
    pixels = hp.query_disc(nside, centre, np.radians(3.0))
    lookup = np.full(pixels.max() - pixels.min() + 1, -1)   # over the subset's span only
    lookup[pixels - pixels.min()] = np.arange(len(pixels))
    part = np.zeros((6, len(pixels)), dtype=np.float32)
    subset = PatchSet(nside, level, ids, lookup, first_pixel=pixels.min())
    subset.accumulate(fields, part)
    np.testing.assert_array_equal(part, results[0][:, pixels])
    assert len(subset.used) < len(ids)
    band = RingBand(nside, 15, 30)   # whole rings, no lookup
    part = np.zeros((6, band.n_pixels), dtype=np.float32)
    in_band = PatchSet(nside, level, ids, first_pixel=band.first_pixel, n_pixels=band.n_pixels)
    in_band.accumulate(fields, part)
    np.testing.assert_array_equal(part, results[0][:, band.pixels()])
    assert 0 < len(in_band.used) < len(ids)
    window = np.zeros((6, 1000), dtype=np.float32)   # positions 20000 .. 20999 of the whole sky
    patches.accumulate(fields, window, offset=20000)
    np.testing.assert_array_equal(window, results[0][:, 20000:21000])


def test_duplicate_pixels_are_refused():
    renderer = Renderer(load_weights())
    level = renderer.levels(64)[0]
    with pytest.raises(ValueError, match="duplicate pixel indices"):
        renderer.level_field(level, 64, 0, np.array([9, 5, 5, 6]), np.zeros(hp.nside2npix(8)))


def test_blend_window_slides_with_the_tiles_and_blends_as_the_whole_sums():
    """Patches added in tile order on a window of a few rows of tiles give the blend of the
    whole-sky sums bit for bit; a reservation beyond the window and a pixel no patch covers raise."""
    from pysm_vaedust.cutouts import PatchGeometry
    from pysm_vaedust.tiling import BlendWindow, PatchSet, _blended_kernel, cascade_levels

    nside = 64
    level = cascade_levels(nside, PatchGeometry(16, 8.0), 2.5)[0]
    fields = np.random.default_rng(1).normal(size=(4, 32, 32, 32)).astype(np.float32)
    sets = [PatchSet(nside, level, np.arange(start, min(start + 32, level.n_tiles)))
            for start in range(0, level.n_tiles, 32)]
    whole = np.zeros((6, hp.nside2npix(nside)), dtype=np.float32)
    for patches in sets:
        patches.accumulate(fields[:, :len(patches.ids)], whole)
    expected = np.empty((2, whole.shape[1]), dtype=np.float32)
    for view in range(2):
        _blended_kernel(whole, view, expected[view])
    reach = np.array([patches.pixel_reach() for patches in sets])
    bounds, span = BlendWindow.bounds(reach)
    assert span < whole.shape[1] // 2   # the window is a band of the sky, not all of it
    window = BlendWindow(2, whole.shape[1], span, "test: ")
    for patches, (lo, hi) in zip(sets, bounds):
        window.reserve(int(lo), int(hi))
        window.add(patches, fields[:, :len(patches.ids)])
    assert window.start > 0   # it did slide
    np.testing.assert_array_equal(np.stack(window.finish()), expected)
    narrow = BlendWindow(2, whole.shape[1], 100, "test: ")
    with pytest.raises(ValueError, match="do not fit a window of 100"):
        narrow.reserve(0, 101)
    partial = BlendWindow(2, whole.shape[1], span, "test: ")
    partial.reserve(*map(int, reach[0]))
    partial.add(sets[0], fields)
    with pytest.raises(RuntimeError, match="test: .* pixels not covered by any patch"):
        partial.finish()


def test_a_decoder_noise_fixed_at_the_floor_stays_out_of_the_map():
    """Weights trained with decoder_noise='floor' (the noise stands for IRIS's noise + CIB only):
    the renderer keeps the decoded means and leaves the noise out (the map carries dust only);
    weights with a learned noise keep it. What the first level's tiles share (blended as a
    partition of unity) does not depend on their latents or noise and equals the whole patch at
    zero latents and zero noise normals; on a later level it is the decoded mean itself (its
    shared band is cut in the resampling); all equal the network's decodings (fixed latents
    included)."""
    import copy

    learned = load_weights()
    floor = copy.copy(learned)
    floor.metadata = copy.deepcopy(learned.metadata)
    floor.metadata["training_config"]["decoder_noise"] = "floor"
    level, later = Renderer(learned).levels(1024)
    rng = np.random.default_rng(0)
    n, d = learned.vae.config.npix, learned.vae.latent_dim
    conditions = rng.standard_normal((4, 2, n // 2, n // 2)).astype(np.float32)
    normals = rng.standard_normal((4, d + n * n)).astype(np.float32)
    other_noise = normals.copy()
    other_noise[:, d:] = rng.standard_normal((4, n * n))
    with_noise, with_other_noise, without, without_other_noise = (
        Renderer(w).decode(level, conditions, x) for w in (learned, floor) for x in (normals, other_noise))
    assert torch.equal(with_noise[1], without[1]) and torch.equal(with_noise[1], with_other_noise[1])
    assert torch.equal(without[0], without_other_noise[0])                     # the floor noise stays out
    assert float((with_noise[0] - with_other_noise[0]).abs().min()) > 0       # a learned noise is drawn
    assert float((without[0] - without[1]).abs().max()) > 0                   # the latents' own part
    at_zero = Renderer(floor).decode(level, conditions, np.zeros_like(normals))
    assert torch.equal(at_zero[1], without[1]) and torch.equal(at_zero[0], at_zero[1])
    # the parts against the network itself: a (s (mu(z, c) + noise) + m) and a (s mu(0, c) + m), a
    # tile with fixed latents decoded with them; on the later level a (s mu(z, c) + m) second
    vae, norm = learned.vae, learned.metadata["normalisation"]
    fixed = rng.standard_normal(d).astype(np.float32)
    ids = np.array([3, 7, 8, 9])
    parts = Renderer(learned, fixed_latents={level.index: {7: fixed}}).decode(level, conditions, normals, ids)
    later_parts = Renderer(learned).decode(later, conditions, normals, ids)
    c = torch.from_numpy(conditions)
    z = torch.from_numpy(normals[:, :d]).clone()
    with torch.no_grad():
        later_mean = vae.decode(z, c)[:, 0]
        z[1] = torch.from_numpy(fixed)
        mean, shared = vae.decode(z, c)[:, 0], vae.decode(torch.zeros_like(z), c)[:, 0]
        noise = vae.decoder_noise(torch.from_numpy(normals[:, d:]).reshape(-1, 1, n, n), c)[:, 0]
    for lv, (patch, basis), mu, mu_shared in ((level, parts, mean, shared), (later, later_parts, later_mean, later_mean)):
        scale, offset = lv.amplitude * norm["log_scale"], lv.amplitude * norm["log_mean"]
        torch.testing.assert_close(patch, scale * (mu + noise) + offset, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(basis, scale * mu_shared + offset, atol=1e-6, rtol=1e-5)


def test_later_levels_share_the_band_their_conditions_hold():
    """`tiling.shared_band` is 1 below kappa = 0.55 cycles per conditioning FWHM and 0 above 0.8,
    falling in between; a later level's shared resampling passes each DCT mode of a patch by that
    band times the whole resampling's gain; the first level's is the whole resampling."""
    fwhm, n = 4.0, 64
    kappa = np.linspace(0, 1.2, 241)
    band = shared_band(kappa / fwhm, fwhm)
    assert np.all(band[kappa <= SHARED_KAPPA[0]] == 1) and np.all(band[kappa >= SHARED_KAPPA[1]] < 1e-12)
    assert np.all(np.diff(band) <= 0) and 0 < band[(kappa > 0.6) & (kappa < 0.75)].min() < 1
    whole = resampling_matrix(n, 1.5, 2)
    shared = resampling_matrix(n, 1.5, 2, shared_fwhm_pix=fwhm)
    for k in (1, 8, 9, 11, 13, 30):
        mode = np.cos(np.pi * k * (np.arange(n) + 0.5) / n)
        np.testing.assert_allclose(shared @ mode, shared_band(k / (2 * n), fwhm) * (whole @ mode), atol=1e-9)
    renderer = Renderer(load_weights())
    first, later = renderer.levels(1024)
    for lv in (first, later):
        (whole, shared), = renderer.views(lv, 1024)
        limit = BAND_LIMIT * 1024 * np.radians(lv.geometry.pixel_size_deg) / (2 * np.pi)
        expected = resampling_matrix(n, *renderer.window, limit_cycles=limit, coherence=renderer.coherence,
                                     shared_fwhm_pix=fwhm if lv.index else 0.0)   # 30' over 7.5' at every level
        np.testing.assert_allclose(shared.matrix.numpy(), expected, atol=1e-6)
        assert torch.equal(whole.matrix, shared.matrix) == (lv.index == 0)


@pytest.mark.parametrize("part", ["white noise", "smooth sky"])
def test_a_later_level_keeps_its_own_draws_and_shares_its_band(monkeypatch, part):
    """A level after the first (one decoding per tile): independent white patches as decoder
    noise come out white up to their band at the bare white level (none of them averaged away as
    shared, within 4 %), and a smooth sky every patch shows as decoded means is put back where it
    is (rms error < 1 %: the shared band as a partition of unity)."""
    renderer = Renderer(load_weights())
    later = renderer.levels(1024)[1]
    ell = np.arange(97)
    np.random.seed(3)
    sky = hp.synfast(np.where(ell > 1, 1.0 / np.maximum(ell, 1) ** 2, 0.0), 128, lmax=96, pixwin=False)
    sky *= 0.3 / sky.std()

    def decode(self, level, conditions, normals, ids=None):
        assert level.index == 1
        if part == "white noise":
            means = np.zeros((len(ids), self.vae.config.npix, self.vae.config.npix))
            noise = windowed_white(np.random.default_rng(int(ids[0])), len(ids), self.vae.config.npix, *self.window)
        else:
            means = sample_patches(sky, "G", *tile_centres(level, ids), level.geometry)
            noise = np.zeros_like(means)
        return torch.from_numpy(np.stack([means + noise, means]).astype(np.float32))

    monkeypatch.setattr(Renderer, "decode", decode)
    field = renderer.level_field(later, NSIDE, 0, None, np.zeros(hp.nside2npix(64)))[0]
    if part == "white noise":
        cl = hp.anafast(field, lmax=int(1.5 * NSIDE))
        bands = np.array([cl[lo:lo + 50].mean() for lo in range(100, int(1.5 * NSIDE) - 49, 50)])
        expected = (np.radians(later.geometry.pixel_size_deg) / renderer.window[1]) ** 2
        assert np.all(np.abs(bands / expected - 1) < 0.04), bands / expected
    else:
        truth = hp.get_interp_val(sky, *hp.pix2ang(NSIDE, np.arange(hp.nside2npix(NSIDE))))
        assert np.sqrt(np.mean((field - truth) ** 2)) < 0.01 * truth.std()

