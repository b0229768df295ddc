"""Typed configs: flags, JSON round trips and one-line errors naming the field."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from genmod.train import ConfigError, TrainConfig, config_help, load_config, parse_config, save_config


@dataclass
class FlowLikeConfig(TrainConfig):
    depth: int = 4
    path: Literal["linear", "cosine", "vp"] = "linear"
    class_dropout: float = 0.1
    channels: list[int] = field(default_factory=lambda: [32, 64])
    shift: Optional[float] = None


def test_flags_of_every_type_parse():
    config = parse_config(FlowLikeConfig, [
        "--lr", "3e-4", "--depth=6", "--path", "cosine", "--no-tensorboard", "--cpu", "--ema_warmup", "true",
        "--adam_betas", "0.9,0.95", "--channels=16,32,64", "--shift", "3", "--resume", "latest",
        "--max-steps", "1e3"])
    assert config.lr == 3e-4 and config.depth == 6 and config.path == "cosine"
    assert config.tensorboard is False and config.cpu is True and config.ema_warmup is True
    assert config.adam_betas == (0.9, 0.95) and config.channels == [16, 32, 64]
    assert config.shift == 3.0 and config.resume == "latest" and config.max_steps == 1000
    assert parse_config(FlowLikeConfig, ["--shift", "none"]).shift is None
    assert parse_config(FlowLikeConfig, ["--cpu", "--seed", "3"]).cpu is True  # bare bool before a flag


@pytest.mark.parametrize("argv, message", [
    (["--lrr", "1e-3"], "unknown option --lrr (did you mean --lr?)"),
    (["--lr", "abc"], "--lr: expected float, got 'abc'"),
    (["--depth", "2.5"], "--depth: expected int, got '2.5'"),
    (["--mixed_precision", "fp8"], "--mixed_precision: invalid choice 'fp8' (choose from 'no', 'bf16', 'fp16')"),
    (["--path", "sde"], "--path: invalid choice 'sde' (choose from 'linear', 'cosine', 'vp')"),
    (["--cpu", "maybe"], "--cpu: expected true/false, got 'maybe'"),
    (["--adam_betas", "0.9"], "--adam_betas: expected 2 comma-separated values, got '0.9'"),
    (["--batch_size", "0"], "--batch_size: must be > 0, got 0"),
    (["--ema_decay", "1.5"], "--ema_decay: must be in [0, 1), got 1.5"),
    (["--lr"], "--lr: expected a value (float)"),
    (["positional"], "unexpected argument 'positional' (options look like --field value)"),
])
def test_bad_flags_are_one_line_errors_naming_the_field(argv, message):
    with pytest.raises(ConfigError) as info:
        parse_config(FlowLikeConfig, argv)
    assert str(info.value) == message


def test_json_round_trip_and_config_file_with_overrides(tmp_path):
    config = parse_config(FlowLikeConfig, ["--depth", "8", "--adam_betas", "0.8,0.9", "--shift", "2.5"])
    path = tmp_path / "train_config.json"
    save_config(config, path)
    data = json.loads(path.read_text())
    assert data["_config_class"].endswith(":FlowLikeConfig") and data["adam_betas"] == [0.8, 0.9]
    assert load_config(FlowLikeConfig, path) == config  # tuples come back as tuples
    again = parse_config(FlowLikeConfig, ["--lr", "1e-3", "--config", str(path)])  # flags win wherever they are
    assert again.depth == 8 and again.lr == 1e-3 and again.shift == 2.5


def test_mismatched_saved_config_names_file_and_field(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"depth": "deep"}))
    with pytest.raises(ConfigError, match=rf"^{path}: field 'depth': expected int, got str 'deep'$"):
        load_config(FlowLikeConfig, path)
    path.write_text(json.dumps({"lr": True}))
    with pytest.raises(ConfigError, match=r"field 'lr': expected float, got bool True"):
        load_config(FlowLikeConfig, path)
    path.write_text(json.dumps({"depth": 4, "codebook_size": 512, "_config_class": "x:TokConfig"}))
    with pytest.raises(ConfigError, match=r"field 'codebook_size' is not an option of FlowLikeConfig \(saved from x:TokConfig\)"):
        load_config(FlowLikeConfig, path)
    assert load_config(FlowLikeConfig, path, strict=False).depth == 4
    path.write_text(json.dumps({"path": "sde"}))
    with pytest.raises(ConfigError, match=r"field 'path': invalid choice 'sde'"):
        load_config(FlowLikeConfig, path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=rf"^{path}: invalid JSON"):
        load_config(FlowLikeConfig, path)
    with pytest.raises(ConfigError, match="--config: no such file"):
        parse_config(FlowLikeConfig, ["--config", str(tmp_path / "missing.json")])


def test_help_lists_every_field(capsys):
    text = config_help(FlowLikeConfig)
    for name in ("--lr", "--depth", "--tensorboard/--no-tensorboard", "one of 'linear', 'cosine', 'vp'"):
        assert name in text
    with pytest.raises(SystemExit) as info:
        parse_config(FlowLikeConfig, ["--help"])
    assert info.value.code == 0 and "--class_dropout" in capsys.readouterr().out


def test_optional_bool_takes_flag_forms_and_keeps_none_as_auto():
    """``Optional[bool]`` fields: --flag, --no-flag, --flag none; the msvq tokenizer resolves none to cosine codes."""
    from genmod.tokenizer import TokenizerConfig, resolved_cosine

    assert parse_config(TokenizerConfig, []).cosine is None
    assert parse_config(TokenizerConfig, ["--cosine"]).cosine is True
    assert parse_config(TokenizerConfig, ["--no-cosine"]).cosine is False
    assert parse_config(TokenizerConfig, ["--cosine", "none"]).cosine is None
    assert resolved_cosine(parse_config(TokenizerConfig, ["--quantizer", "msvq"])) is True
    assert resolved_cosine(parse_config(TokenizerConfig, ["--quantizer", "msvq", "--no-cosine"])) is False
    assert resolved_cosine(parse_config(TokenizerConfig, ["--quantizer", "vq"])) is False
