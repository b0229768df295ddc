"""How the trainer spreads one model over its processes: DDP or FSDP2 (``--distributed ddp|fsdp``).

* ``ddp`` (default): Accelerate's ``prepare`` wraps the model in ``DistributedDataParallel``; every
  process holds the full weights, gradients are all-reduced.
* ``fsdp``: torch's FSDP2, ``torch.distributed.fsdp.fully_shard``, applied to every transformer
  block (the modules whose class is named in the model's ``_no_split_modules``, the diffusers /
  Accelerate ``TRANSFORMER_BASED_WRAP`` convention) and then to the root. Parameters, gradients,
  AdamW moments and the EMA shadow become ``DTensor`` shards (``Shard(0)``: rank r holds rows
  ``r*ceil(n/N)...``); a block's weights are all-gathered for its forward/backward and gradients are
  reduce-scattered. Torch's call shards on CPU/gloo and on GPUs alike; Accelerate's FSDP plugin is
  not used, because on CPU it reports ``MULTI_CPU`` and silently shards nothing
  (docs ``/work/shared/papers/diffusers-accelerate.md`` §4.5). An ``accelerate config`` file with
  ``distributed_type: FSDP`` (``ACCELERATE_USE_FSDP=true``) selects ``fsdp`` here; its other FSDP
  settings are not read.

Checkpoints stay the DDP format (full safetensors ``model/``, ``ema/``; ``training_state.pt`` with
the index-keyed AdamW state): the shards are gathered to rank 0 before it writes, and scattered back
(each rank takes its rows) on resume. So checkpoints move freely between ``ddp`` and ``fsdp`` and
between world sizes. References: torch ``fully_shard`` / ``DTensor`` docs
(https://docs.pytorch.org/docs/stable/distributed.fsdp.fully_shard.html) and
``torch.distributed.checkpoint.state_dict.get_model_state_dict`` (``full_state_dict=True``).
"""

from __future__ import annotations

import contextlib
import copy
import os
from typing import Optional

import torch

from .config import ConfigError
from .optim import build_optimizer

__all__ = ["distributed_mode", "accelerate_fsdp_env_off", "prepare_model", "fsdp_units", "no_sync", "full_value",
           "gather_model_into", "gather_ema_into", "gather_optimizer_state", "load_model_state",
           "load_ema_shadow", "shard_optimizer_state", "is_sharded"]


def distributed_mode(config) -> str:
    """``config.distributed``, or ``fsdp`` when an ``accelerate config`` file chose FSDP."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    return config.distributed


@contextlib.contextmanager
def accelerate_fsdp_env_off():
    """Build the Accelerator without its FSDP plugin (genmod shards with torch's ``fully_shard`` itself)."""
    saved = os.environ.pop("ACCELERATE_USE_FSDP", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["ACCELERATE_USE_FSDP"] = saved


def fsdp_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks to shard one by one: modules whose class is in ``model._no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    units = [m for m in model.modules() if m is not model and type(m).__name__ in names]
    if not units:
        raise ConfigError(f"--distributed fsdp: {type(model).__name__} has no transformer blocks to shard "
                          "(no _no_split_modules classes in it); train it with --distributed ddp")
    return units


def prepare_model(accelerator, model: torch.nn.Module, config, mode: str):
    """``(model, optimizer, lr_scheduler, trainable, full_copy)``: the model wrapped for ``mode``, AdamW over
    its (sharded) trainable parameters, and under FSDP rank 0's unsharded copy for exports (else None)."""
    if mode == "fsdp":  # refused alike on one process, where there is nothing to shard
        units = fsdp_units(model)
        if accelerator.mixed_precision == "fp16":
            raise ConfigError("--distributed fsdp: --mixed_precision fp16 is not supported (the grad scaler would "
                              "see one shard of the gradients); use --mixed_precision bf16")
    sharded = mode == "fsdp" and accelerator.num_processes > 1
    full_copy = None
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        model = model.to(accelerator.device)
        if accelerator.is_main_process:
            full_copy = copy.deepcopy(model).requires_grad_(False)
        mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
        for unit in reversed(units):  # inner blocks before outer ones, the root last
            fully_shard(unit, mesh=mesh)
        fully_shard(model, mesh=mesh)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, lr_scheduler = build_optimizer(trainable, config)
    if sharded:
        optimizer = accelerator.prepare_optimizer(optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, lr_scheduler, trainable, full_copy


def is_sharded(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_value(tensor):
    """A DTensor's full value (collective), anything else as it is."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def _shard_like(full: torch.Tensor, like) -> torch.Tensor:
    """``full`` cut like the DTensor ``like`` (each rank keeps its own rows; no communication)."""
    from torch.distributed.tensor import distribute_tensor

    full = full.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


@contextlib.contextmanager
def no_sync(accelerator, model):
    """No gradient reduction inside (micro-batches before the last): DDP's ``no_sync``, FSDP2's
    ``set_requires_gradient_sync(False)`` (gradients accumulate unsharded until the last micro-batch)."""
    if not hasattr(model, "set_requires_gradient_sync"):
        with accelerator.no_sync(model):
            yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


# --------------------------------------------------------------------------------------------
# Full state for rank 0 (collective: every process calls these, in the same order)


@torch.no_grad()
def gather_model_into(model: torch.nn.Module, full_model: Optional[torch.nn.Module]) -> None:
    """The sharded model's full weights into ``full_model`` (rank 0; None elsewhere), via torch's
    ``get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if full_model is not None:
        full_model.load_state_dict(state, strict=True)


@torch.no_grad()
def gather_ema_into(ema, ema_model: Optional[torch.nn.Module]) -> None:
    """The sharded EMA shadow, one tensor at a time, into ``ema_model``'s parameters (rank 0; None elsewhere)."""
    params = dict(ema_model.named_parameters()) if ema_model is not None else {}
    for name, shadow in zip(ema.names, ema.shadow):
        full = full_value(shadow)
        if name in params:
            params[name].copy_(full)


def gather_optimizer_state(optimizer, keep: bool) -> Optional[dict]:
    """``optimizer.state_dict()`` with every sharded moment gathered in full (index-keyed, as DDP saves
    it); the dict on the process with ``keep``, None on the others."""
    state = optimizer.state_dict()
    gathered = {}
    for index in sorted(state["state"]):
        gathered[index] = {key: full_value(value).cpu() if torch.is_tensor(value) else value
                           for key, value in state["state"][index].items()}
    return {"state": gathered, "param_groups": copy.deepcopy(state["param_groups"])} if keep else None


# --------------------------------------------------------------------------------------------
# Full state from a checkpoint into shards (every process reads the files and keeps its rows)


def load_model_state(model: torch.nn.Module, tensors: dict) -> None:
    """``model.load_state_dict(tensors, strict=True)``, each full tensor cut to the rank's shard first."""
    own = model.state_dict()
    tensors = {key: _shard_like(value, own[key]) if key in own and is_sharded(own[key]) else value
               for key, value in tensors.items()}
    model.load_state_dict(tensors, strict=True)


def load_ema_shadow(ema, tensors: dict, where: str) -> None:
    """``ema.load_shadow`` from full tensors, each cut like its (possibly sharded) shadow."""
    shadows = dict(zip(ema.names, ema.shadow))
    ema.load_shadow({key: _shard_like(value, shadows[key]) if key in shadows and is_sharded(shadows[key]) else value
                     for key, value in tensors.items()}, where=where)


def shard_optimizer_state(optimizer, state: dict) -> dict:
    """A saved (full, index-keyed) optimizer state with each moment of a sharded parameter cut to its shard;
    unchanged when no parameter is sharded."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(is_sharded(p) for p in params):
        return state
    saved_ids = [i for group in state["param_groups"] for i in group["params"]]
    by_id = dict(zip(saved_ids, params))
    cut = {}
    for index, entry in state["state"].items():
        param = by_id.get(index)
        cut[index] = {key: _shard_like(value, param)
                      if param is not None and is_sharded(param) and torch.is_tensor(value) and value.shape == param.shape
                      else value for key, value in entry.items()}
    return {"state": cut, "param_groups": state["param_groups"]}
