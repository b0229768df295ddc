"""Every pipeline with an ODE inside: scheduler swap and diffusers' callback_on_step_end (issue 18, item 6)."""

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from genmod.flow.gmm import three_mode_mixture_2d
from genmod.flow.scheduler import FlowMatchSolverScheduler
from genmod.samplers import get_time_grid, sample_ode
from genmod.samplers.scheduled import solve_with_scheduler

FLOW_SETTINGS = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=1.0)


# -- the driver, on the mixture's exact flow ------------------------------------------------------
def test_scheduler_driver_equals_the_solvers_and_reaches_the_exact_solution():
    velocity = three_mode_mixture_2d().velocity_fn()
    noise = torch.randn(512, 2, generator=torch.Generator().manual_seed(0))
    exact = sample_ode(velocity, noise, get_time_grid("uniform", 400), method="rk4")
    grid = get_time_grid("uniform", 10)
    for solver, method in (("euler", "euler"), ("heun", "heun"), ("dpmsolver++2m", "dpm_solver_pp_2m")):
        x, nfe = solve_with_scheduler(FlowMatchSolverScheduler(solver=solver), velocity, noise, 10)
        torch.testing.assert_close(x, sample_ode(velocity, noise, grid, method=method), atol=1e-4, rtol=1e-4)  # float32 grid
        assert nfe == {"euler": 10, "heun": 20, "dpmsolver++2m": 10}[solver]
    x, _ = solve_with_scheduler(FlowMatchEulerDiscreteScheduler(), velocity, noise, 10)
    torch.testing.assert_close(x, sample_ode(velocity, noise, grid, method="euler"), atol=1e-4, rtol=1e-4)
    euler_error = (x - exact).norm(dim=1).mean()
    for cls in (DPMSolverMultistepScheduler, UniPCMultistepScheduler):  # second order at 1 call per step
        x, nfe = solve_with_scheduler(cls(**FLOW_SETTINGS), velocity, noise, 10)
        assert nfe == 10 and (x - exact).norm(dim=1).mean() < 0.5 * euler_error, cls.__name__


def test_driver_callback_sees_every_step_and_can_replace_x():
    seen = []
    x, _ = solve_with_scheduler(FlowMatchSolverScheduler(solver="heun"), lambda x, t: torch.zeros_like(x),
                                torch.ones(3, 2), 4, on_step=lambda i, t, x: seen.append(i) or (x + 1 if i == 3 else None))
    assert seen == list(range(8)) and torch.equal(x, torch.full((3, 2), 2.0))  # heun: 2 entries per step


# -- CausalFusion: per AR step ------------------------------------------------------------------
def _causalfusion_pipe():
    from genmod.causalfusion.pipeline import CausalFusionPipeline
    from test_causalfusion import tiny_model

    pipe = CausalFusionPipeline(tiny_model(), solver="euler", order="raster")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_causalfusion_scheduler_swap():
    pipe = _causalfusion_pipe()
    run = lambda **kw: pipe(class_labels=[0, 2], num_ar_steps=2, num_inference_steps=4, guidance_scale=2.0,  # noqa: E731
                            generator=torch.Generator().manual_seed(1), output_type="latent", **kw).images
    euler, heun = run(), run(solver="heun")
    torch.testing.assert_close(run(scheduler=FlowMatchEulerDiscreteScheduler()), euler, atol=1e-5, rtol=1e-5)
    pipe.scheduler = FlowMatchSolverScheduler(solver="heun")  # diffusers' way: assign the component
    torch.testing.assert_close(run(), heun, atol=1e-5, rtol=1e-5)
    pipe.scheduler = None
    assert torch.equal(run(), euler)


def test_causalfusion_callback_per_ar_step_changes_the_prefix():
    pipe = _causalfusion_pipe()
    calls = []

    def callback(p, step, timestep, kwargs):
        calls.append((step, float(timestep), tuple(kwargs["latents"].shape)))
        if step == 0:  # raster order, 3 AR steps over 16 tokens: step 0 makes the first 6
            return {"latents": torch.full_like(kwargs["latents"], 0.25)}
        return {}

    kw = dict(class_labels=[0, 1], num_ar_steps=3, num_inference_steps=2, output_type="latent")
    plain = pipe(generator=torch.Generator().manual_seed(2), **kw).images
    edited = pipe(generator=torch.Generator().manual_seed(2), callback_on_step_end=callback, **kw).images
    assert calls == [(0, 0.0, (2, 3, 8, 8)), (1, 0.0, (2, 3, 8, 8)), (2, 0.0, (2, 3, 8, 8))]
    tokens = edited.reshape(2, 3, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 16, 12)  # raster patches
    assert torch.equal(tokens[:, :6], torch.full_like(tokens[:, :6], 0.25))  # step 0's 6 tokens kept as set
    assert not torch.allclose(edited, plain)
    # the later steps saw the replaced prefix: the uncached sampler (full masked sequence) agrees
    uncached = pipe(generator=torch.Generator().manual_seed(2), callback_on_step_end=callback, use_cache=False, **kw).images
    torch.testing.assert_close(uncached, edited, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe(callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["prompt_embeds"], **kw)


# -- LatentLM: per latent token's head solve ------------------------------------------------------
def _latentlm_pipe():
    from genmod.latentlm.pipeline import LatentLMPipeline
    from test_latentlm import tiny_model, tiny_sigma_vae

    vae = tiny_sigma_vae("image")
    grid = tuple(vae.encode(torch.zeros(1, 3, 8, 8)).shape[2:])
    pipe = LatentLMPipeline(transformer=tiny_model(latent_grid=grid, num_classes=0), vae=vae, num_head_steps=4,
                            guidance_scale=2.0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_latentlm_head_scheduler_swap_and_guidance_interval():
    pipe = _latentlm_pipe()
    run = lambda **kw: pipe(prompt=["a red circle", "a blue square"], output_type="latent",  # noqa: E731
                            generator=torch.Generator().manual_seed(3), **kw).images
    default = run()
    path = pipe.transformer.config.path
    ours = FlowMatchSolverScheduler(solver="dpmsolver++2m", path=path)  # the head's own solver, as a scheduler
    torch.testing.assert_close(run(scheduler=ours), default, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(run(scheduler=FlowMatchSolverScheduler(solver="euler", path=path)), default, atol=1e-3)
    # guidance only outside every head time = no guidance
    torch.testing.assert_close(run(guidance_interval=(2.0, 3.0)), run(guidance_scale=1.0), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(run(guidance_interval=(0.0, 1.0)), run(guidance_scale=1.0), atol=1e-3)
    torch.testing.assert_close(run(guidance_interval=(0.0, 1.0)), default)


def test_latentlm_callback_per_latent_token():
    pipe = _latentlm_pipe()
    steps = []

    def zero_tokens(p, i, timestep, kwargs):
        steps.append(i)
        return {"latents": torch.zeros_like(kwargs["latents"])}

    out = pipe(prompt=["a red circle"], output_type="latent", generator=torch.Generator().manual_seed(4),
               callback_on_step_end=zero_tokens).images
    assert steps == list(range(pipe.transformer.num_latent_tokens))
    assert torch.equal(out, torch.zeros_like(out))


# -- Diffusion Forcing: per frame chunk -----------------------------------------------------------
def test_diffusion_forcing_callback_per_chunk():
    from genmod.diffusion_forcing.pipeline import DiffusionForcingPipeline
    from test_diffusion_forcing import _random_model

    pipe = DiffusionForcingPipeline(transformer=_random_model("video"), schedule="pyramid", num_inference_steps=3)
    pipe.set_progress_bar_config(disable=True)
    context = torch.rand(2, 2, *pipe.transformer.frame_shape, generator=torch.Generator().manual_seed(8)) * 2 - 1
    seen = []

    def callback(p, chunk, timestep, kwargs):
        seen.append((chunk, kwargs["latents"].shape[1]))
        return {"latents": torch.full_like(kwargs["latents"], 0.5)} if chunk == 1 else {}

    kw = dict(num_frames=5, chunk_size=2, output_type="latent")
    plain = pipe(context, generator=torch.Generator().manual_seed(5), **kw).frames
    out = pipe(context, generator=torch.Generator().manual_seed(5), callback_on_step_end=callback, **kw).frames
    assert seen == [(0, 2), (1, 2), (2, 1)]
    torch.testing.assert_close(out[:, :2], plain[:, :2])  # before the edit: unchanged
    assert torch.equal(out[:, 2:4], torch.full_like(out[:, 2:4], 0.5))  # the replaced chunk
    assert not torch.allclose(out[:, 4], plain[:, 4])  # the next chunk saw it as history


def _df_pipe(path="linear", prediction="x0"):
    from genmod.diffusion_forcing.pipeline import DiffusionForcingPipeline
    from test_diffusion_forcing import _random_model

    pipe = DiffusionForcingPipeline(transformer=_random_model("video"), schedule="pyramid", num_inference_steps=4,
                                    path=path, prediction=prediction)
    pipe.set_progress_bar_config(disable=True)
    context = torch.rand(2, 2, *pipe.transformer.frame_shape, generator=torch.Generator().manual_seed(8)) * 2 - 1
    return pipe, context


@pytest.mark.parametrize("make", [FlowMatchEulerDiscreteScheduler, lambda: FlowMatchSolverScheduler(solver="euler"),
                                  lambda: FlowMatchSolverScheduler(solver="euler", prediction_type="x0")])
def test_diffusion_forcing_euler_scheduler_per_frame_equals_its_ddim_steps(make, tmp_path):
    """On the linear path an Euler step of the velocity rebuilt from (x0_hat, eps_hat) lands where DDIM does:
    (1 - t') x0_hat + t' eps_hat, so swapping an Euler scheduler in leaves the pyramid rollout unchanged."""
    pipe, context = _df_pipe()
    kw = dict(num_frames=5, chunk_size=3, output_type="latent")
    plain = pipe(context, generator=torch.Generator().manual_seed(5), **kw).frames
    pipe.scheduler = make()
    swapped = pipe(context, generator=torch.Generator().manual_seed(5), **kw).frames
    torch.testing.assert_close(swapped, plain, atol=2e-5, rtol=1e-5)
    pipe.save_pretrained(tmp_path / "df")  # the swapped scheduler is a saved component
    from genmod.pipelines import load_pipeline

    assert type(load_pipeline(str(tmp_path / "df")).scheduler).__name__ == type(pipe.scheduler).__name__


def test_diffusion_forcing_multistep_scheduler_steps_every_frame_through_every_level():
    """DPM-Solver++ 2M on the cosine path: each frame's own copy is stepped once per level, at the level
    grid 1, 3/4, 1/2, 1/4 in order, whatever the row at which the pyramid moves it; a different sampler
    than DDIM, so the frames differ."""
    from genmod.diffusion_forcing import rollout
    from genmod.diffusion_forcing.frame_schedulers import FrameSchedulers
    from test_diffusion_forcing import _random_model

    steps = []
    original = FrameSchedulers.step

    def recording(self, i, x0_hat, eps_hat, x_t, t):
        steps.append((id(self), i, float(t)))
        return original(self, i, x0_hat, eps_hat, x_t, t)

    FrameSchedulers.step = recording
    try:
        model, context = _random_model("video"), torch.zeros(1, 2, *_random_model("video").frame_shape)
        kw = dict(schedule="pyramid", num_inference_steps=4, chunk_size=3, path="cosine", prediction="x0",
                  generator=torch.Generator().manual_seed(1))
        out = rollout(model, context, 3, scheduler=FlowMatchSolverScheduler(solver="dpmsolver++2m", path="cosine"), **kw)
    finally:
        FrameSchedulers.step = original
    for frame in range(3):
        assert [t for _, i, t in steps if i == frame] == [1.0, 0.75, 0.5, 0.25]
    kw["generator"] = torch.Generator().manual_seed(1)
    ddim = rollout(model, context, 3, **kw)
    assert torch.isfinite(out).all() and float((out - ddim).abs().max()) > 1e-4


@pytest.mark.parametrize("scheduler,path,message", [
    (FlowMatchSolverScheduler(solver="heun", path="cosine"), "cosine", "2 network calls per step"),
    (FlowMatchEulerDiscreteScheduler(), "cosine", "steps the linear path's velocity"),
    (FlowMatchSolverScheduler(solver="euler", path="linear"), "cosine", "steps the 'linear' path"),
    (DPMSolverMultistepScheduler(**FLOW_SETTINGS), "linear", "does not step the rollout's levels"),
    (FlowMatchEulerDiscreteScheduler(shift=3.0), "linear", "does not step the rollout's levels"),
])
def test_diffusion_forcing_scheduler_that_cannot_step_frames_is_one_line(scheduler, path, message):
    pipe, context = _df_pipe(path=path)
    pipe.scheduler = scheduler
    with pytest.raises(ValueError, match=f"^scheduler: .*{message}"):
        pipe(context, num_frames=2, generator=torch.Generator().manual_seed(0))
