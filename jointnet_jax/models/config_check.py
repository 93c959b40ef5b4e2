"""Checks of a model config's values against the types of its dataclass fields, shared by the UNet, VAE and
text-encoder configs.

A wrong type in a ``config.json`` (``"block_out_channels": "8,8,8,16"``, a float layer count, a negative
size) would otherwise surface deep inside the first forward pass as a GroupNorm or reshape ``TypeError``.
Checked at load time instead, it is one sentence naming the key. The expected type of a field is its
default's: an int field takes ints (not bools), a float field any finite number, a bool field bools, a
tuple field a list of its default's element type; a None default allows None or an int.
"""

from __future__ import annotations

import dataclasses
import math
from numbers import Real


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _describe(kind: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[kind]


def _value_error(value, kind: type) -> str | None:
    if kind is int and not _is_int(value):
        return _describe(int)
    if kind is float and not (isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)):
        return "a finite number"
    if kind in (bool, str) and not isinstance(value, kind):
        return _describe(kind)
    return None


def check_raw_lists(what: str, d: dict, keys) -> None:
    """Keys that must hold lists: a string there would otherwise be read character by character."""
    for key in keys:
        if key in d and not isinstance(d[key], list | tuple):
            raise ValueError(f"{what} config key {key!r} must be a list, got {d[key]!r}")


def check_fields(what: str, config, *, positive=(), skip=("raw",)) -> None:
    """Every field of ``config`` has its default's type; the integers named in ``positive`` (or every entry
    of such a tuple field) are > 0, the other integers >= 0. ValueError naming ``what`` and the key."""
    for f in dataclasses.fields(config):
        if f.name in skip:
            continue
        value, default = getattr(config, f.name), f.default
        if default is None:
            if value is None:
                continue
            default = 1
        values, kinds = (value, default) if isinstance(default, tuple) else ((value,), (default,))
        if isinstance(default, tuple) and not isinstance(value, tuple):
            raise ValueError(f"{what} config key {f.name!r} must be a list, got {value!r}")
        kind = type(kinds[0])
        for v in values:
            problem = _value_error(v, kind)
            if problem is None and kind is int and v < (1 if f.name in positive else 0):
                problem = "a positive integer" if f.name in positive else "a non-negative integer"
            if problem is not None:
                listed = isinstance(default, tuple)
                shown = f"{v!r} in {list(value)!r}" if listed else f"{v!r}"
                each = "each entry of " if listed else ""
                raise ValueError(f"{what} config key {f.name!r}: {each}the value must be {problem}, got {shown}")
