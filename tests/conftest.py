"""Shared fixtures: real data location and a tiny trained model (trained once per session)."""

import pytest

from pysm_vaedust.data import shared_data_dir

EBV_MAP = "planck_ebv_nside256_ring_icrs.fits.gz"


@pytest.fixture(scope="session")
def data_dir():
    path = shared_data_dir()
    if not (path / EBV_MAP).is_file():
        pytest.fail(f"real data not found at {path}: set PYSM_VAEDUST_DATA or put ../shared beside the repo")
    return path


TINY = dict(data_map=EBV_MAP, npix=32, epochs=2, widths=[4, 8, 8, 8], latent_channels=[1, 1, 2], batch_size=64,
            threads=1)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory, data_dir):
    """Path of a tiny model trained for 2 epochs on the real data (about 10 s)."""
    from pysm_vaedust.train import TrainConfig, train

    out = tmp_path_factory.mktemp("tiny")
    cfg = TrainConfig(**TINY, checkpoint_dir=str(out / "ckpt"), output=str(out / "tiny.h5"))
    return train(cfg, progress=False)
