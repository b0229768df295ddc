"""FlowMatchingPipeline: diffusers conventions, scheduler swaps, offline save/load, export, CLI errors."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import (
    ConfigMixin,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    ModelMixin,
    UniPCMultistepScheduler,
)
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from genmod.flow.pipeline import FlowMatchingPipeline
from genmod.flow.scheduler import FlowMatchSolverScheduler
from genmod.flow.transformer import FlowTransformer

DATA_MEAN, DATA_STD = 0.5, 0.25
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class GaussianVelocity(ModelMixin, ConfigMixin):
    """Exact diffusers-convention velocity (noise - x0 in expectation) for per-pixel data N(m, s^2)."""

    @register_to_config
    def __init__(self, in_channels: int = 1, sample_size: int = 4, num_classes: int = 0):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        sigma = (timestep.float() / 1000).view(-1, *([1] * (sample.ndim - 1)))
        mean = (1 - sigma) * DATA_MEAN
        var = (1 - sigma) ** 2 * DATA_STD**2 + sigma**2
        d_std = ((sigma - 1) * DATA_STD**2 + sigma) / var.sqrt()
        v = -DATA_MEAN + d_std / var.sqrt() * (sample.float() - mean) + 0 * self.dummy
        return Transformer2DModelOutput(sample=v) if return_dict else (v,)


def tiny_transformer(num_classes=3):
    torch.manual_seed(0)
    model = FlowTransformer(in_channels=3, sample_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                            num_classes=num_classes)
    with torch.no_grad():  # DiT zero-inits the output; make the network non-trivial
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def sample_gaussian(scheduler, steps, n=2048, sigmas=None):
    pipe = FlowMatchingPipeline(GaussianVelocity(sample_size=4), scheduler)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=n // 16, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
               output_type="latent", sigmas=sigmas).images
    return out.flatten()


@pytest.mark.parametrize("solver", ["euler", "midpoint", "heun", "rk4", "dpmsolver++2m"])
def test_every_solver_reaches_the_gaussian_target(solver):
    # DPM-Solver++(2M) under-disperses at very few steps on this grid (diffusers' own does the same)
    steps = {"euler": 60, "dpmsolver++2m": 16}.get(solver, 8)
    x = sample_gaussian(FlowMatchSolverScheduler(solver=solver), steps=steps)
    assert abs(x.mean() - DATA_MEAN) < 0.02 and abs(x.std() - DATA_STD) < 0.02


def test_flow_match_euler_swapped_in_gives_the_same_trajectory():
    ours = FlowMatchSolverScheduler(shift=2.0)
    a = sample_gaussian(ours, steps=10)
    b = sample_gaussian(FlowMatchEulerDiscreteScheduler.from_config(ours.config), steps=10)
    assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [DPMSolverMultistepScheduler, UniPCMultistepScheduler])
def test_diffusers_multistep_schedulers_with_flow_settings(cls):
    ours = FlowMatchSolverScheduler()
    sched = cls.from_config(ours.config, use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=1.0)
    x = sample_gaussian(sched, steps=10)
    assert abs(x.mean() - DATA_MEAN) < 0.02 and abs(x.std() - DATA_STD) < 0.03


def test_guidance_one_equals_conditional_and_call_arguments():
    pipe = FlowMatchingPipeline(tiny_transformer(), FlowMatchSolverScheduler(), id2label={0: "a", 1: "b", 2: "c"})
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=3, output_type="pt")
    g = lambda: [torch.Generator().manual_seed(s) for s in range(2)]  # noqa: E731
    by_name = pipe(class_labels=["b", "c"], generator=g(), guidance_scale=1.0, **kw).images
    by_id = pipe(class_labels=[1, 2], generator=g(), guidance_scale=1.0, **kw).images
    assert torch.equal(by_name, by_id) and by_id.shape == (2, 3, 8, 8) and 0 <= by_id.min() and by_id.max() <= 1
    # per-sample generators: sample 1 of a batch equals a batch of one with the same seed
    single = pipe(class_labels=[2], generator=[torch.Generator().manual_seed(1)], guidance_scale=3.0, **kw).images
    batch = pipe(class_labels=[1, 2], generator=g(), guidance_scale=3.0, **kw).images
    torch.testing.assert_close(single[0], batch[1], atol=1e-5, rtol=0)
    # the guidance interval: outside it w = 1
    off = pipe(class_labels=[1, 2], generator=g(), guidance_scale=3.0, guidance_interval=(2.0, 3.0), **kw).images
    torch.testing.assert_close(off, by_id, atol=1e-6, rtol=0)
    pil = pipe(class_labels=[0], num_inference_steps=2).images
    assert pil[0].size == (8, 8)
    with pytest.raises(ValueError, match="class_labels"):
        pipe(class_labels=[7], num_inference_steps=2)
    with pytest.raises(ValueError, match="unknown class name"):
        pipe(class_labels=["zebra"], num_inference_steps=2)
    with pytest.raises(ValueError, match="output_type"):
        pipe(class_labels=[0], num_inference_steps=2, output_type="jpg")
    # a step callback can read and replace the latents
    seen = []
    def callback(p, i, t, kwargs):
        seen.append(i)
        return {"latents": kwargs["latents"]}
    pipe(class_labels=[0], num_inference_steps=3, callback_on_step_end=callback)
    assert seen == [0, 1, 2]


def test_save_load_round_trip_in_a_fresh_process(tmp_path):
    pipe = FlowMatchingPipeline(tiny_transformer(), FlowMatchSolverScheduler(solver="heun"), id2label={0: "a", 1: "b", 2: "c"})
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    expected = pipe(class_labels=[0, 2], num_inference_steps=4, guidance_scale=2.0,
                    generator=torch.Generator().manual_seed(7), output_type="np").images
    np.save(tmp_path / "expected.npy", expected)
    script = textwrap.dedent(f"""
        import numpy as np, torch
        from genmod.pipelines import FlowMatchingPipeline
        pipe = FlowMatchingPipeline.from_pretrained({str(tmp_path / 'pipe')!r})
        assert type(pipe.scheduler).__name__ == "FlowMatchSolverScheduler" and pipe.scheduler.config.solver == "heun"
        out = pipe(class_labels=["a", "c"], num_inference_steps=4, guidance_scale=2.0,
                   generator=torch.Generator().manual_seed(7), output_type="np").images
        assert np.array_equal(out, np.load({str(tmp_path / 'expected.npy')!r})), "samples differ after reload"
        print("OK")
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-2000:]


def test_export_loads_with_diffusers_alone(tmp_path):
    from genmod.pipelines.export import export_pipeline

    pipe = FlowMatchingPipeline(tiny_transformer(), FlowMatchSolverScheduler(solver="rk4"))
    pipe.save_pretrained(tmp_path / "pipe")
    export_pipeline(str(tmp_path / "pipe"), str(tmp_path / "export"))
    expected = pipe(class_labels=[1], num_inference_steps=2, generator=torch.Generator().manual_seed(3),
                    output_type="np").images
    np.save(tmp_path / "expected.npy", expected)
    script = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):  # genmod is not installed for this user
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "genmod":
                    raise ImportError("blocked " + name)
        sys.meta_path.insert(0, Block())
        import numpy as np, torch
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(tmp_path / 'export')!r}, trust_remote_code=True)
        out = pipe(class_labels=[1], num_inference_steps=2, generator=torch.Generator().manual_seed(3),
                   output_type="np").images
        assert np.allclose(out, np.load({str(tmp_path / 'expected.npy')!r}), atol=1e-6)
        assert not any(m.split(".")[0] == "genmod" for m in sys.modules)
        print("OK", type(pipe).__module__)
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("argv,message", [
    (["sample", "/nonexistent/run"], "no such checkpoint or pipeline folder"),
    (["train", "flow", "--lrr", "1"], "--lrr"),
    (["train", "flow", "--lr", "abc"], "--lr"),
    (["train", "nosuchfamily"], "unknown family"),
])
def test_cli_errors_are_one_line(argv, message):
    result = subprocess.run([sys.executable, "-m", "genmod.cli", *argv], capture_output=True, text=True, timeout=120,
                            cwd=REPO)
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize("path,prediction,solver", [("cosine", "epsilon", "heun"), ("vp", "x0", "rk4"),
                                                    ("linear", "velocity", "dpmsolver++2m")])
def test_family_previews_equal_the_exported_pipeline(path, prediction, solver):
    """FlowFamily.sample (training previews) and the exported pipeline (`genmod sample`) are one code path:
    same noise, same numbers, for every path x prediction type; one network call per scheduled evaluation."""
    from genmod.flow.family import FlowConfig, FlowFamily
    from genmod.samplers import get_time_grid, nfe_per_solve, sample_ode

    config = FlowConfig(dataset_size=4, path=path, prediction=prediction, solver=solver, num_inference_steps=3,
                        backbone="dit", patch_size=8, hidden_size=32, depth=1, num_heads=2, guidance_scale=2.0)
    family = FlowFamily(config)
    torch.manual_seed(0)
    model = family.build_model().eval()
    with torch.no_grad():  # DiT zero-inits the output; make the network non-trivial
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    pipe = family.build_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    assert (pipe.scheduler.config.path, pipe.scheduler.config.prediction_type) == (path, prediction)
    calls = []
    hook = model.register_forward_hook(lambda *args: calls.append(1))
    latents = pipe(class_labels=[0, 1, 2], num_inference_steps=3, guidance_scale=2.0,
                   generator=torch.Generator().manual_seed(5), output_type="latent").images
    hook.remove()
    previews = family.sample(model, 3, torch.Generator().manual_seed(5))
    assert torch.isfinite(latents).all()  # (an untrained epsilon net at alpha(0.999) ~ 1e-3 gives large x0)
    assert torch.equal(previews, latents.clamp(-1, 1))
    assert len(calls) == nfe_per_solve(solver.replace("dpmsolver++2m", "dpm_solver_pp_2m"), 3,
                                       path=family.path, prediction=prediction)
    # the same solve from the network-agnostic driver on the scheduler's grid, with the family's own
    # velocity_fn (a different CFG batching, so equal up to float32 rounding)
    noise = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    velocity = family.velocity_fn(model, torch.tensor([0, 1, 2]), 2.0)
    integrated = sample_ode(velocity, noise, pipe.scheduler.sigmas, method=solver, path=family.path)
    torch.testing.assert_close(integrated, latents, atol=1e-3, rtol=1e-3)


def test_folder_saved_with_pre_namespace_module_names_loads(tmp_path):
    """Folders saved when tokenizers_vq/samplers installed at the top level name those modules; they still load."""
    import json

    from genmod.pipelines import load_pipeline
    from genmod.tokenizers_vq.models import KLVAE

    torch.manual_seed(0)
    vae = KLVAE(base_channels=8, ch_mult=(1, 2), latent_channels=4)
    transformer = FlowTransformer(in_channels=4, sample_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2,
                                  num_classes=0)
    pipe = FlowMatchingPipeline(transformer=transformer, scheduler=FlowMatchSolverScheduler(), vae=vae)
    pipe.save_pretrained(tmp_path)
    index_file = tmp_path / "model_index.json"
    index = json.loads(index_file.read_text())
    assert index["vae"][0] == "genmod.tokenizers_vq.models.kl_vae"
    index["vae"][0] = "tokenizers_vq.models.kl_vae"
    index_file.write_text(json.dumps(index))
    loaded = load_pipeline(tmp_path)
    assert type(loaded.vae) is KLVAE
    run = dict(batch_size=2, num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(**run).images, pipe(**dict(run, generator=torch.Generator().manual_seed(0))).images)


@pytest.mark.parametrize("path", ["/no/such/run/pipeline", "./missing", "runs/x/pipeline"])
def test_from_pretrained_of_a_missing_local_folder_names_it(path):
    """A path that cannot be a hub id ("org/name") is not sent to the hub: one line naming it."""
    from genmod.flow.pipeline import FlowMatchingPipeline

    with pytest.raises(FileNotFoundError, match=f"^{path}: no such pipeline folder$"):
        FlowMatchingPipeline.from_pretrained(path)
