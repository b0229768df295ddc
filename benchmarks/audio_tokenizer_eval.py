#!/usr/bin/env python
"""Audio tokenizers on the held-out spoken digits: SI-SDR, MR-STFT and mel distances, code usage per
stage and bitrate, next to reference codecs (silence, resampled mu-law) measured on the same clips.

    OMP_NUM_THREADS=1 python benchmarks/audio_tokenizer_eval.py \
        --tokenizer rfsq=runs/audio_tok/rfsq_final --tokenizer sigma_vae=runs/audio_tok/sigma_vae_final \
        --out benchmarks/results/audio_tokenizer

For each ``NAME=RUN_DIR`` (a run folder with ``final_model/`` or a tokenizer folder) it runs
``genmod.tokenizer.evaluate_tokenizer`` on every test clip at its own length (the same numbers as
``genmod eval-tokenizer RUN_DIR``), keeps the first ``--wavs`` input / reconstruction pairs as WAVs
(``NAME_recon_XX.wav``, ``input_XX.wav``) and one PNG of log-mel spectrograms (inputs and every
tokenizer's reconstructions), and writes ``metrics.json`` and ``table.md`` into ``--out``.

``--classifier`` adds an intelligibility proxy: the accuracy of the spoken-digit classifier of
``benchmarks/latentlm_tts.py`` (trained once on the single-digit training clips, then cached) on the
reconstructions of the held-out single-digit clips, next to its accuracy on the originals and on the
reference codecs' versions.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile


def _fmt(value, digits=2):
    return "n/a" if value is None else f"{value:.{digits}f}"


def digit_accuracies(models: dict, sample_rate: int = 16000, batch_size: int = 32) -> dict:
    """Spoken-digit classifier accuracy on the held-out single-digit clips (2 s, zero-padded): originals,
    each tokenizer's reconstructions and each reference codec's output."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from latentlm_tts import SingleDigits, single_digit_classifier

    from genmod.evals.audio import audio_baselines
    from genmod.evals.feature_net import classifier_accuracy

    with torch.enable_grad():  # trains the classifier on the first call
        net = single_digit_classifier()
    real = SingleDigits("test")
    clips = torch.stack([real[i]["audio"] for i in range(len(real))])
    labels = torch.tensor([int(real[i]["label"]) for i in range(len(real))])
    out = {"num_clips": len(real), "feature_net": net.describe(), "original": classifier_accuracy(net, clips, labels)}
    for name, model in models.items():
        hop = model.downsample_factor
        x = torch.nn.functional.pad(clips, (0, -clips.shape[-1] % hop))
        recon = torch.cat([model(x[s:s + batch_size]).sample.clamp(-1, 1) for s in range(0, len(x), batch_size)])
        out[name] = classifier_accuracy(net, recon[..., :clips.shape[-1]], labels)
    for name, (y, _) in audio_baselines(clips, sample_rate).items():
        out[name] = classifier_accuracy(net, y, labels)
    return out


def markdown_table(results: dict, accuracy: dict | None = None) -> str:
    """One row per tokenizer and per reference codec (from the first tokenizer's baselines)."""
    acc = (lambda name: f" {accuracy[name]:.3f} |" if name in accuracy else " |") if accuracy else (lambda name: "")
    lines = ["| system | bitrate | SI-SDR (dB) | MR-STFT distance | mel distance | code usage / perplexity per stage |"
             + (" digit-classifier accuracy |" if accuracy else ""),
             "|---|---|---|---|---|---|" + ("---|" if accuracy else "")]
    baselines = {}
    for name, m in results.items():
        if "bitrate_bps" in m:
            rate = f"{m['bitrate_bps'] / 1000:.2f} kbit/s ({m['frames_per_second']:.0f} frames/s x {m['bits_per_frame']:.1f} bits)"
        else:
            rate = f"continuous: {m['frames_per_second']:.0f} frames/s x {m['latent_channels']} floats"
        usage = "n/a"
        if "usage_per_codebook" in m:
            usage = ", ".join(f"{u:.2f}/{p:.0f}" for u, p in zip(m["usage_per_codebook"], m["perplexity_per_codebook"]))
        elif "codebook_usage" in m:
            usage = f"{m['codebook_usage']:.2f}/{m['perplexity']:.0f}"
        lines.append(f"| **{name}** | {rate} | {_fmt(m['si_sdr'])} | {_fmt(m['mr_stft_distance'])} | "
                     f"{_fmt(m['mel_distance'])} | {usage} |" + acc(name))
        baselines = baselines or m.get("baselines", {})
    for name, b in baselines.items():
        lines.append(f"| {name} | {b['bitrate_bps'] / 1000:g} kbit/s | {_fmt(b['si_sdr'])} | {_fmt(b['mr_stft_distance'])} | "
                     f"{_fmt(b['mel_distance'])} | |" + acc(name))
    if accuracy:
        lines.append(f"| original clips | | | | | | {accuracy['original']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", action="append", required=True, metavar="NAME=RUN_DIR")
    parser.add_argument("--dataset", default="speech_digits")
    parser.add_argument("--split", default="test")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--wavs", type=int, default=4, help="input / reconstruction pairs kept as WAVs")
    parser.add_argument("--out", required=True)
    parser.add_argument("--classifier", action="store_true",
                        help="also score single-digit reconstructions with a spoken-digit classifier")
    args = parser.parse_args(argv)

    import torch

    from genmod.evals.audio import save_mel_comparison
    from genmod.data.audio_folder import load_audio
    from genmod.tokenizer import evaluate_tokenizer, load_eval_dataset
    from genmod.tokenizers_vq.folders import resolve_tokenizer_dir
    from genmod.tokenizers_vq.models import load_tokenizer

    torch.set_grad_enabled(False)
    os.makedirs(args.out, exist_ok=True)
    results, recon_columns, inputs, models = {}, [], [], {}
    for spec in args.tokenizer:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            parser.error(f"--tokenizer {spec!r}: expected NAME=RUN_DIR")
        model_dir, _ = resolve_tokenizer_dir(path)
        model = load_tokenizer(model_dir).eval()
        dataset = load_eval_dataset(args.dataset, args.split, "audio")
        with tempfile.TemporaryDirectory() as tmp:
            metrics = evaluate_tokenizer(model, dataset, tmp, num_samples=args.num_samples, num_show=args.wavs)
            clips = []
            for i in range(args.wavs):
                shutil.copy(os.path.join(tmp, f"recon_{i:02d}.wav"), os.path.join(args.out, f"{name}_recon_{i:02d}.wav"))
                clips.append(load_audio(os.path.join(tmp, f"recon_{i:02d}.wav"))[0])
                if not inputs or len(inputs) <= i:
                    shutil.copy(os.path.join(tmp, f"input_{i:02d}.wav"), os.path.join(args.out, f"input_{i:02d}.wav"))
                    inputs.append(load_audio(os.path.join(tmp, f"input_{i:02d}.wav"))[0])
        metrics["model_dir"] = model_dir
        metrics["parameters"] = sum(p.numel() for p in model.parameters())
        results[name] = metrics
        models[name] = model
        recon_columns.append((name, clips))
        print(f"{name}: SI-SDR {_fmt(metrics['si_sdr'])} dB, MR-STFT {_fmt(metrics['mr_stft_distance'])}, "
              f"mel {_fmt(metrics['mel_distance'])}")
    sample_rate = results[next(iter(results))]["sample_rate"]
    save_mel_comparison(os.path.join(args.out, "mel_spectrograms.png"), [("input", inputs)] + recon_columns, sample_rate)
    accuracy = digit_accuracies(models, sample_rate) if args.classifier else None
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump({"tokenizers": results, "digit_classifier_accuracy": accuracy}, f, indent=2)
    table = markdown_table(results, accuracy)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table)
    print(table)
    return results


if __name__ == "__main__":
    main()
