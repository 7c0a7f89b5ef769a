"""Splatter images: DiffSplat's 12-channel per-pixel Gaussian maps, and their activation to Gaussians.

A splatter image holds one Gaussian per pixel, every channel in [-1, 1] (GSRecon's output range, the
GSVAE's input/output range). :data:`SPLATTER_CHANNELS` is the one definition of the channel order.
:func:`splatter_to_gaussians` applies DiffSplat's renderer mapping (``gs_renderer.py``; docs/diffsplat-reference.md §2 table).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from chibisplat.geometry import unproject_depth

# (name, channels) in the order of the GSVAE's 12 channels (DiffSplat ``get_gslatents``).
SPLATTER_CHANNELS: tuple[tuple[str, int], ...] = (("rgb", 3), ("scale", 3), ("rotation", 4), ("opacity", 1), ("depth", 1))
SPLATTER_NUM_CHANNELS = sum(c for _, c in SPLATTER_CHANNELS)  # 12

# Inverted range: a normalised scale of 1 gives the smallest Gaussian (docs/diffsplat-reference.md §11.3).
SCALE_MIN = 0.0005
SCALE_MAX = 0.02


def splatter_slices() -> dict[str, slice]:
    """Channel slices of each attribute, e.g. ``{"rgb": slice(0, 3), ...}``."""
    out, start = {}, 0
    for name, c in SPLATTER_CHANNELS:
        out[name] = slice(start, start + c)
        start += c
    return out


def to_splatter_image(attributes: dict[str, Tensor]) -> Tensor:
    """GSRecon outputs ``{name: (.., c, H, W)}`` -> splatter image (.., 12, H, W)."""
    return torch.cat([attributes[name] for name, _ in SPLATTER_CHANNELS], dim=-3)


def from_splatter_image(splatter: Tensor) -> dict[str, Tensor]:
    """Splatter image (.., 12, H, W) -> ``{name: (.., c, H, W)}`` views."""
    if splatter.shape[-3] != SPLATTER_NUM_CHANNELS:
        raise ValueError(f"a splatter image has {SPLATTER_NUM_CHANNELS} channels, got shape {tuple(splatter.shape)}")
    return {name: splatter[..., s, :, :] for name, s in splatter_slices().items()}


@dataclass
class Gaussians:
    """Activated 3D Gaussians, N of them (any leading batch shape is flattened by the caller).

    means (N, 3) world positions; quats (N, 4) rotation quaternions ``(w, x, y, z)`` (real part first,
    3DGS convention; not necessarily unit length); scales (N, 3) standard deviations; opacities (N,) in
    [0, 1]; colors (N, 3) RGB in [0, 1].
    """

    means: Tensor
    quats: Tensor
    scales: Tensor
    opacities: Tensor
    colors: Tensor

    def __len__(self) -> int:
        return self.means.shape[0]

    def select(self, keep: Tensor) -> "Gaussians":
        return Gaussians(self.means[keep], self.quats[keep], self.scales[keep], self.opacities[keep], self.colors[keep])


def splatter_to_gaussians(
    splatter: Tensor,
    c2w: Tensor,
    fxfycxcy: Tensor,
    normalize_rotation: bool = False,
    opacity_threshold: float = 0.0,
) -> Gaussians:
    """Splatter images of the input views of ONE object -> its Gaussians (DiffSplat ``GaussianRenderer``).

    Args:
        splatter: (V, 12, H, W) in [-1, 1], channel order :data:`SPLATTER_CHANNELS`.
        c2w: (V, 4, 4) input-view cameras (OpenGL world, OpenCV camera axes).
        fxfycxcy: (V, 4) normalised intrinsics of the input views.
        normalize_rotation: DiffSplat feeds decoded rotations to its rasterizer without re-normalising
            (docs/diffsplat-reference.md §3); GSRecon's own outputs are already unit length. The "diffsplat" image
            formation builds the covariance from the raw quaternion (its length matters), "3dgs" normalises it
            (docs/image-formation.md); this also changes what a PLY stores.
        opacity_threshold: opacities at or below it are set to 0 (DiffSplat ``opacity_threshold``).

    Returns:
        :class:`Gaussians` with N = V * H * W, in view-major, row-major pixel order.
    """
    a = from_splatter_image(splatter)
    # Depth is stored relative to the camera distance: z = d + ||camera origin|| (docs/diffsplat-reference.md §2).
    z = a["depth"][:, 0] + c2w[:, :3, 3].norm(dim=-1)[:, None, None]  # (V, H, W)
    means = unproject_depth(z, c2w, fxfycxcy)  # (V, 3, H, W)
    s = a["scale"] * 0.5 + 0.5
    scales = SCALE_MIN * s + SCALE_MAX * (1.0 - s)
    opacity = a["opacity"][:, 0] * 0.5 + 0.5
    opacity = opacity * (opacity > opacity_threshold)
    quats = a["rotation"]
    if normalize_rotation:
        quats = torch.nn.functional.normalize(quats, dim=1)

    def flat(x: Tensor) -> Tensor:  # (V, C, H, W) -> (V*H*W, C)
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])

    return Gaussians(
        means=flat(means),
        quats=flat(quats),
        scales=flat(scales),
        opacities=opacity.reshape(-1),
        colors=flat(a["rgb"] * 0.5 + 0.5),
    )
