"""Issue 20: FlowMatchSolverScheduler is a drop-in for diffusers' flow schedulers.

A diffusers pipeline relies on ``order`` (network calls per step), ``set_begin_index`` /
``begin_index``, a ``step_index`` that is None until the first ``step`` and then follows the
``timestep`` it was given, ``scale_noise``, and state reset by ``set_timesteps``. The img2img tests
start part-way through the grid as diffusers' img2img pipelines do and compare with
``sample_ode`` on the remaining grid (the known answer); the last test runs diffusers' own
``FluxPipeline`` with our scheduler swapped in.
"""

import importlib
import sys
import types

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from genmod.flow.scheduler import FlowMatchSolverScheduler
from genmod.samplers import sample_ode

SOLVERS = {"euler": ("euler", 1), "midpoint": ("midpoint", 2), "heun": ("heun", 2), "rk4": ("rk4", 4),
           "dpmsolver++2m": ("dpm_solver_pp_2m", 1)}
MEAN, STD = 0.7, 0.3


def velocity(x, sigma):
    """Exact marginal velocity of the linear path for data N(MEAN, STD^2)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype)
    std = torch.sqrt((1 - sigma) ** 2 * STD**2 + sigma**2)
    return -MEAN + ((sigma - 1) * STD**2 + sigma) / std**2 * (x - (1 - sigma) * MEAN)


def img2img(scheduler, num_steps, strength, x0, noise, use_begin_index=True):
    """What diffusers' img2img pipelines (SD3, Flux, ...) do with a scheduler (on Flux's uniform sigmas)."""
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps))
    t_start = int(num_steps - min(num_steps * strength, num_steps))
    timesteps = scheduler.timesteps[t_start * scheduler.order:]
    if use_begin_index:
        scheduler.set_begin_index(t_start * scheduler.order)
    x = scheduler.scale_noise(x0, timesteps[:1], noise)
    for t in timesteps:
        x = scheduler.step(velocity(x, t / 1000), t, x, return_dict=False)[0]
    return x, t_start


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("use_begin_index", [True, False])
def test_img2img_starts_where_the_pipeline_slices_for_every_solver(solver, use_begin_index):
    method, order = SOLVERS[solver]
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(64, generator=gen, dtype=torch.float64), torch.randn(64, generator=gen, dtype=torch.float64)
    scheduler = FlowMatchSolverScheduler(shift=3.0, solver=solver)
    assert scheduler.order == order and scheduler.begin_index is None and scheduler.step_index is None
    x, t_start = img2img(scheduler, 10, 0.6, x0, noise, use_begin_index)
    grid = scheduler.sigmas[t_start:]
    start = (1 - grid[0].double()) * x0 + grid[0].double() * noise
    expected = sample_ode(lambda x, t: velocity(x, t), start, grid, method=method)
    torch.testing.assert_close(x, expected, atol=1e-6, rtol=0)
    assert scheduler.step_index == len(scheduler.timesteps)
    # the pipeline's progress bar: one update per `order` calls reaches the number of steps
    assert len(scheduler.timesteps[t_start * order:]) == (10 - t_start) * order


def test_euler_img2img_equals_flow_match_euler_discrete():
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(64, generator=gen), torch.randn(64, generator=gen)
    ours = FlowMatchSolverScheduler(shift=3.0)
    theirs = FlowMatchEulerDiscreteScheduler.from_config(ours.config)
    for use_begin_index in (True, False):
        a, _ = img2img(ours, 12, 0.5, x0, noise, use_begin_index)
        b, _ = img2img(theirs, 12, 0.5, x0, noise, use_begin_index)
        assert torch.equal(a, b)


def test_index_state_follows_diffusers():
    scheduler = FlowMatchSolverScheduler(solver="heun")
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [1000, 750, 750, 500, 500, 250, 250, 0]
    # a timestep that ends one step and starts the next is the start (diffusers' Heun picks it too)
    assert scheduler.index_for_timestep(torch.tensor(750.0)) == 2
    with pytest.raises(ValueError, match="timestep: 123.0 is not in this schedule"):
        scheduler.index_for_timestep(123.0)
    with pytest.raises(ValueError, match="timestep: 0.0 is a stage inside a step"):
        scheduler.index_for_timestep(0.0)
    scheduler.set_begin_index(3)  # the second call of a Heun step
    with pytest.raises(ValueError, match="begin_index: 3 is not the first network call of a step"):
        scheduler.step(torch.zeros(2), 500.0, torch.zeros(2))
    scheduler.set_begin_index(2)
    scheduler.step(torch.ones(2), 750.0, torch.zeros(2))
    assert (scheduler.begin_index, scheduler.step_index) == (2, 3)
    scheduler.set_timesteps(4)  # a new solve forgets the old one
    assert scheduler.begin_index is None and scheduler.step_index is None


def test_scale_noise_is_the_forward_process():
    scheduler = FlowMatchSolverScheduler()
    x0, noise = torch.full((2, 3), 2.0), torch.full((2, 3), -1.0)
    out = scheduler.scale_noise(x0, torch.tensor([250.0]), noise)
    torch.testing.assert_close(out, torch.full((2, 3), 0.75 * 2.0 - 0.25))
    with pytest.raises(ValueError, match="noise"):
        scheduler.scale_noise(x0, torch.tensor([250.0]))


# ------------------------------------------------------------------------------------------------
# diffusers' own FluxPipeline with our scheduler swapped in
# ------------------------------------------------------------------------------------------------
TRANSFORMERS_NAMES = ["CLIPImageProcessor", "CLIPTextModel", "CLIPTokenizer", "CLIPVisionModelWithProjection",
                      "T5EncoderModel", "T5TokenizerFast"]
LOADER_NAMES = ["FluxIPAdapterMixin", "FluxLoraLoaderMixin", "FromSingleFileMixin", "TextualInversionLoaderMixin"]


def import_flux_pipeline():
    """diffusers' FluxPipeline class. Without ``transformers`` installed, its module is imported with
    placeholder text-encoder / loader class names: we pass ``prompt_embeds``, so none is ever used."""
    import diffusers.loaders as loaders

    stub = None
    if importlib.util.find_spec("transformers") is None:
        stub = types.ModuleType("transformers")
        for name in TRANSFORMERS_NAMES:
            setattr(stub, name, type(name, (), {}))
        sys.modules["transformers"] = stub
        for name in LOADER_NAMES:
            if not hasattr(loaders, name):
                setattr(loaders, name, type(name, (), {}))
    try:
        return importlib.import_module("diffusers.pipelines.flux.pipeline_flux").FluxPipeline
    finally:
        if stub is not None:
            del sys.modules["transformers"]


def build_flux():
    """FluxPipeline on a one-block FluxTransformer2DModel built from its config, and fixed prompt embeddings."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    pipe = import_flux_pipeline()(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                                  tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 8, 32, generator=gen), torch.randn(1, 32, generator=gen)
    return pipe, embeds


@pytest.fixture(scope="module")
def flux():
    return build_flux()


def run_flux(flux, scheduler, num_steps):
    """The sample (packed latents) and the number of transformer calls."""
    pipe, (prompt_embeds, pooled) = flux
    pipe.scheduler, calls = scheduler, []
    hook = pipe.transformer.register_forward_hook(lambda *args: calls.append(1))
    try:
        out = pipe(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, height=32, width=32,
                   num_inference_steps=num_steps, generator=torch.Generator().manual_seed(1),
                   output_type="latent").images
    finally:
        hook.remove()
    return out, len(calls)


def test_flux_pipeline_euler_sample_equals_flow_match_euler(flux):
    theirs, calls_theirs = run_flux(flux, FlowMatchEulerDiscreteScheduler(shift=3.0), 8)
    ours, calls_ours = run_flux(flux, FlowMatchSolverScheduler(shift=3.0), 8)
    assert calls_ours == calls_theirs == 8 and theirs.shape == (1, 4, 16)
    assert torch.equal(ours, theirs)


def test_flux_pipeline_higher_order_solvers_converge_with_fewer_calls(flux):
    reference, _ = run_flux(flux, FlowMatchSolverScheduler(shift=3.0, solver="rk4"), 48)
    euler, _ = run_flux(flux, FlowMatchSolverScheduler(shift=3.0), 16)
    euler_error = (euler - reference).abs().mean().item()  # a random network's time embedding oscillates:
    assert 0.005 < euler_error < 0.05                      # the mean error, not the max, ranks the solvers
    for solver, (_, order) in SOLVERS.items():
        sample, calls = run_flux(flux, FlowMatchSolverScheduler(shift=3.0, solver=solver), 16 // order)
        assert calls == 16
        if solver != "euler":  # the same 16 network calls, closer to the converged sample
            assert (sample - reference).abs().mean().item() < 0.75 * euler_error, solver
