"""``genmod sample``: load a pipeline folder or a training checkpoint and write samples.

Sampling flags are the pipelines' ``__call__`` keywords (``--num-inference-steps``,
``--guidance-scale``, ``--num-ar-steps``, ``--prompt``, ``--num-frames`` ...; short aliases
``--steps``, ``--guidance``, ``--ar-steps`` ...), listed once per family in ``genmod.families``. A
flag the loaded pipeline's family does not take is an error rather than silently ignored.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os

import numpy as np
import torch

from genmod.core.files import atomic_path, atomic_write, check_output_path
from genmod.families import SAMPLE_OPTIONS, families_taking, pipeline_row


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genmod sample", description="Sample from a genmod checkpoint or pipeline folder.")
    p.add_argument("path", help="pipeline folder (model_index.json) or training output / checkpoint folder")
    p.add_argument("--num", type=int, default=16, help="number of samples (default 16)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per forward batch (independent of --num)")
    p.add_argument("--class-labels", default=None, help="comma-separated class ids or names (default: cycle classes)")
    p.add_argument("--seed", type=int, default=0, help="seed; sample i uses seed + i, so batches do not matter")
    p.add_argument("--out", default="samples.png", help="output grid (.png), clip (.gif) or audio (.wav)")
    p.add_argument("--save-individual", default=None, metavar="DIR", help="also save one PNG per sample here")
    p.add_argument("--npz", default=None, help="also save an ADM-style .npz (arr_0: uint8 NHWC)")
    for option in SAMPLE_OPTIONS.values():  # the pipeline keywords of the family table
        flags = [option.flag] + ([option.alias] if option.alias else [])
        families = ", ".join(families_taking(option.keyword))
        p.add_argument(*flags, dest=option.keyword, type=option.type, default=None, metavar=option.type.__name__.upper(),
                       help=f"{families}: {option.help} (default: the pipeline's saved setting)")
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
    if not items:
        raise ValueError(f"--class-labels: no class ids or names in {spec!r}")
    labels = [int(s) if s.lstrip("-").isdigit() else s for s in items]
    if len(labels) < num:  # cycle the given labels over all samples
        labels = [labels[i % len(labels)] for i in range(num)]
    return labels[:num]


# smallest value of the numeric sampling flags (all float flags must also be finite)
OPTION_MINIMUM = {"num_inference_steps": 1, "num_ar_steps": 1, "num_frames": 1, "num_context_frames": 0, "top_k": 1,
                  "num_head_steps": 1, "temperature": 0.0}


def _flag_names(keyword: str) -> str:
    option = SAMPLE_OPTIONS[keyword]
    return option.flag + (f"/{option.alias}" if option.alias else "")


def check_arguments(args) -> None:
    """One-line errors for values no pipeline can use: counts < 1, NaN / infinite floats, top-p outside (0, 1]."""
    if args.num < 1 or args.batch_size < 1:
        raise ValueError(f"--num and --batch-size must be >= 1, got --num {args.num} --batch-size {args.batch_size}")
    for keyword, option in SAMPLE_OPTIONS.items():
        value = getattr(args, keyword, None)
        if value is None or option.type not in (int, float):
            continue
        if option.type is float and not math.isfinite(value):
            raise ValueError(f"{_flag_names(keyword)}: must be a finite number, got {value}")
        low = OPTION_MINIMUM.get(keyword)
        if low is not None and value < low:
            raise ValueError(f"{_flag_names(keyword)}: must be >= {low}, got {value}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p: must be in (0, 1], got {args.top_p}")
    for keyword in ("rtol", "atol"):
        value = getattr(args, keyword, None)
        if value is not None and not 0 < value < 1:
            raise ValueError(f"--{keyword}: must be in (0, 1), got {value}")


def _sample_options(pipe, args) -> dict:
    """The sampling flags given on the command line, checked against the pipeline's family row."""
    given = {keyword: getattr(args, keyword) for keyword in SAMPLE_OPTIONS if getattr(args, keyword) is not None}
    row = pipeline_row(type(pipe).__name__)
    takes = row.sample_options if row else tuple(inspect.signature(pipe.__call__).parameters)
    for keyword in given:
        if keyword not in takes:
            raise ValueError(f"{SAMPLE_OPTIONS[keyword].flag}: {type(pipe).__name__} does not take this option")
    return given


def call_pipeline(pipe, args, num: int, start: int, labels):
    """One batch ``[start, start + num)`` with per-sample generators (seed + index)."""
    params = inspect.signature(pipe.__call__).parameters
    kwargs = {"generator": [torch.Generator("cpu").manual_seed(args.seed + start + i) for i in range(num)],
              "output_type": "pt"}
    if "class_labels" in params and labels is not None:
        kwargs["class_labels"] = labels[start:start + num]
    elif "batch_size" in params:
        kwargs["batch_size"] = num
    kwargs.update(_sample_options(pipe, args))
    return pipe(**kwargs)


def _apply_scheduler_options(pipe, args) -> None:
    """Flags set on the pipeline's scheduler rather than passed to ``__call__`` (flow's ``--solver``)."""
    row = pipeline_row(type(pipe).__name__)
    for keyword in row.scheduler_options if row else ():
        value = getattr(args, keyword)
        if value is None:
            continue
        scheduler = pipe.scheduler
        if keyword not in getattr(scheduler, "config", {}):
            raise ValueError(f"{SAMPLE_OPTIONS[keyword].flag}: {type(pipe).__name__} has no {keyword} choice")
        pipe.scheduler = type(scheduler).from_config(scheduler.config, **{keyword: value})
        setattr(args, keyword, None)  # applied through the scheduler


def check_outputs(args) -> None:
    """One-line errors, before anything loads, for output paths that cannot be written; ``--npz`` gets
    its ``.npz`` suffix here (numpy would add it)."""
    check_output_path(args.out)
    check_output_path(settings_path(args))
    if args.save_individual:
        check_output_path(args.save_individual, folder=True)
    if args.npz:
        args.npz = args.npz if args.npz.endswith(".npz") else args.npz + ".npz"
        check_output_path(args.npz)


def settings_path(args) -> str:
    return os.path.splitext(args.out)[0] + ".json"


def save_images(images: torch.Tensor, args):
    """images: (N, C, H, W) in [0, 1]; every file written under a temporary name and renamed."""
    from PIL import Image
    from torchvision.utils import save_image

    with atomic_path(args.out) as tmp:
        save_image(images, tmp, nrow=max(1, int(math.ceil(math.sqrt(len(images))))), padding=2)
    written = [args.out]
    uint8 = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    if uint8.shape[-1] == 1:
        uint8 = np.repeat(uint8, 3, axis=-1)
    if args.save_individual:
        for i, img in enumerate(uint8):
            with atomic_path(os.path.join(args.save_individual, f"{i:06d}.png")) as tmp:
                Image.fromarray(img).save(tmp)
        written.append(args.save_individual)
    if args.npz:
        with atomic_path(args.npz) as tmp:
            np.savez(tmp, arr_0=uint8)
        written.append(args.npz)
    return written


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_arguments(args)
    check_outputs(args)
    pipe = load_for_sampling(args.path)
    pipe.to(args.device)
    _apply_scheduler_options(pipe, args)
    pipe.set_progress_bar_config(disable=True)
    labels = _labels(pipe, args.class_labels, args.num)
    outputs, adaptive_nfe = [], []
    from tqdm.auto import tqdm

    for start in tqdm(range(0, args.num, args.batch_size), desc="sampling", unit="batch"):
        n = min(args.batch_size, args.num - start)
        out = call_pipeline(pipe, args, n, start, labels)
        outputs.append(out)
        if getattr(getattr(pipe, "scheduler", None), "is_adaptive", False):  # dopri5 ...: the calls it chose
            adaptive_nfe.append(pipe.scheduler.last_nfe)
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
    if adaptive_nfe:
        settings["adaptive_nfe_per_batch"] = adaptive_nfe
    if hasattr(pipe, "sampling_settings"):  # defaults saved with the pipeline (VAR: guidance, top-k/p, temperature)
        settings["pipeline_defaults"] = pipe.sampling_settings()
    with atomic_write(settings_path(args)) as f:
        json.dump(settings, f, indent=2, default=str)
    print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items() if k not in ("scheduler",)))
    for path in written:
        print(f"wrote {path}")
    return 0
