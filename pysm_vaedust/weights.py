"""Stage 5 — weights: one HDF5 file of tensors + JSON metadata + a sha256, verified on load.

Layout: group ``tensors/<module>/<parameter>`` (float32 datasets), root attributes
``format_version`` (int), ``metadata`` (JSON text) and ``sha256`` (hex digest of the metadata
text and of every tensor's name and bytes, in sorted order).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import h5py
import numpy as np
import torch

from .data import atomic_write
from .model import ConditionalVAE, VAEConfig

#: 4: the conditional VAE with a brightness-dependent decoder noise (3: its stationary noise; 2: the
#: unconditional VAE + latent flow of pysm_vaedust <= 0.1; both refused)
FORMAT_VERSION = 4
DEFAULT_WEIGHTS_NAME = "vaedust_default.h5"


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


def default_weights_path() -> Path:
    """Path of the weights shipped as package data."""
    return Path(str(resources.files("pysm_vaedust") / "package_data" / DEFAULT_WEIGHTS_NAME))


def _digest(metadata_text: str, tensors: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256(metadata_text.encode())
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(tensors[name]).tobytes())
    return digest.hexdigest()


def state_tensors(modules: dict[str, torch.nn.Module]) -> dict[str, np.ndarray]:
    """Flatten module state dicts into {'<module>/<param>': float32 array}."""
    return {f"{key}/{name}": value.detach().cpu().numpy()
            for key, module in modules.items() for name, value in module.state_dict().items()}


def save_weights(path, modules: dict[str, torch.nn.Module], metadata: dict) -> Path:
    """Write modules (e.g. {'vae': model}) and metadata atomically; returns path."""
    metadata = dict(metadata, format_version=FORMAT_VERSION)
    text = json.dumps(metadata, sort_keys=True)
    tensors = state_tensors(modules)

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            for name, value in tensors.items():
                f.create_dataset(f"tensors/{name}", data=value)
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["metadata"] = text
            f.attrs["sha256"] = _digest(text, tensors)

    return atomic_write(path, write)


def read_weights_file(path) -> tuple[dict, dict[str, np.ndarray]]:
    """Read and verify a weights file: (metadata, {name: array}). Raises ValueError if tampered."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    try:
        with h5py.File(path, "r") as f:
            version = int(f.attrs["format_version"])
            text = str(f.attrs["metadata"])
            stored = str(f.attrs["sha256"])
            tensors = {}
            f["tensors"].visititems(lambda name, obj: tensors.__setitem__(name, obj[()])
                                    if isinstance(obj, h5py.Dataset) else None)
    except (OSError, KeyError) as err:
        raise ValueError(f"{str(path)!r} is not a pysm_vaedust weights file: {err}") from err
    if version != FORMAT_VERSION:
        what = {2: " (the unconditional VAE of earlier pysm_vaedust versions, whose small scales ignore the large "
                   "scales)", 3: " (the conditional VAE with one decoder noise for all skies, too weak on bright "
                   "dust)"}.get(version, "")
        raise ValueError(f"{str(path)!r} has weights format version {version}{what}; this pysm_vaedust "
                         f"reads version {FORMAT_VERSION} (the conditional VAE): retrain with pysm_vaedust-train")
    actual = _digest(text, tensors)
    if actual != stored:
        raise ValueError(f"{str(path)!r} fails its checksum (stored {stored[:16]}..., computed "
                         f"{actual[:16]}...): the file was modified or corrupted")
    return json.loads(text), tensors


def module_state(tensors: dict[str, np.ndarray], key: str) -> dict[str, torch.Tensor]:
    """State dict of module `key` from flattened tensors."""
    prefix = f"{key}/"
    return {name[len(prefix):]: torch.from_numpy(np.array(value))
            for name, value in tensors.items() if name.startswith(prefix)}


@dataclass
class Weights:
    """A loaded, verified weights file: the conditional VAE (eval mode) and its metadata."""

    vae: ConditionalVAE
    metadata: dict
    path: str = ""

    @property
    def log_scale(self) -> float:
        """Global scale of the normalised small scales (std of ln I - [ln I]_fwhm, train split)."""
        return float(self.metadata["normalisation"]["log_scale"])


def load_weights(path=None, device="cpu") -> Weights:
    """Load and verify a weights file (default: the shipped weights) onto `device`."""
    path = Path(path) if path is not None else default_weights_path()
    metadata, tensors = read_weights_file(path)
    vae = ConditionalVAE(VAEConfig(**metadata["architecture"]))
    vae.load_state_dict(module_state(tensors, "vae"))
    vae.eval().requires_grad_(False).to(device)
    return Weights(vae=vae, metadata=metadata, path=str(path))
