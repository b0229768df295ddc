"""Flow matching (Lipman et al. 2023; Liu et al. 2023; SiT, Ma et al. 2024) on images or tokenizer latents.

``FlowTransformer`` (DiT/SiT backbone) and ``FlowUNet`` (models), ``FlowFamily`` / ``FlowConfig``
(``genmod train flow``: path, prediction type, time sampling from ``genmod.core``), ``FlowMatchSolverScheduler``
(a diffusers scheduler that steps ``genmod.samplers``' solvers one network call at a time) and
``FlowMatchingPipeline``; ``gmm`` holds Gaussian-mixture targets with exact velocities for tests.
"""
