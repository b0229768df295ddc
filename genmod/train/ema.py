"""Exponential moving average of model parameters (fp32 shadow) that forgets its initialisation.

Update after every optimizer step t = 0, 1, 2, ... (Polyak averaging as used by DDPM/EDM/DiT):

    shadow <- d_t * shadow + (1 - d_t) * param

**Bias correction (default).** A constant decay ``d`` started from the initial weights keeps a share
``d^T`` of them after T updates (0.999^1000 = 37%), so a short run exports mostly its untrained
network. Adam's fix (Kingma & Ba 2015, Sec. 3) starts the average at zero and divides by
``1 - d^T``; that corrected mean obeys the same recursion with the decay

    d_t = d (1 - d^t) / (1 - d^(t+1))        (d_0 = 0: the first update copies the weights)

so the shadow holds the corrected average at every step: checkpoints' ``ema/`` folders, previews and
the exported pipeline read it as it is, and resume needs only ``num_updates`` (kept in the state).
It weights the T iterates seen as ``(1 - d) d^(T-1-t) / (1 - d^T)`` and gives the initial weights none.

**Warmup** (the trainer's default, ``TrainConfig.ema_warmup``; combinable): the ``inv_gamma``/``power``
schedule of diffusers' ``EMAModel`` (after Karras' "EMA warmup"), ``d_t <= 1 - (1 + t / inv_gamma) ** -power``:
the averaging window grows with the run instead of spanning a fixed share of a short one (measured better
at 500-2000 steps, docs/RESULTS.md issue 19); with both on, the smaller decay is used. Only floating-point
parameters are averaged; buffers come from the live model.
"""

from __future__ import annotations

import math

import torch

__all__ = ["EMA", "corrected_decay"]


def corrected_decay(decay: float, t: int) -> float:
    """``d (1 - d^t) / (1 - d^(t+1))``: the decay of the bias-corrected EMA at update ``t`` (0-based)."""
    if decay == 0.0:
        return 0.0
    log_d = math.log(decay)
    return decay * math.expm1(t * log_d) / math.expm1((t + 1) * log_d)  # expm1: exact for d near 1


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = False,
                 inv_gamma: float = 1.0, power: float = 0.75, bias_correction: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay: must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.inv_gamma = float(inv_gamma)
        self.power = float(power)
        self.bias_correction = bool(bias_correction)
        self.num_updates = 0
        self.names = [n for n, p in model.named_parameters() if p.dtype.is_floating_point]
        params = dict(model.named_parameters())
        self.shadow = [params[n].detach().to(torch.float32).clone() for n in self.names]

    def current_decay(self) -> float:
        """d_t for the next update (t = number of updates done so far)."""
        decay = corrected_decay(self.decay, self.num_updates) if self.bias_correction else self.decay
        if not self.warmup:
            return decay
        warm = 1.0 - (1.0 + self.num_updates / self.inv_gamma) ** (-self.power)
        return min(decay, max(warm, 0.0))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> float:
        """One EMA step from the model's current parameters; returns the decay used."""
        decay = self.current_decay()
        params = dict(model.named_parameters())
        live = [params[name].detach() for name in self.names]
        live = [p if p.dtype == torch.float32 else p.float() for p in live]
        # multi-tensor kernels: two launches for the whole model instead of two per parameter
        torch._foreach_mul_(self.shadow, decay)
        torch._foreach_add_(self.shadow, live, alpha=1.0 - decay)
        self.num_updates += 1
        return decay

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Write the averaged weights into ``model`` (cast to its dtype/device)."""
        params = dict(model.named_parameters())
        for shadow, name in zip(self.shadow, self.names):
            params[name].copy_(shadow)

    def to(self, device) -> "EMA":
        self.shadow = [s.to(device) for s in self.shadow]
        return self

    def state_dict(self) -> dict:
        """Plain tensors and numbers (safe for ``torch.load(weights_only=True)``)."""
        return {"decay": self.decay, "warmup": self.warmup, "inv_gamma": self.inv_gamma, "power": self.power,
                "bias_correction": self.bias_correction, "num_updates": self.num_updates,
                "shadow": dict(zip(self.names, self.shadow))}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """The update count and shadow; the schedule stays this object's (a state saved before bias
        correction existed has no ``bias_correction`` key and loads the same way)."""
        self.num_updates = int(state["num_updates"])
        self.load_shadow(state["shadow"])

    @torch.no_grad()
    def load_shadow(self, tensors: dict, where: str = "EMA state") -> None:
        """Fill the shadow from a ``{param name: tensor}`` mapping (e.g. a safetensors file)."""
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise ValueError(f"{where}: missing parameter {missing[0]!r} ({len(missing)} missing)")
        for shadow, name in zip(self.shadow, self.names):
            if tensors[name].shape != shadow.shape:
                raise ValueError(f"{where}: parameter {name!r} has shape {tuple(tensors[name].shape)}, "
                                 f"model expects {tuple(shadow.shape)}")
            shadow.copy_(tensors[name])
