"""Splatter image -> Gaussians (chibisplat.splats.splatter) against DiffSplat's renderer mapping worked out by hand.

Every channel of every pixel holds its own value, so a swapped colour channel, a scale range used the wrong way
round, a rotation component moved, an opacity compared with the wrong inequality at the threshold, or a depth
unprojected through the wrong axis changes a compared number. Expectations are float64 numpy, pixel by pixel,
from docs/diffsplat-reference.md §2 ("renderer mapping" column) and §2 "Depth parameterization".
"""

from __future__ import annotations

import numpy as np
import torch

from chibisplat.splats.splatter import SCALE_MAX, SCALE_MIN, splatter_to_gaussians

V, H, W = 2, 2, 3


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def _cameras() -> tuple[np.ndarray, np.ndarray]:
    c2w = np.stack([np.eye(4), np.eye(4)])
    c2w[0, :3, :3] = _rotation(np.array([0.2, 1.0, -0.3]), 0.6)
    c2w[0, :3, 3] = [0.3, -0.2, 1.2]  # |o| = sqrt(1.57)
    c2w[1, :3, :3] = _rotation(np.array([-1.0, 0.4, 0.5]), -1.1)
    c2w[1, :3, 3] = [-1.1, 0.5, 0.4]
    intr = np.array([[1.3, 1.1, 0.45, 0.55], [1.5, 1.2, 0.52, 0.4]])  # fx != fy, off-centre principal points
    return c2w, intr


def _splatter() -> np.ndarray:
    """(V, 12, H, W) in [-1, 1]: a different value in every channel of every pixel."""
    k = np.arange(V * 12 * H * W, dtype=np.float64).reshape(V, 12, H, W)
    s = np.sin(1.7 * k + 0.3) * 0.9  # distinct values in (-0.9, 0.9)
    s[:, 10] = np.array([[[0.0, 0.25, -0.5], [0.5, -0.25, 0.75]], [[-0.75, 0.0, 0.9], [0.1, -0.9, 0.0]]])
    return s


def test_every_attribute_by_hand():
    c2w, intr = _cameras()
    s = _splatter()
    threshold = 0.5  # raw opacity 0.0 -> exactly 0.5: "at or below" the threshold is dropped
    g = splatter_to_gaussians(torch.from_numpy(s), torch.from_numpy(c2w), torch.from_numpy(intr),
                              opacity_threshold=threshold)
    assert len(g) == V * H * W
    n = 0
    for v in range(V):
        fx, fy, cx, cy = intr[v]
        for i in range(H):
            for j in range(W):  # view-major, row-major pixel order
                px = s[v, :, i, j]
                r, gr, b = px[0:3]
                colour = [r * 0.5 + 0.5, gr * 0.5 + 0.5, b * 0.5 + 0.5]
                sc = px[3:6] * 0.5 + 0.5
                scale = [SCALE_MIN * sc[k] + SCALE_MAX * (1.0 - sc[k]) for k in range(3)]
                opacity = px[10] * 0.5 + 0.5
                opacity = opacity if opacity > threshold else 0.0
                z = px[11] + np.linalg.norm(c2w[v, :3, 3])
                cam = np.array([(j / (W - 1) - cx) / fx * z, (i / (H - 1) - cy) / fy * z, z])
                xyz = c2w[v, :3, :3] @ cam + c2w[v, :3, 3]
                np.testing.assert_allclose(g.colors[n].numpy(), colour, rtol=0, atol=1e-12)
                np.testing.assert_allclose(g.scales[n].numpy(), scale, rtol=0, atol=1e-12)
                np.testing.assert_allclose(g.quats[n].numpy(), px[6:10], rtol=0, atol=0)  # (w, x, y, z) as decoded
                assert g.opacities[n].item() == opacity, (v, i, j, g.opacities[n].item(), opacity)
                np.testing.assert_allclose(g.means[n].numpy(), xyz, rtol=0, atol=1e-12)
                n += 1
    # The threshold case is in the data: raw 0.0 sits exactly at 0.5 and is dropped, raw 0.1 (0.55) is kept.
    assert (s[:, 10] == 0.0).sum() == 3 and g.opacities.eq(0).sum().item() == (s[:, 10] <= 0.0).sum()


def test_scale_range_is_inverted_and_rotation_normalises_on_request():
    c2w, intr = _cameras()
    s = _splatter()
    s[0, 3:6, 0, 0] = [1.0, -1.0, 0.0]  # normalised 1 -> the smallest Gaussian, -1 -> the largest
    s[0, 6:10, 0, 0] = [2.0, 0.0, -1.0, 2.0]
    g = splatter_to_gaussians(torch.from_numpy(s), torch.from_numpy(c2w), torch.from_numpy(intr),
                              normalize_rotation=True)
    np.testing.assert_allclose(g.scales[0].numpy(), [SCALE_MIN, SCALE_MAX, (SCALE_MIN + SCALE_MAX) / 2], rtol=0,
                               atol=1e-15)
    np.testing.assert_allclose(g.quats[0].numpy(), [2 / 3, 0.0, -1 / 3, 2 / 3], rtol=0, atol=1e-15)
    assert g.opacities.min() > 0  # no threshold by default: every opacity in (0, 1) is kept
