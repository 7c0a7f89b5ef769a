"""Mixed precision values and the GPU speed switches that are shared by the training-side stages.

``mixed_precision`` (``train``, ``finetune``, ``latents``) is accelerate's vocabulary: ``no`` (float32),
``fp16`` (float16 autocast; training adds accelerate's GradScaler) or ``bf16`` (bfloat16 autocast, no scaler:
bfloat16 has float32's exponent range). bf16 needs an Ampere-or-newer GPU (or the CPU, where autocast supports it);
weights stay float32 in every mode (the trainable ones are the fp32 master weights).
"""

from __future__ import annotations

import torch

MIXED_PRECISION = ("no", "fp16", "bf16")
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def check_mixed_precision(key: str, value: str, device: str | torch.device | None = None) -> str:
    """``value`` if it is a valid ``mixed_precision`` for ``device``, else a ValueError naming ``key``."""
    if value not in MIXED_PRECISION:
        raise ValueError(f"params.yaml {key} must be one of {list(MIXED_PRECISION)}, got {value!r}")
    on_gpu = device is not None and str(device).split(":")[0] in ("cuda", "auto")  # auto: CUDA when present
    if value == "bf16" and on_gpu and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ValueError(f"params.yaml {key}: bf16 needs a GPU with bfloat16 support (Ampere or newer); "
                         f"{torch.cuda.get_device_name()} has none: set {key}: fp16")
    return value


def autocast(device: str | torch.device, mixed_precision: str):
    """``torch.autocast`` for ``mixed_precision`` on ``device`` (disabled for ``no``)."""
    dev = torch.device(device)
    dtype = AUTOCAST_DTYPES.get(mixed_precision, torch.float32)
    return torch.autocast(device_type=dev.type, dtype=dtype, enabled=mixed_precision in AUTOCAST_DTYPES)


__all__ = ["MIXED_PRECISION", "AUTOCAST_DTYPES", "check_mixed_precision", "autocast"]
