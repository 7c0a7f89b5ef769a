"""The train stage's resumable checkpoints: what a ``checkpoint-<step>/`` folder holds, how it is written and read.

A checkpoint is ``accelerator.save_state``'s folder (optimizer, LR scheduler, RNG states of every process, the EMA as
``custom_checkpoint_0.pkl``) plus :data:`STATE_FILE` (``{"step", "fingerprint"}``). What it holds of the UNet
depends on ``train.mode``:

* ``full``: every UNet weight (accelerate's ``model.safetensors``).
* ``lora``: the adapter alone, :data:`ADAPTER_FILE` (peft's ``get_peft_model_state_dict``, the file format of the
  final ``unet/lora/``), in place of the full UNet: diffusers' ``save_model_hook`` / ``load_model_hook`` pattern
  (``train_text_to_image_lora.py``) on accelerate's ``register_save_state_pre_hook`` /
  ``register_load_state_pre_hook`` (:func:`adapter_only_checkpoints`). The frozen base UNet is rebuilt from its
  source (``models:``) on resume; its weights' hash (:func:`base_weights_sha256`) is part of the run's fingerprint,
  so an adapter is only ever resumed onto the base it was trained on. EMA and optimizer state cover the trainable
  (adapter) parameters only, so a checkpoint of the SD1.5 UNet at rank 4 is about 13 MB instead of 3.4 GB.

Resume stays bit-exact: the adapter is saved and restored in the float32 it trains in, and nothing else of the UNet
changes during training.

Every folder is written under a hidden temporary name and swapped in with renames only
(:func:`chibisplat.files.install_folder`); old ones are renamed away before they are deleted. A kill at any moment
leaves complete checkpoints only (:func:`checkpoints` lists those).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# diffusers' name of a LoRA adapter file (pytorch_lora_weights.safetensors): in a checkpoint and in unet/lora/.
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE as ADAPTER_FILE

from chibisplat.files import install_folder, write_atomic
from chibisplat.identity import sha256_state
from chibisplat.safetensors_io import safetensors_bytes

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "train_state.json"
ADAPTER_NAME = "default"  # peft's adapter name of `unet.add_adapter(config)`
TMP_PREFIX = ".tmp-"
TRASH_DIR = ".trash-checkpoints"  # beside the checkpoints folder: old folders pass through it (never a DVC output)


class CheckpointError(ValueError):
    """A checkpoint folder cannot be resumed (missing or mismatched adapter); the message says what to do."""


def checkpoint_dir(ckpt_root: Path, step: int) -> Path:
    return Path(ckpt_root) / f"{CHECKPOINT_PREFIX}{step:06d}"


def checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints (``checkpoint-<step>`` folders with a state file), oldest first."""
    found = []
    for p in Path(ckpt_root).glob(f"{CHECKPOINT_PREFIX}*"):
        step = p.name[len(CHECKPOINT_PREFIX):]
        if step.isdigit() and (p / STATE_FILE).is_file():
            found.append((int(step), p))
    return [p for _, p in sorted(found)]


def read_state(folder: Path) -> dict:
    """A checkpoint's :data:`STATE_FILE`: ``{"step": int, "fingerprint": str}``."""
    return json.loads((Path(folder) / STATE_FILE).read_text())


def _trash(ckpt_root: Path) -> Path:
    return Path(ckpt_root).parent / TRASH_DIR


def _discard(folder: Path, trash: Path) -> None:
    """Delete ``folder`` so that it is never seen half-deleted: one rename out of the way, then the deletion."""
    trash.mkdir(parents=True, exist_ok=True)
    gone = trash / folder.name
    shutil.rmtree(gone, ignore_errors=True)
    folder.replace(gone)
    shutil.rmtree(gone)


def save_checkpoint(accelerator, ckpt_root: Path, step: int, fingerprint: str, limit: int, log=print) -> Path:
    """``accelerator.save_state`` (every process) into a hidden temporary folder; the main process adds the state
    file, swaps the folder in as ``checkpoint-<step:06d>`` with renames only, then removes the oldest beyond
    ``limit`` (at least one is kept). Returns the checkpoint's folder."""
    ckpt_root = Path(ckpt_root)
    final = checkpoint_dir(ckpt_root, step)
    tmp = ckpt_root / f"{TMP_PREFIX}{final.name}"
    trash = _trash(ckpt_root)
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
        shutil.rmtree(trash, ignore_errors=True)
        ckpt_root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if main:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, "fingerprint": fingerprint}))
        install_folder(tmp, final, trash)
        done = checkpoints(ckpt_root)
        for old in done[: max(0, len(done) - max(1, limit))]:
            _discard(old, trash)
        shutil.rmtree(trash, ignore_errors=True)
        log(f"train: checkpoint {final}")
    accelerator.wait_for_everyone()
    return final


def remove_checkpoints(ckpt_root: Path) -> None:
    """Delete the whole checkpoints folder (those of other settings), renamed away first like a single one."""
    ckpt_root = Path(ckpt_root)
    if ckpt_root.exists():
        trash = _trash(ckpt_root)
        _discard(ckpt_root, trash)
        shutil.rmtree(trash, ignore_errors=True)


def base_weights_sha256(unet) -> str:
    """Hash of the UNet's weights before an adapter is added (the base a ``lora`` checkpoint's adapter belongs to)."""
    return sha256_state(unet.state_dict())


def trainable_names(unet) -> list[str]:
    return [name for name, p in unet.named_parameters() if p.requires_grad]


def adapter_bytes(unet) -> bytes:
    """The LoRA adapter of ``unet`` as the file ``unet.save_lora_adapter`` writes (peft's state dict, diffusers'
    ``lora_adapter_metadata``; ``load_lora_adapter`` reads it), but with stable bytes: the same adapter gives the
    same file in every process (safetensors' own header order, and the order of the config's sets, vary)."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
    if len(state) != len(trainable_names(unet)):
        raise CheckpointError(
            f"train.mode lora: the adapter holds {len(state)} tensors but the UNet trains {len(trainable_names(unet))} "
            "parameters; an adapter-only checkpoint would lose the others (train them with train.mode: full)")
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in unet.peft_config[ADAPTER_NAME].to_dict().items()}
    metadata = {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}
    return safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in state.items()}, metadata)


def save_adapter(unet, folder: Path) -> Path:
    """:func:`adapter_bytes` to ``folder/ADAPTER_FILE``, atomically."""
    path = Path(folder) / ADAPTER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, adapter_bytes(unet))
    return path


def load_adapter(unet, folder: Path) -> None:
    """Set ``unet``'s adapter (added already, same rank and targets) to ``folder/ADAPTER_FILE``, strictly."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(folder) / ADAPTER_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing: a train.mode lora checkpoint holds its UNet as this adapter file. Delete {folder} "
            "(training resumes from an older checkpoint or starts afresh) or set train.resume: never")
    wanted = set(trainable_names(unet))
    result = set_peft_model_state_dict(unet, load_file(str(path)), adapter_name=ADAPTER_NAME)
    missing = sorted(wanted & set(result.missing_keys))
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{path} does not fit the UNet's LoRA adapter (train.lora_rank / targets): missing {missing[:4]}, "
            f"unexpected {sorted(result.unexpected_keys)[:4]}; delete {folder} or set train.resume: never")


def adapter_only_checkpoints(accelerator, unet) -> list:
    """Make ``accelerator.save_state`` / ``load_state`` hold ``unet`` (prepared, LoRA added) as its adapter alone.

    The save hook takes the UNet's full state dict out of what accelerate writes and writes the adapter instead
    (main process); the load hook takes the UNet out of what accelerate loads and sets the adapter from the file.
    Returns the hooks' handles."""
    own = accelerator.unwrap_model(unet)

    def index(models) -> int | None:
        return next((i for i, m in enumerate(models) if accelerator.unwrap_model(m) is own), None)

    def save_hook(models, weights, output_dir):
        i = index(models)
        if i is None:
            return
        if len(weights) != len(models):
            raise CheckpointError(f"train.mode lora: adapter-only checkpoints need accelerate's plain (DDP or single "
                                  f"process) save_state, not {accelerator.distributed_type}; use train.mode: full")
        weights.pop(i)
        if accelerator.is_main_process:
            save_adapter(own, Path(output_dir))

    def load_hook(models, input_dir):
        i = index(models)
        if i is None:
            return
        models.pop(i)
        load_adapter(own, Path(input_dir))

    return [accelerator.register_save_state_pre_hook(save_hook), accelerator.register_load_state_pre_hook(load_hook)]


__all__ = ["ADAPTER_FILE", "CHECKPOINT_PREFIX", "STATE_FILE", "CheckpointError", "adapter_only_checkpoints",
           "base_weights_sha256", "checkpoint_dir", "checkpoints", "load_adapter", "read_state", "remove_checkpoints",
           "adapter_bytes", "save_adapter", "save_checkpoint"]
