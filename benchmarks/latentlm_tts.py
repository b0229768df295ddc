#!/usr/bin/env python
"""LatentLM text-to-speech on the spoken digits: WAVs per prompt and (optional) digit-classifier accuracy.

    OMP_NUM_THREADS=1 python benchmarks/latentlm_tts.py runs/latentlm/speech/pipeline --per-digit 4 \
        --out runs/latentlm/speech/tts --classifier

Generates ``--per-digit`` clips for each single-digit prompt ("zero" .. "nine") and a few digit
sequences, writes them as WAVs under ``--out``, and with ``--classifier`` trains (once; cached under
the feature-net cache as ``speech_digits_single``) a spoken-digit classifier on the corpus's
single-digit clips and reports its accuracy on real held-out clips, on the same clips passed through the
pipeline's sigma-VAE (the ceiling the tokenizer allows) and on the generated ones against their prompt.
``spectrograms.png`` shows, for each digit (row k = "zero".."nine"), a real held-out clip and the first generated one.
Prints a markdown table and writes ``--out/tts.json``.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class SingleDigits(torch.utils.data.Dataset):
    """The single-digit clips (label >= 0) of a speech-digits split."""

    def __init__(self, split: str):
        from genmod.data import get_dataset

        self.base = get_dataset("speech_digits", split=split)
        self.index = [i for i, rec in enumerate(self.base.items) if rec["label"] >= 0]
        self.num_classes, self.class_names = 10, list(DIGITS)

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        return self.base[self.index[i]]


def single_digit_classifier():
    """The spoken-digit domain classifier (trained once on the single-digit clips, then loaded from the cache)."""
    from genmod.evals.feature_net import INFO_FILE, default_feature_net_dir, load_feature_net, train_feature_net

    path = default_feature_net_dir("speech_digits_single")
    if os.path.isfile(os.path.join(path, INFO_FILE)):
        return load_feature_net(path)
    return train_feature_net(SingleDigits("train"), path, test_dataset=SingleDigits("test"), name="speech_digits_single",
                             epochs=4, max_train=4000)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pipeline")
    parser.add_argument("--per-digit", type=int, default=4)
    parser.add_argument("--head-steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--out", default="runs/latentlm/speech/tts")
    parser.add_argument("--classifier", action="store_true", help="train/load a spoken-digit classifier and score the clips")
    args = parser.parse_args(argv)

    from genmod.evals.feature_net import classifier_accuracy
    from genmod.data.io import save_wav
    from genmod.latentlm.pipeline import LatentLMPipeline

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    pipe = LatentLMPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    rate = pipe.config.sample_rate or 16000
    os.makedirs(args.out, exist_ok=True)
    prompts = [d for d in DIGITS for _ in range(args.per_digit)]
    labels = torch.tensor([DIGITS.index(p) for p in prompts])
    out = pipe(prompt=prompts, num_head_steps=args.head_steps, guidance_scale=args.guidance,
               generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))])
    clips = torch.from_numpy(out.audios)
    for i, (p, clip) in enumerate(zip(prompts, clips)):
        save_wav(os.path.join(args.out, f"{p}_{i % args.per_digit}.wav"), clip, rate)
    sequences = ["three one four", "one two", "nine eight seven six"]
    seq_out = pipe(prompt=sequences, num_head_steps=args.head_steps, guidance_scale=args.guidance,
                   generator=[torch.Generator().manual_seed(100 + i) for i in range(len(sequences))])
    for s, clip in zip(sequences, seq_out.audios):
        save_wav(os.path.join(args.out, s.replace(" ", "_") + ".wav"), torch.from_numpy(clip), rate)
    # log-mel spectrograms, row k = digit k: a real held-out clip next to the first generated one
    from genmod.evals.audio import save_mel_comparison

    real = SingleDigits("test")
    first_real = {}
    for i in range(len(real)):
        first_real.setdefault(int(real.base.items[real.index[i]]["label"]), i)
    n = clips.shape[-1]
    real_rows = [real[first_real[d]]["audio"][..., :n] for d in range(10)]
    save_mel_comparison(os.path.join(args.out, "spectrograms.png"),
                        [("real", real_rows), ("generated", [clips[d * args.per_digit] for d in range(10)])], rate)
    result = {"num_clips": len(prompts), "sample_rate": rate, "out": args.out, "pipeline": args.pipeline}
    if args.classifier:
        net = single_digit_classifier()
        real_clips = torch.stack([real[i]["audio"] for i in range(len(real))])
        real_labels = torch.tensor([int(real[i]["label"]) for i in range(len(real))])
        real_clips = torch.nn.functional.pad(real_clips, (0, max(0, n - real_clips.shape[-1])))[..., :n]
        with torch.no_grad():  # the ceiling: what the sigma-VAE itself keeps of the held-out clips
            recon = torch.cat([pipe.vae.decode(pipe.vae.encode(real_clips[i:i + 32])) for i in range(0, len(real_clips), 32)])
        recon = recon.clamp(-1, 1)[..., :n]
        result.update(classifier_real_accuracy=classifier_accuracy(net, real_clips, real_labels),
                      classifier_reconstruction_accuracy=classifier_accuracy(net, recon, real_labels),
                      classifier_generated_accuracy=classifier_accuracy(net, clips.float(), labels),
                      feature_net=net.describe())
        print("| clips | spoken-digit classifier accuracy |")
        print("|---|---|")
        print(f"| real held-out single digits (N={len(real)}) | {result['classifier_real_accuracy']:.3f} |")
        print(f"| the same clips through the sigma-VAE (encode, decode) | {result['classifier_reconstruction_accuracy']:.3f} |")
        print(f"| generated, vs prompt (N={len(prompts)}) | {result['classifier_generated_accuracy']:.3f} |")
    print(f"wrote {len(prompts) + len(sequences)} WAVs to {args.out}")
    with open(os.path.join(args.out, "tts.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
