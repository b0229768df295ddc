"""Issue 19, defaults that work: the flow defaults are the measured first-run recipe (docs/RESULTS.md,
"Issue 19: defaults that work"), and every generator family's ``--help`` says what its first run gives."""

from __future__ import annotations

import importlib

import pytest

from genmod.families import FAMILIES
from genmod.train import config_help, get_family
from genmod.train.first_runs import FIRST_RUNS

GENERATORS = [row for row in FAMILIES if row.pipeline]


def test_flow_defaults_are_the_measured_first_run():
    """`genmod train flow --dataset shapes --cpu` with no other flag trains the run of the RESULTS table
    (benchmarks/results/defaults/: the U-Net 32-64-64, logit-normal t, batch 32, lr 1e-3 with 100 warmup
    steps and cosine decay, 2000 steps, EMA 0.999 with warmup and bias correction; `--backbone dit` is the
    DiT 128 x 4, patch 4, of the same table)."""
    from genmod.flow.family import FlowConfig

    config = FlowConfig(dataset="shapes", cpu=True)
    measured = dict(backbone="unet", unet_channels=(32, 64, 64), hidden_size=128, depth=4, num_heads=4, patch_size=4,
                    time_sampling="logit_normal",
                    batch_size=32, lr=1e-3, warmup_steps=100, lr_schedule="cosine", max_steps=2000, ema_decay=0.999,
                    ema_bias_correction=True, ema_warmup=True)
    assert {key: getattr(config, key) for key in measured} == measured


@pytest.mark.parametrize("row", GENERATORS, ids=[row.name for row in GENERATORS])
def test_every_generator_family_help_states_its_first_run(row):
    importlib.import_module(row.module)
    config_class = get_family(row.name).config_class
    note = FIRST_RUNS[config_class.__name__]
    assert note.startswith("first run:") and "CPU-minutes" in note
    assert config_help(config_class).splitlines()[0] == note
