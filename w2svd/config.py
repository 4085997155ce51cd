"""One typed config tree for every stage, loaded from YAML with dotted overrides.

    cfg = load_config("debug", ["method.alpha_weak=0.5", "optim.steps=20"])

A named config is a YAML file in ``w2svd/configs`` (or any path); it may name a ``base``
config whose values it overrides. Every key is checked against the dataclasses of
``w2svd.config_schema``, so a misspelt key or a value outside its allowed set fails before any
work starts, with a ``ValueError`` that names the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from w2svd.config_checks import validate
from w2svd.config_schema import (  # noqa: F401  (re-exported: callers import the schema from here)
    HUNYUAN_LORA_TARGETS,
    BucketConfig,
    Config,
    DataConfig,
    DebugConfig,
    EvalConfig,
    GateConfig,
    GenerateConfig,
    HealthConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    PromotionConfig,
    ServeConfig,
    TrackingConfig,
    TransformerArch,
    VAEArch,
    WorldConfig,
)

CONFIG_DIR = Path(__file__).parent / "configs"


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _read_named(name_or_path: str, seen: tuple[str, ...] = ()) -> dict:
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ValueError(
            f"unknown config {name_or_path!r}: not a file and not one of {available_configs()}"
        )
    if str(path) in seen:
        raise ValueError(f"config {name_or_path!r} inherits from itself via {list(seen)}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"config {path} must be a mapping at the top level")
    base = raw.pop("base", None)
    if base is None:
        return raw
    return _deep_merge(_read_named(base, seen + (str(path),)), raw)


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``["method.alpha_weak=0.5"]`` → nested dict update; values are parsed as YAML scalars."""
    raw = _deep_merge({}, raw)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        dotted, _, text = item.partition("=")
        keys = dotted.strip().split(".")
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {key!r} is not a section")
        node[keys[-1]] = yaml.safe_load(text) if text.strip() else None
    return raw


def load_config(name_or_path: str = "debug", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    raw = apply_overrides(_read_named(name_or_path), list(overrides))
    raw.setdefault("name", Path(name_or_path).stem)
    cfg = from_dict(Config, raw)
    validate(cfg)
    return cfg


def from_dict(cls: type, raw: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from plain data, naming the dotted key of anything wrong."""
    if not isinstance(raw, dict):
        raise ValueError(f"{path or 'config'} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = path or "the top level"
        raise ValueError(f"unknown key(s) {unknown} in {where}; allowed: {sorted(fields)}")
    kwargs = {k: _coerce(hints[k], v, f"{path}.{k}" if path else k) for k, v in raw.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, path)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError("; ".join(errors))
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{path} = {value!r} is not allowed; choose one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{path} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{path} must be true or false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{path} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{path} must be an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{path} must be a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"unsupported config type {tp} at {path}")  # a bug in this file, not user input


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys → values, for experiment trackers' flat parameter lists."""
    out: dict[str, Any] = {}
    for key, value in (to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out
