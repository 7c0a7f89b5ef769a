"""Measurements of a rendered character that go into its meta.json and the render report (no Blender)."""

from __future__ import annotations

import numpy as np

# Above this share of clipped foreground pixels a character gets a warning (issue 10: at most 5% on every sample).
MAX_CLIPPED_FRACTION = 0.05


def clipped_fraction(views: list[np.ndarray]) -> float:
    """Share of foreground pixels (alpha > 0) with at least one colour channel at 255, over all views of a
    character (RGBA uint8, straight alpha). Clipped pixels have lost their shading. 0.0 when nothing is visible."""
    foreground = clipped = 0
    for rgba in views:
        if rgba.dtype != np.uint8 or rgba.ndim != 3 or rgba.shape[2] != 4:
            raise ValueError(f"expected RGBA uint8 views, got {rgba.dtype} {rgba.shape}")
        fg = rgba[..., 3] > 0
        foreground += int(fg.sum())
        clipped += int((fg & (rgba[..., :3] == 255).any(axis=-1)).sum())
    return round(clipped / foreground, 6) if foreground else 0.0
