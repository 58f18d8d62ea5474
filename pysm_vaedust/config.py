"""Sky configurations for simulation pipelines: pysm3 presets and plugin components together.

pysm3 3.4.6 resolves a ``component_config`` "class" only among the names of ``pysm3.sky``, so a
plugin class such as ``pysm_vaedust.VAEDust`` cannot be named there (galsci/pysm issue 181).
`build_sky` reads one configuration (a dict, or a TOML file path or string) that mixes pysm3
preset strings, this package's presets and any ``pysm3.Model`` subclass named by its dotted
import path, and returns one ``pysm3.Sky`` of all of them.

Configuration keys::

    nside = 512                # optional if build_sky(nside=...) or map_dist.nside gives it
    output_unit = "uK_CMB"     # optional, default "uK_RJ"; build_sky(output_unit=...) wins
    components = ...           # required: a list, or a table of named entries (order kept)

Each component entry is one of

* a preset name: ``"s1"`` (pysm3, see pysm3/data/presets.cfg) or ``"vd1"`` (table below);
* a table ``{preset = "vd1", seed = 3}``: a preset with keyword arguments added or replaced
  (pysm3 presets too, e.g. ``{preset = "d1", max_nside = 1024}``, single-class presets only);
* a table ``{class = "pysm_vaedust.VAEDust", seed = 3}``: the class at that import path
  (a name without a dot is looked up among pysm3's models, like pysm3's component_config),
  built mapsims-style as ``cls(nside=nside, **table)`` plus ``map_dist=`` when one is given.

In TOML: ``components = ["s1", "vd1"]``, or ``[[components]]`` tables, or named tables
``[components.dust]`` (the table layout mapsims uses for ``other_components``); see
examples/mission.toml. Relative paths inside a table are passed on as written (relative to the
working directory, not to the TOML file).

Presets of this package (`PRESETS`; names never collide with pysm3's)::

    name            class                   keyword arguments    what
    vd1             pysm_vaedust.VAEDust    (defaults)           shipped weights, bundled template,
                                                                 cascade to the nside
    vd1_gnilc       pysm_vaedust.VAEDust    template =           on the PySM GNILC template, I and
                                            pol_template =       Q/U (fetched through pysm3's
                                            "pysm_gnilc"         loader)
    vd1_nocascade   pysm_vaedust.VAEDust    cascade = false      base level only (scales of the
                                                                 training data, no extrapolation)

Every preset takes ``seed`` (default 0) and the other VAEDust keywords as overrides.

Errors: an unknown preset or class, a keyword the class does not take (checked against
``inspect.signature``), a missing nside, an invalid unit, or a ``map_dist`` whose nside differs
from the sky's raise one ValueError naming the offending entry; a keyword value the class refuses
(e.g. ``seed = 1.5``) raises its TypeError / ValueError prefixed with the entry.

Other pipelines: TOAST takes component objects (``build_sky(...).components`` or the Sky);
litebird_sim takes pysm3 preset strings only, so it cannot name a plugin class.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path

import pysm3
import pysm3.units as u
from pysm3 import sky as pysm_sky

from .checks import check_nside, check_pixel_indices

#: Presets of this package: name -> {"class": dotted path, **keyword arguments}.
PRESETS: dict[str, dict] = {
    "vd1": {"class": "pysm_vaedust.VAEDust"},
    "vd1_gnilc": {"class": "pysm_vaedust.VAEDust", "template": "pysm_gnilc", "pol_template": "pysm_gnilc"},
    "vd1_nocascade": {"class": "pysm_vaedust.VAEDust", "cascade": False},
}

TOP_LEVEL_KEYS = ("nside", "output_unit", "components")
#: Keywords set by build_sky itself, never in a component table.
RESERVED_KEYS = ("nside", "map_dist")


def load_config(config) -> dict:
    """The configuration as a dict: `config` as a dict (copied, values shared), a list of
    components, or a TOML file path / TOML text. ValueError if it is none of these."""
    if isinstance(config, Mapping):
        return dict(config)
    if isinstance(config, str) and ("\n" in config or ("=" in config and not Path(config).is_file())):
        text, where = config, "TOML text"
    elif isinstance(config, (str, Path)):
        path = Path(config)
        if not path.is_file():
            raise ValueError(f"config {str(config)!r}: no such TOML file (or pass a dict / TOML text)")
        text, where = path.read_text(), str(path)
    elif isinstance(config, Sequence):
        return {"components": list(config)}
    else:
        raise ValueError(f"config of type {type(config).__name__}: expected a dict, a list of "
                         "components, a TOML file path or TOML text")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"config {where}: invalid TOML: {err}") from err


def resolve_class(name: str, where: str = "component") -> type:
    """The pysm3.Model subclass named by a dotted import path ("package.module.Class"), or by a
    bare pysm3 model name ("ModifiedBlackBody"). ValueError naming it if it cannot be found."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: class={name!r}: expected a dotted import path such as "
                         "'pysm_vaedust.VAEDust'")
    if "." not in name:
        obj = getattr(pysm_sky, name, None)
        if obj is None:
            raise ValueError(f"{where}: class {name!r} is not a pysm3 model; name a plugin class by "
                             "its dotted import path, e.g. 'pysm_vaedust.VAEDust'")
    else:
        obj = _import_dotted(name, where)
        if obj is None:
            raise ValueError(f"{where}: class {name!r} not found (no importable module and attribute "
                             "of that dotted path)")
    if not (isinstance(obj, type) and issubclass(obj, pysm3.Model)):
        raise ValueError(f"{where}: {name!r} is {obj!r}, not a pysm3.Model subclass")
    return obj


def _import_dotted(name: str, where: str):
    """Object at a dotted path (longest importable module prefix, then attributes), or None."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            missing = err.name or ""
            if module_name == missing or module_name.startswith(missing + "."):
                continue  # this prefix is not a module: try a shorter one
            raise ValueError(f"{where}: importing {module_name!r} for class {name!r} failed: {err}") from err
        except ImportError as err:
            raise ValueError(f"{where}: importing {module_name!r} for class {name!r} failed: {err}") from err
        for attr in parts[cut:]:
            obj = getattr(obj, attr, None)
            if obj is None:
                return None
        return obj
    return None


def check_keywords(cls: type, kwargs: Mapping, where: str = "component", map_dist=None) -> dict:
    """The keyword arguments of ``cls(nside=..., **kwargs[, map_dist=...])``, validated against the
    class signature: ValueError naming unknown or reserved keys and missing required ones."""
    for key in kwargs:
        if not isinstance(key, str) or not key.isidentifier():
            raise ValueError(f"{where}: key {key!r} is not a valid keyword name")
    reserved = [k for k in RESERVED_KEYS if k in kwargs]
    if reserved:
        raise ValueError(f"{where}: {reserved} must not be set per component: give nside at the top "
                         "level of the config (or to build_sky) and map_dist to build_sky")
    params = inspect.signature(cls).parameters
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = {n for n, p in params.items()
             if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    if "nside" not in named and not var_kw:
        raise ValueError(f"{where}: {cls.__qualname__} takes no nside keyword, so build_sky cannot "
                         "build it as cls(nside=nside, **table)")
    unknown = sorted(set(kwargs) - named)
    if unknown and not var_kw:
        raise ValueError(f"{where}: {cls.__module__}.{cls.__qualname__} takes no keyword "
                         f"{', '.join(map(repr, unknown))}; it takes {sorted(named - set(RESERVED_KEYS))}")
    call = dict(kwargs)
    if map_dist is not None:
        if "map_dist" not in named and not var_kw:
            raise ValueError(f"{where}: {cls.__qualname__} takes no map_dist, so it cannot be "
                             "distributed; build the sky without map_dist")
        call["map_dist"] = map_dist
    missing = [n for n, p in params.items() if n not in call and n != "nside"
               and p.default is inspect.Parameter.empty
               and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    if missing:
        raise ValueError(f"{where}: {cls.__qualname__} needs {missing}, not given")
    return call


def _entries(components, where="components") -> list[tuple[str, object]]:
    """(label, entry) pairs of the `components` value: a list, or a table of named entries."""
    if isinstance(components, (str, bytes)) or not isinstance(components, (Mapping, Sequence)):
        raise ValueError(f"{where}={components!r}: expected a list of components or a table of "
                         "named components")
    if isinstance(components, Mapping):
        items = [(f"{where}.{name}", entry) for name, entry in components.items()]
    else:
        items = [(f"{where}[{i}]", entry) for i, entry in enumerate(components)]
    if not items:
        raise ValueError(f"{where} is empty: name at least one component")
    return items


def _build_component(label, entry, nside, map_dist) -> list[pysm3.Model]:
    """The pysm3 components of one configuration entry."""
    if isinstance(entry, str):
        preset, kwargs, cls_name = entry, {}, None
    elif isinstance(entry, Mapping):
        kwargs = dict(entry)
        preset, cls_name = kwargs.pop("preset", None), kwargs.pop("class", None)
        if (preset is None) == (cls_name is None):
            raise ValueError(f"{label}: a component table needs exactly one of 'class' (dotted path) "
                             f"or 'preset' (name); got keys {sorted(entry)}")
    else:
        raise ValueError(f"{label}={entry!r}: expected a preset name or a table with 'class' or 'preset'")

    if preset is not None:
        if preset in PRESETS:
            kwargs = {**{k: v for k, v in PRESETS[preset].items() if k != "class"}, **kwargs}
            cls_name, label = PRESETS[preset]["class"], f"{label} (preset {preset!r})"
        elif preset in pysm_sky.PRESET_MODELS:
            return _pysm_preset(label, preset, kwargs, nside, map_dist)
        else:
            raise ValueError(f"{label}: unknown preset {preset!r}; this package's presets are "
                             f"{sorted(PRESETS)}, pysm3's are {sorted(pysm_sky.PRESET_MODELS)}")
    cls = resolve_class(cls_name, label)
    call = check_keywords(cls, kwargs, label, map_dist)
    try:
        return [cls(nside=nside, **call)]
    except (TypeError, ValueError) as err:  # the class's own argument checks: say which entry
        raise (TypeError if isinstance(err, TypeError) else ValueError)(f"{label}: {err}") from err


def _pysm_preset(label, preset, overrides, nside, map_dist) -> list[pysm3.Model]:
    """Components of a pysm3 preset (with keyword overrides for single-class presets)."""
    if not overrides:
        return pysm3.Sky(nside=nside, preset_strings=[preset], map_dist=map_dist).components
    config = copy.deepcopy(pysm_sky.PRESET_MODELS[preset])
    if "class" not in config:
        raise ValueError(f"{label}: pysm3 preset {preset!r} has several sub-components; keyword "
                         f"overrides {sorted(overrides)} apply to single-class presets only")
    config.update(overrides)
    check_keywords(resolve_class(config["class"], label), {k: v for k, v in config.items() if k != "class"},
                   f"{label} (pysm3 preset {preset!r})")
    return pysm3.Sky(nside=nside, component_config={preset: config}, map_dist=map_dist).components


def build_sky(config, nside=None, output_unit=None, map_dist=None) -> pysm3.Sky:
    """One pysm3.Sky of the components of `config` (see the module docstring for the format).

    config: dict, list of components, TOML file path or TOML text. nside, output_unit: override
    the config's (nside may also come from map_dist.nside). map_dist: pysm3.MapDistribution passed
    to every component (MPI or partial sky); its nside must equal the sky's.
    Returns pysm3.Sky(component_objects=[...], output_unit=...) in the config's order.
    """
    cfg = load_config(config)
    unknown = sorted(set(cfg) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ValueError(f"config has unknown top-level keys {unknown}; expected {list(TOP_LEVEL_KEYS)}")
    if "components" not in cfg:
        raise ValueError("config has no 'components': name at least one component")
    dist_nside = None if map_dist is None else getattr(map_dist, "nside", None)
    if nside is not None:
        nside = check_nside(nside, "nside")
    elif "nside" in cfg:
        nside = check_nside(cfg["nside"], "config nside")
    elif dist_nside is not None:
        nside = check_nside(dist_nside, "map_dist.nside")
    else:
        raise ValueError("no nside: set nside in the config, or pass nside= or a map_dist with nside")
    if dist_nside is not None and int(dist_nside) != nside:
        raise ValueError(f"map_dist.nside={dist_nside} differs from the sky's nside={nside}")
    if map_dist is not None and getattr(map_dist, "pixel_indices", None) is not None:
        check_pixel_indices(map_dist.pixel_indices, nside)
    unit = output_unit if output_unit is not None else cfg.get("output_unit", "uK_RJ")
    try:
        unit = u.Unit(unit)
        (1 * u.uK_RJ).to(unit, equivalencies=u.cmb_equivalencies(100 * u.GHz))
    except (ValueError, TypeError) as err:  # UnitConversionError is a ValueError
        raise ValueError(f"output_unit={unit!r} is not a brightness unit pysm3 converts to "
                         f"(e.g. uK_RJ, uK_CMB, MJy/sr): {err}") from err

    components = []
    for label, entry in _entries(cfg["components"]):
        components += _build_component(label, entry, nside, map_dist)
    return pysm3.Sky(nside=nside, component_objects=components, output_unit=unit, map_dist=map_dist)


__all__ = ["PRESETS", "build_sky", "load_config", "resolve_class", "check_keywords"]
