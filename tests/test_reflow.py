"""Reflow pairs and k-step students (genmod.flow.reflow) and the flow family's coupling / reflow losses."""

import os

import pytest
import torch
from safetensors.torch import load_file

from genmod.core.loss import flow_matching_loss
from genmod.flow.gmm import three_mode_mixture_2d
from genmod.flow.reflow import PairDataset, distill_times, generate_pairs, shard_noise
from genmod.flow.toy import path_report, train_toy_flow
from genmod.samplers import get_time_grid, sample_ode


def exact_teacher(noise, labels=None):
    """The 3-mode mixture's exact flow, solved with RK4 in 64 steps (a 'teacher ODE' with known answer)."""
    return sample_ode(three_mode_mixture_2d().velocity_fn(), noise, get_time_grid("uniform", 64), method="rk4")


def test_pairs_reproduce_the_teacher_ode_and_resume_identically(tmp_path):
    out = str(tmp_path / "pairs")
    paths = generate_pairs(exact_teacher, 70, out, (2,), shard_size=32, seed=3, settings={"teacher": "gmm"},
                           progress=False)
    assert [os.path.basename(p) for p in paths] == [f"pairs-{i:05d}.safetensors" for i in range(3)]
    data = PairDataset(out)
    assert len(data) == 70
    assert torch.equal(data.noise[32:64], shard_noise((32, 2), 3, 1))
    assert torch.equal(data.sample, exact_teacher(data.noise))  # bitwise the teacher's solve of the stored noise
    before = {p: load_file(p) for p in paths}
    os.remove(paths[1])  # an interrupted run: shard 1 missing
    generate_pairs(exact_teacher, 70, out, (2,), shard_size=32, seed=3, settings={"teacher": "gmm"}, progress=False)
    for p in paths:
        assert all(torch.equal(before[p][k], v) for k, v in load_file(p).items())
    with pytest.raises(ValueError, match="seed"):
        generate_pairs(exact_teacher, 70, out, (2,), shard_size=32, seed=4, settings={"teacher": "gmm"})
    item = data[5]
    assert set(item) == {"latents", "noise", "label"} and torch.equal(item["latents"], data.sample[5])


def test_teacher_pipeline_pairs_equal_the_pipeline_call(tmp_path):
    """--reflow_from: the pairs are the saved teacher pipeline's own output for the stored noise (same loop)."""
    from genmod.flow.family import FlowConfig
    from genmod.flow.reflow import make_reflow_pairs
    from genmod.pipelines import load_pipeline
    from test_flow_pipeline import tiny_transformer
    from genmod.flow.pipeline import FlowMatchingPipeline
    from genmod.flow.scheduler import FlowMatchSolverScheduler

    FlowMatchingPipeline(tiny_transformer(), FlowMatchSolverScheduler(solver="heun")).save_pretrained(tmp_path / "teacher")
    config = FlowConfig(output_dir=str(tmp_path / "student"), reflow_from=str(tmp_path / "teacher"), reflow_pairs=5,
                        reflow_num_inference_steps=3, reflow_guidance_scale=2.0, seed=1)
    data = make_reflow_pairs(config)
    pipe = load_pipeline(str(tmp_path / "teacher"))
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(class_labels=[0, 1, 2, 0, 1], latents=data.noise.clone(), num_inference_steps=3, guidance_scale=2.0,
                    output_type="latent").images
    assert data.labels.tolist() == [0, 1, 2, 0, 1]
    assert torch.equal(data.sample, expected)
    assert data.settings["solver"] == "heun" and data.settings["num_inference_steps"] == 3


def test_distill_times_are_the_euler_grid():
    g = torch.Generator().manual_seed(0)
    t = distill_times(4, 4000, g)
    assert set(t.tolist()) == {1.0, 0.75, 0.5, 0.25}
    assert (t == 1.0).float().mean().item() == pytest.approx(0.25, abs=0.03)


def test_reflow_of_the_exact_mixture_flow_is_straighter_and_better_in_few_steps(tmp_path):
    """Liu et al. 2022: 2-rectified flow (trained on the teacher's pairs) is straighter than 1-rectified flow
    (independent coupling), so 1-2 Euler steps land closer; the 1-step distilled student closer still."""
    mixture = three_mode_mixture_2d()
    generate_pairs(exact_teacher, 4096, str(tmp_path), (2,), shard_size=1024, progress=False)
    data = PairDataset(str(tmp_path))
    pairs = (data.sample, data.noise)
    g = torch.Generator().manual_seed(9)
    target, noise = mixture.sample(500, g).float(), torch.randn(500, 2, generator=g)
    sample_data = lambda n, gen: mixture.sample(n, gen).float()  # noqa: E731
    first = path_report(train_toy_flow(sample_data, steps=500, batch_size=128), target, noise, (1, 2), 50)
    reflow = path_report(train_toy_flow(sample_data, steps=500, batch_size=128, pairs=pairs), target, noise, (1, 2), 50)
    student = path_report(train_toy_flow(sample_data, steps=500, batch_size=128, pairs=pairs, distill_steps=1),
                          target, noise, (1,), 50)
    assert reflow["straightness"] < 0.5 * first["straightness"]
    for k in (1, 2):
        assert reflow["euler_error"][k] < 0.6 * first["euler_error"][k]
        assert reflow["w2"][k] < first["w2"][k]
    assert student["w2"][1] < reflow["w2"][1]


def _family(tmp_path, **kw):
    from genmod.flow.family import FlowConfig, FlowFamily

    config = FlowConfig(output_dir=str(tmp_path), dataset_size=8, backbone="dit", patch_size=8, hidden_size=32, depth=1, num_heads=2,
                        time_sampling="uniform", **kw)
    family = FlowFamily(config)
    torch.manual_seed(0)
    model = family.build_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return family, model


def _manual_loss(model, x0, noise, t, labels):
    x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
    out = model(x_t, 1000 * t, labels, dropout_generator=torch.Generator().manual_seed(99)).sample
    return flow_matching_loss(out, x0, noise, t)


@pytest.mark.parametrize("coupling", ["independent", "ot"])
def test_family_loss_uses_the_coupled_noise(tmp_path, coupling):
    from genmod.core.couplings import coupling_permutation

    family, model = _family(tmp_path, coupling=coupling, class_dropout_prob=0.0)
    x0, labels = torch.rand(6, 3, 32, 32) * 2 - 1, torch.tensor([0, 1, 0, 1, 0, 2])
    loss = family.loss(model, {"image": x0, "label": labels}, torch.Generator().manual_seed(1))["loss"]
    g = torch.Generator().manual_seed(1)
    t = torch.rand(6, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    noise = noise[coupling_permutation(x0, noise, coupling, labels=labels)]
    assert torch.allclose(loss, _manual_loss(model, x0, noise, t, labels), rtol=1e-5, atol=1e-7)


def test_family_reflow_loss_uses_stored_noise_and_distill_grid(tmp_path):
    family, model = _family(tmp_path, class_dropout_prob=0.0)
    family.config.reflow_from, family.config.distill_steps = "teacher", 2  # (the model was built on shapes)
    x0, noise, labels = torch.rand(6, 3, 32, 32), torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    loss = family.loss(model, {"latents": x0, "noise": noise, "label": labels}, torch.Generator().manual_seed(2))["loss"]
    t = distill_times(2, 6, torch.Generator().manual_seed(2))
    assert torch.allclose(loss, _manual_loss(model, x0, noise, t, labels), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("flags,message", [
    ({"coupling": "sb", "path": "cosine"}, "--coupling sb"),
    ({"coupling": "ot", "reflow_from": "x"}, "--coupling ot"),
    ({"distill_steps": 2}, "--distill_steps 2"),
    ({"coupling_reg": 0.0}, "--coupling_reg"),
])
def test_bad_pairing_flags_are_one_line_errors(flags, message):
    from genmod.flow.family import FlowConfig
    from genmod.train.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        FlowConfig(**flags).validate()


def test_student_pipeline_steps_euler_on_its_own_grid_by_default(tmp_path):
    """A K-step student's export samples with Euler at K steps unless told otherwise, also after save / load."""
    from genmod.pipelines import load_pipeline

    family, model = _family(tmp_path, class_dropout_prob=0.0)
    family.config.reflow_from, family.config.distill_steps = "teacher", 2
    pipe = family.build_pipeline(model)
    pipe.save_pretrained(tmp_path / "student")
    loaded = load_pipeline(str(tmp_path / "student"))
    assert loaded.config.default_num_inference_steps == 2 and loaded.scheduler.config.solver == "euler"
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    times = []
    hook = loaded.transformer.register_forward_pre_hook(lambda m, args: times.append(args[1].flatten()[0].item()))
    out = loaded(class_labels=[0, 1], latents=noise, output_type="latent").images
    hook.remove()
    assert times == [1000.0, 500.0]
    with torch.no_grad():  # two Euler steps by hand: x <- x + (t_next - t) v(x, t) at t = 1, 1/2
        x, labels = noise, torch.tensor([0, 1])
        for t, t_next in ((1.0, 0.5), (0.5, 0.0)):
            x = x + (t_next - t) * model(x, torch.full((2,), 1000 * t), labels).sample
    assert torch.allclose(out, x, atol=1e-5)
    assert len(loaded.scheduler.timesteps) == 2


def test_pipeline_default_steps_is_checked():
    from genmod.flow.pipeline import FlowMatchingPipeline

    with pytest.raises(ValueError, match="default_num_inference_steps"):
        FlowMatchingPipeline(transformer=None, scheduler=None, default_num_inference_steps=0)
