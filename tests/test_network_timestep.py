"""Issue 21 item 2: on the DDPM tables (``ddpm_linear`` / ``ddpm_cosine``) the network is fed the integer step n of
``alpha_bar[n]`` (0..999, as the official DDPM / LatentLM / CausalFusion code), not genmod's old ``1000 t = n + 1``;
on continuous paths the timestep stays ``1000 t`` bit for bit. Spied at the embedders' inputs: LatentLM's diffusion
head and CausalFusion's t-embedder, in training and in sampling."""

from __future__ import annotations

import pytest
import torch

import genmod.latentlm.family as latentlm_family
from genmod.causalfusion import CausalFusionTransformer, sample_tokens
from genmod.causalfusion.family import CausalFusionConfig, CausalFusionFamily, draw_ar_steps
from genmod.core.paths import get_path
from genmod.latentlm.family import draw_head_time, item_segments, next_element_loss
from genmod.latentlm.sampling import sample_head
from genmod.latentlm.text import LatentLMTokenizer, pack_sequences

STEPS = [0, 1, 500, 999]
DISCRETE = ["ddpm_cosine", "ddpm_linear"]


def spy(module) -> list:
    """Record every input ``timestep`` of ``module`` (a ``TimestepEmbedder``)."""
    seen = []
    module.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    return seen


def knots(steps) -> torch.Tensor:
    """Package time of DDPM step n, ``t = (n + 1) / 1000``, in float32 as the families hold it."""
    return (torch.tensor(steps, dtype=torch.float64) + 1).div(1000).float()


@pytest.mark.parametrize("name", DISCRETE)
def test_network_timestep_is_the_ddpm_step_on_every_knot(name):
    path = get_path(name)
    n = torch.arange(1000)
    assert torch.equal(path.network_timestep(knots(n.tolist())), n.float())
    assert path.network_timestep(0.5) == 499.0  # t = 0.5 is alpha_bar[499]
    # the old feed, 1000 t, was n + 1 (and 1000 at n = 999, a value the official models never saw)
    assert torch.allclose(1000 * knots(STEPS), torch.tensor(STEPS).float() + 1)


def test_continuous_paths_keep_1000_t_bitwise():
    t = torch.rand(257, generator=torch.Generator().manual_seed(0))
    for name in ("cosine", "linear", "vp"):
        assert torch.equal(get_path(name).network_timestep(t), 1000 * t)


def tiny_latentlm(path):
    from genmod.latentlm.transformer import LatentLMTransformer

    torch.manual_seed(0)
    return LatentLMTransformer(latent_channels=4, latent_grid=(2, 2), hidden_size=32, depth=1, num_heads=4, head_width=32,
                               head_depth=1, max_text_length=8, path=path, prediction="epsilon").eval()


@pytest.mark.parametrize("name", DISCRETE)
def test_latentlm_head_is_fed_n_in_training(name, monkeypatch):
    model, path = tiny_latentlm(name), get_path(name)
    tok = LatentLMTokenizer(0)
    latents = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(1))
    packed = pack_sequences([item_segments(tok, "text", caption="ab")] * 2, latents, 4)
    # the drawn times: integer steps at their knots
    g = torch.Generator().manual_seed(7)
    t = draw_head_time(path, 4000, g, "cpu")
    n = torch.randint(0, 1000, (4000,), generator=torch.Generator().manual_seed(7))
    assert torch.equal(path.network_timestep(t), n.float())
    # the network edge: knots of n in STEPS reach the head's embedder as exactly n
    monkeypatch.setattr(latentlm_family, "draw_head_time", lambda p, num, gen, dev: knots(STEPS * (num // 4)))
    seen = spy(model.diffusion_head.time_embed)
    next_element_loss(model, packed, torch.Generator().manual_seed(0), path, "epsilon", diffusion_batch_mul=2)
    assert len(seen) == 1 and torch.equal(seen[0], torch.tensor(STEPS * 4).float())


def test_latentlm_training_times_on_the_continuous_path_are_unchanged():
    g = torch.Generator().manual_seed(3)
    assert torch.equal(draw_head_time(get_path("cosine"), 50, g, "cpu"),
                       torch.rand(50, generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("name,do_cfg", [("ddpm_cosine", True), ("ddpm_linear", False)])
def test_latentlm_head_is_fed_n_in_sampling(name, do_cfg):
    model = tiny_latentlm(name)
    seen = spy(model.diffusion_head.time_embed)
    hidden = torch.randn(4 if do_cfg else 2, 32)
    sample_head(model, hidden, num_steps=1000, guidance_scale=2.0, do_cfg=do_cfg, generator=torch.Generator().manual_seed(0))
    # the uniform 1000-step grid visits t = 1, 0.999, ..., 0.001: alpha_bar[999] ... alpha_bar[0]
    assert len(seen) == 1000 and all(torch.equal(s, torch.full_like(s, 999 - i)) for i, s in enumerate(seen))


def tiny_causalfusion():
    torch.manual_seed(0)
    return CausalFusionTransformer(in_channels=3, sample_size=4, patch_size=2, hidden_size=32, depth=1, num_heads=2,
                                   num_classes=3, num_cond_tokens=2).eval()


@pytest.mark.parametrize("name", DISCRETE)
def test_causalfusion_t_embedder_is_fed_n_in_training(name):
    config = CausalFusionConfig(path=name, prediction="epsilon", time_sampling="discrete", patch_size=2, dataset_size=8)
    family, model = CausalFusionFamily(config), tiny_causalfusion()
    seen = spy(model.t_embedder)
    batch = {"image": torch.rand(16, 3, 4, 4) * 2 - 1, "label": torch.arange(16) % 3}
    family.loss(model, batch, torch.Generator().manual_seed(5))
    replay = torch.Generator().manual_seed(5)  # the family's draws in order: token order, AR split, step n
    torch.rand((16, 4), generator=replay)
    draw_ar_steps(4, replay, config.ar_step_decay, config.max_ar_steps)
    n = torch.randint(0, 1000, (16,), generator=replay)
    assert len(seen) == 1 and torch.equal(seen[0], n.float())
    family.draw_time = lambda shape, gen, device=None: knots(STEPS * 4).to(device)
    family.loss(model, batch, torch.Generator().manual_seed(5))
    assert torch.equal(seen[1], torch.tensor(STEPS * 4).float())


@pytest.mark.parametrize("name", DISCRETE)
def test_causalfusion_t_embedder_is_fed_n_in_sampling(name):
    model = tiny_causalfusion()
    seen = spy(model.t_embedder)
    sample_tokens(model, torch.tensor([0, 2]), 2, num_inference_steps=1000, solver="ddpm", time_grid="ddpm", path=name,
                  prediction="epsilon", guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    # one AR step (the default splits 4 tokens into steps: every step walks n = 999 .. 0)
    received = torch.stack([s[0] for s in seen])
    assert torch.equal(received[:1000], torch.arange(999, -1, -1).float())
    assert all(torch.equal(s, torch.full_like(s, s[0])) for s in seen)
    assert set(received.tolist()) == set(range(1000))
