"""FlowUNet: FlowTransformer's interface on a U-Net (labels, null class, dropout, pipeline, round trip)."""

import numpy as np
import torch

from genmod.flow.pipeline import FlowMatchingPipeline
from genmod.flow.scheduler import FlowMatchSolverScheduler
from genmod.flow.unet import FlowUNet


def tiny_unet():
    torch.manual_seed(0)
    return FlowUNet(in_channels=3, sample_size=8, block_out_channels=(8, 16), num_classes=4, class_dropout_prob=0.5)


def test_labels_null_class_and_seeded_dropout():
    model = tiny_unet().eval()
    x, t = torch.randn(4, 3, 8, 8), torch.full((4,), 500.0)
    null = model(x, t, torch.full((4,), 4)).sample
    torch.testing.assert_close(model(x, t, None).sample, null)  # no labels = the null class
    assert not torch.allclose(model(x, t, torch.arange(4)).sample, null)
    model.train()  # dropout decided by the generator alone: same seed, same drops
    a = model(x, t, torch.arange(4), dropout_generator=torch.Generator().manual_seed(3)).sample
    b = model(x, t, torch.arange(4), dropout_generator=torch.Generator().manual_seed(3)).sample
    torch.testing.assert_close(a, b)
    drop = torch.rand(4, generator=torch.Generator().manual_seed(3)) < 0.5
    expected = model.eval()(x, t, torch.where(drop, torch.full((4,), 4), torch.arange(4))).sample
    torch.testing.assert_close(a, expected)


def test_pipeline_and_save_load_round_trip(tmp_path):
    pipe = FlowMatchingPipeline(tiny_unet().eval(), FlowMatchSolverScheduler(solver="heun"), id2label={0: "a", 1: "b"})
    pipe.set_progress_bar_config(disable=True)
    kw = dict(class_labels=[0, 3], num_inference_steps=3, guidance_scale=2.0, output_type="np")
    expected = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    pipe.save_pretrained(tmp_path)
    reloaded = FlowMatchingPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    assert type(reloaded.transformer).__name__ == "FlowUNet"
    assert np.array_equal(reloaded(generator=torch.Generator().manual_seed(0), **kw).images, expected)
