"""A CPU stand-in for an accelerator that fails on every operation mixing it with the host, as CUDA does.

Under :class:`FakeAccelerator`, the device ``meta`` plays the GPU: ``x.to("meta")``, ``module.to("meta")`` and
factory functions with ``device="meta"`` (or ``device=x.device`` of such a tensor) give real CPU tensors that are
*tagged* as living on the accelerator, and a tagged tensor reports ``.device == meta``. Every torch operation then
checks its tensor arguments: tagged and untagged tensors together raise :class:`DeviceMix` naming the operation
(0-dim host tensors are allowed, as CUDA allows CPU scalars, and so are host index tensors in ``x[idx]``).
Outputs of an operation on tagged tensors are tagged; ``.cpu()`` / ``.to("cpu")`` untag; ``.numpy()`` of a tagged
tensor raises, as it does for a CUDA tensor. The computation itself runs on the CPU with real values, so data
dependent code (sorting, the tile rasterizer) runs to the end.

Tensors made by autograd's backward or by optimizers are invisible to a function mode, so the guard covers
forward passes and losses (where the CUDA crashes of issue 9 happened), not optimizer steps.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

ACCEL = torch.device("meta")
_TAGS = WeakIdKeyDictionary()  # tensors on the simulated accelerator (by identity; nothing is stored on the tensor)
_FACTORIES = {
    torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.linspace, torch.logspace, torch.eye,
    torch.rand, torch.randn, torch.randint, torch.randperm, torch.tensor, torch.as_tensor, torch.zeros_like,
    torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like, torch.randn_like, torch.randint_like,
    torch.scalar_tensor,
}
_DEVICE_GET = torch.Tensor.device.__get__  # method-wrappers compare with ==, not is
_INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}
_PASS = {torch.Tensor.dim, torch.Tensor.size, torch.Tensor.numel, torch.Tensor.data_ptr, torch.Tensor.is_floating_point,
         torch.Tensor.element_size, torch.Tensor.stride, torch.Tensor.__len__, torch.Tensor.requires_grad_,
         torch.Tensor.retain_grad, torch.Tensor.__hash__, torch.Tensor.__repr__, torch.Tensor.__format__}


class DeviceMix(RuntimeError):
    pass


def tagged(t) -> bool:
    return torch.is_tensor(t) and t in _TAGS


def _tag(out):
    if torch.is_tensor(out):
        _TAGS[out] = True
    elif isinstance(out, (list, tuple)):
        for o in out:
            _tag(o)
    return out


def _is_accel(device) -> bool:
    if device is None:
        return False
    if torch.is_tensor(device):
        return tagged(device)
    try:
        return torch.device(device).type == ACCEL.type
    except (RuntimeError, TypeError):
        return False


def _tensors(obj, out):
    if torch.is_tensor(obj):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _tensors(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _tensors(o, out)
    return out


def _alias(t):
    """A new tensor object sharing ``t``'s storage and autograd history (so tags do not leak onto ``t``)."""
    with torch._C.DisableTorchFunction():
        return t.view_as(t)


class _HostAutocast(torch.autocast):
    """``torch.autocast`` that treats the simulated accelerator as the host it really computes on."""

    def __init__(self, device_type, *args, **kwargs):
        super().__init__("cpu" if device_type == ACCEL.type else device_type, *args, **kwargs)


class FakeAccelerator(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.ops = 0  # operations that ran on tagged tensors (the test checks the guard saw the work)

    def __enter__(self):
        self._autocast = (torch.autocast, torch.amp.autocast)
        torch.autocast = torch.amp.autocast = _HostAutocast
        return super().__enter__()

    def __exit__(self, *exc):
        torch.autocast, torch.amp.autocast = self._autocast
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func == _DEVICE_GET:
            return ACCEL if tagged(args[0]) else func(*args)
        name = getattr(func, "__name__", "")
        if func in _PASS or name == "__set__":
            return func(*args, **kwargs)
        if name == "__get__":  # properties: .shape, .dtype, .T, .data, ...; tensors keep the tag of their owner
            out = func(*args, **kwargs)
            return _tag(out) if torch.is_tensor(out) and out is not args[0] and tagged(args[0]) else out
        if func in (torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda, torch.Tensor.type):
            return self._to(func, args, kwargs)
        if func is torch.Tensor.numpy and tagged(args[0]):
            raise DeviceMix(f"{func.__name__}() of a tensor on the accelerator (shape {tuple(args[0].shape)}): "
                            "CUDA tensors must come to the host first")
        if func in _FACTORIES:
            device = kwargs.get("device")
            like = args[0] if args and torch.is_tensor(args[0]) and func.__name__.endswith("_like") else None
            accel = _is_accel(device) if device is not None else (like is not None and tagged(like))
            if device is not None:
                kwargs = dict(kwargs, device="cpu")
            if func is torch.as_tensor and args and tagged(args[0]) and not accel and device is not None:
                return func(_alias(args[0]), *args[1:], **kwargs)
            out = func(*args, **kwargs)
            if accel:
                if out is (args[0] if args else None):
                    out = _alias(out)
                self.ops += 1
                return _tag(out)
            if out is (args[0] if args else None) and tagged(out):
                return out
            return out
        if func is torch.Tensor.copy_:  # cross-device copies are legal on CUDA too; the destination keeps its device
            return func(*args, **kwargs)
        ts = _tensors(args[1:] if func in _INDEXING else args, [])
        if func is torch.Tensor.__setitem__ and len(args) > 2:
            ts = [args[0]] + _tensors(args[2], [])
        ts += _tensors(kwargs, [])
        on = [t for t in ts if tagged(t)]
        off = [t for t in ts if not tagged(t) and t.dim() > 0]
        if on and off:
            raise DeviceMix(
                f"{getattr(func, '__qualname__', func)}: tensors on the accelerator {[tuple(t.shape) for t in on][:4]} "
                f"mixed with host tensors {[tuple(t.shape) for t in off][:4]}"
            )
        if func in _INDEXING and tagged(args[0]) and not on:
            on = [args[0]]
        out = func(*args, **kwargs)
        if on:
            self.ops += 1
            _tag(out)
        return out

    def _to(self, func, args, kwargs):
        t = args[0]
        if func is torch.Tensor.cuda:
            raise DeviceMix(".cuda() called: stage code moves tensors with chibisplat.device.to_device only")
        if func is torch.Tensor.cpu:
            return _alias(func(*args, **kwargs)) if tagged(t) else func(*args, **kwargs)
        if func is torch.Tensor.type:
            out = func(*args, **kwargs)
            return _tag(out) if tagged(t) and torch.is_tensor(out) else out
        device, rest = None, []
        for a in args[1:]:
            if isinstance(a, (str, torch.device)) or torch.is_tensor(a):
                device = a
                rest.append(a.dtype if torch.is_tensor(a) else "cpu")
            else:
                rest.append(a)
        if "device" in kwargs:
            device = kwargs["device"]
            kwargs = dict(kwargs, device="cpu")
        if "other" in kwargs:
            device = kwargs["other"]
            kwargs = {k: v for k, v in kwargs.items() if k != "other"}
            kwargs["dtype"] = device.dtype
        out = func(t, *rest, **kwargs)
        if device is None:  # dtype only: keeps the device
            if tagged(t) and out is not t:
                _tag(out)
            return out
        if _is_accel(device):
            if isinstance(t, torch.nn.Parameter):  # Module.to: the parameter object itself moves
                return _tag(t) if out is t else _tag(out)
            if out is t:
                out = _alias(t)
            self.ops += 1
            return _tag(out)
        return _alias(out) if (out is t and tagged(t)) else out
