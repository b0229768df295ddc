"""A small network trained with the flow-matching loss approaches the closed-form GMM velocity."""

import torch

from genmod.flow.gmm import three_mode_mixture_2d
from genmod.core.loss import flow_matching_loss
from genmod.core.paths import LinearPath
from genmod.core.time_sampling import sample_logit_normal_t
from genmod.samplers import get_time_grid, sample_ode


class VelocityMLP(torch.nn.Module):
    def __init__(self, width=128):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(3, width), torch.nn.SiLU(), torch.nn.Linear(width, width), torch.nn.SiLU(),
            torch.nn.Linear(width, width), torch.nn.SiLU(), torch.nn.Linear(width, 2))

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None]], dim=1))


def test_trained_velocity_reaches_the_mixture():
    target, path = three_mode_mixture_2d(), LinearPath()
    g = torch.Generator().manual_seed(0)
    model = VelocityMLP()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 1500)
    for _ in range(1500):
        x0 = target.sample(256, generator=g).float()
        noise = torch.randn(x0.shape, generator=g)
        t = sample_logit_normal_t((256,), g)
        x_t = path.sample(x0, noise, t).x_t
        loss = flow_matching_loss(model(x_t, t), x0, noise, t, path=path)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()

    with torch.no_grad():
        # the learned field is close to the oracle marginal velocity where the data flows
        t = torch.rand(2000, generator=g) * 0.9 + 0.05
        x_t = path.sample(target.sample(2000, generator=g).float(), torch.randn(2000, 2, generator=g), t).x_t
        oracle = target.velocity(x_t.double(), t.double(), path).float()
        relative = ((model(x_t, t) - oracle).norm(dim=1) / oracle.norm(dim=1).clamp(min=1)).mean()
        assert relative < 0.15, relative

        samples = sample_ode(model, torch.randn(4000, 2, generator=g), get_time_grid("uniform", 16), "heun")
    assert (samples.mean(0) - target.mean.float()).norm() < 0.15
    assignments = target.component_posteriors(samples.double()).argmax(1)
    weights = torch.bincount(assignments, minlength=3).float() / len(samples)
    assert (weights - target.weights.float()).abs().max() < 0.05, weights
    for k in range(3):  # each mode's mean lands on its component
        assert (samples[assignments == k].mean(0) - target.means[k].float()).norm() < 0.2
