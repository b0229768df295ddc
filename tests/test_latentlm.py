"""LatentLM (issue 6): causality, KV cache == recompute, the diffusion head (loss falls, few-step samples
match a Gaussian's moments, analytic head through the solver), CE / diffusion routing in mixed
sequences, the byte tokenizer, the family's latent normalisation, pipeline save/load round trips."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from genmod.core.paths import get_path
from genmod.latentlm.family import LatentLMConfig, LatentLMFamily, item_segments, next_element_loss
from genmod.latentlm.pipeline import LatentLMPipeline
from genmod.latentlm.sampling import generate_latents, generate_text, sample_head
from genmod.latentlm.text import BOL, BOS, EOL, EOS, LATENT, NULL, PAD, LatentLMTokenizer, pack_sequences
from genmod.latentlm.transformer import LatentLMTransformer


def tiny_model(seed=0, **kw) -> LatentLMTransformer:
    torch.manual_seed(seed)
    args = dict(latent_channels=4, latent_grid=(2, 3), hidden_size=32, depth=2, num_heads=4, head_width=32, head_depth=2,
                max_text_length=16)
    args.update(kw)
    model = LatentLMTransformer(**args).eval()
    # the head starts at exactly zero (adaLN-Zero); randomise it so the tests see a non-trivial head
    with torch.no_grad():
        for p in model.diffusion_head.parameters():
            p.normal_(0, 0.2)
    return model


def random_sequence(model, batch=2, seed=1):
    tok = LatentLMTokenizer(0)
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, model.num_latent_tokens, model.config.latent_channels, generator=g)
    segments = [item_segments(tok, "text", caption="ab" * (b + 1), caption_first=b % 2 == 0) for b in range(batch)]
    return pack_sequences(segments, latents, model.config.latent_channels)


def test_tokenizer_round_trip_and_layout():
    tok = LatentLMTokenizer(num_classes=3, max_text_length=32)
    assert tok.vocab_size == 6 + 256 + 3
    text = "a small red circle, é"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text) + [EOS] + tok.encode("junk")) == text
    assert tok.class_token(2) == 6 + 256 + 2
    with pytest.raises(ValueError, match="class_labels"):
        tok.class_token(3)
    packed = pack_sequences([[[BOS, 10, BOL], LATENT, [EOL, EOS]], [[BOS, BOL], LATENT, [EOL]]],
                            torch.arange(2 * 2 * 1.0).reshape(2, 2, 1), 1, left_pad=True)
    assert packed.tokens.tolist() == [[BOS, 10, BOL, PAD, PAD, EOL, EOS], [PAD, PAD, BOS, BOL, PAD, PAD, EOL]]
    assert packed.is_latent.tolist()[1] == [False, False, False, False, True, True, False]
    assert packed.positions.tolist()[1] == [0, 0, 0, 1, 2, 3, 4]
    assert packed.latents[1, 4:6, 0].tolist() == [2.0, 3.0]


def test_causality_changing_element_i_plus_1_leaves_positions_up_to_i():
    model = tiny_model()
    packed = random_sequence(model, batch=2)
    ref = model(packed.tokens, packed.latents, packed.is_latent, positions=packed.positions)
    length = packed.tokens.shape[1]
    for i in range(length - 1):
        tokens, latents = packed.tokens.clone(), packed.latents.clone()
        if packed.is_latent[0, i + 1]:
            latents[0, i + 1] += 1.0
        else:
            tokens[0, i + 1] = (tokens[0, i + 1] + 7) % model.config.vocab_size
        out = model(tokens, latents, packed.is_latent, positions=packed.positions)
        assert torch.equal(out.hidden_states[0, : i + 1], ref.hidden_states[0, : i + 1]), i
        assert torch.equal(out.logits[0, : i + 1], ref.logits[0, : i + 1]), i
        assert not torch.allclose(out.hidden_states[0, i + 1], ref.hidden_states[0, i + 1]), i
        assert torch.equal(out.hidden_states[1], ref.hidden_states[1])  # other samples untouched


def test_left_padding_with_key_mask_equals_unpadded():
    model = tiny_model()
    tok = LatentLMTokenizer()
    short, long = [BOS, *tok.encode("ab"), BOL], [BOS, *tok.encode("hello there"), BOL]
    packed = pack_sequences([[short], [long]], None, 4, left_pad=True)
    out = model(packed.tokens, positions=packed.positions, key_mask=packed.valid).hidden_states
    alone = model(torch.tensor([short])).hidden_states
    assert torch.allclose(out[0, -len(short):], alone[0], atol=1e-5)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_kv_cached_generation_equals_uncached(guidance):
    model = tiny_model()
    tok = LatentLMTokenizer()
    prompts = [[BOS, *tok.encode("ab"), BOL], [BOS, *tok.encode("a longer one"), BOL]]
    null = [[BOS, BOL]] * 2
    cached = generate_latents(model, prompts, null, 4, guidance, 0.9, torch.Generator().manual_seed(3), use_kv_cache=True)
    recomputed = generate_latents(model, prompts, null, 4, guidance, 0.9, torch.Generator().manual_seed(3), use_kv_cache=False)
    assert cached.shape == (2, 6, 4)
    assert torch.allclose(cached, recomputed, atol=1e-4)
    # captioning: latents in, text out, same ids either way
    segments = [[[BOS, BOL], LATENT, [EOL]], [[BOS, 40, 41, BOL], LATENT, [EOL]]]
    text_cached = generate_text(model, segments, cached, 8, use_kv_cache=True)
    text_recomputed = generate_text(model, segments, cached, 8, use_kv_cache=False)
    assert text_cached == text_recomputed and len(text_cached[0]) == 8


def test_latent_patches_round_trip_and_generate():
    """With ``latent_patch_size=2`` token k holds the k-th 2x2 latent patch (raster order), all channels."""
    model = tiny_model(latent_grid=(4, 6), latent_patch_size=2)
    assert model.num_latent_tokens == 6 and model.token_dim == 16
    z = torch.randn(2, 4, 4, 6)
    tokens = model.latents_to_tokens(z)
    assert tokens.shape == (2, 6, 16)
    assert torch.equal(tokens[1, 4].reshape(4, 2, 2), z[1, :, 2:4, 2:4])  # patch row 1, column 1
    assert torch.equal(model.tokens_to_latents(tokens), z)
    prompts = [[BOS, 40, BOL], [BOS, 41, 42, BOL]]
    cached = generate_latents(model, prompts, [[BOS, BOL]] * 2, 3, 2.0, 1.0, torch.Generator().manual_seed(0))
    recomputed = generate_latents(model, prompts, [[BOS, BOL]] * 2, 3, 2.0, 1.0, torch.Generator().manual_seed(0),
                                  use_kv_cache=False)
    assert cached.shape == (2, 6, 16) and torch.allclose(cached, recomputed, atol=1e-4)
    with pytest.raises(ValueError, match="latent_patch_size"):
        tiny_model(latent_grid=(3, 4), latent_patch_size=2)
    with pytest.raises(ValueError, match="latent_patch_size"):
        tiny_model(latent_grid=(8,), latent_patch_size=2, modality="audio")


def _gaussian_head(path, mean, std, prediction):
    """The exact head output for data x0 ~ N(mean, diag(std^2)): E[x0 | x_t] converted to ``prediction``."""

    def head(x_t, timestep, hidden):
        # invert path.network_timestep: 1000 t, or the DDPM step n = 1000 t - 1 on ddpm_* paths (issue 21)
        shift = 1.0 if path.name == "discrete" else 0.0
        t = ((timestep.to(torch.float64) + shift) / 1000)[:, None]
        a, s = path.alpha(t), path.sigma(t)
        x = x_t.to(torch.float64)
        x0 = mean + a * std**2 / (a**2 * std**2 + s**2) * (x - a * mean)
        return path.convert(x0, x, t[:, 0], src="x0", dst=prediction).to(x_t.dtype)

    return head


# DPM-Solver++(2M) on a uniform grid shrinks a narrow Gaussian's spread at very few steps (std 0.39 for 0.5
# at 5 steps, 0.475 at 10, 0.495 at 25), identically on both paths; the tolerances follow that.
@pytest.mark.parametrize("path_name,prediction,steps,rtol", [("cosine", "velocity", 10, 0.06), ("ddpm_cosine", "epsilon", 25, 0.03)])
def test_head_sampler_with_exact_gaussian_head_matches_moments(path_name, prediction, steps, rtol):
    model = tiny_model(latent_channels=2, path=path_name, prediction=prediction)
    mean, std = torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([0.5, 1.5], dtype=torch.float64)
    model.head = _gaussian_head(get_path(path_name), mean, std, prediction)
    hidden = torch.zeros(4000, 32)
    samples = sample_head(model, hidden, num_steps=steps, generator=torch.Generator().manual_seed(0)).double()
    assert torch.allclose(samples.mean(0), mean, atol=0.06)
    assert torch.allclose(samples.std(0), std, rtol=rtol)
    # temperature scales the initial noise: at 0 every sample is the deterministic mode of the flow
    cold = sample_head(model, hidden[:8], num_steps=10, temperature=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(cold.double(), mean.expand(8, 2), atol=1e-3)


def test_head_loss_falls_on_fixed_target_and_samples_match_gaussian():
    torch.manual_seed(0)
    model = LatentLMTransformer(latent_channels=2, latent_grid=(1,), hidden_size=32, depth=1, num_heads=4,
                                head_width=48, head_depth=2)
    path = get_path("cosine")
    mean, std = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.5])
    opt = torch.optim.Adam(model.diffusion_head.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    batch = 256
    hidden = torch.zeros(batch, 32)
    fixed_target = torch.tensor([[0.7, -0.3]]).expand(batch, 2)
    losses = []
    for step in range(200):
        target = fixed_target if step < 40 else mean + std * torch.randn(batch, 2, generator=g)
        t = torch.rand(batch, generator=g)
        noise = torch.randn(batch, 2, generator=g)
        x_t = path.sample(target, noise, t).x_t
        pred = model.head(x_t, 1000 * t, hidden)
        velocity = path.d_alpha(t)[:, None] * target + path.d_sigma(t)[:, None] * noise
        loss = F.mse_loss(pred, velocity)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # a point-mass target makes the velocity a function of x_t, so the loss can fall towards 0
    assert sum(losses[30:40]) < 0.3 * sum(losses[:10])
    with torch.no_grad():
        samples = sample_head(model, torch.zeros(2000, 32), num_steps=10, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(samples.mean(0), mean, atol=0.2)
    assert torch.allclose(samples.std(0), std, rtol=0.25)


def test_mixed_sequence_routes_ce_and_diffusion_to_the_right_positions():
    model = tiny_model()
    model.train()
    tok = LatentLMTokenizer()
    a, b = tok.encode("a")[0], tok.encode("b")[0]
    latents = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(0))
    segments = [[[BOS, a, b, BOL], LATENT, [EOL, EOS]],  # text -> latents
                [[BOS, BOL], LATENT, [EOL, a, EOS]]]  # latents -> text (caption)
    packed = pack_sequences(segments, latents, 4)
    path = get_path("cosine")
    logs = next_element_loss(model, packed, torch.Generator().manual_seed(5), path, "velocity", diffusion_batch_mul=3)
    # position i predicts element i + 1. sample 0: CE at 0,1,2 (a, b, <bol>), 9 (<eol>), 10 (<eos>); latents at 3..8.
    # sample 1: CE at 0 (<bol>), 7 (<eol>), 8 (a), 9 (<eos>); latents at 1..6; position 10 is padding.
    ce_positions = [(0, 0), (0, 1), (0, 2), (0, 9), (0, 10), (1, 0), (1, 7), (1, 8), (1, 9)]
    latent_positions = [(0, i) for i in range(3, 9)] + [(1, i) for i in range(1, 7)]
    assert logs["num_text_targets"] == len(ce_positions) and logs["num_latent_targets"] == len(latent_positions)
    out = model(packed.tokens, packed.latents, packed.is_latent, positions=packed.positions)
    rows, cols = zip(*ce_positions)
    ce = F.cross_entropy(out.logits[rows, cols], packed.tokens[rows, [c + 1 for c in cols]])
    assert torch.allclose(logs["ce"], ce, atol=1e-6)
    rows, cols = zip(*latent_positions)
    cond = out.hidden_states[rows, cols].repeat(3, 1)
    x0 = torch.cat([latents[0], latents[1]]).repeat(3, 1)
    g = torch.Generator().manual_seed(5)
    t = torch.rand(x0.shape[0], generator=g)
    noise = torch.randn(x0.shape, generator=g)
    sample = path.sample(x0, noise, t)
    target = path.d_alpha(t)[:, None] * x0 + path.d_sigma(t)[:, None] * noise
    diffusion = F.mse_loss(model.head(sample.x_t, 1000 * t, cond), target)
    assert torch.allclose(logs["diffusion"], diffusion, atol=1e-5)
    assert torch.allclose(logs["loss"], ce + diffusion, atol=1e-5)


def tiny_sigma_vae(modality="image"):
    from genmod.tokenizers_vq.models import SigmaVAE

    torch.manual_seed(0)
    if modality == "image":
        return SigmaVAE(modality="image", in_channels=3, base_channels=8, ch_mult=(1, 2), num_res_blocks=1,
                        latent_channels=4).eval()
    return SigmaVAE(modality="audio", in_channels=1, base_channels=4, strides=(4, 4), num_res_blocks=1,
                    latent_channels=4).eval()


def test_pipeline_save_load_round_trip_image_and_caption(tmp_path):
    vae = tiny_sigma_vae("image")
    grid = tuple(vae.encode(torch.zeros(1, 3, 8, 8)).shape[2:])
    model = tiny_model(latent_grid=grid, num_classes=0)
    pipe = LatentLMPipeline(transformer=model, vae=vae, num_head_steps=3, guidance_scale=2.0)
    pipe.set_progress_bar_config(disable=True)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
    images = pipe(prompt=["a red circle", "a blue square"], generator=gens(), output_type="pt").images
    assert images.shape == (2, 3, 8, 8) and 0 <= images.min() and images.max() <= 1
    captions = pipe.caption(images * 2 - 1, max_new_tokens=6)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = LatentLMPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.num_head_steps == 3 and loaded.config.guidance_scale == 2.0
    again = loaded(prompt=["a red circle", "a blue square"], generator=gens(), output_type="pt").images
    assert torch.allclose(images, again, atol=1e-6)
    assert loaded.caption(images * 2 - 1, max_new_tokens=6) == captions
    # per-sample generators: a sample does not depend on its batch mates
    single = loaded(prompt="a blue square", generator=[torch.Generator().manual_seed(1)], output_type="pt").images
    assert torch.allclose(single[0], again[1], atol=1e-5)


def test_pipeline_audio_and_class_conditional(tmp_path):
    vae = tiny_sigma_vae("audio")
    frames = vae.encode(torch.zeros(1, 1, 96)).shape[-1]
    model = tiny_model(latent_grid=(frames,), modality="audio", num_classes=3, vocab_size=LatentLMTokenizer(3).vocab_size)
    pipe = LatentLMPipeline(transformer=model, vae=vae, sample_rate=8000, id2label={0: "a", 1: "b", 2: "c"},
                            num_head_steps=2)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(class_labels=["b", 0], generator=torch.Generator().manual_seed(0))
    assert out.audios.shape == (2, 1, 96) and abs(out.audios).max() <= 1
    pipe.save_pretrained(tmp_path / "audio")
    loaded = LatentLMPipeline.from_pretrained(tmp_path / "audio")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.sample_rate == 8000
    again = loaded(class_labels=[1, 0], generator=torch.Generator().manual_seed(0))
    assert abs(again.audios - out.audios).max() < 1e-5
    with pytest.raises(ValueError, match="class_labels"):
        loaded(class_labels=["z"])
    with pytest.raises(ValueError, match="prompt"):
        loaded(prompt="hello", class_labels=[0])


def test_family_normalises_latents_and_trains_one_step(tmp_path):
    vae = tiny_sigma_vae("image")
    vae.save_pretrained(tmp_path / "vae")
    config = LatentLMConfig(tokenizer=str(tmp_path / "vae"), dataset="shapes", dataset_size=32, latent_stats_batches=1,
                            hidden_size=32, depth=1, num_heads=4, head_width=32, head_depth=1, cpu=True,
                            latent_sample=False)
    config.validate()
    family = LatentLMFamily(config)
    info = family.data_info()
    images = torch.stack([family.raw_dataset()[i]["image"] for i in range(32)])
    z = family.tokenizer.encode(images)
    # --no-latent_sample: the stats of the means, so the encoded means are (z - mean) / std
    assert abs(z.mean().item()) < 1e-4 and abs(z.std().item() - 1) < 1e-2
    model = family.build_model()
    assert model.config.latent_grid == info["latent_grid"] and model.num_latent_tokens == math.prod(info["latent_grid"])
    batch = {"image": images[:4], "caption": [family.raw_dataset()[i]["caption"] for i in range(4)],
             "label": torch.zeros(4, dtype=torch.long)}
    logs = family.loss(model.train(), batch, torch.Generator().manual_seed(0))
    assert logs["num_latent_targets"] == 4 * model.num_latent_tokens and torch.isfinite(logs["loss"])
    logs["loss"].backward()
    assert model.latent_embed.weight.grad.abs().sum() > 0 and model.lm_head.weight.grad.abs().sum() > 0


def test_config_errors_name_the_flag():
    with pytest.raises(ValueError, match="--tokenizer"):
        LatentLMConfig().validate()
    with pytest.raises(ValueError, match="--caption_prob"):
        LatentLMConfig(tokenizer="x", caption_prob=2.0).validate()
    with pytest.raises(ValueError, match="--audio_duration"):
        LatentLMConfig(tokenizer="x", dataset="shapes", audio_duration=1.0).validate()
    LatentLMConfig(tokenizer="x", dataset="speech_digits", audio_duration=1.28).validate()
    with pytest.raises(ValueError, match="prediction"):
        LatentLMTransformer(prediction="v")
    model = tiny_model()
    with pytest.raises(ValueError, match="latents"):
        model.latents_to_tokens(torch.zeros(1, 4, 3, 3))
    assert NULL == 5
