"""Registry of the real data sources and a verified fetcher.

The registry is ``pysm_vaedust/package_data/sources.toml`` (read by default, so it works from an
installed wheel). Its editable original is ``data/sources.toml`` at the repository root; a test
checks that both copies are byte-identical.

``fetch(name)`` returns a local path whose sha256 has been checked, looking in this order:

a. ``<data_dir>/<local_name>`` or ``<destination_dir>/<local_name>`` (an earlier download);
b. for PySM templates, ``pysm3.utils.RemoteData().get(pysm_path)`` (honours PYSM_LOCAL_DATA);
c. a download of ``url`` (then ``mirrors``), streamed to a temporary file, verified, then
   atomically renamed: a failed or corrupt download never leaves a file behind.
"""

from __future__ import annotations

import http.client
import os
import urllib.request
import warnings
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path

from .data import atomic_write, file_digest, shared_data_dir

import tomllib

REQUIRED_KEYS = ("name", "description", "url", "sha256", "units", "frame", "reference",
                 "license", "local_name")


@dataclass(frozen=True)
class Source:
    """One registered data file. Units/frame describe the file's content as stored."""

    name: str
    description: str
    url: str                      # direct download URL, "" if none
    sha256: str                   # hex digest, "" when not known yet
    units: str
    frame: str                    # "G" Galactic, "C" ICRS
    reference: str
    license: str
    local_name: str               # path relative to a data directory
    nside: int | None = None      # HEALPix maps only
    ordering: str | None = None   # "RING" / "NESTED"
    size_bytes: int | None = None
    md5: str = ""                 # checked only when sha256 is empty
    pysm_path: str = ""           # path in PySM's data tree, fetched with pysm3 RemoteData
    mirrors: tuple[str, ...] = ()
    origin: str = ""
    shape: tuple[int, ...] | None = None  # flat images: (ny, nx)
    pixel_arcmin: float | None = None
    projection: str = ""
    unverified: tuple[str, ...] = ()      # keys whose values were not checked on the real file
    notes: str = ""

    @classmethod
    def from_dict(cls, table: dict) -> "Source":
        """Build from one TOML table; unknown or missing keys raise ValueError."""
        known = {f.name for f in fields(cls)}
        name = table.get("name", "?")
        if unknown := sorted(set(table) - known):
            raise ValueError(f"source {name!r}: unknown keys {unknown}; known keys: {sorted(known)}")
        if missing := [key for key in REQUIRED_KEYS if key not in table]:
            raise ValueError(f"source {name!r}: missing keys {missing}")
        values = dict(table)
        for key in ("mirrors", "shape", "unverified"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


def default_registry_path() -> Path:
    """The package-data copy of sources.toml."""
    return Path(str(resources.files("pysm_vaedust") / "package_data" / "sources.toml"))


def load_registry(path=None) -> dict[str, Source]:
    """Read a sources.toml (default: the package-data copy) into {name: Source}."""
    path = Path(path) if path is not None else default_registry_path()
    with open(path, "rb") as handle:
        tables = tomllib.load(handle)
    registry = {}
    for key, table in tables.items():
        source = Source.from_dict(table)
        if source.name != key:
            raise ValueError(f"{path}: table [{key}] has name = {source.name!r}; they must match")
        registry[key] = source
    return registry


def sha256_file(path) -> str:
    """Hex sha256 of a file's bytes."""
    return file_digest(path)


def default_data_dir() -> Path | None:
    """data.shared_data_dir() ($PYSM_VAEDUST_DATA, else ../shared/data) when it exists, else None."""
    path = shared_data_dir()
    return path if path.is_dir() else None


def default_cache_dir() -> Path:
    """Where downloads go by default: $XDG_CACHE_HOME/pysm_vaedust (~/.cache/pysm_vaedust)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pysm_vaedust"


def verify(source: Source, path, label=None) -> Path:
    """Check `path` against the source's sha256 (else md5); ValueError on mismatch.

    With no checksum recorded, warns and reports the sha256 to record in data/sources.toml.
    label: what to call the file in messages (default: its path).
    """
    path = Path(path)
    label = label or path
    if source.sha256:
        actual = sha256_file(path)
        if actual != source.sha256.lower():
            raise ValueError(f"checksum mismatch for source {source.name!r} ({label}): "
                             f"expected sha256 {source.sha256}, got {actual}")
    elif source.md5:
        actual = file_digest(path, "md5")
        if actual != source.md5.lower():
            raise ValueError(f"checksum mismatch for source {source.name!r} ({label}): "
                             f"expected md5 {source.md5}, got {actual}")
    else:
        warnings.warn(f"source {source.name!r} has no recorded checksum; {label} has sha256 "
                      f"{sha256_file(path)} (record it in data/sources.toml)", stacklevel=3)
    return path


def fetch(name, destination_dir=None, *, url=None, data_dir=None, timeout=60,
          progress=True) -> Path:
    """Return a verified local path of source `name` (a registry name or a Source).

    destination_dir: where a download is written (default: default_cache_dir()); also searched
    for an earlier download. data_dir: folder searched first (default: default_data_dir()).
    url: download from this URL instead of the registered url/mirrors (may be file://).
    Raises ValueError on a checksum mismatch, RuntimeError when no copy can be obtained.
    """
    source = name if isinstance(name, Source) else _lookup(name)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    destination_dir = Path(destination_dir) if destination_dir is not None else default_cache_dir()
    hint = (f"set PYSM_VAEDUST_DATA (or pass data_dir=) to a folder holding "
            f"{source.local_name!r}")

    # (a) a local copy
    for folder in (data_dir, destination_dir):
        if folder is not None and (folder / source.local_name).is_file():
            return verify(source, folder / source.local_name)

    # (b) PySM's own data loader
    if source.pysm_path and url is None:
        from pysm3.utils import RemoteData
        try:
            path = RemoteData().get(source.pysm_path)
        except Exception as err:
            raise RuntimeError(
                f"cannot obtain source {source.name!r} through pysm3 ({source.pysm_path!r}, "
                f"{source.url}): {err!r}. Set PYSM_LOCAL_DATA to a folder holding "
                f"{source.pysm_path!r}, or {hint}") from err
        return verify(source, path)

    # (c) download
    urls = [url] if url is not None else [u for u in (source.url, *source.mirrors) if u]
    if not urls:
        raise RuntimeError(f"source {source.name!r} has no download URL and no local copy was "
                           f"found in {data_dir} or {destination_dir}: {hint}")
    errors = []
    for candidate in urls:
        try:
            return _download(source, candidate, destination_dir, timeout, progress)
        except (OSError, http.client.HTTPException) as err:  # network errors: next mirror
            errors.append(f"{candidate}: {err}")
    raise RuntimeError(f"could not download source {source.name!r}: " + "; ".join(errors)
                       + f". Check the network, or download it by hand and {hint}")


def _lookup(name: str) -> Source:
    registry = load_registry()
    if name not in registry:
        raise KeyError(f"unknown data source {name!r}; known: {sorted(registry)}")
    return registry[name]


def _download(source: Source, url: str, destination_dir: Path, timeout, progress) -> Path:
    """Stream `url` to a temp file next to the target, verify, then rename; no partial file."""
    from tqdm.auto import tqdm

    target = destination_dir / source.local_name

    def write(tmp):
        with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=source.name, disable=not progress) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))
        if target.suffix == ".fits":
            with open(tmp, "rb") as handle:
                if handle.read(6) != b"SIMPLE":
                    raise ValueError(f"download of source {source.name!r} from {url} is not a "
                                     f"FITS file (an error page?)")
        verify(source, tmp, label=f"download from {url}")

    return atomic_write(target, write)
