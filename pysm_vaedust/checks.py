"""Argument checks of the public entry points: one error naming the argument, its value and what
is expected (TypeError for a wrong type, ValueError for a wrong value)."""

from __future__ import annotations

import os
from numbers import Real

import healpy as hp
import numpy as np
import pysm3.units as u
from pysm3 import utils as pysm_utils

#: seeds key 32-bit Philox streams (tiling.patch_normals): larger ones would alias smaller ones
SEED_LIMIT = 2**32


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_int(value, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` as int: Python or numpy integers only (no bools, no floats), within [minimum, maximum]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}={_show(value)}: expected an integer, got {type(value).__name__}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = (f">= {minimum}" if maximum is None else f"<= {maximum}" if minimum is None
                  else f"in {minimum}..{maximum}")
        raise ValueError(f"{name}={value}: expected an integer {bounds}")
    return value


def check_seed(value, name: str = "seed") -> int:
    """A seed: an integer 0 <= seed < 2**32."""
    return check_int(value, name, 0, SEED_LIMIT - 1)


def check_nside(value, name: str = "nside") -> int:
    """nside as int; an integer power of two (1, 2, 4, ...)."""
    nside = check_int(value, name)
    if not hp.isnsideok(nside, nest=True):
        raise ValueError(f"{name}={nside!r}: expected a power of two (1, 2, 4, ..., 8192)")
    return nside


def check_float_dtype(value, name: str = "dtype") -> np.dtype:
    """float32 or float64 (a numpy dtype, type or its name)."""
    if value is None or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}={_show(value)}: expected float32 or float64")
    try:
        dtype = np.dtype(value)
    except TypeError:
        raise (ValueError if isinstance(value, str) else TypeError)(
            f"{name}={_show(value)}: expected float32 or float64") from None
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"{name}={_show(value)}: expected float32 or float64")
    return dtype


def check_bool(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}={_show(value)}: expected True or False, got {type(value).__name__}")
    return bool(value)


def check_real(value, name: str, minimum: float | None = None, positive: bool = False) -> float:
    """A finite real number (not a bool), > 0 if `positive`, >= `minimum` if given."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Real):
        raise TypeError(f"{name}={_show(value)}: expected a real number, got {type(value).__name__}")
    value = float(value)
    if not np.isfinite(value) or (positive and value <= 0) or (minimum is not None and value < minimum):
        what = " > 0" if positive else f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name}={value!r}: expected a finite number{what}")
    return value


def check_choice(value, name: str, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}={_show(value)}: expected one of {tuple(choices)}")
    return value


def check_path(value, name: str, optional: bool = True):
    """A file path (str or os.PathLike), or None if `optional`."""
    if value is None and optional:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name}={_show(value)}: expected a file path (str or pathlib.Path)"
                        + (" or None" if optional else ""))
    return value


def check_frequency(freqs, name: str = "freqs") -> u.Quantity:
    """A scalar or 1-d Quantity of frequencies (or wavelengths), as finite positive GHz."""
    if not isinstance(freqs, u.Quantity):
        raise TypeError(f"{name}={_show(freqs)} has no units: pass a Quantity, e.g. 545 * u.GHz")
    try:
        freqs = freqs.to(u.GHz, equivalencies=u.spectral())
    except u.UnitConversionError as err:
        raise ValueError(f"{name}={_show(freqs)}: expected a frequency (e.g. u.GHz): {err}") from None
    if freqs.ndim > 1 or freqs.size == 0 or not np.isrealobj(freqs.value):
        raise ValueError(f"{name} has shape {freqs.shape}, dtype {freqs.dtype}: expected a real scalar "
                         "or a non-empty 1-d array of frequencies")
    if np.any(~np.isfinite(freqs.value)) or np.any(freqs.value <= 0):
        raise ValueError(f"{name}={_show(freqs)}: expected finite positive values")
    return freqs


def check_bandpass(freqs, weights=None, name: str = "freqs", weights_name: str = "weights"):
    """(frequencies in GHz (n,), pysm3-normalised weights (n,)) of a frequency or a bandpass.

    weights: None (top hat) or n finite non-negative numbers, not all zero; a bandpass of n > 1
    frequencies must be strictly monotonic, so that its integral is positive."""
    freqs = pysm_utils.check_freq_input(check_frequency(freqs, name))
    freqs = np.atleast_1d(np.asarray(freqs, dtype=np.float64))
    if weights is not None:
        if isinstance(weights, u.Quantity) and weights.unit != u.dimensionless_unscaled:
            raise ValueError(f"{weights_name} has unit {weights.unit}: expected plain numbers")
        try:
            array = np.atleast_1d(np.asarray(weights, dtype=np.float64))
        except (TypeError, ValueError):
            raise TypeError(f"{weights_name}={_show(weights)}: expected an array of numbers") from None
        if array.shape != freqs.shape:
            raise ValueError(f"{weights_name} has shape {array.shape}; expected {freqs.shape}, "
                             f"one weight per frequency of {name}")
        if np.any(~np.isfinite(array)) or np.any(array < 0) or not np.any(array > 0):
            raise ValueError(f"{weights_name}={_show(array)}: expected finite weights >= 0, not all zero")
        weights = array
    if len(freqs) > 1:
        steps = np.diff(freqs)
        if not (np.all(steps > 0) or np.all(steps < 0)):
            raise ValueError(f"{name}={_show(freqs)} GHz: a bandpass needs strictly increasing (or "
                             "decreasing) frequencies")
    with np.errstate(all="ignore"):
        normalised = pysm_utils.normalize_weights(freqs, weights)
    if not np.all(np.isfinite(normalised)):
        raise ValueError(f"{weights_name}={_show(weights)}: the bandpass integral over {name} is not finite "
                         "in float64 (rescale the weights)")
    return freqs, normalised


def check_lonlat(lon_deg, lat_deg, names=("lon_deg", "lat_deg")) -> tuple[np.ndarray, np.ndarray]:
    """Galactic centres as two float64 (N,) arrays: real, finite, of one shape, |lat| <= 90 deg."""
    arrays = []
    for value, name in zip((lon_deg, lat_deg), names):
        try:
            array = np.atleast_1d(np.asarray(value, dtype=np.float64))
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name}={_show(value)}: expected real numbers (degrees)") from err
        if array.ndim != 1 or not np.all(np.isfinite(array)):
            raise ValueError(f"{name}={_show(value)}: expected a finite number or 1D array (degrees)")
        arrays.append(array)
    if arrays[0].shape != arrays[1].shape:
        raise ValueError(f"{names[0]} and {names[1]} have shapes {arrays[0].shape} and {arrays[1].shape}: "
                         f"expected one latitude per longitude")
    if np.any(np.abs(arrays[1]) > 90):
        raise ValueError(f"{names[1]}={_show(lat_deg)}: expected latitudes in -90..90 deg")
    return arrays[0], arrays[1]


def check_pixel_indices(pixels, nside: int, name: str = "map_dist.pixel_indices") -> np.ndarray:
    """A 1-d integer array of RING pixel indices of `nside`."""
    pixels = np.asarray(pixels)
    if pixels.ndim != 1 or not (pixels.size == 0 or np.issubdtype(pixels.dtype, np.integer)):
        raise ValueError(f"{name} has shape {pixels.shape}, dtype {pixels.dtype}: expected a 1-d integer array")
    npix = hp.nside2npix(nside)
    if pixels.size and (pixels.min() < 0 or pixels.max() >= npix):
        raise ValueError(f"{name} span {pixels.min()}..{pixels.max()}, outside the {npix} pixels of nside {nside}")
    return pixels
