"""Diffusion Forcing rollouts: long-horizon stability vs ground truth, context noising, KV-cache speed.

    python benchmarks/diffusion_forcing_rollout.py --model runs/diffusion_forcing/shapes     # trained model
    python benchmarks/diffusion_forcing_rollout.py --fps-only                               # speed only

(1) Stability: from ``--context`` clean frames of validation ``moving_shapes`` clips, roll out
``--multiple`` x the training clip length with the autoregressive schedule (sliding window) and
compare every frame with the exact continuation ``MovingShapesDataset.ground_truth``: per-frame MSE
and PSNR against the horizon, for several stabilisation levels ``t_c`` (0 = no context noising).
Baselines in the same run: repeating the last context frame, and the real-vs-real floor of two
different clips. MSE against the exact continuation punishes any drift of position, so frame
*quality* is measured too, independent of the trajectory: a domain classifier trained on real
``moving_shapes`` frames (``genmod.evals.feature_net``; its test accuracy is reported) gives, per block of
``window`` generated frames, its accuracy on the clip's shape class and the domain-FID of the frames
against as many real frames, next to the same numbers for the true continuation (the floor).
Writes ``OUT/stability.png`` (curves), ``OUT/rollout.gif`` (model vs truth) and JSON.
(2) Speed: frames per second of autoregressive rollout without a cache (history recomputed at every
denoising step), with the per-chunk re-encoded cache and with the incremental cache; ratios are
against the uncached run measured in the same process. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from genmod.diffusion_forcing import DiffusionForcingTransformer, rollout


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def load(model_dir: str, device):
    """(family, model) from a training output / checkpoint folder."""
    from genmod.train import load_family_from_checkpoint

    import genmod.diffusion_forcing.family  # noqa: F401  (registers the family)

    family, model = load_family_from_checkpoint(model_dir)
    return family, model.to(device).eval()


def stability(family, model, args, device) -> dict:
    cfg = family.config
    dataset = family.build_dataset("val")
    window = model.config.max_frames
    total = args.context + args.multiple * window
    idx = list(range(args.num_clips))
    truth = torch.stack([dataset.ground_truth(i, total) for i in idx]).to(device)
    results = {"context": args.context, "frames": total, "window": window, "steps": args.steps, "curves": {}}
    rollouts = {}
    for level in args.context_noise:
        gen = torch.Generator(device).manual_seed(args.seed)
        t0 = time.time()
        with torch.no_grad():
            out = family.rollout(model, truth[:, :args.context], total - args.context, gen, schedule="autoregressive",
                                 chunk_size=1, num_inference_steps=args.steps, context_noise=level, kv_cache="reencode",
                                 stabilization=args.stabilization)
        _sync(device)
        mse = ((out - truth) ** 2).flatten(2).mean(-1)  # [N, T] in [-1, 1] units
        psnr = 10 * torch.log10(4.0 / mse.clamp(min=1e-10))
        results["curves"][f"t_c={level:g}"] = {"mse": mse.mean(0).tolist(), "psnr": psnr.mean(0).tolist(),
                                               "seconds": time.time() - t0}
        rollouts[level] = out
    results["frame_quality"] = frame_quality(rollouts, truth, dataset, idx, args, window)
    last = truth[:, args.context - 1:args.context]
    copy_mse = ((last - truth) ** 2).flatten(2).mean(-1)
    results["curves"]["copy-last-frame"] = {"mse": copy_mse.mean(0).tolist(),
                                            "psnr": (10 * torch.log10(4.0 / copy_mse.clamp(min=1e-10))).mean(0).tolist()}
    other = truth.roll(1, dims=0)  # a different clip: the error of an unrelated but real video
    floor = ((other - truth) ** 2).flatten(2).mean(-1)
    results["curves"]["other-real-clip"] = {"mse": floor.mean(0).tolist(),
                                            "psnr": (10 * torch.log10(4.0 / floor.clamp(min=1e-10))).mean(0).tolist()}
    os.makedirs(args.out, exist_ok=True)
    _plot(results, os.path.join(args.out, "stability.png"))
    from genmod.data.io import save_gif

    best = args.context_noise[-1] if len(args.context_noise) else None
    if best is not None:
        pairs = torch.stack([rollouts[best][:4], truth[:4]], 1).flatten(0, 1)  # model, truth, model, truth ...
        save_gif(os.path.join(args.out, "rollout.gif"), pairs.clamp(-1, 1).cpu(), nrow=2, fps=6)
        from torchvision.utils import save_image

        save_image(pairs[:4].flatten(0, 1).cpu(), os.path.join(args.out, "rollout_strip.png"), nrow=total,
                   normalize=True, value_range=(-1, 1))
    return results


class _Frames(torch.utils.data.Dataset):
    """Single frames of ``moving_shapes`` clips, labelled with the clip's shape class."""

    def __init__(self, clips):
        self.clips, self.frames = clips, clips.num_frames
        self.num_classes, self.class_names = clips.num_classes, clips.class_names

    def __len__(self):
        return len(self.clips) * self.frames

    def __getitem__(self, i):
        item = self.clips[i // self.frames]
        return {"image": item["video"][i % self.frames], "label": item["label"]}


def frame_quality(rollouts, truth, dataset, idx, args, window) -> dict:
    """Per block of ``window`` generated frames: the frame classifier's accuracy on the clip's class
    and the domain-FID against real frames of other clips, for each rollout and for the truth."""
    from genmod.evals.metrics import frechet_distance

    size = dataset.image_size
    net = _frame_net(size)
    labels = torch.tensor([int(dataset[i]["label"]) for i in idx])

    def features_logits(frames):
        with torch.no_grad():
            outs = [net.model(frames[s:s + 512].float().cpu()) for s in range(0, len(frames), 512)]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    # real frames of other (test) clips, featurised once; each block gets its own draw (disjoint while they last)
    real_pool = _frames("test", 500, size)
    real_features = features_logits(torch.stack([real_pool[i]["image"] for i in range(len(real_pool))]))[0]
    real_order = torch.randperm(len(real_features), generator=torch.Generator().manual_seed(args.seed))
    c, total = args.context, truth.shape[1]
    blocks = [(s, min(s + window, total)) for s in range(c, total, window)]
    report = {"feature_net": net.describe(), "blocks": [f"{a + 1}-{b}" for a, b in blocks], "rows": {}}
    sources = {f"t_c={k:g}": v for k, v in rollouts.items()}
    sources["true continuation"] = truth
    for source, video in sources.items():
        acc, fid = [], []
        for k, (a, b) in enumerate(blocks):
            features, logits = features_logits(video[:, a:b].cpu().flatten(0, 1))
            acc.append((logits.argmax(1).view(len(idx), -1) == labels[:, None]).float().mean().item())
            n = len(features)
            real = real_features[real_order[(torch.arange(n) + k * n) % len(real_order)]]
            fid.append(frechet_distance(features, real))
        report["rows"][source] = {"accuracy": acc, "domain_fid": fid}
    return report


def _frames(split, num_clips, size):
    from genmod.data import get_dataset

    return _Frames(get_dataset("moving_shapes", split=split, num_samples=num_clips, num_frames=8, image_size=size))


def _frame_net(size):
    """The frame classifier: trained once on real frames (a few CPU minutes), then cached."""
    from genmod.evals.feature_net import INFO_FILE, default_feature_net_dir, load_feature_net, train_feature_net

    name = f"moving_shapes_frames_{size}px"
    path = default_feature_net_dir(name)
    if os.path.isfile(os.path.join(path, INFO_FILE)):
        return load_feature_net(path)
    return train_feature_net(_frames("train", 2000, size), path, test_dataset=_frames("test", 250, size), name=name,
                             max_train=16000, epochs=4)


def _plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in results["curves"].items():
        style = "--" if name in ("copy-last-frame", "other-real-clip") else "-"
        ax.plot(curve["mse"], style, label=name)
    ax.axvline(results["context"] - 0.5, color="grey", lw=0.8)
    for k in range(1, 5):
        ax.axvline(results["context"] + k * results["window"] - 0.5, color="grey", lw=0.4, ls=":")
    ax.set_xlabel("frame (context | generated; dotted = multiples of the training length)")
    ax.set_ylabel("MSE vs exact continuation ([-1, 1] units)")
    ax.set_title("Diffusion Forcing rollout stability (moving_shapes)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def speed(model, args, device) -> list[dict]:
    frame = model.frame_shape
    rows = []
    ctx = torch.randn(args.fps_batch, 1, *frame, device=device).clamp(-1, 1)
    reference = None
    for mode in (None, "reencode", "incremental"):
        times = []
        for rep in range(args.repeat + 1):
            gen = torch.Generator(device).manual_seed(0)
            _sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = rollout(model, ctx, args.fps_frames, schedule="autoregressive", chunk_size=1,
                              num_inference_steps=args.steps, kv_cache=mode, generator=gen)
            _sync(device)
            if rep:  # the first run warms up
                times.append(time.perf_counter() - t0)
        seconds = min(times)
        if reference is None:
            reference = (seconds, out)
        within = args.fps_frames + 1 <= model.config.max_frames
        rows.append({"kv_cache": str(mode), "frames_per_s": args.fps_batch * args.fps_frames / seconds,
                     "speedup": reference[0] / seconds, "max_abs_diff_vs_uncached": float((out - reference[1]).abs().max()),
                     "rollout_fits_window": within})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="runs/diffusion_forcing/shapes", help="training output or checkpoint folder")
    p.add_argument("--out", default="runs/diffusion_forcing/benchmark")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num-clips", type=int, default=32)
    p.add_argument("--context", type=int, default=2)
    p.add_argument("--multiple", type=int, default=4, help="rollout length in training clip lengths")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--context-noise", type=float, nargs="*", default=[0.0, 0.02, 0.1])
    p.add_argument("--stabilization", default="v1.5", choices=["v1.5", "v1.5_ddpm", "dfot", "fixed_noise"],
                   help="how clean frames are shown (the tables before session 6 used fixed_noise)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps-only", action="store_true", help="speed table only, on a random model of the default size")
    p.add_argument("--fps-frames", type=int, default=32)
    p.add_argument("--fps-batch", type=int, default=4)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--json", default="benchmarks/results/diffusion_forcing_rollout.json")
    args = p.parse_args()
    device = torch.device(args.device)
    report = {"device": str(device), "torch_threads": torch.get_num_threads()}
    if args.fps_only:
        model = DiffusionForcingTransformer(sample_size=16, patch_size=4, hidden_size=128, depth=4, num_heads=4,
                                            max_frames=8).to(device).eval()
    else:
        family, model = load(args.model, device)
        report["model"] = args.model
        report["stability"] = stability(family, model, args, device)
        res = report["stability"]
        w, c = res["window"], res["context"]
        print(f"\n(1) rollout stability: {args.num_clips} clips, {c} context frames, {res['frames'] - c} generated "
              f"({args.multiple}x the {w}-frame training clips), {args.steps} steps, MSE vs exact continuation")
        marks = [c + k * w - 1 for k in range(1, args.multiple + 1)]
        print("| rollout | " + " | ".join(f"frame {m + 1}" for m in marks) + " | mean |")
        print("|---|" + "---|" * (len(marks) + 1))
        for name, curve in res["curves"].items():
            mse = curve["mse"]
            mean = sum(mse[c:]) / len(mse[c:])
            print(f"| {name} | " + " | ".join(f"{mse[m]:.4f}" for m in marks) + f" | {mean:.4f} |")
        quality = res["frame_quality"]
        print(f"\n(1b) frame quality per block of generated frames: frame classifier accuracy on the clip's class / "
              f"domain-FID vs real frames (classifier test accuracy {quality['feature_net']['test_accuracy']:.3f})")
        print("| rollout | " + " | ".join(f"frames {b}" for b in quality["blocks"]) + " |")
        print("|---|" + "---|" * len(quality["blocks"]))
        for name, row in quality["rows"].items():
            print(f"| {name} | " + " | ".join(f"{a:.2f} / {f:.1f}" for a, f in zip(row["accuracy"], row["domain_fid"]))
                  + " |")
    rows = speed(model, args, device)
    report["speed"] = rows
    print(f"\n(2) autoregressive rollout speed: batch {args.fps_batch}, {args.fps_frames} frames, {args.steps} steps/frame, "
          f"window {model.config.max_frames} frames, {args.device}")
    print("| KV cache | frames/s | speed-up vs none | max abs diff vs none |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['kv_cache']} | {r['frames_per_s']:.1f} | {r['speedup']:.2f}x | {r['max_abs_diff_vs_uncached']:.2e} |")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
