"""Reflow pairs: (noise, teacher sample) couplings for rectified-flow reflow and k-step distillation.

Liu et al. 2022 ("Flow straight and fast", Sec. 2.2 / Alg. 1): the *reflow* of a flow draws noise
``z``, solves the teacher ODE from ``z`` to a sample ``x = ODE(z)`` and trains a new flow on the pairs
``(x, z)`` with the straight interpolation; the new flow's paths are straighter and cross less, so few
Euler steps suffice. Distillation (their Sec. 2.3) trains on the same pairs only at the times a k-step
Euler sampler visits (``FlowConfig.distill_steps``).

``generate_pairs`` writes the pairs as safetensors shards ``pairs-00000.safetensors`` (``noise``,
``sample``, ``label``) with a ``pairs.json`` that records how they were made. Every shard draws its noise
from its own seed, is written atomically and is skipped when it exists, so an interrupted generation
resumes where it stopped and gives the same files. ``PairDataset`` reads them back for the trainer.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from genmod.core.files import atomic_path, atomic_write

SampleFn = Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]  # (noise, labels) -> x at t = 0
SHARD_NAME = "pairs-{:05d}.safetensors"


def shard_noise(shape: tuple, seed: int, shard: int) -> torch.Tensor:
    """The noise of shard ``shard``: its own CPU generator seeded from ``(seed, shard)``, float32."""
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(shard))
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def pair_labels(start: int, count: int, num_classes: int) -> Optional[torch.Tensor]:
    """Classes cycled over the pair index (balanced), or None for unconditional teachers."""
    return torch.arange(start, start + count) % num_classes if num_classes else None


def _check_settings(out_dir: str, settings: dict) -> None:
    """Write ``pairs.json``, or check that the existing one describes the same generation."""
    path = os.path.join(out_dir, "pairs.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved != settings:
            changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
            raise ValueError(f"{path}: made with other settings ({', '.join(changed)}); use a new --reflow_pairs_dir")
        return
    with atomic_write(path) as f:
        json.dump(settings, f, indent=2)


def generate_pairs(sample_fn: SampleFn, num_pairs: int, out_dir: str, sample_shape: tuple, num_classes: int = 0,
                   shard_size: int = 256, seed: int = 0, settings: Optional[dict] = None, progress: bool = True) -> list[str]:
    """Solve the teacher from seeded noise and store ``num_pairs`` (noise, sample, label) pairs under ``out_dir``.

    ``sample_fn(noise, labels)`` is the teacher's ODE solve (t = 1 -> 0); ``settings`` (teacher, solver,
    steps, guidance...) go into ``pairs.json`` and must match on resume. Returns the shard paths.
    """
    if num_pairs < 1 or shard_size < 1:
        raise ValueError(f"--reflow_pairs: expected >= 1 pairs in shards of >= 1, got {num_pairs}, {shard_size}")
    os.makedirs(out_dir, exist_ok=True)
    _check_settings(out_dir, {**(settings or {}), "num_pairs": num_pairs, "shard_size": shard_size, "seed": seed,
                              "sample_shape": list(sample_shape), "num_classes": num_classes})
    num_shards = -(-num_pairs // shard_size)
    paths = [os.path.join(out_dir, SHARD_NAME.format(i)) for i in range(num_shards)]
    todo = [i for i, p in enumerate(paths) if not os.path.exists(p)]
    bar = tqdm(total=num_pairs, desc="reflow pairs", disable=not progress,
               initial=num_pairs - sum(min(shard_size, num_pairs - i * shard_size) for i in todo))
    for shard in todo:
        count = min(shard_size, num_pairs - shard * shard_size)
        noise = shard_noise((count, *sample_shape), seed, shard)
        labels = pair_labels(shard * shard_size, count, num_classes)
        with torch.no_grad():
            sample = sample_fn(noise.clone(), labels)
        tensors = {"noise": noise.contiguous(), "sample": sample.detach().float().cpu().contiguous()}
        if labels is not None:
            tensors["label"] = labels
        with atomic_path(paths[shard]) as tmp:
            save_file(tensors, tmp)
        bar.update(count)
    bar.close()
    return paths


class PairDataset(torch.utils.data.Dataset):
    """The stored pairs as training items ``{"latents": sample, "noise": noise, "label": label}``.

    ``latents`` is what the generator models (pixels for a pixel-space teacher), so the flow family's
    ``clean_data`` takes it as is and its loss uses the stored ``noise`` instead of drawing one.
    """

    def __init__(self, out_dir: str, class_names: Optional[list] = None):
        with open(os.path.join(out_dir, "pairs.json")) as f:
            self.settings = json.load(f)
        num = int(self.settings["num_pairs"])
        shards = [os.path.join(out_dir, SHARD_NAME.format(i)) for i in range(-(-num // int(self.settings["shard_size"])))]
        missing = [p for p in shards if not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(f"{missing[0]}: reflow pairs incomplete; run the generation again to resume")
        loaded = [load_file(p) for p in shards]
        self.noise = torch.cat([d["noise"] for d in loaded])
        self.sample = torch.cat([d["sample"] for d in loaded])
        self.labels = torch.cat([d["label"] for d in loaded]) if "label" in loaded[0] else None
        self.num_classes = int(self.settings.get("num_classes", 0))
        self.class_names = list(class_names or [str(i) for i in range(self.num_classes)])
        self.channels, self.image_size = self.sample.shape[1], self.sample.shape[-1]

    def __len__(self) -> int:
        return self.sample.shape[0]

    def __getitem__(self, index: int) -> dict:
        item = {"latents": self.sample[index], "noise": self.noise[index]}
        item["label"] = self.labels[index] if self.labels is not None else torch.tensor(0)
        return item


def teacher_sample_fn(pipe, num_inference_steps: int, guidance_scale: float, batch_size: int = 64) -> SampleFn:
    """``(noise, labels) -> latents at t = 0`` of a ``FlowMatchingPipeline`` (its own scheduler and loop), in chunks."""
    pipe.set_progress_bar_config(disable=True)

    def sample(noise: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        outs = []
        for start in range(0, noise.shape[0], batch_size):
            chunk = noise[start:start + batch_size]
            y = None if labels is None else labels[start:start + batch_size]
            out = pipe(class_labels=y, batch_size=None if y is not None else chunk.shape[0], latents=chunk,
                       num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                       output_type="latent").images
            outs.append(out.float().cpu())
        return torch.cat(outs)

    return sample


def distill_times(num_steps: int, batch: int, generator: torch.Generator, device=None) -> torch.Tensor:
    """``[B]`` times drawn uniformly from the starts ``{1, (K-1)/K, ..., 1/K}`` of a K-step uniform Euler solve.

    Training the straight-pair target only there (Liu et al. 2022, Sec. 2.3: "k-step" distillation; K = 1 is
    ``min E || (z - x) - v(z, 1) ||^2``) makes the K-step Euler sampler the object being fitted.
    """
    if num_steps < 1:
        raise ValueError(f"--distill_steps: expected >= 1, got {num_steps}")
    k = torch.randint(0, num_steps, (batch,), generator=generator, device=generator.device)
    return (1.0 - k.to(torch.float32) / num_steps).to(device if device is not None else generator.device)


def make_reflow_pairs(config) -> PairDataset:
    """``--reflow_from TEACHER --reflow_pairs N``: make (or resume) the pairs under ``--reflow_pairs_dir`` and load them.

    The teacher pipeline solves with its saved solver for ``reflow_num_inference_steps`` steps and CFG
    ``reflow_guidance_scale``; classes are cycled so the pairs are balanced.
    """
    from genmod.pipelines import load_pipeline

    if not os.path.isfile(os.path.join(config.reflow_from, "model_index.json")):
        raise FileNotFoundError(f"--reflow_from: {config.reflow_from} is not a pipeline folder (no model_index.json)")
    pipe = load_pipeline(config.reflow_from)
    net = pipe.transformer.eval()
    num_classes = int(net.config.num_classes)
    shape = (net.config.in_channels, net.config.sample_size, net.config.sample_size)
    out_dir = config.reflow_pairs_dir or os.path.join(config.output_dir, "reflow_pairs")
    settings = {"teacher": os.path.abspath(config.reflow_from), "solver": pipe.scheduler.config.get("solver", "?"),
                "num_inference_steps": config.reflow_num_inference_steps,
                "guidance_scale": config.reflow_guidance_scale}
    sample_fn = teacher_sample_fn(pipe, config.reflow_num_inference_steps,
                                  config.reflow_guidance_scale if num_classes else 1.0)
    generate_pairs(sample_fn, config.reflow_pairs, out_dir, shape, num_classes=num_classes, seed=config.seed,
                   settings=settings)
    names = pipe.config.get("id2label") or {}
    class_names = [names.get(str(i), str(i)) for i in range(num_classes)]
    return PairDataset(out_dir, class_names=class_names)
