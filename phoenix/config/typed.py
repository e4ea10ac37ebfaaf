"""Strict conversion of plain YAML data into typed config dataclasses.

Every config in phoenix is a dataclass; this module turns nested dicts (from YAML and
dotted command-line overrides) into those dataclasses, rejecting unknown keys and wrong
types with one message that names the full dotted key, so a typo never silently falls
back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin


class ConfigError(ValueError):
    """A config is invalid; the message names the dotted key and what is wrong."""


def positive(section: str, **values) -> None:
    """Raise ConfigError naming ``section.key`` for each given value that is not a finite
    number > 0 (None values are skipped: not set)."""
    for name, value in values.items():
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{section}.{name}: must be > 0, got {value}")


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{key}: null is not allowed here")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {_type_name(tp)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp, *_rest) = get_args(tp) or (Any,)
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        _, val_tp = get_args(tp) or (Any, Any)
        return {str(k): _convert(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            # A float is refused even when whole (4.0): YAML reads 1e6 as an integer
            # already (phoenix.config.loader), so a float here was written as one.
            hint = (f" (write {int(value)})" if isinstance(value, float) and value.is_integer()
                    else "")
            raise ConfigError(f"{key}: expected an integer, got {value!r}{hint}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {tp}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and bad types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        renamed = getattr(cls, "RENAMED_KEYS", {}).get(name)
        if renamed is not None:
            where = f"{prefix}." if prefix else ""
            raise ConfigError(f"config key '{key}' was renamed to '{where}{renamed}'")
        if name not in fields:
            close = difflib.get_close_matches(str(name), list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{key}'{hint}")
        kwargs[name] = _convert(value, hints[name], key)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        # __post_init__ checks name keys relative to their own section; prefix them.
        msg = str(e)
        raise ConfigError(f"{prefix}.{msg}" if prefix and not msg.startswith(prefix) else msg) from None
    except TypeError:
        missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            where = f"{prefix}." if prefix else ""
            raise ConfigError(f"missing required config key '{where}{missing[0]}'") from None
        raise


def to_dict(obj: Any) -> Any:
    """Plain-data (YAML-safe) view of a config dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


_INDEXED = re.compile(r"^(\w+)\[(\d+)\]$")


def apply_override(data: dict, dotted_key: str, value: Any) -> None:
    """Set ``a.b.c=value`` inside nested dict ``data`` (creating sections as needed).

    A list item is addressed by index: ``data.datasets[1].weight=0.2``.
    """
    parts = dotted_key.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        m = _INDEXED.match(part)
        if m:
            name, index = m.group(1), int(m.group(2))
            items = node.get(name) if isinstance(node, dict) else None
            if not isinstance(items, list) or index >= len(items):
                size = len(items) if isinstance(items, list) else 0
                raise ConfigError(f"override '{dotted_key}': '{name}' has no item {index} "
                                  f"(it has {size})")
            if last:
                items[index] = value
                return
            node = items[index]
        elif last:
            node[part] = value
        else:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            node = child
        if not last and not isinstance(node, dict):
            raise ConfigError(f"override '{dotted_key}': '{part}' is not a section")
