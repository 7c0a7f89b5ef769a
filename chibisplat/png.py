"""PNG files with stable bytes.

Blender writes time stamps and render-time text chunks into its PNGs, so two renders of the same
scene differ in bytes. Every PNG this project writes goes through :func:`encode_png`, which emits
only IHDR/IDAT/IEND (OpenCV's libpng writer at a fixed compression level): the same pixels always
give the same bytes. 16-bit images are read with OpenCV too (Pillow truncates 16-bit RGBA to 8 bits).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from chibisplat.files import write_atomic

COMPRESSION = 6


def _to_bgr(img: np.ndarray) -> np.ndarray:
    if img.ndim == 2:
        return img
    if img.shape[2] == 3:
        return img[:, :, ::-1]
    if img.shape[2] == 4:
        return img[:, :, [2, 1, 0, 3]]
    raise ValueError(f"expected 1, 3 or 4 channels, got shape {img.shape}")


def encode_png(img: np.ndarray) -> bytes:
    """RGB(A) uint8 or uint16 array (H, W[, C]) -> PNG bytes with no varying chunks."""
    if img.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"PNG pixels must be uint8 or uint16, got {img.dtype}")
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(_to_bgr(img)), [cv2.IMWRITE_PNG_COMPRESSION, COMPRESSION])
    if not ok:
        raise RuntimeError("OpenCV could not encode the PNG")
    return buf.tobytes()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> RGB(A) array at the file's bit depth (uint8 or uint16)."""
    arr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ValueError("not a decodable PNG")
    return np.ascontiguousarray(_to_bgr(arr))


def read_png(path: Path) -> np.ndarray:
    try:
        return decode_png(Path(path).read_bytes())
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def write_png(path: Path, img: np.ndarray) -> None:
    """Atomically (readers never see half a file), flushed to disk."""
    write_atomic(path, encode_png(img), fsync=True)
