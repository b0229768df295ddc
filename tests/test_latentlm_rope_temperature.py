"""Issue 21 item 6 (LatentLM): RoPE frequency spacing (the released LatentLM's ``10000^(-i/(d/2-1))`` as an option,
LLaMA's ``10000^(-2i/d)`` the unchanged default) and what genmod's head ``temperature`` is (initial-noise scale only)."""

from __future__ import annotations

import pytest
import torch

from genmod.latentlm.sampling import sample_head
from genmod.latentlm.transformer import LatentLMTransformer
from genmod.nn.embeddings import rope_frequencies


@pytest.mark.parametrize("head_dim", [8, 64])
def test_rope_spacings_follow_their_formulas(head_dim):
    pos = torch.arange(37)
    i = torch.arange(head_dim // 2, dtype=torch.float64)
    llama = pos[:, None].double() * 10000.0 ** (-2 * i / head_dim)
    official = pos[:, None].double() * 10000.0 ** (-i / (head_dim // 2 - 1))  # exponents 0 .. 1 evenly spaced
    cos, sin = rope_frequencies(pos, head_dim)
    assert torch.equal(cos, llama.cos().float()) and torch.equal(sin, llama.sin().float())
    cos, sin = rope_frequencies(pos, head_dim, spacing="latentlm")
    assert torch.allclose(cos, official.cos().float(), atol=1e-6) and torch.allclose(sin, official.sin().float(), atol=1e-6)
    assert torch.allclose(sin[:, -1].double(), (pos.double() / 10000.0).sin(), atol=1e-7)  # slowest pair: pos / base
    with pytest.raises(ValueError, match="^spacing: expected 'llama' or 'latentlm', got 'neox'$"):
        rope_frequencies(pos, head_dim, spacing="neox")


def test_latentlm_transformer_rope_spacing_option(tmp_path):
    kw = dict(latent_channels=4, latent_grid=(2, 2), hidden_size=32, depth=1, num_heads=2, head_width=32, head_depth=1)
    torch.manual_seed(0)
    default = LatentLMTransformer(**kw).eval()
    assert default.config.rope_spacing == "llama"
    official = LatentLMTransformer(**kw, rope_spacing="latentlm").eval()
    official.load_state_dict(default.state_dict())
    tokens = torch.randint(0, 200, (2, 9))
    assert (default(tokens).hidden_states - official(tokens).hidden_states).abs().max() > 1e-4
    official.save_pretrained(tmp_path / "m")
    loaded = LatentLMTransformer.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.rope_spacing == "latentlm"
    assert torch.allclose(loaded(tokens).hidden_states, official(tokens).hidden_states, atol=1e-6)
    with pytest.raises(ValueError, match="^rope_spacing: expected 'llama' or 'latentlm', got 'x'$"):
        LatentLMTransformer(**kw, rope_spacing="x")


def test_head_temperature_only_scales_the_initial_noise():
    torch.manual_seed(0)
    model = LatentLMTransformer(latent_channels=4, latent_grid=(2, 2), hidden_size=32, depth=1, num_heads=2, head_width=32,
                                head_depth=1).eval()
    with torch.no_grad():
        for p in model.diffusion_head.parameters():
            p.normal_(0, 0.2)
    hidden, eps = torch.randn(6, 32), torch.randn(3, 4)
    with torch.no_grad():
        warm = sample_head(model, hidden, 5, guidance_scale=2.0, temperature=0.7, do_cfg=True, noise=eps)
        same = sample_head(model, hidden, 5, guidance_scale=2.0, temperature=1.0, do_cfg=True, noise=0.7 * eps)
    assert torch.equal(warm, same)  # a deterministic ODE solve from temperature * eps: no per-step noise to scale
