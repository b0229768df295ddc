"""Flat typed training configs: the fields, their one conversion chain, and their JSON file.

A family extends :class:`TrainConfig` by subclassing it (flat, no nesting)::

    @dataclass
    class FlowConfig(TrainConfig):
        depth: int = 4
        path: Literal["linear", "cosine"] = "linear"

Every field is a CLI flag (parsed by :mod:`genmod.train.flags`) and a JSON key
(:func:`save_config` / :func:`load_config`); flags, saved configs and presets go through one
conversion chain (:func:`convert_value`).
Supported field types: ``int``, ``float``, ``str``, ``bool``, ``Literal[...]`` (choices),
``Optional[X]`` (flag value ``none``), ``tuple[X, ...]``/``tuple[X, Y]``/``list[X]``
(comma-separated). Every mistake is a one-line :class:`ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Optional

__all__ = ["ConfigError", "TrainConfig", "save_config", "load_config", "read_config_values", "convert_value",
           "RENAMED_FIELDS"]


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
    # several processes: ddp = full replicas (DDP); fsdp = FSDP2 shards per transformer block (genmod.train.sharding)
    distributed: Literal["ddp", "fsdp"] = "ddp"
    # speed switches (docs/scale/speed.md): torch.compile the model; recompute transformer blocks in backward
    compile: bool = False
    gradient_checkpointing: bool = False
    # EMA of the weights; 0 = off (genmod.train.ema). Warmup (diffusers' EMAModel, Karras' EMA warmup):
    # decay_t <= 1 - (1 + t/inv_gamma)^-power, an averaging window that grows with the run (on by default since
    # issue 19: measured better than a constant decay in short runs); bias correction (Adam's): no schedule
    # keeps a share of the initial weights
    ema_decay: float = 0.9999
    ema_bias_correction: bool = True
    ema_warmup: bool = True
    ema_inv_gamma: float = 1.0
    ema_power: float = 0.75
    # checkpoints, previews and logs (every N optimizer steps; 0 = off)
    checkpoint_every: int = 500
    keep_last: int = 3  # checkpoints kept; 0 = keep all
    sample_every: int = 500
    num_preview: int = 16
    log_every: int = 10
    report_to: Literal["tensorboard", "wandb", "none"] = "tensorboard"  # Accelerate tracker of the scalars
    tensorboard: Optional[bool] = None  # old switch: --no-tensorboard means --report_to none
    resume: Optional[str] = None  # None, "latest" or a checkpoint path
    # fine-tune: start from a model folder (config.json + safetensors) or a pipeline folder's generator,
    # e.g. one written by `genmod import` (the family's flags must describe the same architecture)
    init_weights: Optional[str] = None
    # devices and data
    cpu: bool = False
    num_workers: int = 0
    dataset: str = "shapes"
    dataset_split: str = "train"
    dataset_size: Optional[int] = None  # number of samples for datasets that take `num_samples`
    resolution: Optional[int] = None  # image side for image_folder / webdataset images (resize + crop)
    random_crop: bool = False  # random instead of center crops, seeded per (seed, epoch, item)
    random_flip: bool = False  # horizontal flips with probability 1/2, seeded the same way

    def trackers(self) -> list[str]:
        """The Accelerate trackers of the run: ``report_to``, with the old ``--no-tensorboard`` meaning none."""
        if self.tensorboard is False and self.report_to == "tensorboard":
            return []
        return [] if self.report_to == "none" else [self.report_to]

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
        check_finite(self)
        for name in ("ema_inv_gamma", "ema_power"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name}: must be > 0, got {getattr(self, name)}")
        for name in ("dataset_size", "resolution"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name}: must be >= 1, got {getattr(self, name)}")
        if self.dataset_size is not None and self.dataset_size > MAX_DATASET_SIZE:
            raise ConfigError(f"--dataset_size: must be <= {MAX_DATASET_SIZE} (built-in datasets draw every item up "
                              f"front, ~9 s per 100000), got {self.dataset_size}")
        for name in ("dataset", "resume", "init_weights"):
            value = getattr(self, name)
            if value is not None and (not value.strip() or "\x00" in value):
                raise ConfigError(f"--{name}: must be a name or path, got {value!r}")


MAX_DATASET_SIZE = 1_000_000  # --dataset_size cap (issue 15: 1e30 used to build forever)


MAX_INT_FIELD = 2**31 - 1  # sizes, counts and steps past this are typos (1e30), and overflow torch's shapes


def check_finite(config) -> None:
    """Every float field (and every float in a tuple field) is finite: NaN / inf are one-line errors; every
    int field (but the seed; --dataset_size has its own cap) is at most :data:`MAX_INT_FIELD`."""
    for name, value in vars(config).items():
        values = value if isinstance(value, (tuple, list)) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ConfigError(f"--{name}: must be a finite number, got {value}")
        if name not in ("seed", "dataset_size") and any(isinstance(v, int) and not isinstance(v, bool) and v > MAX_INT_FIELD for v in values):
            raise ConfigError(f"--{name}: must be <= {MAX_INT_FIELD}, got {value}")


def check_at_least(config, low, *names: str) -> None:
    """``--name: must be >= low`` for each named numeric field (None skipped)."""
    for name in names:
        value = getattr(config, name)
        if value is not None and not value >= low:
            raise ConfigError(f"--{name}: must be >= {low}, got {value}")


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


def convert_value(where: str, tp, value, from_cli: bool):
    """One value -> the field type ``tp``: a CLI string (parsed) or a JSON value (type-checked).

    The one conversion chain of flags, saved configs and presets; ``where`` prefixes every error
    (``--lr`` for a flag, ``FILE: field 'lr'`` for JSON).
    """
    optional, inner = _is_optional(tp)
    if optional:
        is_none = value.strip().lower() in ("none", "null") if from_cli else value is None
        return None if is_none else convert_value(where, inner, value, from_cli)
    origin = typing.get_origin(tp)
    if origin is Literal:
        return _convert_choice(where, typing.get_args(tp), value, from_cli)
    if origin in (tuple, list):
        return _convert_sequence(where, tp, value, from_cli)
    if tp in _JSON_TYPES:
        return _parse_scalar(where, tp, value) if from_cli else _check_json_scalar(where, tp, value)
    raise ConfigError(f"{where}: unsupported field type {tp!r}")


def _convert_choice(where: str, choices: tuple, value, from_cli: bool):
    if from_cli:
        found = [choice for choice in choices if str(choice) == value]
    else:  # JSON: the value itself, with True never standing in for 1
        found = [c for c in choices if c == value and isinstance(c, bool) == isinstance(value, bool)]
    if not found:
        raise ConfigError(f"{where}: invalid choice {value!r} (choose from {', '.join(repr(c) for c in choices)})")
    return found[0]


def _convert_sequence(where: str, tp, value, from_cli: bool):
    """``tuple[X, ...]``, ``tuple[X, Y]`` or ``list[X]``: comma-separated on the CLI, a list in JSON."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if from_cli:
        items = [p.strip() for p in value.split(",")] if value.strip() else []
    elif isinstance(value, list):
        items = value
    else:
        raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(items) != len(args):
            got = repr(value) if from_cli else len(items)
            raise ConfigError(f"{where}: expected {len(args)}{' comma-separated' if from_cli else ''} values, got {got}")
        elem_types = list(args)
    else:
        elem_types = [args[0] if args else (str if from_cli else Any)] * len(items)
    out = [v if t is Any else convert_value(where, t, v, from_cli) for t, v in zip(elem_types, items)]
    return tuple(out) if origin is tuple else out


_JSON_TYPES = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}  # JSON types a scalar field takes


def _check_json_scalar(where: str, tp, value):
    """A JSON value of a scalar field: the right type (True is not an int), ints widened to float."""
    if not isinstance(value, _JSON_TYPES[tp]) or (tp is not bool and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return float(value) if tp is float else value


def _parse_scalar(where: str, tp, text: str):
    """A CLI string of a scalar field; ints may be written ``1e3`` when whole."""
    if tp is str:
        return text
    if tp is bool:
        low = text.strip().lower()
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
        raise ConfigError(f"{where}: expected true/false, got {text!r}")
    try:
        number = float(text)
    except ValueError:
        number = None
    if tp is float and number is not None:
        return number
    if tp is int and number is not None and number.is_integer():
        return int(text) if text.strip().lstrip("+-").isdigit() else int(number)
    raise ConfigError(f"{where}: expected {tp.__name__}, got {text!r}")


def _check_instance_types(config) -> None:
    """Type-check (and normalise) the fields of a config built in Python, as if read from JSON."""
    for name, tp in _field_types(type(config)).items():
        value = getattr(config, name)
        as_json = list(value) if isinstance(value, tuple) else value
        setattr(config, name, convert_value(f"--{name}", tp, as_json, from_cli=False))


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


# Fields renamed to their pipeline keyword (one name per setting); configs saved before still load.
RENAMED_FIELDS = {
    "sample_steps": "num_inference_steps",
    "sample_ar_steps": "num_ar_steps",
    "sample_solver": "solver",
    "sample_schedule": "schedule",
    "sample_slope": "slope",
}


def read_config_values(cls, path: str | os.PathLike, strict: bool = True) -> dict:
    """The type-checked ``{field: value}`` of a JSON config file (saved config or preset) for ``cls``.

    Keys starting with ``_`` are notes; old names in :data:`RENAMED_FIELDS` map to the new ones. With
    ``strict`` a field ``cls`` does not have is an error (a config of another family), else ignored.
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
        key = RENAMED_FIELDS.get(key, key) if RENAMED_FIELDS.get(key) in types_by_name else key
        if key not in types_by_name:
            if strict:
                saved = data.get("_config_class", "another config")
                raise ConfigError(f"{path}: field {key!r} is not an option of {cls.__name__} (saved from {saved})")
            continue
        values[key] = convert_value(f"{path}: field {key!r}", types_by_name[key], value, from_cli=False)
    return values


def load_config(cls, path: str | os.PathLike, strict: bool = True):
    """Read a config saved by :func:`save_config` into ``cls``, type-checking every field.

    Fields missing from the file take their defaults (see :func:`read_config_values`).
    """
    config = cls(**read_config_values(cls, path, strict))
    try:
        config.validate()
    except ConfigError as err:
        raise ConfigError(f"{os.fspath(path)}: {err}") from None
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
