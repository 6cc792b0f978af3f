"""Reading the configuration: YAML, ``APP__*`` environment overrides, typed
conversion with one-line errors naming the key."""

from __future__ import annotations

import collections.abc
import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml

from app.config.checks import validate
from app.config.model import (
    DEFAULT_CONFIG_PATH,
    ENV_PREFIX,
    Config,
    ConfigError,
    _Duration,
    _Size,
    parse_duration,
    parse_size,
)


def load_config(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Read YAML (``path`` or ``config/app.yaml``), apply ``environ`` overrides, validate."""
    environ = os.environ if environ is None else environ
    config_path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    raw: dict[str, Any] = {}
    if config_path.exists():
        try:
            loaded = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{config_path}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{config_path}: the top level must be a mapping of sections")
        raw = loaded or {}
    elif path is not None:
        raise ConfigError(f"config file {config_path} does not exist")
    _apply_environment(raw, environ)
    config = _build(Config, raw, "")
    validate(config)
    return config


def config_from_mapping(raw: Mapping[str, Any]) -> Config:
    """Build a validated config from a plain mapping (tests, embedding)."""
    config = _build(Config, dict(raw), "")
    validate(config)
    return config


def replace(config: Config, **sections: Mapping[str, Any]) -> Config:
    """A copy of ``config`` with some keys changed: ``replace(c, storage={"part_size": 5})``."""
    raw = _to_raw(config)
    for name, values in sections.items():
        _merge(raw.setdefault(name, {}), values)
    return config_from_mapping(raw)


def _to_raw(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_raw(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return list(obj)
    return obj


def _merge(target: dict[str, Any], values: Mapping[str, Any]) -> None:
    for key, value in values.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value


def _apply_environment(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    port = environ.get("PORT")
    if port:
        raw.setdefault("server", {})
        if not isinstance(raw["server"], dict):
            raise ConfigError("server: must be a mapping")
        raw["server"]["port"] = _yaml_scalar(port, "PORT")
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX):].split("__")]
        if not all(parts):
            raise ConfigError(f"{name}: malformed override name (use APP__SECTION__KEY)")
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{name}: {part} is not a section")
            node = child
        node[parts[-1]] = _yaml_scalar(value, name)


def _yaml_scalar(value: str, name: str) -> Any:
    try:
        return yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        return value


def _build(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: must be a mapping of keys")
    hints = typing.get_type_hints(cls, include_extras=True)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"{key}: unknown key (known here: {', '.join(sorted(known))})")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        key = f"{where}.{f.name}" if where else f.name
        values[f.name] = _convert(hints[f.name], raw[f.name], key)
    return cls(**values)


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin is Annotated:
        base, *markers = get_args(tp)
        try:
            if _Size in markers:
                return parse_size(value)
            if _Duration in markers:
                return parse_duration(value)
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}") from None
        return _convert(base, value, key)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None or value == "":
            return None
        return _convert(args[0], value, key)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin in (dict, Mapping, collections.abc.Mapping):
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str | None) for k, v in value.items()
        ):
            raise ConfigError(f"{key}: expected a mapping of strings to strings")
        return {k: "" if v is None else v for k, v in value.items()}
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of strings")
        return tuple(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool | dict | list):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp!r}")
