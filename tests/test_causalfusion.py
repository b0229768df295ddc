"""CausalFusion: the generalized causal mask, AR-step sampling law, teacher forcing vs sampling,
KV cache, both ends of the factorization (plain diffusion, pure AR), editing, loss, pipeline I/O."""

import math

import pytest
import torch
import torch.nn.functional as F

from genmod.causalfusion import CausalFusionTransformer, causalfusion_sequence_layout, sample_tokens
from genmod.causalfusion.family import CausalFusionConfig, CausalFusionFamily, ar_step_weights, draw_ar_steps
from genmod.causalfusion.pipeline import CausalFusionPipeline
from genmod.nn.embeddings import patchify, unpatchify
from genmod.nn.masks import CAUSALFUSION_RULES, causalfusion_mask, mask_from_rules



def tiny_model(num_classes=3, seed=0):
    torch.manual_seed(seed)
    model = CausalFusionTransformer(in_channels=3, sample_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                                    num_classes=num_classes, num_cond_tokens=2)
    with torch.no_grad():  # the output layer is zero-initialised; make the network non-trivial
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def reference_mask(num_cond, step_sizes):
    """The paper's rules, token by token (generalized causal attention)."""
    tokens = [("cond", -1)] * num_cond
    tokens += [("clean", s) for s, n in enumerate(step_sizes[:-1]) for _ in range(n)]
    tokens += [("noisy", s) for s, n in enumerate(step_sizes) for _ in range(n)]
    mask = torch.zeros(len(tokens), len(tokens), dtype=torch.bool)
    for i, (q_kind, q_step) in enumerate(tokens):
        for j, (k_kind, k_step) in enumerate(tokens):
            if k_kind == "cond":
                ok = True  # everybody sees the class tokens, class tokens see each other
            elif q_kind == "cond":
                ok = False
            elif (q_kind, k_kind) == ("clean", "clean"):
                ok = k_step <= q_step
            elif (q_kind, k_kind) == ("noisy", "clean"):
                ok = k_step < q_step
            elif (q_kind, k_kind) == ("noisy", "noisy"):
                ok = k_step == q_step
            else:  # clean never sees noisy
                ok = False
            mask[i, j] = ok
    return mask


def test_mask_matches_rules_for_random_splits():
    generator = torch.Generator().manual_seed(0)
    for trial in range(25):
        sizes = draw_ar_steps(12, generator, decay=0.8)
        expected = reference_mask(3, sizes)
        assert torch.equal(causalfusion_mask(3, sizes), expected), sizes
        kinds, blocks = causalfusion_sequence_layout(3, sizes[:-1], sizes)
        assert torch.equal(mask_from_rules(kinds, blocks, kinds, blocks, CAUSALFUSION_RULES), expected)
        # the uncached sampling layout of step s is the training mask restricted to its rows/columns
        s = trial % len(sizes)
        kinds_s, blocks_s = causalfusion_sequence_layout(3, sizes[:s], [sizes[s]], s)
        keep = torch.cat([torch.arange(3 + sum(sizes[:s])),
                          3 + sum(sizes[:-1]) + sum(sizes[:s]) + torch.arange(sizes[s])])
        assert torch.equal(mask_from_rules(kinds_s, blocks_s, kinds_s, blocks_s, CAUSALFUSION_RULES),
                           expected[keep][:, keep])


def test_ar_step_law_and_weights():
    generator = torch.Generator().manual_seed(1)
    length, draws = 6, 6000
    counts = torch.zeros(length)
    first_cut = torch.zeros(length - 1)
    for _ in range(draws):
        sizes = draw_ar_steps(length, generator, decay=0.7)
        assert sum(sizes) == length and min(sizes) >= 1
        counts[len(sizes) - 1] += 1
        if len(sizes) == 2:
            first_cut[sizes[0] - 1] += 1
    expected = 0.7 ** torch.arange(length, dtype=torch.float32)
    expected = expected / expected.sum()
    assert torch.allclose(counts / draws, expected, atol=0.02)
    # with N = 2 the one split point is uniform over the 5 gaps
    assert torch.allclose(first_cut / first_cut.sum(), torch.full((5,), 0.2), atol=0.04)
    # w = 2 - start / L over AR order (paper: 2.0 at the first step down towards 1.0)
    assert torch.allclose(ar_step_weights([2, 3, 5]).float(), torch.tensor([2, 2, 1.8, 1.8, 1.8, 1.5, 1.5, 1.5, 1.5, 1.5]))
    assert torch.allclose(ar_step_weights([4]).float(), torch.full((4,), 2.0))


def test_teacher_forced_inputs_equal_sampling_with_same_clean_tokens():
    model = tiny_model()
    gen = torch.Generator().manual_seed(2)
    batch, length = 2, model.num_tokens
    x0 = torch.randn(batch, 3, 8, 8, generator=gen)
    x_t = torch.randn(batch, 3, 8, 8, generator=gen)
    order = torch.stack([torch.randperm(length, generator=gen) for _ in range(batch)])
    sizes = [3, 5, 1, 7]
    labels = torch.tensor([0, 2])
    timestep = torch.tensor([300.0, 720.0])
    with torch.no_grad():
        train_out = model(x_t, timestep, labels, clean_sample=x0, token_order=order, step_sizes=sizes).sample
        train_tokens = patchify(train_out, 2)
        noisy_tokens, clean_tokens = patchify(x_t, 2), patchify(x0, 2)

        def gather(x, pos):
            return x.gather(1, pos[..., None].expand(-1, -1, x.shape[-1]))

        # sampling: condition into the cache, then each AR step's noisy tokens, then commit its clean tokens
        caches = model.prefill_condition(labels, batch)
        start = 0
        for step, size in enumerate(sizes):
            pos = order[:, start:start + size]
            cached = model.forward_cached(gather(noisy_tokens, pos), pos, caches, timestep=timestep)
            uncached = model.forward_tokens(gather(noisy_tokens, pos), pos, timestep, labels,
                                            gather(clean_tokens, order[:, :start]), order[:, :start], sizes[:step], [size], step)
            torch.testing.assert_close(cached, gather(train_tokens, pos), atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(uncached, gather(train_tokens, pos), atol=2e-5, rtol=1e-4)
            model.forward_cached(gather(clean_tokens, pos), pos, caches, timestep=None, commit=True)
            start += size


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_cached_and_uncached_sampling_agree(guidance):
    model = tiny_model()
    labels = torch.tensor([1, 2])
    for num_ar_steps in (1, 3, model.num_tokens):
        outs = []
        for use_cache in (True, False):
            gens = [torch.Generator().manual_seed(10 + i) for i in range(2)]
            tokens, stats = sample_tokens(model, labels, 2, num_ar_steps=num_ar_steps, num_inference_steps=2,
                                          generator=gens, guidance_scale=guidance, guidance_interval=(0.4, 1.0),
                                          use_cache=use_cache, return_stats=True)
            outs.append(tokens)
        torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)
        assert stats["nfe"] == 2 * num_ar_steps and sum(stats["step_sizes"]) == model.num_tokens


def test_one_ar_step_is_an_ordinary_diffusion_transformer():
    """N = 1, empty prefix: class tokens attend among themselves, every noisy token attends to all
    class + noisy tokens (full attention, no order): written out by hand with the model's weights."""
    model = tiny_model()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    timestep = torch.tensor([100.0, 900.0])
    labels = torch.tensor([2, 0])

    def attend(block, h, context):
        attn = block.attn
        q = attn.norm_q(attn._heads(attn.to_q(block.norm1(h)), attn.num_heads))
        kv_in = block.norm1(context)
        k = attn.norm_k(attn._heads(attn.to_k(kv_in), attn.num_heads))
        v = attn._heads(attn.to_v(kv_in), attn.num_heads)
        weights = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)
        return attn.to_out((weights @ v).transpose(1, 2).flatten(2))

    with torch.no_grad():
        cond = model.embed_condition(labels, 2)
        positions = torch.arange(model.num_tokens).expand(2, -1)
        noisy = model.x_proj(patchify(x, 2)) + model.pos_embed + model.t_embedder(timestep)[:, None]
        for block in model.blocks:
            new_cond = cond + attend(block, cond, cond)
            new_cond = new_cond + block.mlp(block.norm2(new_cond))
            seq = torch.cat([cond, noisy], 1)
            noisy = noisy + attend(block, noisy, seq)
            noisy = noisy + block.mlp(block.norm2(noisy))
            cond = new_cond
        reference = unpatchify(model.proj_out(model.norm_out(noisy)), 2, (4, 4))
        out = model(x, timestep, labels).sample
        shuffled = model(x, timestep, labels, token_order=torch.stack([torch.randperm(16, generator=gen) for _ in range(2)])).sample
    torch.testing.assert_close(out, reference, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(shuffled, reference, atol=2e-5, rtol=1e-4)  # no order in plain diffusion
    assert positions.shape == (2, 16)


def test_both_ends_dependency_structure():
    """Pure AR in raster order: token i never depends on the noise of later tokens. Plain diffusion:
    every token depends on every other token's noise."""
    model = tiny_model()
    labels = torch.tensor([0])
    length, dim = model.num_tokens, model.token_dim
    noise = torch.randn(1, length, dim, generator=torch.Generator().manual_seed(4))
    changed = noise.clone()
    changed[:, 10:] += 1.0
    outs = {}
    for n in (1, length):
        a = sample_tokens(model, labels, 1, num_ar_steps=n, num_inference_steps=2, order="raster", noise=noise)
        b = sample_tokens(model, labels, 1, num_ar_steps=n, num_inference_steps=2, order="raster", noise=changed)
        outs[n] = (a - b).abs().amax(-1)[0]
    assert outs[length][:10].max() == 0  # pure AR: the first 10 tokens ignore the changed future noise
    assert outs[1][:10].min() > 1e-6  # plain diffusion: they all move


def test_editing_keeps_tokens_and_zero_x0_model_gives_known_answer():
    """x0-predicting model with zero output: the ODE on the linear path ends exactly at x0 = 0 for
    generated tokens (x_{t'} = x t'/t); kept tokens are the image's, for any number of AR steps."""
    model = CausalFusionTransformer(in_channels=3, sample_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                                    num_classes=3, num_cond_tokens=2).eval()  # zero-initialised output
    pipe = CausalFusionPipeline(model, prediction="x0")
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(2, 3, 8, 8) * 2 - 1
    keep = pipe.edit_mask("inpaint", 8)
    assert keep.sum() == 48 and not keep[3:5, 3:5].any()
    for n in (1, 4):
        out = pipe.edit(image, "inpaint", class_labels=[0, 1], num_ar_steps=n, num_inference_steps=3,
                        generator=torch.Generator().manual_seed(0), output_type="latent").images
        torch.testing.assert_close(out[:, :, keep], image[:, :, keep])
        torch.testing.assert_close(out[:, :, ~keep], torch.zeros_like(out[:, :, ~keep]), atol=1e-6, rtol=0)
    # a trained-like model: kept tokens stay exact and the generated ones depend on them
    model = tiny_model()
    pipe = CausalFusionPipeline(model)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(class_labels=[0, 1], num_ar_steps=3, num_inference_steps=2, output_type="latent")
    out_a = pipe.edit(image, "outpaint", generator=torch.Generator().manual_seed(0), **kwargs).images
    out_b = pipe.edit(-image, "outpaint", generator=torch.Generator().manual_seed(0), **kwargs).images
    keep = pipe.edit_mask("outpaint", 8)
    torch.testing.assert_close(out_a[:, :, keep], image[:, :, keep])
    assert (out_a[:, :, ~keep] - out_b[:, :, ~keep]).abs().max() > 1e-4


def test_family_loss_matches_hand_computation():
    """Zero-output velocity model: per-token error is |eps - x0|^2, weighted by AR step, mean over all."""
    config = CausalFusionConfig(patch_size=2, hidden_size=32, depth=1, num_heads=2, num_cond_tokens=2, dataset_size=8)
    family = CausalFusionFamily(config)
    model = CausalFusionTransformer(in_channels=3, sample_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2,
                                    num_classes=8, num_cond_tokens=2)
    batch = {"image": torch.rand(4, 3, 8, 8) * 2 - 1, "label": torch.tensor([0, 1, 2, 3])}
    out = family.loss(model, batch, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)  # replay the draws in the family's order
    order = torch.argsort(torch.rand((4, 16), generator=gen), dim=1)
    sizes = draw_ar_steps(16, gen, 0.9)
    torch.rand(4, generator=gen)  # t (uniform): unused by a zero velocity model's error
    noise = torch.randn((4, 3, 8, 8), generator=gen)
    err = ((patchify(noise, 2) - patchify(batch["image"], 2)) ** 2).mean(-1)  # [B, L] raster
    weight = torch.empty(4, 16).scatter_(1, order, ar_step_weights(sizes).float().expand(4, -1))
    torch.testing.assert_close(out["loss"], (weight * err).mean(), rtol=1e-5, atol=1e-6)
    assert out["ar_steps"] == len(sizes)


def test_pipeline_round_trip_and_cli(tmp_path):
    model = tiny_model()
    pipe = CausalFusionPipeline(model, id2label={0: "a", 1: "b", 2: "c"}, solver="heun")
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(class_labels=["a", "c"], num_ar_steps=4, num_inference_steps=2, guidance_scale=2.0, output_type="pt")
    before = pipe(generator=[torch.Generator().manual_seed(i) for i in range(2)], **kwargs).images
    pipe.save_pretrained(tmp_path / "pipe")
    from genmod.pipelines import load_pipeline

    loaded = load_pipeline(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded, CausalFusionPipeline) and loaded.config.solver == "heun"
    after = loaded(generator=[torch.Generator().manual_seed(i) for i in range(2)], **kwargs).images
    torch.testing.assert_close(before, after)
    assert before.shape == (2, 3, 8, 8) and 0 <= before.min() and before.max() <= 1
    # a sample is reproducible alone from its own generator
    alone = loaded(class_labels=["c"], num_ar_steps=4, num_inference_steps=2, guidance_scale=2.0, output_type="pt",
                   generator=[torch.Generator().manual_seed(1)]).images
    torch.testing.assert_close(alone[0], before[1], atol=1e-5, rtol=1e-4)
    from genmod.sampling import main as sample_main

    out_png = tmp_path / "grid.png"
    assert sample_main([str(tmp_path / "pipe"), "--num", "2", "--steps", "1", "--ar-steps", "4", "--out", str(out_png),
                        "--device", "cpu"]) == 0
    assert out_png.exists()
    with pytest.raises(ValueError, match="num_ar_steps"):
        loaded(class_labels=[0], num_ar_steps=17, num_inference_steps=1)
    with pytest.raises(ValueError, match="step_sizes"):
        model(torch.zeros(1, 3, 8, 8), 500.0, torch.tensor([0]), step_sizes=[5, 5])


def test_latent_space_through_a_tokenizer(tmp_path):
    """With --tokenizer the model works on the tokenizer's latent grid; editing keeps encoded tokens and
    a zero x0-model fills the rest with zeros; images come back through the tokenizer's decoder."""
    from genmod.tokenizers_vq.models import KLVAE

    torch.manual_seed(0)
    KLVAE(base_channels=8, ch_mult=(1, 2), latent_channels=4).eval().save_pretrained(tmp_path / "tok")
    config = CausalFusionConfig(tokenizer=str(tmp_path / "tok"), patch_size=2, hidden_size=32, depth=1, num_heads=2,
                                num_cond_tokens=2, dataset_size=4, prediction="x0")
    family = CausalFusionFamily(config)
    model = family.build_model().eval()
    assert (model.config.in_channels, model.config.sample_size) == (4, 16)
    batch = {"image": torch.stack([family.build_dataset()[i]["image"] for i in range(2)]), "label": torch.tensor([0, 1])}
    assert torch.isfinite(family.loss(model, batch, torch.Generator().manual_seed(0))["loss"])
    pipe = family.build_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe.edit(batch["image"], "left", class_labels=[0, 1], num_ar_steps=2, num_inference_steps=2,
                        output_type="latent").images
    with torch.no_grad():
        encoded = family.tokenizer.encode(batch["image"])
    torch.testing.assert_close(latents[..., :8], encoded[..., :8])
    torch.testing.assert_close(latents[..., 8:], torch.zeros_like(latents[..., 8:]), atol=1e-6, rtol=0)
    images = pipe.edit(batch["image"], "left", class_labels=[0, 1], num_ar_steps=2, num_inference_steps=2, output_type="pt").images
    with torch.no_grad():
        expected = (family.tokenizer.decode(latents) / 2 + 0.5).clamp(0, 1)
    assert images.shape == (2, 3, 32, 32)
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=1e-4)


def test_paper_parameterization_ddpm_linear_epsilon():
    """The paper's setting: DDPM linear betas, epsilon prediction, integer steps. A zero-epsilon model
    makes DPM-Solver++ exact: x0(x_t) = x_t / alpha(t), so every token ends at noise / alpha(1)."""
    from genmod.core.paths import get_path

    config = CausalFusionConfig(path="ddpm_linear", prediction="epsilon", time_sampling="discrete")
    family = CausalFusionFamily(config)
    t = family.draw_time((4000,), torch.Generator().manual_seed(0))
    assert torch.allclose(t * 1000, (t * 1000).round(), atol=1e-3) and t.min() >= 1e-3 and t.max() <= 1.0
    model = CausalFusionTransformer(in_channels=3, sample_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2,
                                    num_classes=3, num_cond_tokens=2).eval()  # zero output = zero epsilon
    noise = torch.randn(2, 16, 12, generator=torch.Generator().manual_seed(1))
    alpha_one = get_path("ddpm_linear").alpha(torch.tensor([1.0], dtype=torch.float64)).item()
    for n in (1, 5):
        tokens = sample_tokens(model, torch.tensor([0, 1]), 2, num_ar_steps=n, num_inference_steps=4, solver="dpmsolver++2m",
                               path="ddpm_linear", prediction="epsilon", noise=noise, guidance_scale=2.0)
        torch.testing.assert_close(tokens, noise / alpha_one, rtol=1e-4, atol=1e-4)
    batch = {"image": torch.rand(2, 3, 8, 8) * 2 - 1, "label": torch.tensor([0, 1])}
    family.config.patch_size = 2
    model.train()
    out = family.loss(model, batch, torch.Generator().manual_seed(2))
    # zero epsilon prediction: the loss is the weighted mean of eps^2 (about the mean weight)
    assert 0.8 < out["loss"].item() < 2.6


@pytest.mark.parametrize("field,value", [("num_ar_steps", 0), ("step_sizes", [3, 0]), ("num_inference_steps", 0),
                                         ("prediction", "score"), ("order", "spiral"), ("guidance_interval", (0.8, 0.2))])
def test_sampling_settings_reject_bad_values_naming_the_field(field, value):
    from genmod.causalfusion import CausalFusionSampling

    with pytest.raises(ValueError, match=f"^{field}: "):
        CausalFusionSampling(**{field: value})
    with pytest.raises(TypeError, match="num_steps"):  # a keyword that is no field is named too
        sample_tokens(tiny_model(), torch.tensor([0]), 1, num_steps=2)


def test_settings_object_and_keyword_options_give_the_same_tokens():
    from genmod.causalfusion import CausalFusionSampling

    model, labels = tiny_model(), torch.tensor([0, 2])
    settings = CausalFusionSampling(num_ar_steps=3, num_inference_steps=2, guidance_scale=2.0, order="raster")
    a = sample_tokens(model, labels, 2, settings, generator=torch.Generator().manual_seed(0))
    b = sample_tokens(model, labels, 2, num_ar_steps=3, num_inference_steps=2, guidance_scale=2.0, order="raster",
                      generator=torch.Generator().manual_seed(0))
    c = sample_tokens(model, labels, 2, settings, generator=torch.Generator().manual_seed(0), guidance_scale=1.0)
    assert torch.equal(a, b) and settings.step_sizes is None
    assert (a - c).abs().max() > 1e-4  # an option overrides the settings' field
