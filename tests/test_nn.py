"""Shared network parts: attention backends, masks, KV cache, RoPE, embeddings, layers."""

import math

import pytest
import torch

from genmod.nn import (
    AdaLNZeroBlock,
    Attention,
    CausalBlock,
    DiffusionHead,
    KVCache,
    LabelEmbedder,
    PatchEmbed,
    PreNormBlock,
    TimestepEmbedder,
    apply_rope,
    attention,
    block_ids_from_sizes,
    block_mask,
    causal_mask,
    causalfusion_layout,
    causalfusion_mask,
    drop_path,
    grid_positions,
    make_kv_caches,
    mask_to_bias,
    patchify,
    rope_frequencies,
    sincos_2d,
    sincos_3d,
    unpatchify,
)


@pytest.fixture(autouse=True)
def _restore_autograd():
    grad = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(grad)  # some tests switch autograd off


def _randomize(module, std=0.2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


# ---------------------------------------------------------------------------------- masks


def test_var_scale_mask_matches_hand_written():
    ids = block_ids_from_sizes([1 * 1, 2 * 2, 3 * 3])  # VAR scales 1, 2, 3
    assert ids.tolist() == [0] + [1] * 4 + [2] * 9
    expected = torch.zeros(14, 14, dtype=torch.bool)
    expected[0, 0] = True  # the start token sees itself
    expected[1:5, :5] = True  # scale 2 sees scales 1-2, fully inside its own scale
    expected[5:, :] = True  # scale 3 sees everything
    assert torch.equal(block_mask(ids, ids, "block_causal"), expected)


def test_diffusion_forcing_frame_masks():
    frames = block_ids_from_sizes([2, 2, 2])  # 3 frames of 2 tokens
    causal = torch.tensor([
        [1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(block_mask(frames, rule="block_causal"), causal)
    diagonal = torch.block_diag(*[torch.ones(2, 2)] * 3).bool()
    assert torch.equal(block_mask(frames, rule="block_diagonal"), diagonal)
    assert block_mask(frames, rule="full").all()
    # token-level causal and bottom-right alignment for cached queries
    assert torch.equal(block_mask(torch.arange(4), rule="causal"), torch.ones(4, 4).tril().bool())
    assert torch.equal(causal_mask(2, 5), torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool))
    # batched ids broadcast, callable rule
    batched = block_mask(torch.stack([frames, frames.flip(0)]), rule=lambda q, k: (q - k).abs() <= 1)
    assert batched.shape == (2, 6, 6) and batched[0, 0, 3] and not batched[0, 0, 4]


def test_causalfusion_mask_hand_written():
    # [cond | clean step0 (2) | noisy step0 (2) | noisy step1 (1)]
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],  # cond: only cond
        [1, 1, 1, 0, 0, 0],  # clean step0: cond + clean<=0
        [1, 1, 1, 0, 0, 0],
        [1, 0, 0, 1, 1, 0],  # noisy step0: cond + own noisy step
        [1, 0, 0, 1, 1, 0],
        [1, 1, 1, 0, 0, 1],  # noisy step1: cond + clean<1 + own noisy step
    ], dtype=torch.bool)
    assert torch.equal(causalfusion_mask(1, [2, 1]), expected)


def test_causalfusion_mask_random_split_follows_rules():
    gen = torch.Generator().manual_seed(3)
    sizes = (torch.randint(1, 4, (5,), generator=gen)).tolist()
    kinds, blocks = causalfusion_layout(3, sizes)
    mask = causalfusion_mask(3, sizes)
    for i in range(len(kinds)):
        for j in range(len(kinds)):
            qk, kk, qb, kb = int(kinds[i]), int(kinds[j]), int(blocks[i]), int(blocks[j])
            want = (kk == 0) or (qk == 1 and kk == 1 and kb <= qb) or (qk == 2 and kk == 1 and kb < qb) or (qk == 2 and kk == 2 and kb == qb)
            assert bool(mask[i, j]) == want, (i, j)
    # N = 1 is plain diffusion: noisy tokens see each other and the condition tokens
    one = causalfusion_mask(2, [4])
    assert one.shape == (6, 6) and one[2:].all() and not one[:2, 2:].any()


def test_mask_errors():
    with pytest.raises(ValueError, match="rule"):
        block_mask(torch.arange(3), rule="diagonal")
    with pytest.raises(ValueError, match="q_blocks"):
        block_mask(torch.rand(3))


# ------------------------------------------------------------------------------ attention


@pytest.mark.parametrize("rule", ["full", "causal", "block_causal", "additive", "batched"])
def test_sdpa_matches_math_reference(rule):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=gen) for _ in range(3))
    ids = block_ids_from_sizes([1, 2, 4])
    if rule == "additive":
        mask = torch.randn(7, 7, generator=gen)
    elif rule == "batched":
        mask = torch.stack([block_mask(ids), block_mask(torch.arange(7), rule="causal")])
    else:
        mask = block_mask(torch.arange(7) if rule == "causal" else ids, rule=rule)
    sdpa, ref = attention(q, k, v, mask, backend="sdpa"), attention(q, k, v, mask, backend="math")
    torch.testing.assert_close(sdpa, ref, atol=1e-5, rtol=1e-5)
    if mask.dtype == torch.bool and mask.dim() == 2:  # the math backend is itself softmax(qk^T/sqrt(d)) v
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(8) + mask_to_bias(mask)
        torch.testing.assert_close(ref, logits.softmax(-1) @ v, atol=1e-5, rtol=1e-5)


def test_attention_module_backends_agree_with_qk_norm_and_gqa():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 32)
    mask = block_mask(block_ids_from_sizes([2, 4]))
    for kwargs in ({"qk_norm": "layernorm"}, {"qk_norm": "rmsnorm", "num_kv_heads": 2}, {"l2_norm_qk": True, "qkv_bias": "qv"}):
        sdpa = _randomize(Attention(32, 4, **kwargs))
        ref = Attention(32, 4, attention_backend="math", **kwargs)
        ref.load_state_dict(sdpa.state_dict())
        torch.testing.assert_close(sdpa(x, mask=mask), ref(x, mask=mask), atol=1e-5, rtol=1e-5)


def test_var_l2_normalised_attention_reference():
    torch.manual_seed(0)
    layer = _randomize(Attention(16, 2, qkv_bias="qv", l2_norm_qk=True))
    assert layer.to_k.bias is None and layer.to_q.bias is not None and layer.to_v.bias is not None
    with torch.no_grad():
        layer.log_temperature.copy_(torch.tensor([math.log(4.0), 10.0]).view(1, 2, 1, 1))  # head 2 hits the cap
    x = torch.randn(1, 5, 16)
    q = torch.nn.functional.normalize((x @ layer.to_q.weight.T + layer.to_q.bias).view(1, 5, 2, 8).transpose(1, 2), dim=-1)
    k = torch.nn.functional.normalize((x @ layer.to_k.weight.T).view(1, 5, 2, 8).transpose(1, 2), dim=-1)
    v = (x @ layer.to_v.weight.T + layer.to_v.bias).view(1, 5, 2, 8).transpose(1, 2)
    temperature = torch.tensor([4.0, 100.0]).view(1, 2, 1, 1)
    out = ((q @ k.transpose(-1, -2)) * temperature).softmax(-1) @ v  # softmax scale 1
    expected = layer.to_out(out.transpose(1, 2).reshape(1, 5, 16))
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_cross_attention_and_errors():
    layer = Attention(16, 2, cross_attention_dim=12)
    out = layer(torch.randn(2, 5, 16), context=torch.randn(2, 3, 12))
    assert out.shape == (2, 5, 16)
    with pytest.raises(ValueError, match="context"):
        layer(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="attention_backend"):
        Attention(16, 2, attention_backend="flash")
    try:
        import xformers  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="xformers"):
            Attention(16, 2, attention_backend="xformers")


def test_kv_cached_blocks_equal_uncached_block_causal_forward():
    """VAR-style: append one scale at a time; each new block sees all cached blocks and itself."""
    torch.manual_seed(0)
    dim, sizes = 32, [1, 4, 9]
    blocks = [_randomize(AdaLNZeroBlock(dim, 4, qkv_bias="qv", l2_norm_qk=True), seed=s) for s in range(2)]
    x, c = torch.randn(2, sum(sizes), dim), torch.randn(2, dim)
    ids = block_ids_from_sizes(sizes)
    full = x
    for blk in blocks:
        full = blk(full, c, mask=block_mask(ids))
    caches, outs, start = make_kv_caches(len(blocks)), [], 0
    for b, size in enumerate(sizes):
        h = x[:, start : start + size]
        q_ids, k_ids = ids[start : start + size], ids[: start + size]
        for blk, cache in zip(blocks, caches):
            h = blk(h, c, mask=block_mask(q_ids, k_ids), kv_cache=cache)
        outs.append(h)
        start += size
    assert len(caches[0]) == sum(sizes)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grad", [True, False], ids=["autograd-concat", "no-grad-buffer"])
def test_kv_cached_causal_rope_stack_and_uncommitted_steps(grad):
    """LatentLM-style: token-causal RoPE blocks fed in uneven chunks equal one causal forward."""
    torch.set_grad_enabled(grad)
    torch.manual_seed(0)
    dim, heads, length = 32, 4, 7
    blocks = [_randomize(CausalBlock(dim, heads, num_kv_heads=2), std=0.15, seed=s) for s in range(2)]
    x = torch.randn(2, length, dim)
    cos, sin = rope_frequencies(torch.arange(length), dim // heads)
    full = x
    for blk in blocks:
        full = blk(full, rope=(cos, sin))
    caches, outs = make_kv_caches(2), []
    for lo, hi in [(0, 3), (3, 4), (4, 5), (5, 7)]:
        h = x[:, lo:hi]
        # a non-committed pass (e.g. a denoising step) must leave the caches untouched
        probe = h
        for blk, cache in zip(blocks, caches):
            probe = blk(probe, rope=(cos[lo:hi], sin[lo:hi]), kv_cache=cache, update_cache=False)
        assert len(caches[0]) == lo
        for blk, cache in zip(blocks, caches):
            h = blk(h, rope=(cos[lo:hi], sin[lo:hi]), kv_cache=cache)
        torch.testing.assert_close(probe, h)
        outs.append(h)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)
    cache = KVCache()
    keys = torch.randn(1, 2, 20, 4)
    for lo in range(0, 20, 5):  # grows past the initial capacity of 16
        cache.extend(keys[..., lo : lo + 5, :], keys[..., lo : lo + 5, :])
    cache.crop(3)
    assert len(cache) == 3 and torch.equal(cache.key, keys[..., -3:, :])


def test_causal_block_stack_is_causal():
    torch.manual_seed(0)
    blocks = [_randomize(PreNormBlock(32, 4, qk_norm="layernorm"), std=0.15, seed=s) for s in range(3)]
    x = torch.randn(1, 8, 32)

    def run(inp):
        for blk in blocks:
            inp = blk(inp, causal=True)
        return inp

    base = run(x)
    for i in range(7):
        changed = x.clone()
        changed[:, i + 1 :] += torch.randn_like(changed[:, i + 1 :]) * 3
        out = run(changed)
        torch.testing.assert_close(out[:, : i + 1], base[:, : i + 1], atol=1e-6, rtol=0)
        assert not torch.allclose(out[:, i + 1], base[:, i + 1])


# ------------------------------------------------------------------------------ embeddings


def test_rope_is_a_relative_rotation():
    gen = torch.Generator().manual_seed(0)
    head_dim = 16
    q, k = torch.randn(1, 1, 1, head_dim, generator=gen), torch.randn(1, 1, 1, head_dim, generator=gen)

    def rotated(x, pos):
        cos, sin = rope_frequencies(torch.tensor([pos]), head_dim)
        return apply_rope(x, cos, sin)

    for pos in (0, 3, 17.5):
        torch.testing.assert_close(rotated(q, pos).norm(), q.norm())
    dots = [float((rotated(q, m) * rotated(k, m - 5)).sum()) for m in (5, 9, 40, 123)]
    assert max(dots) - min(dots) < 1e-4
    assert abs(float((rotated(q, 0) * rotated(k, -5)).sum()) - float((rotated(q, 0) * rotated(k, -6)).sum())) > 1e-3
    # 2D: relative in both axes
    axes = [8, 8]

    def rotated2(x, pos):
        cos, sin = rope_frequencies(torch.tensor([pos], dtype=torch.float32), head_dim, axes_dims=axes)
        return apply_rope(x, cos, sin)

    d1 = float((rotated2(q, (2, 3)) * rotated2(k, (0, 7))).sum())
    d2 = float((rotated2(q, (12, 13)) * rotated2(k, (10, 17))).sum())
    assert abs(d1 - d2) < 1e-4
    assert grid_positions(2, 3).tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]


def test_sincos_2d_matches_reference_formula():
    dim, grid_h, grid_w = 16, 3, 4
    emb = sincos_2d(grid_h, grid_w, dim)
    quarter = dim // 4
    for row in range(grid_h):
        for col in range(grid_w):
            n = row * grid_w + col
            for i in range(quarter):
                w = 1.0 / 10000 ** (i / quarter)
                assert math.isclose(emb[n, i], math.sin(col * w), abs_tol=1e-6)
                assert math.isclose(emb[n, quarter + i], math.cos(col * w), abs_tol=1e-6)
                assert math.isclose(emb[n, 2 * quarter + i], math.sin(row * w), abs_tol=1e-6)
                assert math.isclose(emb[n, 3 * quarter + i], math.cos(row * w), abs_tol=1e-6)
    e3 = sincos_3d(2, 3, 4, 24)
    assert e3.shape == (24, 24)
    torch.testing.assert_close(e3[:12, 8:], sincos_2d(3, 4, 16))  # frame 0 spatial part = 2D embedding


@pytest.mark.parametrize("shape,patch", [((2, 3, 12), 4), ((2, 3, 8, 12), 2), ((2, 4, 2, 6, 8), (2, 3, 4))])
def test_patchify_round_trip_and_patch_embed_order(shape, patch):
    x = torch.randn(shape)
    tokens = patchify(x, patch)
    ndim = len(shape) - 2
    p = (patch,) * ndim if isinstance(patch, int) else patch
    grid = [s // q for s, q in zip(shape[2:], p)]
    assert tokens.shape == (2, math.prod(grid), math.prod(p) * shape[1])
    torch.testing.assert_close(unpatchify(tokens, patch, grid), x)
    # the conv patch embedding is the linear map of the patchified features (same token order)
    video = ndim == 3
    embed = PatchEmbed(shape[1], 10, patch, ndim=ndim)
    inp = x.transpose(1, 2) if video else x
    w = embed.proj.weight.permute(0, *range(2, 2 + ndim), 1).reshape(10, -1)
    torch.testing.assert_close(embed(inp), tokens @ w.T + embed.proj.bias, atol=1e-5, rtol=1e-5)


def test_timestep_embedder_per_sample_and_per_token():
    emb = _randomize(TimestepEmbedder(16, 32), std=0.1)
    t = torch.tensor([[0.0, 250.0, 999.0], [10.0, 500.0, 1000.0]])
    per_token = emb(t)
    assert per_token.shape == (2, 3, 16)
    torch.testing.assert_close(per_token[:, 1], emb(t[:, 1]))


def test_label_embedder_dropout_reproducible_and_null_id():
    emb = LabelEmbedder(10, 8, dropout_prob=0.3).train()
    labels = torch.randint(0, 10, (2000,))
    a = emb.drop_labels(labels, torch.Generator().manual_seed(7))
    b = emb.drop_labels(labels, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    dropped = a != labels
    assert torch.all(a[dropped] == 10) and abs(dropped.float().mean().item() - 0.3) < 0.04
    out = emb(labels, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out[dropped], emb.embedding_table.weight[10].expand(int(dropped.sum()), 8))
    emb.eval()
    torch.testing.assert_close(emb(labels), emb.embedding_table(labels))
    with pytest.raises(ValueError, match="class_labels"):
        emb(torch.tensor([11]))


def test_drop_path_reproducible_and_unbiased():
    x = torch.ones(4000, 3)
    a = drop_path(x, 0.25, True, torch.Generator().manual_seed(1))
    assert torch.equal(a, drop_path(x, 0.25, True, torch.Generator().manual_seed(1)))
    values = a[:, 0].unique()
    assert len(values) == 2 and values[0] == 0 and math.isclose(values[1].item(), 1 / 0.75, rel_tol=1e-6)
    assert abs(a.mean().item() - 1.0) < 0.05
    assert torch.equal(drop_path(x, 0.25, False), x)


# ------------------------------------------------------------------------------ diffusion head


def test_diffusion_head_starts_at_zero_and_fits_a_target():
    torch.manual_seed(0)
    head = DiffusionHead(in_channels=4, cond_dim=8, width=32, depth=2, mlp="swiglu", norm="rmsnorm")
    x, t, cond = torch.randn(64, 4), torch.rand(64) * 1000, torch.randn(64, 8)
    assert head(x, t, cond).abs().max() == 0
    assert head(x.view(8, 8, 4), t.view(8, 8), cond.view(8, 8, 8)).shape == (8, 8, 4)
    target = cond[:, :4] * 2 - x  # a per-token function of the condition and input
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss = (head(x, t, cond) - target).pow(2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first
    with pytest.raises(ValueError, match="condition"):
        head(x, t, cond[:, :5])
