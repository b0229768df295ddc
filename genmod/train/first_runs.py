"""What ``genmod train FAMILY --dataset D --cpu`` with no other flag gives, and in how long (issue 19).

Measured on the 2-core development CPU (one thread; docs/RESULTS.md "Issue 19: defaults that work");
``genmod train FAMILY --help`` prints the family's line above its options. Keyed by config class name,
so the note needs no edit of the family's module.
"""

from __future__ import annotations

__all__ = ["FIRST_RUNS", "first_run_note"]

FIRST_RUNS = {
    "FlowConfig": (
        "first run: `genmod train flow --dataset shapes --cpu` (the U-Net 32-64-64, 2000 steps) takes about 21 "
        "CPU-minutes and draws the shapes: domain-FID 2.6 against a floor of 1.8, class accuracy 0.64 (chance "
        "0.125); `--preset demo-unet` (1500 steps) is the quicker demo. `--backbone dit` (DiT 128 x 4, patch 4) "
        "takes 7 CPU-minutes and draws coloured blobs at that budget (domain-FID 61; docs/RESULTS.md)."),
    "CausalFusionConfig": (
        "first run: `genmod train causalfusion --dataset shapes --cpu` takes about 35 CPU-minutes (1000 steps at "
        "2.1 CPU-s) and does not draw recognisable shapes at that budget (a width-128 model at 2000 steps: class "
        "accuracy 0.16, chance 0.125); `--preset fashion-mnist` (about 12 CPU-minutes) gives Fashion-MNIST "
        "domain-FID 3.7 (docs/RESULTS.md)."),
    "DiffusionForcingConfig": (
        "first run: `genmod train diffusion-forcing --cpu` (moving shapes) takes about 5 CPU-minutes (1000 steps "
        "at 0.3 CPU-s); its rollouts dissolve into speckle within a few frames (shape class found in 20% of the "
        "frames): the transformer needs far longer (8000 steps: rollout MSE below copy-last-frame, objects fade) "
        "and `--preset moving-shapes-unet` (about 80 CPU-minutes in all) keeps the frames' look but not the "
        "object's identity (docs/RESULTS.md)."),
    "VARConfig": (
        "first run: VAR needs a multi-scale tokenizer (`--tokenizer`; without one the command stops with a "
        "one-line error): `genmod train tokenizer --preset msvq-shapes --cpu` (about 25 minutes), then "
        "`genmod train var --preset shapes-recognisable --cpu` (about 33 CPU-minutes: class accuracy 0.69 at "
        "guidance 2.5; docs/RESULTS.md)."),
    "LatentLMConfig": (
        "first run: LatentLM needs a continuous tokenizer (`--tokenizer`; without one the command stops with a "
        "one-line error): `genmod train tokenizer --preset sigma-vae-shapes --cpu` (about 22 minutes), then "
        "`genmod train latentlm --preset shapes-text-to-image --cpu` (about 55 CPU-minutes: the prompt's shape in "
        "62% of the images at guidance 3, 68% at guidance 5; docs/RESULTS.md)."),
}


def first_run_note(config_class) -> str | None:
    """The first-run line of a family's config class (None for the others)."""
    return FIRST_RUNS.get(getattr(config_class, "__name__", ""))
