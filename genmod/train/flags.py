"""The command line of a training config: ``--field value`` flags, ``--preset``, ``--config``, ``--help``.

``parse_config(FlowConfig, ["--lr", "3e-4", "--depth=6", "--no-tensorboard"])`` builds a config
from flags; ``--preset NAME`` (a recipe under ``genmod/presets/<family>/``) and ``--config
run/train_config.json`` (a saved config) give starting values that the other flags override.
Every value goes through the conversion chain of :mod:`genmod.train.config`
(:func:`~genmod.train.config.convert_value`); every mistake is a one-line ``ConfigError``.
"""

from __future__ import annotations

import difflib
from typing import Any, Optional

from .config import ConfigError, _field_types, _is_flag, _type_name, convert_value, read_config_values

__all__ = ["parse_config", "config_help"]


def config_help(cls, presets: Optional[dict] = None) -> str:
    """One line per field (flag, type, default), then the names of ``presets`` if there are any."""
    from .first_runs import first_run_note

    note = first_run_note(cls)
    lines = [note, ""] if note else []
    lines.append(f"options of {cls.__name__} (every field is a flag; --config FILE.json loads a saved config):")
    defaults = cls()
    for name, tp in _field_types(cls).items():
        default = getattr(defaults, name)
        if isinstance(default, (tuple, list)):
            default = ",".join(str(v) for v in default)
        flag = f"--{name}" + ("/--no-" + name if _is_flag(tp) else "")
        lines.append(f"  {flag:<34} {_type_name(tp):<40} default: {default}")
    if presets:
        lines.append(f"presets (--preset NAME; flags override it): {', '.join(sorted(presets))}")
    return "\n".join(lines)


def _take_value(argv: list[str], i: int, key: str, what: str) -> tuple[str, int]:
    if i + 1 >= len(argv):
        raise ConfigError(f"--{key}: expected {what}")
    return argv[i + 1], i + 1


def _parse_flags(cls, argv: list[str]) -> tuple[dict, Optional[str], Optional[str]]:
    """``(field values, --config file, --preset name)`` from ``--field value`` style flags."""
    types_by_name = _field_types(cls)
    flags = {name.replace("_", "-"): name for name in types_by_name}  # accept --max-steps too
    flags.update({name: name for name in types_by_name})
    values: dict[str, Any] = {}
    sources = {"config": None, "preset": None}
    i = 0
    while i < len(argv):
        # 1. one token: --key, --key=value, or a stray positional
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"unexpected argument {token!r} (options look like --field value)")
        key, has_eq, inline = token[2:].partition("=")
        # 2. --config FILE / --preset NAME pick the starting values
        if key in sources:
            if not has_eq:
                inline, i = _take_value(argv, i, key, "a JSON file path" if key == "config" else "a preset name")
            sources[key] = inline
            i += 1
            continue
        # 3. a field flag: bare --flag / --no-flag for booleans, else a value converted by its type
        name, negated = _flag_name(key, flags, types_by_name)
        tp = types_by_name[name]
        if negated:
            if has_eq:
                raise ConfigError(f"--{key}: takes no value")
            values[name] = False
        elif _is_flag(tp) and not has_eq and (i + 1 >= len(argv) or argv[i + 1].startswith("--")):
            values[name] = True
        else:
            if not has_eq:
                inline, i = _take_value(argv, i, key, f"a value ({_type_name(tp)})")
            values[name] = convert_value(f"--{key}", tp, inline, from_cli=True)
        i += 1
    return values, sources["config"], sources["preset"]


def _flag_name(key: str, flags: dict, types_by_name: dict) -> tuple[str, bool]:
    """The field a flag names and whether it is a ``--no-`` form; unknown flags suggest a near name."""
    negated = key.startswith("no-") and key[3:] in flags and _is_flag(types_by_name[flags[key[3:]]])
    name = flags.get(key[3:] if negated else key)
    if name is None:
        guess = difflib.get_close_matches(key, sorted(set(flags) | {"config", "preset"}), n=1)
        hint = f" (did you mean --{guess[0]}?)" if guess else ""
        raise ConfigError(f"unknown option --{key}{hint}")
    return name, negated


def parse_config(cls, argv: list[str] | None = None, presets: Optional[dict] = None):
    """Build ``cls`` from ``--field value`` / ``--field=value`` / ``--flag`` / ``--no-flag`` flags.

    Layers, later wins: the class defaults, ``--preset NAME`` (one of ``presets``, ``{name: JSON
    path}``: the family's recipes, ``genmod.presets.preset_files(family)``), ``--config FILE`` (a saved
    config), then the other flags, wherever they stand in argv. ``-h``/``--help`` prints
    :func:`config_help` and exits with 0.
    """
    argv = list(argv or [])
    if "-h" in argv or "--help" in argv:
        print(config_help(cls, presets))
        raise SystemExit(0)
    flag_values, config_file, preset = _parse_flags(cls, argv)
    values = {}
    if preset is not None:
        values.update(read_config_values(cls, _preset_file(cls, preset, presets or {})))
    if config_file is not None:
        values.update(read_config_values(cls, config_file))
    config = cls(**{**values, **flag_values})
    config.validate()
    check_start_paths(config)
    return config


def check_start_paths(config) -> None:
    """``--resume PATH`` and ``--init_weights PATH`` exist and are the right kind of folder, checked when the
    flags are parsed (before the dataset, the model or the output folder): one line naming the flag."""
    import os

    resume = getattr(config, "resume", None)
    if resume not in (None, "latest"):
        if not os.path.exists(resume):
            raise ConfigError(f"--resume: no such checkpoint {resume!r} (give 'latest' or a checkpoint folder)")
        marks = ("trainer_state.json", "latest", os.path.join("checkpoints", "latest"))
        if not os.path.isdir(resume) or not any(os.path.isfile(os.path.join(resume, m)) for m in marks):
            raise ConfigError(f"--resume: {resume} is not a checkpoint folder (no trainer_state.json, no checkpoints/latest)")
    init = getattr(config, "init_weights", None)
    if init is not None:
        if not os.path.isdir(init):
            raise ConfigError(f"--init_weights: {init!r} is not a folder (a model folder or a pipeline folder)")
        if not any(os.path.isfile(os.path.join(init, m)) for m in ("config.json", "model_index.json")):
            raise ConfigError(f"--init_weights: {init} holds neither config.json nor model_index.json")


def _preset_file(cls, name: str, presets: dict) -> str:
    if name not in presets:
        raise ConfigError(f"--preset: unknown preset {name!r} for {cls.__name__} (known: {', '.join(sorted(presets)) or 'none'})")
    return presets[name]
