"""Images for people to look at: RGBA composited on a background, contact sheets (many views in one picture).

Plain numpy/OpenCV, no Blender: the render worker, evaluation, inference and the sample builder's preview share it.
"""

from __future__ import annotations

import math

import cv2
import numpy as np


def composite_on(rgba: np.ndarray, background=(255, 255, 255)) -> np.ndarray:
    """RGBA uint8 (straight alpha) -> RGB uint8 over a solid background."""
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    bg = np.asarray(background, dtype=np.float32)
    return np.round(rgba[..., :3].astype(np.float32) * alpha + bg * (1.0 - alpha)).astype(np.uint8)


def contact_sheet(images: list[np.ndarray], labels: list[str] | None = None, columns: int = 8, cell: int = 128) -> np.ndarray:
    """Tile RGB or RGBA uint8 images into one RGB sheet (RGBA is composited on white), labelled in a corner."""
    rows = math.ceil(len(images) / columns)
    sheet = np.full((rows * cell, columns * cell, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        rgb = composite_on(img) if img.shape[-1] == 4 else img
        if rgb.shape[0] != cell or rgb.shape[1] != cell:
            rgb = cv2.resize(rgb, (cell, cell), interpolation=cv2.INTER_AREA)
        r, c = divmod(i, columns)
        tile = np.ascontiguousarray(rgb)
        if labels is not None:
            cv2.putText(tile, labels[i], (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (90, 90, 90), 1, cv2.LINE_AA)
        sheet[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell] = tile
    return sheet
