"""The EMA forgets its initialisation (issue 19): bias correction against Adam's formula, a model whose
weights jump to a constant, warmup combined with correction, and checkpoints saved before the change."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from genmod.train import EMA, Trainer, load_weights
from genmod.train.ema import corrected_decay
from test_trainer import Points, ToyFamily, toy_config


def _jump(model: torch.nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


@pytest.mark.parametrize("decay", [0.9, 0.999, 0.9999])
def test_weights_that_jump_to_a_constant_give_that_constant(decay):
    """Initial weights w0, then every optimizer step leaves the weights at c = 0.75: the corrected EMA is
    c after the first update (no share of w0 at all); the old constant-decay EMA is d^T w0 + (1 - d^T) c."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    w0 = [p.detach().clone() for p in model.parameters()]
    fixed, raw = EMA(model, decay), EMA(model, decay, bias_correction=False)
    _jump(model, 0.75)
    for _ in range(5):
        fixed.update(model)
        raw.update(model)
    for shadow in fixed.shadow:
        torch.testing.assert_close(shadow, torch.full_like(shadow, 0.75), rtol=0, atol=1e-6)
    share = decay ** 5
    for shadow, start in zip(raw.shadow, w0):
        torch.testing.assert_close(shadow, share * start + (1 - share) * 0.75, rtol=0, atol=1e-6)


@pytest.mark.parametrize("decay", [0.9, 0.999])
def test_shadow_equals_adams_bias_corrected_average(decay):
    """Reference (Kingma & Ba 2015, Alg. 1 applied to weights): m_0 = 0, m_t = d m_{t-1} + (1 - d) w_t,
    m_t / (1 - d^t), in float64 over a random weight trajectory; the shadow matches it at every step."""
    generator = torch.Generator().manual_seed(3)
    model = torch.nn.Linear(5, 3)
    ema = EMA(model, decay)
    m = [torch.zeros_like(p, dtype=torch.float64) for p in model.parameters()]
    for t in range(1, 41):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator))
        ema.update(model)
        for i, p in enumerate(model.parameters()):
            m[i] = decay * m[i] + (1 - decay) * p.detach().double()
            torch.testing.assert_close(ema.shadow[i].double(), m[i] / (1 - decay ** t), rtol=1e-5, atol=1e-5)


def test_corrected_decay_formula_and_warmup_takes_the_smaller():
    assert corrected_decay(0.999, 0) == 0.0 and corrected_decay(0.0, 7) == 0.0
    assert corrected_decay(0.5, 1) == pytest.approx(0.5 * 0.5 / 0.75)
    assert corrected_decay(0.9999, 10**7) == pytest.approx(0.9999, abs=1e-15)  # long runs: the plain decay
    model = torch.nn.Linear(2, 2)
    both = EMA(model, 0.9, warmup=True, inv_gamma=1.0, power=0.75)
    for t in range(30):
        warm = 1 - (1 + t) ** -0.75
        assert both.current_decay() == pytest.approx(min(corrected_decay(0.9, t), warm), abs=1e-15)
        both.update(model)


def test_state_dict_without_bias_correction_key_loads():
    """An EMA state saved before the change (no ``bias_correction`` key) loads: count and shadow."""
    model = torch.nn.Linear(3, 2)
    state = EMA(model, 0.99).state_dict()
    state.pop("bias_correction")
    state["num_updates"] = 12
    state["shadow"] = {k: torch.full_like(v, 2.0) for k, v in state["shadow"].items()}
    ema = EMA(model, 0.99)
    ema.load_state_dict(state)
    assert ema.num_updates == 12 and all(torch.equal(s, torch.full_like(s, 2.0)) for s in ema.shadow)
    assert ema.current_decay() == pytest.approx(corrected_decay(0.99, 12))


def test_checkpoint_saved_before_the_change_resumes(tmp_path, caplog):
    """An old checkpoint: train_config.json with ``ema_warmup`` false and no ``ema_bias_correction``,
    trainer_state.json without ``ema_num_updates`` (and, as then, no manifest). Resume takes the update count
    from the step and continues the saved shadow with this run's decays d_t, t = 4, 5 (the assumption: the saved
    shadow is the average so far, its share of the initial weights stays), and says so in two warnings."""
    run_toy(tmp_path, max_steps=4, checkpoint_every=4)
    old = tmp_path / "checkpoints" / "step-00000004"
    for name, keys in (("train_config.json", ["ema_bias_correction"]),
                       ("trainer_state.json", ["ema_num_updates", "integrity"])):
        data = json.loads((old / name).read_text())
        for key in keys:
            data.pop(key)
        if name == "train_config.json":
            data["ema_warmup"] = False
        (old / name).write_text(json.dumps(data))
    os.remove(old / "manifest.json")
    saved = load_weights(str(old / "ema"))
    seen = []
    with caplog.at_level(logging.WARNING, logger="genmod.train"):
        run_toy(tmp_path, max_steps=6, resume="latest",
                callbacks=[lambda trainer, step, metrics: seen.append(
                    {k: v.detach().clone() for k, v in trainer.model.named_parameters()})])
    assert "saved before EMA bias correction" in caplog.text and "ema_warmup: False -> True" in caplog.text
    expected = dict(saved)
    for t, weights in zip((4, 5), seen):  # the default schedule: warmup, with bias correction under it
        d = min(corrected_decay(0.9, t), 1 - (1 + t) ** -0.75)
        expected = {k: d * expected[k] + (1 - d) * weights[k] for k in expected}
    final = load_weights(str(tmp_path / "checkpoints" / "step-00000006" / "ema"))
    for key, value in expected.items():
        torch.testing.assert_close(final[key], value, rtol=0, atol=1e-6)


def run_toy(tmp_path, callbacks=None, **overrides):
    config = toy_config(tmp_path, **overrides)
    return Trainer(config, ToyFamily(config), Points(), callbacks=callbacks).train()
