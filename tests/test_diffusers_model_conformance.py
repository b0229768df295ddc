"""Issue 20: genmod models and pipelines behave as diffusers users expect.

Layerwise casting (weights stored in fp16/fp8, computed in fp32/bf16) gives exactly the sample of a
model whose weights were rounded to the storage dtype; diffusers' attention backends and the xformers /
slicing toggles either act or say why not; a step callback can change guidance; labels parse one way
in every pipeline; a diffusers AutoencoderKL as ``vae`` gets its factors undone; FlowUNet checkpoints.
"""

import copy

import pytest
import torch
from diffusers import AutoencoderKL
from test_causalfusion import tiny_model as causalfusion_model
from test_flow_pipeline import tiny_transformer
from test_flow_unet import tiny_unet
from test_var import make_tokenizer, make_transformer

from genmod.causalfusion.pipeline import CausalFusionPipeline
from genmod.flow.pipeline import FlowMatchingPipeline
from genmod.flow.scheduler import FlowMatchSolverScheduler
from genmod.flow.transformer import FlowTransformer
from genmod.nn.attention import attention
from genmod.var.pipeline import VARPipeline


def flow_dit():
    return FlowMatchingPipeline(tiny_transformer(), FlowMatchSolverScheduler()), dict(num_inference_steps=3)


def flow_unet():
    return FlowMatchingPipeline(tiny_unet().eval(), FlowMatchSolverScheduler()), dict(num_inference_steps=3)


def var():
    tok = make_tokenizer()
    return VARPipeline(transformer=make_transformer(tok), vqvae=tok), {}


def causalfusion():
    return CausalFusionPipeline(causalfusion_model()), dict(num_inference_steps=3, num_ar_steps=2)


PIPELINES = {"flow-dit": flow_dit, "flow-unet": flow_unet, "var": var, "causalfusion": causalfusion}


def sample(pipe, **kw):
    pipe.set_progress_bar_config(disable=True)
    return pipe(class_labels=[0, 1], guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
                output_type="latent", **kw).images


def diffusion_forcing(kind):
    from test_diffusion_forcing import _random_model

    from genmod.diffusion_forcing.pipeline import DiffusionForcingPipeline

    model = _random_model(kind)
    context = torch.rand(2, 2, *model.frame_shape, generator=torch.Generator().manual_seed(8)) * 2 - 1
    pipe = DiffusionForcingPipeline(transformer=model, schedule="pyramid", num_inference_steps=3)
    return pipe, lambda p: p(context, num_frames=4, generator=torch.Generator().manual_seed(0), output_type="pt").frames


def latentlm():
    from test_latentlm import tiny_model, tiny_sigma_vae

    from genmod.latentlm.pipeline import LatentLMPipeline

    vae = tiny_sigma_vae("image")
    model = tiny_model(latent_grid=tuple(vae.encode(torch.zeros(1, 3, 8, 8)).shape[2:]), num_classes=0)
    pipe = LatentLMPipeline(transformer=model, vae=vae, num_head_steps=3, guidance_scale=2.0)
    return pipe, lambda p: p(prompt=["a red circle", "a blue square"], generator=torch.Generator().manual_seed(0),
                             output_type="pt").images


def class_sampler(builder):
    pipe, kw = builder()
    return pipe, lambda p: sample(p, **kw)


CASTING = {**{name: (lambda b=b: class_sampler(b)) for name, b in PIPELINES.items()},
           "diffusion-forcing-dit": lambda: diffusion_forcing("video"),
           "diffusion-forcing-unet": lambda: diffusion_forcing("unet"), "latentlm": latentlm}


# ------------------------------------------------------------------------------------------------ casting
@pytest.mark.parametrize("storage,compute", [(torch.float16, torch.float32), (torch.float8_e4m3fn, torch.float32),
                                             (torch.float8_e4m3fn, torch.bfloat16)])
@pytest.mark.parametrize("name", list(CASTING))
def test_layerwise_casting_equals_weights_rounded_to_storage(name, storage, compute):
    pipe, run = CASTING[name]()
    pipe.set_progress_bar_config(disable=True)
    base = pipe.transformer.to(compute)  # as loaded with torch_dtype=compute, then cast layer by layer
    cast = copy.deepcopy(base)
    cast.enable_layerwise_casting(storage_dtype=storage, compute_dtype=compute)
    reference = copy.deepcopy(base)
    with torch.no_grad():
        for (_, p_ref), (_, p_cast) in zip(reference.named_parameters(), cast.named_parameters()):
            p_ref.copy_(p_cast.to(compute))  # what the casting hook hands the layer
    assert any(p.dtype == storage for p in cast.parameters()) and cast.dtype == compute
    pipe.transformer = cast
    out = run(pipe)
    pipe.transformer = reference
    assert torch.equal(out, run(pipe))
    rounded = [not torch.equal(a, b) for a, b in zip(reference.parameters(), base.parameters())]
    assert any(rounded)  # the weights of the cast layers were rounded to the storage dtype


# ------------------------------------------------------------------------------------------------ attention
def test_diffusers_attention_backends_reach_genmod_attention():
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    torch.manual_seed(0)
    args = dict(in_channels=3, sample_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=0)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([300.0, 700.0])
    sdpa = FlowTransformer(**args).eval()
    math = FlowTransformer(**args, attention_backend="math").eval()
    with torch.no_grad():
        for p in list(sdpa.parameters()):
            p.add_(0.1 * torch.randn_like(p))
        math.load_state_dict(sdpa.state_dict())
        default, by_math = sdpa(x, t).sample, math(x, t).sample
        try:
            sdpa.set_attention_backend("_native_math")
            assert torch.equal(sdpa(x, t).sample, by_math) and not torch.equal(by_math, default)
            sdpa.set_attention_backend("native")
            assert torch.equal(sdpa(x, t).sample, default)
            sdpa.set_attention_backend("_native_math")
            sdpa.reset_attention_backend()
            assert torch.equal(sdpa(x, t).sample, default)
            with pytest.raises(ValueError, match="backend='nope'"):
                sdpa.set_attention_backend("nope")
            with pytest.raises((ImportError, RuntimeError), match="flash"):  # flash-attn is not installed here
                sdpa.set_attention_backend("flash")
        finally:
            _AttentionBackendRegistry.set_active_backend("native")
    # diffusers' dispatcher as a genmod backend: same numbers as SDPA
    q, k, v = torch.randn(3, 2, 2, 5, 8).unbind(0)
    mask = torch.tril(torch.ones(5, 5, dtype=torch.bool))
    torch.testing.assert_close(attention(q, k, v, mask, backend="diffusers:native"), attention(q, k, v, mask),
                               atol=0, rtol=0)


def test_xformers_and_slicing_toggles_act_or_say_why_not():
    pipe, _ = flow_dit()
    attn = pipe.transformer.blocks[0].attn
    with pytest.raises(ImportError, match="xformers"):  # not installed on this machine
        pipe.enable_xformers_memory_efficient_attention()
    pipe.disable_xformers_memory_efficient_attention()
    assert attn.active_backend == "sdpa"
    with pytest.raises(NotImplementedError, match="enable_attention_slicing"):
        pipe.enable_attention_slicing()
    pipe.disable_attention_slicing()  # nothing to undo


def test_flow_unet_declares_gradient_checkpointing():
    model = tiny_unet().train()
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([100.0, 900.0]), torch.tensor([0, 1])
    gen = torch.Generator().manual_seed(0)
    model(x, t, y, dropout_generator=gen).sample.square().sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing and model.unet.down_blocks[0].gradient_checkpointing
    model(x, t, y, dropout_generator=torch.Generator().manual_seed(0)).sample.square().sum().backward()
    for a, p in zip(plain, model.parameters()):
        torch.testing.assert_close(p.grad, a, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ pipelines
def test_step_callback_changes_guidance():
    """diffusers' CFG-cutoff pattern: after step 2 the callback sets w = 1 (no guidance); that equals
    guidance only on the first three timesteps (a guidance interval ending between sigma_3 and sigma_2)."""
    pipe, _ = flow_dit()
    pipe.set_progress_bar_config(disable=True)
    run = dict(class_labels=[0, 1], guidance_scale=3.0, num_inference_steps=6, output_type="latent")

    def cutoff(pipeline, i, t, callback_kwargs):
        if i == 2:
            pipeline._guidance_scale = 1.0
        return callback_kwargs

    cut = pipe(**run, generator=torch.Generator().manual_seed(0), callback_on_step_end=cutoff).images
    sigmas = pipe.scheduler.sigmas
    interval = (float(sigmas[3] + sigmas[2]) / 2, 1.0)
    expected = pipe(**run, generator=torch.Generator().manual_seed(0), guidance_interval=interval).images
    assert torch.equal(cut, expected)
    assert not torch.equal(cut, pipe(**run, generator=torch.Generator().manual_seed(0)).images)


@pytest.mark.parametrize("name", ["flow-dit", "var", "causalfusion"])
def test_one_label_parser_nested_lists_names_and_repeats(name):
    pipe, kw = PIPELINES[name]()
    pipe.register_to_config(id2label={"0": "a", "1": "b", "2": "c"})
    flat = sample(pipe, **kw)
    assert torch.equal(pipe.parse_class_labels([[0], ["b"]], "cpu"), torch.tensor([0, 1]))
    pipe.set_progress_bar_config(disable=True)
    nested = pipe(class_labels=[[0], [1]], guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
                  output_type="latent", **kw).images
    assert torch.equal(nested, flat)
    with pytest.raises(ValueError, match="class_labels: expected class ids or names"):
        pipe.parse_class_labels([1.5], "cpu")
    with pytest.raises(ValueError, match="class_labels: unknown class name"):
        pipe.parse_class_labels(["zebra"], "cpu")


@pytest.mark.parametrize("name", ["flow-dit", "var"])
def test_num_images_per_label_repeats_each_label(name):
    pipe, kw = PIPELINES[name]()
    pipe.set_progress_bar_config(disable=True)
    run = dict(guidance_scale=2.0, output_type="latent", **kw)
    repeated = pipe(class_labels=[0, 1], num_images_per_label=2, generator=torch.Generator().manual_seed(0), **run)
    listed = pipe(class_labels=[0, 0, 1, 1], generator=torch.Generator().manual_seed(0), **run)
    assert repeated.images.shape[0] == 4 and torch.equal(repeated.images, listed.images)
    with pytest.raises(ValueError, match="num_images_per_label"):
        pipe(class_labels=[0], num_images_per_label=0, **run)


def test_diffusers_autoencoder_as_vae_gets_its_factors_undone():
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=8, scaling_factor=0.5, shift_factor=0.25).eval()
    transformer = FlowTransformer(in_channels=4, sample_size=4, patch_size=2, hidden_size=32, depth=1, num_heads=2,
                                  num_classes=0)
    pipe = FlowMatchingPipeline(transformer=transformer, scheduler=FlowMatchSolverScheduler(), vae=vae)
    latents = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        decoded = pipe.decode_latents(latents)
        torch.testing.assert_close(decoded, vae.decode(latents / 0.5 + 0.25).sample, atol=0, rtol=0)
        assert not torch.allclose(decoded, vae.decode(latents).sample, atol=1e-3)


def test_latentlm_and_diffusion_forcing_use_the_shared_label_parser():
    from test_diffusion_forcing import _random_model
    from test_latentlm import tiny_model, tiny_sigma_vae

    from genmod.diffusion_forcing.pipeline import DiffusionForcingPipeline
    from genmod.latentlm.pipeline import LatentLMPipeline
    from genmod.latentlm.text import LatentLMTokenizer

    vae = tiny_sigma_vae("audio")
    model = tiny_model(latent_grid=(vae.encode(torch.zeros(1, 1, 96)).shape[-1],), modality="audio", num_classes=3,
                       vocab_size=LatentLMTokenizer(3).vocab_size)
    pipe = LatentLMPipeline(transformer=model, vae=vae, id2label={0: "a", 1: "b", 2: "c"}, num_head_steps=2)
    pipe.set_progress_bar_config(disable=True)
    nested = pipe(class_labels=[["b"], [0]], generator=torch.Generator().manual_seed(0)).audios
    flat = pipe(class_labels=["b", 0], generator=torch.Generator().manual_seed(0)).audios
    assert nested.shape == (2, 1, 96) and (nested == flat).all()
    df = DiffusionForcingPipeline(transformer=_random_model("video", num_classes=2))
    labels, batch = df._labels_and_batch([[1], [2]], None, None, "cpu")  # id 2 = the null class
    assert labels.tolist() == [1, 2] and batch == 2
    with pytest.raises(ValueError, match=r"class_labels: ids must be in \[0, 3\)"):
        df._labels_and_batch([[3]], None, None, "cpu")
