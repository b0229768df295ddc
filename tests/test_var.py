"""VAR (issue 5): block-causal mask by scale, KV cache vs uncached forward, teacher forcing == sampling
inputs, CFG ramp, zero-shot editing, loss weighting, save/load, family training end to end.

Everything runs on tiny random tokenizers (msvq) and tiny transformers.
"""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from genmod.nn.masks import block_ids_from_sizes
from genmod.var import VARPipeline, VARTransformer, guidance_weight, scale_keep_masks, var_generate, var_loss
from genmod.tokenizers_vq.models import VQTokenizer

SQUARE = (1, 2, 3, 4)
RECT = ((1, 2), (2, 3), (3, 4), (4, 6))


def make_tokenizer(scales=SQUARE, vocab=32, channels=4, ch_mult=(1, 2)):
    torch.manual_seed(1)
    tok = VQTokenizer(quantizer="msvq", latent_channels=channels, codebook_size=vocab, base_channels=8, ch_mult=ch_mult,
                      num_res_blocks=1, scales=[list(s) if isinstance(s, tuple) else s for s in scales])
    return tok.eval().requires_grad_(False)


def make_transformer(tok, num_classes=3, depth=2, width=32, **kw):
    torch.manual_seed(2)
    q = tok.quantize_layer
    return VARTransformer(vocab_size=q.codebook_size, latent_channels=q.dim, scales=[list(s) for s in q.scales],
                          num_classes=num_classes, depth=depth, width=width, num_heads=2, **kw).eval()


def random_pyramid(model, batch=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, model.num_tokens), generator=g)


@pytest.fixture(scope="module")
def tiny():
    tok = make_tokenizer()
    return tok, make_transformer(tok)


# ------------------------------------------------------------------------------------------ model
def test_depth_rule_and_attention_layout():
    model = VARTransformer(vocab_size=16, latent_channels=4, scales=[1, 2], num_classes=2, depth=3)
    assert model.width == 192 and model.blocks[0].attn.num_heads == 3
    assert model.blocks[-1].drop_path_prob == pytest.approx(0.1 * 3 / 24) and model.blocks[0].drop_path_prob == 0.0
    assert model.blocks[0].mlp.fc1.out_features == 4 * 192
    attn = model.blocks[0].attn
    assert attn.l2_norm_qk and attn.to_k.bias is None and attn.to_q.bias is not None and attn.to_v.bias is not None
    assert torch.allclose(attn.log_temperature.exp(), torch.tensor(4.0))
    # VAR init: gamma rows of adaLN x init_adaln_gamma (1e-3) are ~1000x smaller than scale/shift rows x 0.5
    w = model.blocks[0].ada_lin[1].weight
    ratio = w[2 * 192:].std() / w[:2 * 192].std()
    assert 300 < ratio < 1000


@pytest.mark.parametrize("scales", [SQUARE, RECT])
def test_mask_sees_exactly_own_and_earlier_scales(scales):
    tok = make_tokenizer(scales)
    model = make_transformer(tok)
    sizes = [h * w for h, w in model.scale_sizes]
    ids = block_ids_from_sizes(sizes)
    expected = ids[:, None] >= ids[None, :]
    assert torch.equal(model.attention_mask(), expected)
    # functional check: d logits(scale i) / d embedding(scale j) is nonzero iff j <= i
    cond = model.condition(torch.tensor([0]))
    x = model.embed_sequence(cond, tok.quantize_layer.scales_to_teacher_forcing_inputs(random_pyramid(model, 1))).detach()
    starts = model.scale_starts
    for i in range(len(sizes)):
        x_req = x.clone().requires_grad_(True)
        logits = model.run_blocks(x_req, cond.detach())
        logits[:, starts[i]:starts[i + 1]].square().sum().backward()
        for j in range(len(sizes)):
            grad = x_req.grad[:, starts[j]:starts[j + 1]].abs().max().item()
            assert (grad > 0) == (j <= i), (i, j, grad)


@pytest.mark.parametrize("scales", [SQUARE, RECT])
def test_kv_cached_logits_equal_uncached_forward(scales):
    tok = make_tokenizer(scales)
    model = make_transformer(tok)
    q = tok.quantize_layer
    indices = random_pyramid(model)
    labels = torch.tensor([0, 2])
    full = model(labels, q.scales_to_teacher_forcing_inputs(indices)).logits
    cond, caches = model.condition(labels), model.new_kv_caches()
    f_hat = torch.zeros(2, q.dim, *q.full_size)
    x, cached = model.embed_scale(0, cond), []
    for k, index_map in enumerate(q.split_indices(indices)):
        cached.append(model.run_blocks(x, cond, caches))
        f_hat, nxt = q.next_autoregressive_input(k, f_hat, q.embed(index_map))
        if k + 1 < len(scales):
            x = model.embed_scale(k + 1, cond, nxt.flatten(2).transpose(1, 2))
    assert len(caches[0]) == model.num_tokens
    torch.testing.assert_close(torch.cat(cached, 1), full, atol=1e-5, rtol=1e-5)
    # the sampler with and without the cache: same logits and same tokens
    a = var_generate(model, q, labels, guidance_scale=3.0, generator=torch.Generator().manual_seed(0), return_logits=True)
    b = var_generate(model, q, labels, guidance_scale=3.0, generator=torch.Generator().manual_seed(0), return_logits=True,
                     use_kv_cache=False)
    for la, lb, ia, ib in zip(a.logits, b.logits, a.index_maps, b.index_maps):
        torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
        assert torch.equal(ia, ib)


def test_teacher_forcing_and_sampling_use_the_same_scale_inputs(tiny):
    tok, model = tiny
    q = tok.quantize_layer
    labels = torch.tensor([1, 0, 2])
    out = var_generate(model, q, labels, generator=torch.Generator().manual_seed(4), return_logits=True)
    indices = torch.cat([m.flatten(1) for m in out.index_maps], 1)
    # the sampler's logits on its own tokens are the teacher-forced logits of that pyramid
    teacher = model(labels, q.scales_to_teacher_forcing_inputs(indices)).logits
    torch.testing.assert_close(torch.cat(out.logits, 1), teacher, atol=1e-5, rtol=1e-5)
    # and its f_hat is the tokenizer's reconstruction of those indices
    torch.testing.assert_close(out.f_hat, q.decode_scales(indices), atol=1e-6, rtol=1e-6)


def test_cfg_ramp_matches_var_and_scale_zero_is_conditional(tiny):
    tok, model = tiny
    q = tok.quantize_layer
    K, cfg = model.num_scales, 1.5
    c, u = torch.randn(5), torch.randn(5)
    for k in range(K):
        t = cfg * k / (K - 1)  # VAR: (1 + t) c - t u
        w = guidance_weight(k, K, 1 + cfg)
        torch.testing.assert_close(u + w * (c - u), (1 + t) * c - t * u)
    assert guidance_weight(0, K, 7.0) == 1.0 and guidance_weight(K - 1, K, 7.0) == 7.0
    assert guidance_weight(0, K, 7.0, "constant") == 7.0
    labels = torch.tensor([2, 1])
    guided = var_generate(model, q, labels, guidance_scale=6.0, generator=torch.Generator().manual_seed(0), return_logits=True)
    plain = var_generate(model, q, labels, guidance_scale=1.0, generator=torch.Generator().manual_seed(0), return_logits=True)
    torch.testing.assert_close(guided.logits[0], plain.logits[0], atol=1e-5, rtol=1e-5)  # w_0 = 1: conditional model
    assert not torch.allclose(guided.logits[-1], plain.logits[-1], atol=1e-3)
    # w = 0 at every scale is the unconditional (null-class) model
    null = var_generate(model, q, torch.full_like(labels, model.null_class_id), return_logits=True,
                        generator=torch.Generator().manual_seed(0))
    zero = var_generate(model, q, labels, guidance_scale=0.0, guidance_schedule="constant", return_logits=True,
                        generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(zero.logits[0], null.logits[0], atol=1e-5, rtol=1e-5)


def test_top_k_one_is_greedy_and_per_sample_generators_are_batch_independent(tiny):
    tok, model = tiny
    q = tok.quantize_layer
    labels = torch.tensor([0, 1, 2])
    out = var_generate(model, q, labels, guidance_scale=2.0, top_k=1, return_logits=True)
    for ids, logits in zip(out.index_maps, out.logits):
        assert torch.equal(ids.flatten(1), logits.argmax(-1))
    batch = var_generate(model, q, labels, generator=[torch.Generator().manual_seed(s) for s in (5, 6, 7)])
    single = var_generate(model, q, labels[1:2], generator=[torch.Generator().manual_seed(6)])
    for a, b in zip(batch.index_maps, single.index_maps):
        assert torch.equal(a[1:2], b)


@pytest.mark.parametrize("scales", [SQUARE, RECT])
def test_editing_keeps_given_tokens_exactly(scales):
    tok = make_tokenizer(scales)
    model = make_transformer(tok)
    q = tok.quantize_layer
    image = torch.rand(2, 3, *(2 * s for s in q.full_size)) * 2 - 1
    given = q.encode_scales(tok.encoder(image))
    keep = torch.zeros(q.full_size)
    keep[:, : q.full_size[1] // 2] = 1  # keep the left half, generate the right half
    masks = scale_keep_masks(keep, q.scales, 2)
    assert masks[0].all()  # VAR's demo: scales of <= 3 tokens always keep the given tokens
    assert torch.equal(masks[-1][0], keep.bool())
    out = var_generate(model, q, torch.tensor([0, 3]), guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
                       given_index_maps=given, keep_masks=masks)
    for ids, gt, m in zip(out.index_maps, given, masks):
        assert torch.equal(ids[m], gt[m])
    assert any((ids[~m] != gt[~m]).any() for ids, gt, m in zip(out.index_maps, given, masks))  # the rest is generated
    # the pipeline path: keeping everything reproduces the tokenizer's reconstruction exactly
    pipe = VARPipeline(transformer=model, vqvae=tok)
    pipe.set_progress_bar_config(disable=True)
    f_hat = pipe.edit(image, torch.ones(7, 5), class_labels=[1, 2], output_type="latent").images
    torch.testing.assert_close(f_hat, q.decode_scales(given), atol=1e-6, rtol=1e-6)


def test_loss_is_uniform_token_cross_entropy(tiny):
    _, model = tiny
    logits = torch.randn(2, model.num_tokens, model.config.vocab_size)
    indices = random_pyramid(model)
    log_probs = logits.log_softmax(-1).gather(-1, indices[..., None])[..., 0]
    weights = torch.full((1, model.num_tokens), 1.0 / model.num_tokens)  # VAR: loss_weight = 1/L
    expected = -(log_probs * weights).sum(-1).mean()
    torch.testing.assert_close(var_loss(logits, indices), expected)
    smooth = var_loss(logits, indices, label_smoothing=0.1)
    torch.testing.assert_close(smooth, F.cross_entropy(logits.flatten(0, 1), indices.flatten(), label_smoothing=0.1))


def test_training_overfits_one_pyramid_and_dropout_uses_the_generator(tiny):
    tok, _ = tiny
    q = tok.quantize_layer
    model = make_transformer(tok, drop_path_rate=0.1, class_dropout_prob=0.5).train()
    indices, labels = random_pyramid(model, 4), torch.tensor([0, 1, 2, 0])
    inputs = q.scales_to_teacher_forcing_inputs(indices)
    a = model(labels, inputs, dropout_generator=torch.Generator().manual_seed(9)).logits
    b = model(labels, inputs, dropout_generator=torch.Generator().manual_seed(9)).logits
    c = model(labels, inputs, dropout_generator=torch.Generator().manual_seed(10)).logits
    assert torch.equal(a, b) and not torch.equal(a, c)
    model = make_transformer(tok)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
    first = None
    for step in range(60):
        loss = var_loss(model(labels, inputs, dropout_generator=torch.Generator().manual_seed(step)).logits, indices)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first == pytest.approx(torch.log(torch.tensor(32.0)).item(), abs=0.1)  # head init x0.02: ~uniform
    assert loss.item() < 0.3 * first


def test_pipeline_save_load_round_trip_and_settings(tmp_path, tiny):
    from genmod.pipelines import load_pipeline

    tok, model = tiny
    pipe = VARPipeline(transformer=model, vqvae=tok, id2label={0: "a", 1: "b", 2: "c"}, guidance_scale=3.0, top_k=5,
                       top_p=0.9, temperature=0.8)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(class_labels=["b", 2], generator=[torch.Generator().manual_seed(i) for i in range(2)], output_type="pt")
    pipe.save_pretrained(tmp_path)
    with open(tmp_path / "model_index.json") as f:
        index = json.load(f)
    assert index["transformer"] == ["genmod.var.transformer", "VARTransformer"] and index["top_k"] == 5
    loaded = load_pipeline(str(tmp_path))
    loaded.set_progress_bar_config(disable=True)
    assert loaded.sampling_settings() == {"guidance_scale": 3.0, "guidance_schedule": "linear", "top_k": 5, "top_p": 0.9,
                                          "temperature": 0.8}
    again = loaded(class_labels=[1, 2], generator=[torch.Generator().manual_seed(i) for i in range(2)], output_type="pt")
    assert out.images.shape == (2, 3, 8, 8)
    torch.testing.assert_close(again.images, out.images, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        loaded(class_labels=[0], num_inference_steps=3)
    with pytest.raises(ValueError, match="class_labels"):
        loaded(class_labels=[4])  # 3 is the null class (unconditional), 4 does not exist


def test_family_trains_and_exports_with_the_cli(tmp_path, capsys):
    from genmod.cli import main as cli_main
    from genmod.pipelines import load_pipeline
    from genmod.train import read_metrics

    tok = make_tokenizer((1, 2, 4, 8), vocab=64, channels=4, ch_mult=(1, 2, 2))  # 32 px shapes -> 8x8
    tok.save_pretrained(tmp_path / "tok")
    out = tmp_path / "var"
    assert 0 == cli_main(["train", "var", "--tokenizer", str(tmp_path / "tok"), "--dataset", "shapes", "--dataset_size", "32",
              "--depth", "1", "--width", "32", "--num_heads", "2", "--batch_size", "8", "--max_steps", "3", "--cpu",
              "--no-tensorboard", "--sample_every", "0", "--checkpoint_every", "0", "--num_preview", "4",
              "--output_dir", str(out), "--top_k", "7"])
    metrics = read_metrics(str(out))
    assert len(metrics) == 3 and metrics[0]["loss"] == pytest.approx(torch.log(torch.tensor(64.0)).item(), abs=0.15)
    pipe = load_pipeline(str(out / "pipeline"))
    assert pipe.sampling_settings()["top_k"] == 7 and pipe.config.id2label["0"] == "circle"
    assert pipe.transformer.scale_sizes == [(1, 1), (2, 2), (4, 4), (8, 8)]
    # genmod sample on the exported folder prints the saved settings
    assert 0 == cli_main(["sample", str(out / "pipeline"), "--num", "2", "--out", str(tmp_path / "s.png"), "--device", "cpu"])
    with open(tmp_path / "s.json") as f:
        assert json.load(f)["pipeline_defaults"]["top_k"] == 7
    assert os.path.isfile(tmp_path / "s.png")
    VQTokenizer(quantizer="fsq", base_channels=8, ch_mult=(1, 2)).save_pretrained(tmp_path / "fsq")
    capsys.readouterr()
    assert 2 == cli_main(["train", "var", "--tokenizer", str(tmp_path / "fsq"), "--cpu", "--output_dir", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "quantizer 'msvq'" in err


@pytest.mark.parametrize("field,value", [("guidance_schedule", "cosine"), ("temperature", -1.0), ("top_k", 0),
                                         ("top_p", 1.5)])
def test_sampling_settings_reject_bad_values_naming_the_field(tiny, field, value):
    from genmod.var import VARSampling

    tok, model = tiny
    with pytest.raises(ValueError, match=f"^{field}: "):
        VARSampling(**{field: value})
    with pytest.raises(ValueError, match=f"^{field}: "):  # keyword options are validated the same way
        var_generate(model, tok.quantize_layer, torch.tensor([0]), **{field: value})
    with pytest.raises(TypeError, match="cfg"):  # a keyword that is no field is named
        var_generate(model, tok.quantize_layer, torch.tensor([0]), cfg=1.5)


def test_settings_object_equals_keyword_options(tiny):
    from genmod.var import VARSampling

    tok, model = tiny
    labels = torch.tensor([0, 2])
    settings = VARSampling(guidance_scale=2.5, top_k=4, temperature=0.8, use_kv_cache=False)
    a = var_generate(model, tok.quantize_layer, labels, settings, generator=torch.Generator().manual_seed(3))
    b = var_generate(model, tok.quantize_layer, labels, guidance_scale=2.5, top_k=4, temperature=0.8, use_kv_cache=False,
                     generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a.index_maps, b.index_maps)) and torch.equal(a.f_hat, b.f_hat)
