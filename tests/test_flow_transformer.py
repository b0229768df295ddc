"""FlowTransformer: shapes, DiT zero-init, save/load, CFG null class, label dropout, checkpointing."""

import pytest
import torch

from genmod.flow.transformer import FlowTransformer
from genmod.nn import AdaLNZeroBlock, FinalLayer

TINY = dict(in_channels=3, sample_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=4, num_classes=5)




def _perturbed(model, seed=0, std=0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return model


def test_output_shape_and_zero_init():
    model = FlowTransformer(**TINY).eval()
    x = torch.randn(3, 3, 8, 8)
    out = model(x, torch.tensor([0.0, 500.0, 1000.0]), torch.tensor([0, 4, 5])).sample
    assert out.shape == x.shape
    assert out.abs().max() == 0  # adaLN-Zero gates and final layer start at zero
    sigma = FlowTransformer(**{**TINY, "learn_sigma": True})
    assert sigma(x, 1.0, torch.tensor([1, 2, 3]), return_dict=False)[0].shape == (3, 6, 8, 8)
    # other resolutions divisible by the patch work (positions recomputed)
    assert _perturbed(model)(torch.randn(1, 3, 12, 8), 10.0).sample.shape == (1, 3, 12, 8)


def test_save_load_round_trip(tmp_path):
    model = _perturbed(FlowTransformer(**TINY, qk_norm="rmsnorm")).eval()
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([100.0, 900.0]), torch.tensor([1, 3])
    before = model(x, t, y).sample
    assert before.abs().max() > 0
    model.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "diffusion_pytorch_model.safetensors").exists()
    loaded = FlowTransformer.from_pretrained(tmp_path / "model").eval()
    assert loaded.config.qk_norm == "rmsnorm" and loaded.config.num_classes == 5
    torch.testing.assert_close(loaded(x, t, y).sample, before, rtol=0, atol=0)


def test_conditioning_null_class_and_timestep():
    model = _perturbed(FlowTransformer(**TINY)).eval()
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([300.0, 300.0])
    null = torch.full((2,), model.null_class_id)
    torch.testing.assert_close(model(x, t).sample, model(x, t, null).sample)  # None = unconditional
    assert not torch.allclose(model(x, t, torch.tensor([0, 0])).sample, model(x, t, torch.tensor([1, 1])).sample)
    assert not torch.allclose(model(x, t, null).sample, model(x, t * 2, null).sample)
    torch.testing.assert_close(model(x, 300.0, null).sample, model(x, t, null).sample)  # scalar timestep broadcasts
    # batch entries are independent (CFG batches cond and uncond together)
    both = model(x.repeat(2, 1, 1, 1), t.repeat(2), torch.tensor([1, 2, 5, 5])).sample
    torch.testing.assert_close(both[:2], model(x, t, torch.tensor([1, 2])).sample, atol=1e-5, rtol=1e-5)


def test_label_dropout_follows_the_generator():
    model = _perturbed(FlowTransformer(**{**TINY, "class_dropout_prob": 0.5})).train()
    x, t, y = torch.randn(16, 3, 8, 8), torch.full((16,), 400.0), torch.randint(0, 5, (16,))
    a = model(x, t, y, dropout_generator=torch.Generator().manual_seed(3)).sample
    b = model(x, t, y, dropout_generator=torch.Generator().manual_seed(3)).sample
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    dropped = torch.rand(16, generator=torch.Generator().manual_seed(3)) < 0.5
    model.eval()
    expected = model(x, t, torch.where(dropped, torch.full_like(y, 5), y)).sample
    torch.testing.assert_close(a, expected, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = _perturbed(FlowTransformer(**{**TINY, "class_dropout_prob": 0.0}))
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([100.0, 700.0]), torch.tensor([0, 1])
    model(x, t, y).sample.square().sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.enable_gradient_checkpointing()
    model(x, t, y).sample.square().sum().backward()
    for g, p in zip(plain, model.parameters()):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)


def test_math_backend_matches_sdpa():
    sdpa = _perturbed(FlowTransformer(**TINY)).eval()
    ref = FlowTransformer(**{**TINY, "attention_backend": "math"}).eval()
    ref.load_state_dict(sdpa.state_dict())
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([10.0, 990.0]), torch.tensor([2, 5])
    torch.testing.assert_close(ref(x, t, y).sample, sdpa(x, t, y).sample, atol=1e-5, rtol=1e-5)


def test_per_token_conditioning_equals_per_sample():
    block = _perturbed(AdaLNZeroBlock(32, 4), std=0.1)
    final = _perturbed(FinalLayer(32, 6), std=0.1)
    x, c = torch.randn(2, 5, 32), torch.randn(2, 32)
    c_tok = c[:, None].expand(2, 5, 32)
    torch.testing.assert_close(block(x, c_tok), block(x, c))
    torch.testing.assert_close(final(x, c_tok), final(x, c))


def test_bad_inputs_are_clear_errors():
    model = FlowTransformer(**TINY)
    with pytest.raises(ValueError, match="sample"):
        model(torch.randn(2, 4, 8, 8), 1.0)
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(2, 3, 7, 8), 1.0)
    with pytest.raises(ValueError, match="class_labels"):
        model(torch.randn(2, 3, 8, 8), 1.0, torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="timestep"):
        model(torch.randn(2, 3, 8, 8), torch.ones(3))
    with pytest.raises(ValueError, match="unconditional"):
        FlowTransformer(**{**TINY, "num_classes": 0})(torch.randn(1, 3, 8, 8), 1.0, torch.tensor([0]))
    with pytest.raises(ValueError, match="attention_backend"):
        FlowTransformer(**{**TINY, "attention_backend": "flash"})
