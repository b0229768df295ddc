"""Bounded fuzzing of ``genmod sample`` and ``genmod train flow`` (issue 15): for every generated command
line the exit code is 0 or 2, a 2 is one line on stderr and never a traceback, and the input folder (the
pipeline, the ``--config`` file) is unchanged. Fixed seed; ``GENMOD_FUZZ_EXAMPLES=N`` runs N per test.

Valid runs are bounded: a sample run with a count above :data:`CAP` and every accepted ``genmod train``
stop at :class:`Accepted` before the work starts (the sampling and training loops are tested elsewhere);
everything before it (flag parsing, config checks, the family, loading, labels, output paths) runs."""

from __future__ import annotations

import json
import os
import sys

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_hostile_inputs import _tree, pipe_dir, run_cli  # noqa: E402,F401

# GENMOD_FUZZ_PROFILE=long (a benchmark run) draws 10x the examples; GENMOD_FUZZ_EXAMPLES=N sets them outright
LONG = os.environ.get("GENMOD_FUZZ_PROFILE") == "long"
EXAMPLES = int(os.environ.get("GENMOD_FUZZ_EXAMPLES", "400" if LONG else "40"))


def fuzz(examples: int):
    """Hypothesis settings: fixed seed (derandomized), ``examples`` (scaled by the profile), no deadline."""
    count = examples * EXAMPLES // 40
    return settings(max_examples=max(1, count), derandomize=True, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


FUZZ = fuzz(40)

# ---------------------------------------------------------------------------------------------
# The table of docs/RESULTS.md: per verb / loader, the distinct inputs tried and what each gave.
# GENMOD_FUZZ_REPORT=FILE.json writes it when the session ends.

RECORD: dict[str, dict[str, dict]] = {}


def record(target: str, key, outcome: str, damaged: bool = False) -> None:
    """One input of ``target`` (a verb or loader): ``outcome`` is ok / one-line / traceback / other."""
    RECORD.setdefault(target, {})[repr(key)] = {"outcome": outcome, "damaged": damaged}


def _write_record() -> None:
    path = os.environ.get("GENMOD_FUZZ_REPORT")
    if not path or not RECORD:
        return
    table = {target: {"distinct_inputs": len(cases),
                      **{name: sum(c["outcome"] == name for c in cases.values()) for name in ("ok", "one-line", "traceback", "other")},
                      "files_damaged": sum(c["damaged"] for c in cases.values())} for target, cases in sorted(RECORD.items())}
    with open(path, "w") as f:
        json.dump(table, f, indent=1)


import atexit  # noqa: E402

atexit.register(_write_record)
CAP = 4  # largest count a fuzzed sample run really samples

NUMBERS = ["0", "-1", "1", "2", "0.5", "nan", "inf", "-inf", "1e30", "-1e30", "99999999999999999999", "1e-320",
           "abc", "", " ", "0x10", "1_0", "３", "True", "[1]"]
TEXT = ["", " ", ",", "0", "1,2", "-1", "99", "cat", "ünïcødé", "🙂", "0,,1", "nan", "a" * 300, "\u0000"]


class Accepted(Exception):
    """A command that passed every check and would now start its (long) work."""


def _messages(lines: list[str]) -> list[str]:
    """stderr without progress bars (diffusers' loading bar, the sampling bar)."""
    return [line for line in lines if not ("|" in line and "/s]" in line)]


def _check(code: int, lines: list[str], command: str) -> None:
    lines = _messages(lines)
    assert code in (0, 2), (code, lines)
    assert not any("Traceback" in line for line in lines), lines
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith(f"genmod {command}: error: "), lines


def _run(capsys, argv, command, target=None, watch=()):
    """``genmod ARGV`` in process; an :class:`Accepted` counts as exit 0. ``watch``: paths whose files must
    be byte-identical afterwards. The outcome is recorded under ``target`` (default: the verb)."""
    before = [_tree_or_file(path) for path in watch]
    parsed = True
    try:
        code, lines, _ = run_cli(capsys, *argv)
    except Accepted:
        capsys.readouterr()
        code, lines = 0, []
    except SystemExit as err:  # argparse: its usage lines, then one error line; exit 2
        err_lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert err.code in (0, 2) and not any("Traceback" in line for line in err_lines), err_lines
        code, lines, parsed = err.code, err_lines[-1:], False
    except BaseException:
        record(target or command, argv[1:], "traceback")
        raise
    damaged = [str(path) for path, old in zip(watch, before) if _tree_or_file(path) != old]
    one_line = code == 2 and len(_messages(lines)) == 1
    record(target or command, argv[1:], "ok" if code == 0 else "one-line" if one_line else "other", bool(damaged))
    assert not damaged, damaged
    if parsed:
        _check(code, lines, command)
    return code


def _tree_or_file(path):
    path = str(path)
    if os.path.isdir(path):
        return _tree(path)
    return open(path, "rb").read() if os.path.isfile(path) else None


# ---------------------------------------------------------------------------------------------
# Shared by the fuzz files: bad output places and flag values


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """Output paths a user gets wrong: a missing folder, a read-only folder, an existing file, a file as a folder."""
    root = tmp_path_factory.mktemp("places")
    (root / "ro").mkdir()
    os.chmod(root / "ro", 0o555)
    (root / "file.txt").write_text("keep me")
    return {"missing": root / "new" / "deeper", "read-only": root / "ro" / "x", "file": root / "file.txt",
            "under-file": root / "file.txt" / "x", "empty": ""}


def out_paths(places, fresh):
    """A strategy: a fresh path (half the time) or one of the bad places."""
    return st.just(fresh) | st.sampled_from(sorted(places)).map(places.get)


def flag_values(numeric, text, extra=()):
    """Up to three ``(flag, value)`` pairs: numbers (zero, negative, NaN, inf, huge, junk, and fine ones) for the
    numeric flags, empty / unicode / odd text and ``extra`` names for the text flags."""
    pairs = st.tuples(st.sampled_from(numeric), st.sampled_from(NUMBERS)) if numeric else st.nothing()
    if text:
        pairs = pairs | st.tuples(st.sampled_from(text), st.sampled_from(TEXT + list(extra)))
    return st.lists(pairs, min_size=0, max_size=3)


def _flags(pairs):
    return [f"{flag}={value}" for flag, value in pairs]


# ---------------------------------------------------------------------------------------------
# genmod sample

SAMPLE_NUMERIC = ["--num", "--batch-size", "--seed", "--steps", "--guidance"]
SAMPLE_TEXT = ["--class-labels", "--solver"]


@pytest.fixture
def bounded_sampling(monkeypatch):
    import genmod.sampling as sampling

    real = sampling.call_pipeline

    def call(pipe, args, num, start, labels):
        if args.num > CAP or (args.num_inference_steps or 1) > CAP:
            raise Accepted
        return real(pipe, args, num, start, labels)

    monkeypatch.setattr(sampling, "call_pipeline", call)


@FUZZ
@given(flags=st.lists(st.tuples(st.sampled_from(SAMPLE_NUMERIC), st.sampled_from(NUMBERS))
                      | st.tuples(st.sampled_from(SAMPLE_TEXT), st.sampled_from(TEXT)), min_size=1, max_size=3))
def test_fuzz_sample_flags(capsys, pipe_dir, tmp_path_factory, bounded_sampling, flags):
    out = tmp_path_factory.mktemp("out") / "g.png"
    before = _tree(pipe_dir)
    argv = ["sample", pipe_dir, "--out", out, "--num", "2", "--steps", "1", "--device", "cpu"]
    argv += [f"{flag}={value}" for flag, value in flags]
    code = _run(capsys, argv, "sample", watch=[pipe_dir])
    assert _tree(pipe_dir) == before
    if code == 2:
        assert not os.path.exists(out)


# ---------------------------------------------------------------------------------------------
# genmod train flow

TRAIN_NUMERIC = ["--lr", "--max_steps", "--batch_size", "--grad_clip", "--weight_decay", "--ema_decay", "--hidden_size",
                 "--depth", "--num_heads", "--patch_size", "--mlp_ratio", "--class_dropout_prob", "--time_shift",
                 "--num_inference_steps", "--guidance_scale", "--time_budget_minutes", "--adam_eps", "--ema_power",
                 "--ema_inv_gamma", "--dataset_size", "--warmup_steps", "--seed"]
TRAIN_TEXT = ["--dataset", "--path", "--solver", "--backbone", "--adam_betas", "--unet_channels", "--tokenizer",
              "--init_weights", "--resume", "--mixed_precision"]
JSON_VALUES = [None, True, False, 0, -1, 1.5, float("nan"), 1e308, "", "x", "ünï", [], [1, 2], {"a": 1}]
CONFIG_KEYS = ["lr", "max_steps", "hidden_size", "depth", "batch_size", "ema_decay", "solver", "adam_betas",
               "no_such_field", "_config_class", "codebook_size", "num_scales"]


@pytest.fixture
def bounded_training(monkeypatch):
    import genmod.train as train

    class StopAtTrainer:  # the trainer's checks and the network (on the meta device: no memory), no loop
        def __init__(self, config, family):
            import torch

            config.validate()
            if (config.dataset_size or 0) > 64:  # built eagerly: a long run, bounded here
                raise Accepted
            if hasattr(family, "data_shape"):
                shape = family.data_shape()  # the dataset, built for real
                family.data_shape = lambda: shape
            else:
                dataset = family.build_dataset()
                if hasattr(family, "attach_dataset"):
                    family.attach_dataset(dataset)
            try:
                with torch.device("meta"):
                    family.build_model()
            except RuntimeError as err:  # a model that computes with data tensors while built: build it for real
                if "meta" not in str(err):
                    raise
                family.build_model()
            raise Accepted

    monkeypatch.setattr(train, "Trainer", StopAtTrainer)


def _train_argv(folder, flags):
    return ["train", "flow", "--output_dir", os.path.join(folder, "run"), "--max_steps", "1", "--cpu"] + \
        [f"{flag}={value}" for flag, value in flags]


@FUZZ
@given(flags=st.lists(st.tuples(st.sampled_from(TRAIN_NUMERIC), st.sampled_from(NUMBERS))
                      | st.tuples(st.sampled_from(TRAIN_TEXT), st.sampled_from(TEXT)), min_size=1, max_size=3))
def test_fuzz_train_flow_flags(capsys, tmp_path_factory, bounded_training, flags):
    folder = tmp_path_factory.mktemp("train")
    _run(capsys, _train_argv(str(folder), flags), "train", target="train flow")
    assert os.listdir(folder) == []


@FUZZ
@given(config=st.dictionaries(st.sampled_from(CONFIG_KEYS), st.sampled_from(JSON_VALUES), max_size=4)
       | st.sampled_from(JSON_VALUES),
       other_family=st.sampled_from([None, "genmod.var.family.VARConfig", "genmod.tokenizer.family.TokenizerConfig",
                                     "no.such.Config", 3]))
def test_fuzz_train_flow_config_file(capsys, tmp_path_factory, bounded_training, config, other_family):
    folder = tmp_path_factory.mktemp("config")
    if isinstance(config, dict) and other_family is not None:
        config = {**config, "_config_class": other_family}
    path = folder / "config.json"
    path.write_text(json.dumps(config))
    before = _tree(folder)
    _run(capsys, ["train", "flow", "--config", path, "--output_dir", folder / "run", "--max_steps", "1"], "train",
         target="config JSON (train flow)")
    assert _tree(folder) == before
