"""Flat typed training configs: every field is a CLI flag and a JSON key.

A family extends :class:`TrainConfig` by subclassing it (flat, no nesting)::

    @dataclass
    class FlowConfig(TrainConfig):
        depth: int = 4
        path: Literal["linear", "cosine"] = "linear"

``parse_config(FlowConfig, ["--lr", "3e-4", "--depth=6", "--no-tensorboard"])`` builds one from
flags; ``--config run/train_config.json`` starts from a saved config that later flags override.
Supported field types: ``int``, ``float``, ``str``, ``bool``, ``Literal[...]`` (choices),
``Optional[X]`` (flag value ``none``), ``tuple[X, ...]``/``tuple[X, Y]``/``list[X]``
(comma-separated). Every mistake is a one-line :class:`ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Optional

__all__ = ["ConfigError", "TrainConfig", "parse_config", "save_config", "load_config", "config_help"]


class ConfigError(ValueError):
    """A bad config value, flag or file; the message is one line naming the field."""


@dataclass
class TrainConfig:
    """Options of the one trainer (``genmod.train.Trainer``); families subclass it flat."""

    # where and how long
    output_dir: str = "runs/train"
    seed: int = 0
    max_steps: int = 1000
    time_budget_minutes: float = 0.0  # stop cleanly (checkpoint + export) after this much training; 0 = off
    # batch_size is per process; the global batch is batch_size * processes * grad_accum_steps
    batch_size: int = 32
    grad_accum_steps: int = 1
    # AdamW and the learning-rate schedule
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    # EMA of the weights; 0 = off. Warmup: decay_t = min(decay, 1 - (1 + t/inv_gamma)^-power)
    ema_decay: float = 0.9999
    ema_warmup: bool = False
    ema_inv_gamma: float = 1.0
    ema_power: float = 0.75
    # checkpoints, previews and logs (every N optimizer steps; 0 = off)
    checkpoint_every: int = 500
    keep_last: int = 3  # checkpoints kept; 0 = keep all
    sample_every: int = 500
    num_preview: int = 16
    log_every: int = 10
    tensorboard: bool = True
    resume: Optional[str] = None  # None, "latest" or a checkpoint path
    # devices and data
    cpu: bool = False
    num_workers: int = 0
    dataset: str = "shapes"
    dataset_split: str = "train"
    dataset_size: Optional[int] = None  # number of samples for datasets that take `num_samples`

    def validate(self) -> None:
        """Range checks that types alone cannot express; raises ConfigError naming the field."""
        positive = ["max_steps", "batch_size", "grad_accum_steps"]
        non_negative = ["time_budget_minutes", "warmup_steps", "grad_clip", "checkpoint_every", "keep_last", "sample_every",
                        "num_preview", "log_every", "num_workers", "weight_decay", "adam_eps"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name}: must be > 0, got {getattr(self, name)}")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name}: must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"--lr: must be > 0, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"--ema_decay: must be in [0, 1), got {self.ema_decay}")
        if not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ConfigError(f"--adam_betas: each beta must be in [0, 1), got {self.adam_betas}")


# --------------------------------------------------------------------------------------------
# Type handling


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _is_optional(tp) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _is_flag(tp) -> bool:
    """``bool`` and ``Optional[bool]`` fields take the bare ``--flag`` / ``--no-flag`` forms."""
    return tp is bool or _is_optional(tp) == (True, bool)


def _type_name(tp) -> str:
    optional, inner = _is_optional(tp)
    if optional:
        return f"{_type_name(inner)} or none"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"comma-separated {_type_name(args[0]) if args else 'values'}"
    return getattr(tp, "__name__", str(tp))


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _from_string(name: str, tp, text: str):
    """Convert one flag value; ``name`` is the flag shown in errors."""
    optional, inner = _is_optional(tp)
    if optional:
        if text.strip().lower() in ("none", "null"):
            return None
        return _from_string(name, inner, text)
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if str(choice) == text:
                return choice
        raise ConfigError(f"{name}: invalid choice {text!r} (choose from {', '.join(repr(c) for c in choices)})")
    if origin in (tuple, list):
        args = typing.get_args(tp)
        parts = [p.strip() for p in text.split(",")] if text.strip() else []
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(parts) != len(args):
                raise ConfigError(f"{name}: expected {len(args)} comma-separated values, got {text!r}")
            items = [_from_string(name, a, p) for a, p in zip(args, parts)]
        else:
            elem = args[0] if args else str
            items = [_from_string(name, elem, p) for p in parts]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"{name}: expected true/false, got {text!r}")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            try:  # allow "1e3" when it is a whole number
                value = float(text)
            except ValueError:
                value = None
            if value is not None and value.is_integer():
                return int(value)
            raise ConfigError(f"{name}: expected int, got {text!r}") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{name}: expected float, got {text!r}") from None
    if tp is str:
        return text
    raise ConfigError(f"{name}: unsupported field type {tp!r}")


def _check_json_value(where: str, tp, value):
    """Type-check (and normalise) one value read from JSON; ``where`` prefixes errors."""
    optional, inner = _is_optional(tp)
    if optional:
        return None if value is None else _check_json_value(where, inner, value)
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices or isinstance(value, bool) != any(isinstance(c, bool) for c in choices):
            raise ConfigError(f"{where}: invalid choice {value!r} (choose from {', '.join(repr(c) for c in choices)})")
        return value
    if origin in (tuple, list):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            items = [_check_json_value(where, a, v) for a, v in zip(args, value)]
        else:
            elem = args[0] if args else Any
            items = [v if elem is Any else _check_json_value(where, elem, v) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected bool, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected int, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected str, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {tp!r}")


def _check_instance_types(config) -> None:
    for name, tp in _field_types(type(config)).items():
        value = getattr(config, name)
        as_json = list(value) if isinstance(value, tuple) else value
        setattr(config, name, _check_json_value(f"--{name}", tp, as_json))


# --------------------------------------------------------------------------------------------
# CLI


def config_help(cls) -> str:
    """One line per field: flag, type and default."""
    lines = [f"options of {cls.__name__} (every field is a flag; --config FILE.json loads a saved config):"]
    defaults = cls()
    for name, tp in _field_types(cls).items():
        default = getattr(defaults, name)
        if isinstance(default, (tuple, list)):
            default = ",".join(str(v) for v in default)
        flag = f"--{name}" + ("/--no-" + name if _is_flag(tp) else "")
        lines.append(f"  {flag:<34} {_type_name(tp):<40} default: {default}")
    return "\n".join(lines)


def parse_config(cls, argv: list[str] | None = None):
    """Build ``cls`` from ``--field value`` / ``--field=value`` / ``--flag`` / ``--no-flag`` flags.

    ``--config FILE`` (anywhere in argv) loads a saved config first; the other flags override it.
    ``-h``/``--help`` prints :func:`config_help` and exits with status 0.
    """
    argv = list(argv or [])
    if "-h" in argv or "--help" in argv:
        print(config_help(cls))
        raise SystemExit(0)
    types_by_name = _field_types(cls)
    flags = {name.replace("_", "-"): name for name in types_by_name}  # accept --max-steps too
    flags.update({name: name for name in types_by_name})

    values: dict[str, Any] = {}
    config_file = None
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"unexpected argument {token!r} (options look like --field value)")
        key, has_eq, inline = token[2:].partition("=")
        if key == "config":
            if not has_eq:
                if i + 1 >= len(argv):
                    raise ConfigError("--config: expected a JSON file path")
                inline, i = argv[i + 1], i + 1
            config_file = inline
            i += 1
            continue
        negated = key.startswith("no-") and key[3:] in flags and _is_flag(types_by_name[flags[key[3:]]])
        name = flags.get(key[3:] if negated else key)
        if name is None:
            known = sorted(set(flags) | {"config"})
            guess = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean --{guess[0]}?)" if guess else ""
            raise ConfigError(f"unknown option --{key}{hint}")
        tp = types_by_name[name]
        if negated:
            if has_eq:
                raise ConfigError(f"--{key}: takes no value")
            values[name] = False
        elif _is_flag(tp) and not has_eq and (i + 1 >= len(argv) or argv[i + 1].startswith("--")):
            values[name] = True  # a bare --flag
        else:
            if not has_eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"--{key}: expected a value ({_type_name(tp)})")
                inline, i = argv[i + 1], i + 1
            values[name] = _from_string(f"--{key}", tp, inline)
        i += 1

    base = load_config(cls, config_file) if config_file is not None else cls()
    config = dataclasses.replace(base, **values)
    config.validate()
    return config


# --------------------------------------------------------------------------------------------
# JSON


def config_to_dict(config) -> dict:
    out = {}
    for name in _field_types(type(config)):
        value = getattr(config, name)
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


def save_config(config, path: str | os.PathLike) -> None:
    """Write ``config`` as JSON (with its class name, checked on load)."""
    data = {"_config_class": f"{type(config).__module__}:{type(config).__qualname__}", **config_to_dict(config)}
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")


def load_config(cls, path: str | os.PathLike, strict: bool = True):
    """Read a config saved by :func:`save_config` into ``cls``, type-checking every field.

    Fields missing from the file take their defaults. With ``strict`` an unknown field is an error
    (a config saved by another family); otherwise it is ignored.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"--config: no such file {path}")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of config fields")
    types_by_name = _field_types(cls)
    values = {}
    for key, value in data.items():
        if key.startswith("_"):
            continue
        if key not in types_by_name:
            if strict:
                saved = data.get("_config_class", "another config")
                raise ConfigError(f"{path}: field {key!r} is not an option of {cls.__name__} (saved from {saved})")
            continue
        values[key] = _check_json_value(f"{path}: field {key!r}", types_by_name[key], value)
    config = cls(**values)
    try:
        config.validate()
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return config


def resolve_config_class(path: str | os.PathLike):
    """The config class named by ``_config_class`` in a saved config (imports its module)."""
    import importlib

    with open(path) as f:
        name = json.load(f).get("_config_class")
    if not name or ":" not in name:
        raise ConfigError(f"{path}: no _config_class recorded")
    module, qualname = name.split(":", 1)
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj
