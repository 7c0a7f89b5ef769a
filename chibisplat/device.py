"""The one place where models and batches change device.

Every stage (embed, finetune, latents, train, evaluate, generate) and ``chibisplat generate`` resolve the device
their params name with :func:`resolve_device` (``auto``: CUDA when torch sees a GPU, else the CPU) and move modules
and batch data with :func:`to_device` only. Tensors created inside functions take the device of their inputs
(``torch.zeros(..., device=x.device)``), so nothing else in the stage or training code moves tensors between
devices; ``tests/test_device.py`` greps for stray moves and runs the training step, the validation loss and the
sampler under a guard that fails on any operation mixing the accelerator with the host.

Random draws stay on the CPU (seeded ``torch.Generator``) and the drawn tensors move with the batch, so a step's
noise, timesteps and CFG drops are the same on every device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:<index>")


def resolve_device(name: str | torch.device | None, key: str = "device") -> torch.device:
    """``auto``/None -> ``cuda`` when available, else ``cpu``; ``cpu``, ``cuda``, ``cuda:N`` as given.

    ``key`` names the parameter in the error (e.g. ``params.yaml latents.device``): asking for CUDA on a machine
    without it is an error that says what to set instead, not a crash at the first tensor.
    """
    if isinstance(name, torch.device):
        return name
    value = "auto" if name is None else str(name).strip()
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except RuntimeError:
        raise ValueError(f"{key} = {name!r} is not a device; use one of {', '.join(DEVICE_CHOICES)}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{key} = {name!r} but this torch sees no CUDA GPU (torch {torch.__version__}); set it to "
                             "auto (CUDA when present, else the CPU) or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{key} = {name!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type not in ("cpu", "meta"):
        raise ValueError(f"{key} = {name!r}: unsupported device type; use one of {', '.join(DEVICE_CHOICES)}")
    return device


def to_device(obj, device, non_blocking: bool = False):
    """``obj`` with every tensor and module in it on ``device``.

    Recurses into dicts, lists, tuples (named tuples too) and dataclass instances (a new instance, fields moved);
    modules (and objects with their own ``to(device)``, such as diffusers' ``EMAModel``) are moved in place and
    returned; anything else (strings, numbers, None) is returned as it is.
    """
    device = torch.device(device) if not isinstance(device, torch.device) else device
    if torch.is_tensor(obj):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, torch.nn.Module):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return type(obj)((k, to_device(v, device, non_blocking)) for k, v in obj.items())
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(to_device(v, device, non_blocking) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device, non_blocking) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        moved = {f.name: to_device(getattr(obj, f.name), device, non_blocking) for f in dataclasses.fields(obj)
                 if f.init}
        return dataclasses.replace(obj, **moved)
    if callable(getattr(obj, "to", None)) and not isinstance(obj, (str, bytes, type)):
        moved = obj.to(device)  # e.g. diffusers' EMAModel, which moves in place and returns None
        return obj if moved is None else moved
    return obj


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (or buffer); the CPU for a module with neither."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


__all__ = ["DEVICE_CHOICES", "module_device", "resolve_device", "to_device"]
