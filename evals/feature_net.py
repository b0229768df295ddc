"""Domain feature networks: small classifiers the package trains itself, used as FID/KID/IS extractors.

For data far from ImageNet (28x28 grey clothes, toy shapes, spoken digits) the common practice is a
classifier trained on the target domain ("LeNet-FID", WaveGAN's SC09 Inception score); it also works
on machines with no Inception weights at all. A net here is a :class:`DomainClassifier`
(``ModelMixin + ConfigMixin``) saved as ``config.json`` + safetensors, next to ``feature_net.json``
with its held-out test accuracy and the weights file's sha256; both are reported with every score,
because such scores compare only within one net.

Images: a LeNet-style CNN on ``[-1, 1]`` images. Audio: the same CNN on a log-mel spectrogram of a
fixed-length crop. The penultimate layer ("feat", scaled once so that ``E|f|^2 / D = 1`` on the
training data - what KID's cubic kernel needs) is the embedding; "logits" give the domain IS and
:func:`classify`.

    net = get_feature_net("fashion_mnist")            # trains into $GENMOD_CACHE on first use
    name = register_feature_net(net)                  # a torch-fidelity extractor name
    labels = classify(net, images)                    # accuracy of generated samples vs their prompts
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch_fidelity
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from tqdm.auto import tqdm

from genmod.core.files import file_sha256
from genmod.evals.paths import cache_subdir

INFO_FILE = "feature_net.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
KNOWN_DATASETS = ("shapes", "fashion_mnist", "tones", "speech_digits")


class DomainClassifier(ModelMixin, ConfigMixin):
    """LeNet-style classifier over images, or over log-mel spectrograms of audio.

    Args:
        modality: "image" (input ``(B, C, H, W)`` in [-1, 1]) or "audio" (``(B, 1, N)`` in [-1, 1]).
        in_channels: image channels (1 for audio).
        input_size: images are resized to this square size; audio is cropped / zero-padded to
            ``audio_samples`` first.
        num_classes, feature_dim, width: head sizes.
    """

    @register_to_config
    def __init__(self, modality: str = "image", in_channels: int = 1, input_size: int = 28, num_classes: int = 10,
                 feature_dim: int = 128, width: int = 16, sample_rate: int = 16000, audio_samples: int = 16000,
                 n_mels: int = 40):
        super().__init__()
        if modality not in ("image", "audio"):
            raise ValueError(f"modality: expected 'image' or 'audio', got {modality!r}")
        conv_in = in_channels if modality == "image" else 1
        self.body = nn.Sequential(
            nn.Conv2d(conv_in, width, 5, padding=2), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 5, padding=2), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.BatchNorm2d(4 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(4 * width * 16, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)
        # set after training: makes E|feat|^2 / D = 1 on the training set (KID's kernel scale)
        self.register_buffer("feature_scale", torch.ones(()))
        if modality == "audio":
            import torchaudio

            self.mel = torchaudio.transforms.MelSpectrogram(sample_rate=sample_rate, n_fft=512,
                                                            hop_length=max(1, audio_samples // 64), n_mels=n_mels)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Bring inputs to the network's fixed shape (resize images; crop/pad + log-mel audio)."""
        cfg = self.config
        if cfg.modality == "image":
            if x.shape[1] != cfg.in_channels:  # RGB files of grey data (e.g. a PNG folder) and the reverse
                x = x.mean(1, keepdim=True) if cfg.in_channels == 1 else x.expand(-1, cfg.in_channels, -1, -1)
            if x.shape[-2:] != (cfg.input_size, cfg.input_size):
                x = F.interpolate(x, size=(cfg.input_size, cfg.input_size), mode="bilinear", antialias=True,
                                  align_corners=False)
            return x
        x = x.mean(1) if x.ndim == 3 else x  # (B, N) mono
        x = x[:, : cfg.audio_samples]
        x = F.pad(x, (0, cfg.audio_samples - x.shape[-1]))
        return torch.log(self.mel(x.float()) + 1e-5).unsqueeze(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features * feature_scale, logits)``."""
        hidden = self.body(self.prepare(x))
        return hidden * self.feature_scale, self.head(hidden)


@dataclass
class FeatureNet:
    """A trained domain classifier and its record (``feature_net.json``)."""

    model: DomainClassifier
    info: dict
    path: str

    @property
    def checksum(self) -> str:
        return self.info["sha256"]

    def describe(self) -> dict:
        """What every score computed with this net reports beside it."""
        return {"dataset": self.info["dataset"], "test_accuracy": self.info["test_accuracy"],
                "sha256": self.info["sha256"], "path": self.path}


# ------------------------------------------------------------------------------------------------
# data


def _resolve_dataset(dataset, split: str):
    if not isinstance(dataset, str):
        return dataset
    try:
        from genmod.data import get_dataset
    except ImportError:
        raise ValueError(f"dataset: genmod.data.get_dataset is not available to build {dataset!r}; "
                         f"pass a Dataset object instead") from None
    return get_dataset(dataset, split=split)


def _modality(item: dict) -> str:
    if "image" in item:
        return "image"
    if "audio" in item:
        return "audio"
    raise ValueError(f"dataset: items need an 'image' or 'audio' field, got keys {sorted(item)}")


def _collate(items: list[dict], modality: str, audio_samples: int | None = None):
    if modality == "image":
        x = torch.stack([item["image"] for item in items])
    else:
        clips = [item["audio"].float().mean(0)[:audio_samples] for item in items]
        x = torch.stack([F.pad(c, (0, audio_samples - len(c))) for c in clips]).unsqueeze(1)
    return x, torch.as_tensor([int(item["label"]) for item in items])


def _subset_indices(length: int, limit: int | None, seed: int) -> list[int]:
    if limit is None or limit >= length:
        return list(range(length))
    return torch.randperm(length, generator=torch.Generator().manual_seed(seed))[:limit].tolist()


# ------------------------------------------------------------------------------------------------
# training


def train_feature_net(dataset, out: str | None = None, *, epochs: int = 3, batch_size: int = 128, lr: float = 2e-3,
                      max_train: int | None = 20000, max_test: int | None = 2000, seed: int = 0,
                      test_dataset=None, name: str | None = None, width: int = 16) -> FeatureNet:
    """Train a :class:`DomainClassifier` on ``dataset`` (a name for ``genmod.data.get_dataset`` or a
    Dataset of dicts) and save it to ``out`` (default ``$GENMOD_CACHE/feature_nets/<name>/``).

    The held-out accuracy is measured on ``test_dataset`` (default: the ``"test"`` split of a named
    dataset). ``max_train`` caps the training set (a random subset) so training stays a few CPU
    minutes. Returns the loaded :class:`FeatureNet`.
    """
    name = name or (dataset if isinstance(dataset, str) else type(dataset).__name__)
    train_set = _resolve_dataset(dataset, "train")
    test_set = test_dataset if test_dataset is not None else _resolve_dataset(dataset, "test")
    if out is None:
        out = default_feature_net_dir(name)
    torch.manual_seed(seed)
    model, modality, num_classes, audio_samples = _build_classifier(train_set, width)

    train_indices = _subset_indices(len(train_set), max_train, seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = (len(train_indices) + batch_size - 1) // batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(1, epochs * steps_per_epoch))
    generator = torch.Generator().manual_seed(seed)
    started = time.time()
    # a LeNet-sized net gains nothing from intra-op threads, and on a shared CPU they cost up to 9x
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model.train()
    try:
        _train_loop(model, train_set, train_indices, modality, audio_samples, optimizer, scheduler, generator,
                    epochs, batch_size, steps_per_epoch, name)
        model.eval()
        train_features, _, _ = _features_labels(model, train_set, train_indices[:4096], modality, audio_samples, batch_size)
        model.feature_scale.fill_(float(train_features.pow(2).sum(1).mean().div(train_features.shape[1]).rsqrt()))
        test_indices = _subset_indices(len(test_set), max_test, seed + 1)
        _, test_logits, test_labels = _features_labels(model, test_set, test_indices, modality, audio_samples, batch_size)
    finally:
        torch.set_num_threads(threads)
    accuracy = (test_logits.argmax(1) == test_labels).float().mean().item()

    _save(model, out, {
        "dataset": name, "modality": modality, "num_classes": num_classes,
        "class_names": list(getattr(train_set, "class_names", []) or []),
        "test_accuracy": accuracy, "num_test": len(test_indices), "num_train": len(train_indices),
        "epochs": epochs, "seed": seed, "train_seconds": round(time.time() - started, 1),
    })
    print(f"[evals] feature net {name}: test accuracy {accuracy:.4f} on {len(test_indices)}, saved to {out}")
    return load_feature_net(out)


def _build_classifier(train_set, width: int):
    """``(model, modality, num_classes, audio_samples)``: a :class:`DomainClassifier` sized from the data."""
    first = train_set[0]
    modality = _modality(first)
    num_classes = int(getattr(train_set, "num_classes", 0) or 0) or int(max(int(train_set[i]["label"]) for i in range(len(train_set))) + 1)
    if modality == "image":
        channels, size = first["image"].shape[0], first["image"].shape[-1]
        model = DomainClassifier("image", in_channels=channels, input_size=size, num_classes=num_classes, width=width)
        return model, modality, num_classes, None
    sample_rate = int(first.get("sample_rate", 16000))
    audio_samples = int(max(train_set[i]["audio"].shape[-1] for i in range(min(64, len(train_set)))))
    model = DomainClassifier("audio", in_channels=1, num_classes=num_classes, width=width,
                             sample_rate=sample_rate, audio_samples=audio_samples)
    return model, modality, num_classes, audio_samples


def _save(model, out: str, info: dict) -> None:
    """Weights (safetensors) and ``info.json`` (accuracy, sizes, the weights' sha256) into ``out``."""
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    info["sha256"] = file_sha256(os.path.join(out, WEIGHTS_FILE))
    with open(os.path.join(out, INFO_FILE), "w") as f:
        json.dump(info, f, indent=2)


def _train_loop(model, train_set, train_indices, modality, audio_samples, optimizer, scheduler, generator, epochs,
                batch_size, steps_per_epoch, name):
    with tqdm(total=epochs * steps_per_epoch, desc=f"feature net {name}", unit="step") as bar:
        for _ in range(epochs):
            order = torch.randperm(len(train_indices), generator=generator).tolist()
            for start in range(0, len(order), batch_size):
                batch = [train_set[train_indices[i]] for i in order[start:start + batch_size]]
                x, y = _collate(batch, modality, audio_samples)
                loss = F.cross_entropy(model(x)[1], y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")


def _features_labels(model, dataset, indices, modality, audio_samples, batch_size):
    feats, logits, labels = [], [], []
    with torch.no_grad():
        for start in range(0, len(indices), batch_size):
            x, y = _collate([dataset[i] for i in indices[start:start + batch_size]], modality, audio_samples)
            f, l = model(x)
            feats.append(f), logits.append(l), labels.append(y)
    return torch.cat(feats), torch.cat(logits), torch.cat(labels)


# ------------------------------------------------------------------------------------------------
# loading


def default_feature_net_dir(dataset: str) -> str:
    return os.path.join(cache_subdir("feature_nets", create=False), dataset)


def load_feature_net(path: str) -> FeatureNet:
    """Load a saved net and check its weights against the recorded sha256."""
    info_path = os.path.join(path, INFO_FILE)
    if not os.path.isfile(info_path):
        raise FileNotFoundError(f"{path}: not a feature net folder (no {INFO_FILE})")
    with open(info_path) as f:
        info = json.load(f)
    actual = file_sha256(os.path.join(path, WEIGHTS_FILE))
    if actual != info.get("sha256"):
        raise ValueError(f"{path}/{WEIGHTS_FILE}: sha256 {actual[:12]} differs from {INFO_FILE}'s {str(info.get('sha256'))[:12]}")
    model = DomainClassifier.from_pretrained(path).eval()
    model.requires_grad_(False)
    return FeatureNet(model=model, info=info, path=os.path.abspath(path))


def get_feature_net(dataset: str, path: str | None = None, train_if_missing: bool = True, **train_kwargs) -> FeatureNet:
    """The domain net for ``dataset`` from ``path`` (default ``$GENMOD_CACHE/feature_nets/<dataset>/``);
    trained there on first use when missing (a few CPU minutes)."""
    path = path or default_feature_net_dir(dataset)
    if os.path.isfile(os.path.join(path, INFO_FILE)):
        return load_feature_net(path)
    if not train_if_missing:
        raise FileNotFoundError(f"{path}: no feature net for {dataset!r}; run `genmod train feature-net --dataset {dataset}`")
    print(f"[evals] no feature net for {dataset!r} at {path}: training one now")
    return train_feature_net(dataset, path, **train_kwargs)


def classify(net: FeatureNet | DomainClassifier, inputs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted class ids of images / audio in ``[-1, 1]`` (uint8 images are accepted too)."""
    model = net.model if isinstance(net, FeatureNet) else net
    if inputs.dtype == torch.uint8:
        inputs = inputs.float() / 127.5 - 1
    with torch.no_grad():
        return torch.cat([model(inputs[s:s + batch_size].float())[1].argmax(1) for s in range(0, len(inputs), batch_size)])


def classifier_accuracy(net: FeatureNet | DomainClassifier, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of samples the domain classifier assigns to the class they were generated for."""
    return (classify(net, inputs) == torch.as_tensor(labels)).float().mean().item()


# ------------------------------------------------------------------------------------------------
# torch-fidelity


class DomainFeatureExtractor(FeatureExtractorBase):
    """A :class:`FeatureNet` as a torch-fidelity extractor: features "feat" (FID/KID/PRC) and "logits" (IS).

    Accepts uint8 images (torch-fidelity's convention, mapped to [-1, 1]) or float inputs in [-1, 1]
    (audio). Subclasses made by :func:`register_feature_net` carry the net in ``feature_net``.
    """

    feature_net: FeatureNet | None = None

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        if self.feature_net is None:
            raise ValueError(f"feature_extractor: {name} has no feature net; use register_feature_net()")
        self.model = self.feature_net.model

    def forward(self, x):
        x = x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float()
        feat, logits = self.model(x)
        out = {"feat": feat, "logits": logits}
        return tuple(out[name] for name in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return "feat", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "feat", "kid": "feat", "prc": "feat"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 28, 28, dtype=torch.uint8)


def register_feature_net(net: FeatureNet) -> str:
    """Register ``net`` with torch-fidelity; the name carries the checksum so caches never mix nets."""
    name = f"genmod-{net.info['dataset']}-{net.checksum[:10]}"
    if name not in torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY:
        cls = type(f"DomainFeatureExtractor_{net.checksum[:10]}", (DomainFeatureExtractor,), {"feature_net": net})
        torch_fidelity.register_feature_extractor(name, cls)
    return name


def main(argv: list[str] | None = None) -> int:
    """``genmod train feature-net --dataset NAME [--out DIR] [--epochs E] ...``"""
    parser = argparse.ArgumentParser(prog="genmod train feature-net",
                                     description="train the domain classifier used for domain FID/KID/IS")
    parser.add_argument("--dataset", required=True, help=f"dataset name ({', '.join(KNOWN_DATASETS)})")
    parser.add_argument("--out", default=None, help="output folder (default $GENMOD_CACHE/feature_nets/<dataset>)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-train", type=int, default=20000, help="train on a random subset of this size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    net = train_feature_net(args.dataset, args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                            max_train=args.max_train, seed=args.seed)
    print(json.dumps(net.describe(), indent=2))
    return 0
