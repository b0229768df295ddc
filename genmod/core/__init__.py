"""genmod.core: what every generator family, sampler, scheduler and loader stands on.

* ``paths``: affine Gaussian probability paths ``x_t = alpha(t) x0 + sigma(t) eps`` (t = 0 data,
  t = 1 noise), exact conversion between velocity / x0 / epsilon / score predictions, log-SNR.
* ``time_sampling``: training-time distributions of ``t`` (uniform, logit-normal, shifted, discrete).
* ``loss``: the flow-matching / denoising regression loss for any path and prediction type.
* ``settings``: ``with_options``, the keyword override of the samplers' frozen settings dataclasses.
* ``files``: structure checks of safetensors files (refusing pickles), sha256 manifests.

It imports nothing of genmod above it (docs/DESIGN.md, "Layers").
"""
