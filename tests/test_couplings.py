"""Minibatch OT / Sinkhorn / Schrodinger-bridge couplings (genmod.core.couplings) and the flow family's option."""

import importlib.util
import itertools

import pytest
import torch

from genmod.core.couplings import (brownian_bridge_sample, coupling_permutation, exact_ot_assignment,
                                   mean_transport_cost, sample_plan_rows, sinkhorn_plan, straightness,
                                   transport_cost)
from genmod.flow.toy import eight_gaussians, path_report, train_toy_flow, two_moons

needs_pot = pytest.mark.skipif(importlib.util.find_spec("ot") is None, reason="POT (pip install 'genmod[ot]')")


def test_exact_ot_equals_brute_force_over_permutations():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    cost = transport_cost(x0, noise)
    best = min(itertools.permutations(range(6)), key=lambda p: sum(float(cost[i, p[i]]) for i in range(6)))
    perm = exact_ot_assignment(cost)
    assert perm.tolist() == list(best)
    assert coupling_permutation(x0, noise, "ot").tolist() == list(best)
    # the coupled pairs' mean cost is the optimum
    assert mean_transport_cost(x0, noise[perm]) == pytest.approx(float(cost[range(6), list(best)].mean()), rel=1e-12)


@needs_pot
def test_ot_and_sinkhorn_lower_the_transport_cost_on_8_gaussians():
    g = torch.Generator().manual_seed(1)
    x0, noise = eight_gaussians(256, g), torch.randn(256, 2, generator=g)
    independent = mean_transport_cost(x0, noise)
    exact = mean_transport_cost(x0, noise[coupling_permutation(x0, noise, "ot")])
    entropic = mean_transport_cost(x0, noise[coupling_permutation(x0, noise, "sinkhorn", reg=0.5, generator=g)])
    assert exact < 0.5 * independent  # 18.3 -> 7.7 on this batch
    assert exact <= entropic < 1.05 * exact  # reg 0.5 on costs of ~8: near the exact plan (7.9)


@needs_pot
def test_sinkhorn_plan_marginals_and_limits():
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(8, 2, generator=g), torch.randn(8, 2, generator=g)
    cost = transport_cost(x0, noise)
    plan = sinkhorn_plan(cost, reg=0.5)
    assert torch.allclose(plan.sum(0), torch.full((8,), 1 / 8, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(plan.sum(1), torch.full((8,), 1 / 8, dtype=torch.float64), atol=1e-6)
    # reg -> infinity: the independent (product) plan; reg -> 0: the exact permutation
    assert torch.allclose(sinkhorn_plan(cost, reg=1e6), torch.full((8, 8), 1 / 64, dtype=torch.float64), atol=1e-7)
    sharp = sinkhorn_plan(cost, reg=1e-3)
    assert sharp.argmax(1).tolist() == exact_ot_assignment(cost).tolist()


def test_row_sampling_follows_the_plan():
    plan = torch.tensor([[0.2, 0.05, 0.0], [0.0, 0.3, 0.0], [0.1, 0.0, 0.35]], dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    draws = torch.stack([sample_plan_rows(plan, g) for _ in range(4000)])
    assert (draws[:, 1] == 1).all()  # row 1 has one partner
    assert (draws[:, 0] == 0).float().mean().item() == pytest.approx(0.8, abs=0.03)  # 0.2 / 0.25
    assert (draws[:, 2] == 2).float().mean().item() == pytest.approx(0.35 / 0.45, abs=0.03)


@needs_pot
def test_class_conditional_coupling_stays_within_class():
    g = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(40, 2, generator=g), torch.randn(40, 2, generator=g)
    labels = torch.randint(0, 3, (40,), generator=g)
    for method in ("ot", "sinkhorn", "sb"):
        idx = coupling_permutation(x0, noise, method, reg=0.1, generator=g, labels=labels)
        assert (labels[idx] == labels).all(), method
    idx = coupling_permutation(x0, noise, "ot", labels=labels)
    assert sorted(idx.tolist()) == list(range(40))
    for c in range(3):  # within each class the exact plan of that class
        members = torch.nonzero(labels == c).squeeze(1)
        perm = exact_ot_assignment(transport_cost(x0[members], noise[members]))
        assert idx[members].tolist() == members[perm].tolist()


def test_brownian_bridge_velocity_is_the_time_derivative():
    g = torch.Generator().manual_seed(5)
    x0, noise, z = (torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0.1, 0.3, 0.5, 0.8], dtype=torch.float64)
    x_t, u_t = brownian_bridge_sample(x0, noise, t, 0.7, z)
    h = 1e-6
    numeric = (brownian_bridge_sample(x0, noise, t + h, 0.7, z)[0] - brownian_bridge_sample(x0, noise, t - h, 0.7, z)[0]) / (2 * h)
    assert torch.allclose(u_t, numeric, atol=1e-7)
    mu = (1 - t[:, None]) * x0 + t[:, None] * noise  # the form (1 - 2t) / (2 t (1 - t)) (x_t - mu_t) of Tong et al.
    assert torch.allclose(u_t, noise - x0 + (1 - 2 * t[:, None]) / (2 * t[:, None] * (1 - t[:, None])) * (x_t - mu), atol=1e-12)
    x_lin, u_lin = brownian_bridge_sample(x0, noise, t, 0.0, z)  # sigma = 0: the straight path
    assert torch.allclose(x_lin, mu) and torch.allclose(u_lin, noise - x0)


def test_straightness_of_known_paths():
    grid = torch.linspace(1, 0, 11, dtype=torch.float64)
    a, b = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    line = [b * (1 - t) + a * t for t in grid]  # noise a at t = 1, data b at t = 0
    assert straightness(line, grid) == pytest.approx(0.0, abs=1e-24)
    # x(t) = (t, c t (1 - t)) on a fine grid: chord velocity (1, 0), v = (1, c (1 - 2t)); S = c^2 / 3
    fine = torch.linspace(1, 0, 2001, dtype=torch.float64)
    c = 2.0
    curve = [torch.tensor([[float(t), c * float(t) * (1 - float(t))]], dtype=torch.float64) for t in fine]
    assert straightness(curve, fine) == pytest.approx(c**2 / 3, rel=1e-5)


@pytest.mark.parametrize("target", [eight_gaussians, two_moons])
def test_ot_coupling_trains_straighter_flows_with_lower_few_step_error(target):
    """Tong et al. 2023: OT-CFM's learned paths are straighter, so 4-8 Euler steps are closer to the ODE solution."""
    g = torch.Generator().manual_seed(6)
    data, noise = target(500, g), torch.randn(500, 2, generator=g)
    reports = {c: path_report(train_toy_flow(target, c, steps=400, batch_size=128, seed=0), data, noise,
                              euler_steps=(4, 8), reference_steps=50) for c in ("independent", "ot")}
    ind, opt = reports["independent"], reports["ot"]
    assert opt["straightness"] < 0.5 * ind["straightness"]
    for k in (4, 8):
        assert opt["euler_error"][k] < 0.7 * ind["euler_error"][k]
        assert opt["w2"][k] < ind["w2"][k]
