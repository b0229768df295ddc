"""The family table, one name per setting, named presets and the one config conversion chain."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
from typing import Literal, Optional

import pytest

from genmod.families import FAMILIES, SAMPLE_OPTIONS, families_taking, family_row
from genmod.presets import PRESETS_DIR, preset_files
from genmod.train import ConfigError, get_family, load_config, parse_config, registered_families
from genmod.train.config import RENAMED_FIELDS, _field_types, convert_value, read_config_values

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENERATORS = [row for row in FAMILIES if row.module]


def _import(path: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


# ---------------------------------------------------------------------------------------------
# the table


@pytest.mark.parametrize("row", GENERATORS, ids=lambda row: row.name)
def test_table_row_matches_what_its_module_registers(row):
    importlib.import_module(row.module)
    entry = get_family(row.name)
    assert entry.name == row.name
    assert entry.factory.__module__ == row.module  # the family class lives in the registering module
    package = row.module.rpartition(".")[0]
    assert entry.config_class.__module__.startswith(package + ".")  # and its config in the family's package


def test_every_registered_family_has_a_row():
    for row in GENERATORS:
        importlib.import_module(row.module)
    assert set(registered_families()) <= {row.name for row in FAMILIES}


@pytest.mark.parametrize("row", [r for r in FAMILIES if r.pipeline], ids=lambda row: row.name)
def test_every_exposed_sample_keyword_is_a_pipeline_keyword(row):
    pipeline = _import(row.pipeline)
    params = inspect.signature(pipeline.__call__).parameters
    for keyword in row.sample_options:
        assert keyword in SAMPLE_OPTIONS, keyword
        assert keyword in params, f"{row.pipeline_class}.__call__ has no {keyword!r}"
        annotation, parse = str(params[keyword].annotation), SAMPLE_OPTIONS[keyword].type
        name = parse.__name__ if isinstance(parse, type) else str(inspect.signature(parse).return_annotation)
        assert name in annotation or annotation == "<class 'inspect._empty'>"  # a parser: its return type
    if row.scheduler_options:  # flow: the solver is a field of the scheduler its family exports
        from genmod.flow.scheduler import FlowMatchSolverScheduler

        assert row.name == "flow"
        for keyword in row.scheduler_options:
            assert keyword in FlowMatchSolverScheduler().config


def test_cli_and_pipeline_lists_are_derived_from_the_table():
    from genmod import cli, pipelines, sampling

    assert cli.FAMILY_MODULES == {
        "flow": "genmod.flow.family", "tokenizer": "genmod.tokenizer.family", "var": "genmod.var.family",
        "latentlm": "genmod.latentlm.family", "diffusion-forcing": "genmod.diffusion_forcing.family",
        "causalfusion": "genmod.causalfusion.family"}
    assert cli.SPECIAL_TRAINERS == {"feature-net": ("genmod.evals.feature_net", "main")}
    assert pipelines.PIPELINE_MODULES == {
        "FlowMatchingPipeline": "genmod.flow.pipeline", "VARPipeline": "genmod.var.pipeline",
        "LatentLMPipeline": "genmod.latentlm.pipeline", "DiffusionForcingPipeline": "genmod.diffusion_forcing.pipeline",
        "CausalFusionPipeline": "genmod.causalfusion.pipeline"}
    assert not hasattr(sampling, "FAMILY_FLAGS")
    assert family_row("var").pipeline_class == "VARPipeline" and family_row("nope") is None


# ---------------------------------------------------------------------------------------------
# one name per setting


@pytest.mark.parametrize("argv, keyword, value", [
    (["--steps", "7"], "num_inference_steps", 7), (["--num-inference-steps", "7"], "num_inference_steps", 7),
    (["--guidance", "2.5"], "guidance_scale", 2.5), (["--guidance-scale", "2.5"], "guidance_scale", 2.5),
    (["--ar-steps", "4"], "num_ar_steps", 4), (["--num-ar-steps", "4"], "num_ar_steps", 4),
    (["--head-steps", "5"], "num_head_steps", 5), (["--frames", "9"], "num_frames", 9),
    (["--context", "2"], "num_context_frames", 2), (["--top-p", "0.9"], "top_p", 0.9), (["--solver", "rk4"], "solver", "rk4"),
    (["--guidance-interval", "0.1,0.9"], "guidance_interval", (0.1, 0.9)),
])
def test_sample_flags_are_the_pipeline_keywords_with_short_aliases(argv, keyword, value):
    from genmod.sampling import build_parser

    args = build_parser().parse_args(["run", *argv])
    assert getattr(args, keyword) == value
    assert all(getattr(args, other) is None for other in SAMPLE_OPTIONS if other != keyword)


def test_sample_flag_of_another_family_is_a_one_line_error():
    from genmod.sampling import _sample_options, build_parser

    class VARPipeline:  # stands in for the loaded pipeline: only its class name is looked up
        pass

    args = build_parser().parse_args(["run", "--ar-steps", "4"])
    with pytest.raises(ValueError, match=r"^--num-ar-steps: VARPipeline does not take this option$"):
        _sample_options(VARPipeline(), args)
    args = build_parser().parse_args(["run", "--top-k", "5", "--steps", "6"])
    assert _sample_options(VARPipeline(), args) == {"top_k": 5, "num_inference_steps": 6}


@pytest.mark.parametrize("spec", ["0.9,0.1", "0.1", "a,b", "0.1,0.5,0.9", "-0.1,0.5", "0.2,1.5"])
def test_bad_guidance_interval_is_one_line(spec, capsys):
    from genmod.sampling import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--guidance-interval", spec])
    assert "argument --guidance-interval: " in capsys.readouterr().err


def test_guidance_interval_is_taken_by_every_ode_family_with_guidance():
    assert families_taking("guidance_interval") == ["flow", "latentlm", "diffusion-forcing", "causalfusion"]


def test_flow_solver_flag_is_set_on_the_scheduler():
    from genmod.flow.scheduler import FlowMatchSolverScheduler
    from genmod.sampling import _apply_scheduler_options, _sample_options, build_parser

    class FlowMatchingPipeline:  # the flow row: --solver goes to the scheduler, not to __call__
        scheduler = FlowMatchSolverScheduler(solver="heun")

    pipe, args = FlowMatchingPipeline(), build_parser().parse_args(["run", "--solver", "rk4", "--steps", "3"])
    _apply_scheduler_options(pipe, args)
    assert pipe.scheduler.config.solver == "rk4" and args.solver is None
    assert _sample_options(pipe, args) == {"num_inference_steps": 3}


@pytest.mark.parametrize("row", GENERATORS, ids=lambda row: row.name)
def test_config_sampling_fields_use_the_pipeline_keyword_names(row):
    importlib.import_module(row.module)
    fields = set(_field_types(get_family(row.name).config_class))
    assert not fields & set(RENAMED_FIELDS), "an old sampling name is still a config field"
    for old, new in RENAMED_FIELDS.items():
        assert new in SAMPLE_OPTIONS or new in ("slope",), (old, new)


def test_saved_config_with_old_field_names_still_loads(tmp_path):
    from genmod.causalfusion.family import CausalFusionConfig
    from genmod.diffusion_forcing.family import DiffusionForcingConfig

    saved = os.path.join(ROOT, "benchmarks", "results", "diffusion_forcing_unet", "train_config.json")
    with open(saved) as f:
        assert "sample_steps" in json.load(f)  # written before the rename
    config = load_config(DiffusionForcingConfig, saved)
    assert (config.num_inference_steps, config.schedule, config.slope, config.backbone) == (20, "pyramid", 1.0, "unet")
    path = tmp_path / "train_config.json"
    path.write_text(json.dumps({"sample_steps": 8, "sample_ar_steps": 2, "sample_solver": "heun", "depth": 3}))
    config = load_config(CausalFusionConfig, path)
    assert (config.num_inference_steps, config.num_ar_steps, config.solver, config.depth) == (8, 2, "heun", 3)
    path.write_text(json.dumps({"sample_solver": "rk5"}))
    with pytest.raises(ConfigError, match=r"field 'solver': invalid choice 'rk5'"):
        load_config(CausalFusionConfig, path)


# ---------------------------------------------------------------------------------------------
# presets


VAR_PRESETS = preset_files("var")


def _all_presets():
    for row in GENERATORS:
        for name, path in preset_files(row.name).items():
            yield row, name, path


def test_preset_folders_are_families():
    folders = {d for d in os.listdir(PRESETS_DIR) if os.path.isdir(os.path.join(PRESETS_DIR, d)) and d != "__pycache__"}
    assert folders <= {row.name for row in GENERATORS}
    assert len(list(_all_presets())) >= 11


@pytest.mark.parametrize("row, name, path", list(_all_presets()), ids=[f"{r.name}/{n}" for r, n, _ in _all_presets()])
def test_every_preset_parses_and_its_values_land_in_the_config(row, name, path):
    importlib.import_module(row.module)
    cls = get_family(row.name).config_class
    with open(path) as f:
        data = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    config = parse_config(cls, ["--preset", name], presets=preset_files(row.name))
    for key, value in data.items():
        got = getattr(config, key)
        assert (list(got) if isinstance(got, tuple) else got) == value, key
    assert read_config_values(cls, path) == {k: getattr(config, k) for k in data}


def test_flags_override_the_preset_and_unknown_presets_list_the_known():
    from genmod.var.family import VARConfig

    config = parse_config(VARConfig, ["--depth", "5", "--preset", "shapes-recognisable", "--lr=2e-3"], presets=VAR_PRESETS)
    assert (config.depth, config.lr, config.width, config.max_steps) == (5, 2e-3, 128, 3500)
    with pytest.raises(ConfigError, match=r"^--preset: unknown preset 'shapes' for VARConfig \(known: shapes-recognisable\)$"):
        parse_config(VARConfig, ["--preset", "shapes"], presets=VAR_PRESETS)
    with pytest.raises(ConfigError, match=r"^--preset: expected a preset name$"):
        parse_config(VARConfig, ["--preset"], presets=VAR_PRESETS)


def test_saved_config_overrides_the_preset_and_flags_override_both(tmp_path):
    from genmod.train import save_config
    from genmod.var.family import VARConfig

    save_config(VARConfig(tokenizer="tok", depth=3, lr=5e-3), tmp_path / "c.json")
    config = parse_config(VARConfig, ["--preset", "shapes-recognisable", "--config", str(tmp_path / "c.json"), "--depth", "2"],
                          presets=VAR_PRESETS)
    assert (config.depth, config.lr, config.tokenizer, config.width) == (2, 5e-3, "tok", None)


def test_train_help_lists_the_presets_and_a_bad_preset_is_one_line(capsys):
    from genmod.cli import main

    with pytest.raises(SystemExit) as info:
        main(["train", "latentlm", "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "presets (--preset NAME; flags override it): shapes-text-to-image, speech-tts" in out
    assert main(["train", "var", "--preset", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "genmod train: error: --preset: unknown preset 'nope' for VARConfig (known: shapes-recognisable)"


def test_config_without_a_family_has_no_presets():
    from genmod.train import TrainConfig

    with pytest.raises(ConfigError, match=r"known: none"):
        parse_config(TrainConfig, ["--preset", "x"])


def test_readme_preset_commands_name_shipped_presets():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    found = re.findall(r"genmod train ([\w-]+) --preset ([\w-]+)", text)
    assert len(found) >= 7
    for family, name in found:
        assert name in preset_files(family), (family, name)


def test_demo_config_is_the_flow_demo_preset():
    """``genmod demo`` trains the preset recipe (it used to spell it out in Python)."""
    from genmod.demo import build_parser, demo_config
    from genmod.flow.family import FlowConfig

    config = demo_config(build_parser().parse_args(["--out", "x", "--guidance", "3"]))
    expected = FlowConfig(
        output_dir=os.path.join("x", "train"), dataset="shapes", max_steps=1500, batch_size=32, lr=1e-3,
        warmup_steps=100, lr_schedule="cosine", ema_decay=0.995, backbone="unet", unet_channels=(32, 64, 64),
        checkpoint_every=500, sample_every=500, log_every=25, cpu=config.cpu, num_inference_steps=16,
        guidance_scale=3.0, resume=None)
    assert config == expected


# ---------------------------------------------------------------------------------------------
# one conversion chain


@pytest.mark.parametrize("tp, text, json_value, expected", [
    (int, "1e3", 1000, 1000),
    (float, "3", 3, 3.0),
    (bool, "off", False, False),
    (Optional[int], "none", None, None),
    (Optional[bool], "yes", True, True),
    (Literal["a", "b"], "b", "b", "b"),
    (tuple[float, float], "0.9, 0.95", [0.9, 0.95], (0.9, 0.95)),
    (tuple[int, ...], "1,2,3", [1, 2, 3], (1, 2, 3)),
    (list[int], "", [], []),
])
def test_cli_text_and_json_values_convert_to_the_same_value(tp, text, json_value, expected):
    from_cli = convert_value("--x", tp, text, from_cli=True)
    from_json = convert_value("f: field 'x'", tp, json_value, from_cli=False)
    assert from_cli == from_json == expected and type(from_cli) is type(expected)


@pytest.mark.parametrize("tp, value, message", [
    (int, "3", "f: expected int, got str '3'"),
    (float, True, "f: expected float, got bool True"),
    (tuple[int, int], [1], "f: expected 2 values, got 1"),
    (list[int], "1,2", "f: expected a list, got str '1,2'"),
    (Literal[1, 2], True, "f: invalid choice True (choose from 1, 2)"),
])
def test_json_values_are_type_checked_not_parsed(tp, value, message):
    with pytest.raises(ConfigError) as info:
        convert_value("f", tp, value, from_cli=False)
    assert str(info.value) == message
