"""``genmod sample``: load a pipeline folder or a training checkpoint and write samples.

All genmod pipelines share diffusers' ``__call__`` names (``class_labels``, ``num_inference_steps``,
``guidance_scale``, ``generator``, ``output_type``); family-specific flags (``--ar-steps``,
``--prompt``, ``--frames`` ...) are passed only to pipelines whose ``__call__`` takes them, and a flag
the pipeline does not take is an error rather than silently ignored.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os

import numpy as np
import torch

# CLI flag -> pipeline __call__ keyword, for the flags that only some families understand.
FAMILY_FLAGS = {
    "ar_steps": "num_ar_steps",
    "prompt": "prompt",
    "frames": "num_frames",
    "context": "num_context_frames",
    "schedule": "schedule",
    "top_k": "top_k",
    "top_p": "top_p",
    "temperature": "temperature",
    "head_steps": "num_head_steps",
    "solver": "solver",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genmod sample", description="Sample from a genmod checkpoint or pipeline folder.")
    p.add_argument("path", help="pipeline folder (model_index.json) or training output / checkpoint folder")
    p.add_argument("--num", type=int, default=16, help="number of samples (default 16)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per forward batch (independent of --num)")
    p.add_argument("--steps", type=int, default=None, help="solver steps (default: the family's setting)")
    p.add_argument("--solver", default=None, help="flow solver: euler, midpoint, heun, rk4, dpmsolver++2m")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale w (1 = off)")
    p.add_argument("--class-labels", default=None, help="comma-separated class ids or names (default: cycle classes)")
    p.add_argument("--seed", type=int, default=0, help="seed; sample i uses seed + i, so batches do not matter")
    p.add_argument("--out", default="samples.png", help="output grid (.png), clip (.gif) or audio (.wav)")
    p.add_argument("--save-individual", default=None, metavar="DIR", help="also save one PNG per sample here")
    p.add_argument("--npz", default=None, help="also save an ADM-style .npz (arr_0: uint8 NHWC)")
    p.add_argument("--ar-steps", type=int, default=None, help="CausalFusion: number of AR steps")
    p.add_argument("--prompt", default=None, help="LatentLM: text prompt")
    p.add_argument("--frames", type=int, default=None, help="Diffusion Forcing: frames to generate")
    p.add_argument("--context", type=int, default=None, help="Diffusion Forcing: context frames")
    p.add_argument("--schedule", default=None, help="Diffusion Forcing: scheduling matrix (full, autoregressive, pyramid)")
    p.add_argument("--top-k", type=int, default=None, help="VAR/LatentLM: top-k")
    p.add_argument("--top-p", type=float, default=None, help="VAR/LatentLM: top-p")
    p.add_argument("--temperature", type=float, default=None, help="VAR/LatentLM: temperature")
    p.add_argument("--head-steps", type=int, default=None, help="LatentLM: diffusion-head solver steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def load_for_sampling(path: str):
    """A pipeline from a pipeline folder, a training output folder or one checkpoint folder."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint or pipeline folder")
    if os.path.isfile(os.path.join(path, "model_index.json")):
        from genmod.pipelines import load_pipeline

        return load_pipeline(path)
    if os.path.isdir(os.path.join(path, "pipeline")) and os.path.isfile(os.path.join(path, "pipeline", "model_index.json")):
        from genmod.pipelines import load_pipeline

        return load_pipeline(os.path.join(path, "pipeline"))
    from genmod.train import pipeline_from_checkpoint

    return pipeline_from_checkpoint(path)


def _labels(pipe, spec: str | None, num: int):
    transformer = getattr(pipe, "transformer", None)
    num_classes = getattr(getattr(transformer, "config", None), "num_classes", 0) or 0
    if spec is None:
        return [i % num_classes for i in range(num)] if num_classes else None
    items = [s.strip() for s in spec.split(",") if s.strip()]
    labels = [int(s) if s.lstrip("-").isdigit() else s for s in items]
    if len(labels) < num:  # cycle the given labels over all samples
        labels = [labels[i % len(labels)] for i in range(num)]
    return labels[:num]


def call_pipeline(pipe, args, num: int, start: int, labels):
    """One batch ``[start, start + num)`` with per-sample generators (seed + index)."""
    params = inspect.signature(pipe.__call__).parameters
    kwargs = {"generator": [torch.Generator("cpu").manual_seed(args.seed + start + i) for i in range(num)],
              "output_type": "pt"}
    if "class_labels" in params and labels is not None:
        kwargs["class_labels"] = labels[start:start + num]
    elif "batch_size" in params:
        kwargs["batch_size"] = num
    if args.steps is not None:
        kwargs["num_inference_steps"] = args.steps
    if args.guidance is not None:
        kwargs["guidance_scale"] = args.guidance
    for flag, keyword in FAMILY_FLAGS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if keyword not in params:
            raise ValueError(f"--{flag.replace('_', '-')}: {type(pipe).__name__} does not take this option")
        kwargs[keyword] = value
    return pipe(**kwargs)


def save_images(images: torch.Tensor, args):
    """images: (N, C, H, W) in [0, 1]."""
    from torchvision.utils import save_image

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_image(images, args.out, nrow=max(1, int(math.ceil(math.sqrt(len(images))))), padding=2)
    written = [args.out]
    uint8 = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    if uint8.shape[-1] == 1:
        uint8 = np.repeat(uint8, 3, axis=-1)
    if args.save_individual:
        from PIL import Image

        os.makedirs(args.save_individual, exist_ok=True)
        for i, img in enumerate(uint8):
            Image.fromarray(img).save(os.path.join(args.save_individual, f"{i:06d}.png"))
        written.append(args.save_individual)
    if args.npz:
        np.savez(args.npz, arr_0=uint8)
        written.append(args.npz)
    return written


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num < 1 or args.batch_size < 1:
        raise ValueError("--num and --batch-size must be >= 1")
    pipe = load_for_sampling(args.path)
    pipe.to(args.device)
    if args.solver is not None and "solver" not in inspect.signature(pipe.__call__).parameters:
        scheduler = getattr(pipe, "scheduler", None)
        if "solver" not in getattr(scheduler, "config", {}):
            raise ValueError(f"--solver: {type(pipe).__name__} has no solver choice")
        pipe.scheduler = type(scheduler).from_config(scheduler.config, solver=args.solver)
        args.solver = None  # applied through the scheduler
    pipe.set_progress_bar_config(disable=True)
    labels = _labels(pipe, args.class_labels, args.num)
    outputs = []
    from tqdm.auto import tqdm

    for start in tqdm(range(0, args.num, args.batch_size), desc="sampling", unit="batch"):
        n = min(args.batch_size, args.num - start)
        out = call_pipeline(pipe, args, n, start, labels)
        outputs.append(out)
    first = outputs[0]
    if hasattr(first, "images"):
        images = torch.cat([torch.as_tensor(o.images) for o in outputs])
        written = save_images(images, args)
    elif hasattr(first, "audios"):
        from genmod.data.io import save_wav

        audios = np.concatenate([np.asarray(o.audios) for o in outputs])
        stem, _ = os.path.splitext(args.out)
        written = []
        for i, clip in enumerate(audios):
            path = f"{stem}_{i:03d}.wav" if len(audios) > 1 else f"{stem}.wav"
            save_wav(path, torch.as_tensor(clip), pipe.config.get("sample_rate", 16000))
            written.append(path)
    elif hasattr(first, "frames"):
        from genmod.data.io import save_gif

        frames = torch.cat([torch.as_tensor(o.frames) for o in outputs])
        save_gif(args.out, frames, value_range=(0, 1))  # pipelines return frames in [0, 1] like images
        written = [args.out]
    else:
        raise ValueError(f"{type(pipe).__name__} returned {type(first).__name__}, which genmod sample cannot save")
    settings = {k: v for k, v in vars(args).items() if v is not None}
    settings["pipeline"] = type(pipe).__name__
    settings["scheduler"] = dict(getattr(pipe.scheduler, "config", {})) if hasattr(pipe, "scheduler") else None
    if hasattr(pipe, "sampling_settings"):  # defaults saved with the pipeline (VAR: guidance, top-k/p, temperature)
        settings["pipeline_defaults"] = pipe.sampling_settings()
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(settings, f, indent=2, default=str)
    print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items() if k not in ("scheduler",)))
    for path in written:
        print(f"wrote {path}")
    return 0
