"""The family table: every trainable family in one row (docs/DESIGN.md §3).

``genmod train NAME`` imports ``row.module`` (which calls ``register_family(NAME, ...)``),
``genmod.pipelines`` loads ``row.pipeline`` by class name, and ``genmod sample`` exposes the
pipeline keywords in ``row.sample_options`` as flags. Adding a family is one row here (plus its
``register_family`` call and, optionally, ``genmod/presets/NAME/*.json``).

A setting has one name everywhere: the pipeline's ``__call__`` keyword is also the config field
(``num_inference_steps``) and the ``genmod sample`` flag (``--num-inference-steps``, short alias
``--steps``). This module holds strings only, so importing it imports no family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["SampleOption", "FamilyRow", "SAMPLE_OPTIONS", "FAMILIES", "family_row", "pipeline_row", "pipeline_modules"]


@dataclass(frozen=True)
class SampleOption:
    """A pipeline keyword that ``genmod sample`` exposes as ``--keyword-with-dashes`` (and ``alias``)."""

    keyword: str
    type: type
    help: str
    alias: Optional[str] = None

    @property
    def flag(self) -> str:
        return "--" + self.keyword.replace("_", "-")


def interval(text: str) -> tuple[float, float]:
    """``"lo,hi"`` -> ``(lo, hi)`` with ``0 <= lo <= hi <= 1`` (a guidance interval of noise levels t)."""
    import argparse

    parts = text.split(",")
    try:
        lo, hi = (float(part) for part in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers lo,hi such as 0.1,0.9, got {text!r}") from None
    if not 0 <= lo <= hi <= 1:
        raise argparse.ArgumentTypeError(f"need 0 <= lo <= hi <= 1, got {text!r}")
    return lo, hi


SAMPLE_OPTIONS = {option.keyword: option for option in (
    SampleOption("num_inference_steps", int, "solver steps (VAR: the number of scales)", alias="--steps"),
    SampleOption("guidance_scale", float, "classifier-free guidance scale w (1 = off)", alias="--guidance"),
    SampleOption("guidance_interval", interval, "guide only at noise levels t in [lo, hi] (Kynkaanniemi et al. "
                 "2024), e.g. 0.1,0.9; diffusion-forcing: per frame"),
    SampleOption("solver", str, "ODE solver: euler, midpoint, heun, rk4, dpmsolver++2m; flow also adaptive dopri5, "
                 "dopri8, bosh3, fehlberg2, adaptive_heun (with --rtol / --atol)"),
    SampleOption("rtol", float, "adaptive solver relative tolerance"),
    SampleOption("atol", float, "adaptive solver absolute tolerance"),
    SampleOption("num_ar_steps", int, "number of AR steps", alias="--ar-steps"),
    SampleOption("prompt", str, "text prompt"),
    SampleOption("num_frames", int, "frames to generate", alias="--frames"),
    SampleOption("num_context_frames", int, "clean context frames", alias="--context"),
    SampleOption("schedule", str, "diffusion-forcing: scheduling matrix full_sequence, autoregressive, pyramid; "
                 "flow: time grid uniform, shifted, karras, cosine, ays (a grid saved by genmod ays)"),
    SampleOption("top_k", int, "sample from the k most likely tokens"),
    SampleOption("top_p", float, "nucleus sampling mass"),
    SampleOption("temperature", float, "sampling temperature"),
    SampleOption("num_head_steps", int, "diffusion-head solver steps", alias="--head-steps"),
)}


@dataclass(frozen=True)
class FamilyRow:
    """One trainable family.

    ``module`` registers the family on import; ``pipeline`` is ``"module:ClassName"`` of its exported
    pipeline; ``sample_options`` are keywords of that pipeline's ``__call__`` and ``scheduler_options``
    fields of its scheduler's config that ``genmod sample`` sets. ``trainer`` (``"module:function"``)
    replaces the shared trainer for a family that is not a generator (the FID feature net).
    """

    name: str
    module: Optional[str] = None
    pipeline: Optional[str] = None
    sample_options: tuple[str, ...] = ()
    scheduler_options: tuple[str, ...] = ()
    trainer: Optional[str] = None

    @property
    def pipeline_class(self) -> Optional[str]:
        return self.pipeline.split(":")[1] if self.pipeline else None

    @property
    def pipeline_module(self) -> Optional[str]:
        return self.pipeline.split(":")[0] if self.pipeline else None


_STEPS_AND_GUIDANCE = ("num_inference_steps", "guidance_scale")
_GUIDED = (*_STEPS_AND_GUIDANCE, "guidance_interval")

FAMILIES = (
    FamilyRow("flow", "genmod.flow.family", "genmod.flow.pipeline:FlowMatchingPipeline",
              _GUIDED, scheduler_options=("solver", "schedule", "rtol", "atol")),
    FamilyRow("tokenizer", "genmod.tokenizer.family"),
    FamilyRow("var", "genmod.var.family", "genmod.var.pipeline:VARPipeline",
              (*_STEPS_AND_GUIDANCE, "top_k", "top_p", "temperature")),
    FamilyRow("latentlm", "genmod.latentlm.family", "genmod.latentlm.pipeline:LatentLMPipeline",
              (*_GUIDED, "prompt", "num_head_steps", "temperature")),
    FamilyRow("diffusion-forcing", "genmod.diffusion_forcing.family",
              "genmod.diffusion_forcing.pipeline:DiffusionForcingPipeline",
              (*_GUIDED, "num_frames", "num_context_frames", "schedule")),
    FamilyRow("causalfusion", "genmod.causalfusion.family", "genmod.causalfusion.pipeline:CausalFusionPipeline",
              (*_GUIDED, "num_ar_steps", "solver")),
    FamilyRow("feature-net", trainer="genmod.evals.feature_net:main"),
)


def family_row(name: str) -> Optional[FamilyRow]:
    """The row of ``genmod train NAME``, or None."""
    return next((row for row in FAMILIES if row.name == name), None)


def pipeline_row(class_name: str) -> Optional[FamilyRow]:
    """The row whose pipeline class is ``class_name``, or None."""
    return next((row for row in FAMILIES if row.pipeline_class == class_name), None)


def pipeline_modules() -> dict[str, str]:
    """``{pipeline class name: module defining it}`` for every family with a pipeline."""
    return {row.pipeline_class: row.pipeline_module for row in FAMILIES if row.pipeline}


def families_taking(keyword: str) -> list[str]:
    """Names of the families whose ``genmod sample`` takes ``keyword``."""
    return [row.name for row in FAMILIES if keyword in row.sample_options + row.scheduler_options]
