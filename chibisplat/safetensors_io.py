"""safetensors files with stable bytes.

``safetensors`` writes the ``__metadata__`` of a file from a Rust ``HashMap``, whose iteration order changes from
one process (and one call) to the next, so the same tensors and metadata gave different bytes on every run and
every DVC-tracked latent file looked changed. :func:`safetensors_bytes` re-serialises the header with sorted keys:
same tensors + same metadata -> same bytes. The files stay standard safetensors (any reader loads them).
"""

from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import save

_ALIGN = 8  # the data section starts on an 8-byte boundary (the header is padded with spaces, as safetensors does)


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors file of ``tensors`` with ``metadata`` (str -> str), deterministic byte for byte."""
    raw = save(tensors)  # the tensor entries and data layout are already in a fixed order; no metadata yet
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    if metadata:
        bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
        if bad:
            raise TypeError(f"safetensors metadata must map str to str; not: {bad}")
        header["__metadata__"] = dict(sorted(metadata.items()))
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-(8 + len(text)) % _ALIGN)
    return struct.pack("<Q", len(text)) + text + raw[8 + n :]
