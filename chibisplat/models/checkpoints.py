"""Strict loading of state dicts, and DiffSplat's accelerate checkpoint layout.

DiffSplat saves GSRecon and GSVAE with ``accelerator.save_state`` under
``<out>/<tag>/checkpoints/<iteration:06d>/model.safetensors`` (docs/diffsplat-reference.md §7) and loads them strictly;
this module reads and writes that layout so our models and the published files are interchangeable.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from chibisplat.files import atomic_path

ACCELERATE_MODEL_FILE = "model.safetensors"


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str,
                           assign: bool = False) -> None:
    """``load_state_dict(strict=True)`` with an error that lists missing, unexpected and mis-shaped keys.

    ``assign``: the model was built without memory (``accelerate.init_empty_weights``, see :func:`empty_model`);
    its parameters become the file's tensors (cast to the model's dtypes), so nothing is initialised first.
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mis_shaped = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state_dict))
        if own[k].shape != state_dict[k].shape
    ]
    if missing or unexpected or mis_shaped:
        def head(xs):
            return ", ".join(xs[:8]) + (f" ... ({len(xs)} in all)" if len(xs) > 8 else "")

        raise ValueError(
            f"{source} does not match {type(model).__name__} (config {getattr(model, 'config', {})}): "
            f"missing [{head(missing)}], unexpected [{head(unexpected)}], shape mismatches [{head(mis_shaped)}]. "
            "Check that the checkpoint is the one this model size was built for."
        )
    if assign:
        state_dict = {k: v.to(own[k].dtype) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=assign)


def empty_model(build):
    """``build()`` with its parameters on the meta device (no memory, no random initialisation: a full-size UNet
    takes seconds to initialise), to be filled by ``load_state_dict_strict(..., assign=True)``."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return build()


def iteration_dir(tag_dir: Path, iteration: int | None = None) -> Path:
    """``<tag_dir>/checkpoints/<iteration:06d>``; the highest iteration when ``iteration`` is None."""
    ckpt_root = Path(tag_dir) / "checkpoints"
    if iteration is not None:
        path = ckpt_root / f"{iteration:06d}"
        if not path.is_dir():
            raise FileNotFoundError(f"no checkpoint folder {path}")
        return path
    found = sorted((p for p in ckpt_root.glob("*") if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    if not found:
        raise FileNotFoundError(f"no <iteration>/ folders under {ckpt_root} (DiffSplat accelerate layout)")
    return found[-1]


def load_accelerate_checkpoint(model: nn.Module, tag_dir: Path, iteration: int | None = None,
                               assign: bool = False) -> Path:
    """Strictly load ``<tag_dir>/checkpoints/<iter>/model.safetensors`` into ``model``; returns the file read."""
    path = iteration_dir(tag_dir, iteration) / ACCELERATE_MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (expected accelerate's save_state file name)")
    load_state_dict_strict(model, load_file(str(path)), str(path), assign=assign)
    return path


def save_accelerate_checkpoint(model: nn.Module, tag_dir: Path, iteration: int) -> Path:
    """Write ``model`` in DiffSplat's layout, so DiffSplat's ``load_ckpt`` (and ours) can read it; atomically (a
    killed writer never leaves half a file that a later load would reject)."""
    path = Path(tag_dir) / "checkpoints" / f"{iteration:06d}" / ACCELERATE_MODEL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    return path
