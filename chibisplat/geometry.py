"""Camera and ray geometry in DiffSplat's conventions (torch).

DiffSplat works in the **OpenGL world** (x right, y up, z backward; the canonical input camera sits at
(0, 0, 1.4) looking at the origin) but hands its renderer, Plücker rays and depth unprojection a
camera-to-world matrix whose **camera axes are OpenCV's** (x right, y down, z forward).
Intrinsics are normalised by the image size: ``fxfycxcy = (fx / W, fy / H, cx / W, cy / H)``.

The dataset contract (``chibisplat.cameras``) stores OpenCV cameras in the **Blender world** (Z up);
:func:`blender_opencv_to_opengl` converts those to DiffSplat's world, and
:func:`opengl_to_opencv_camera` flips the camera axes back to OpenCV for the renderer.

Two published quirks are kept on purpose, because the released checkpoints were trained with them
(docs/diffsplat-reference.md §11.2): :func:`plucker_rays` maps pixel ``j`` to ``j / (W - 1) + 0.5``
before subtracting ``cx``, while :func:`unproject_depth` maps it to ``j / (W - 1)``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from chibisplat.protocol import FOCAL_NORMALISED, PRINCIPAL_POINT_NORMALISED, flip_camera_axes


def normalised_intrinsics(dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """DiffSplat's fixed intrinsics ``(fx, fy, cx, cy)`` = (1.3889, 1.3889, 0.5, 0.5), shape (4,)."""
    f, c = FOCAL_NORMALISED, PRINCIPAL_POINT_NORMALISED
    return torch.tensor([f, f, c, c], dtype=dtype, device=device)


def normalise_K(K: Tensor, width: int, height: int) -> Tensor:
    """Pixel intrinsics (.., 3, 3) -> normalised ``fxfycxcy`` (.., 4)."""
    K = torch.as_tensor(K)
    return torch.stack([K[..., 0, 0] / width, K[..., 1, 1] / height, K[..., 0, 2] / width, K[..., 1, 2] / height], dim=-1)


def pixel_K(fxfycxcy: Tensor, width: int, height: int) -> Tensor:
    """Normalised ``fxfycxcy`` (.., 4) -> pixel intrinsics K (.., 3, 3) (inverse of :func:`normalise_K`)."""
    fxfycxcy = torch.as_tensor(fxfycxcy)
    K = torch.zeros(*fxfycxcy.shape[:-1], 3, 3, dtype=fxfycxcy.dtype, device=fxfycxcy.device)
    K[..., 0, 0] = fxfycxcy[..., 0] * width
    K[..., 1, 1] = fxfycxcy[..., 1] * height
    K[..., 0, 2] = fxfycxcy[..., 2] * width
    K[..., 1, 2] = fxfycxcy[..., 3] * height
    K[..., 2, 2] = 1.0
    return K


def plucker_rays(height: int, width: int, c2w: Tensor, fxfycxcy: Tensor) -> Tensor:
    """Plücker ray embedding ``[o x d, d]`` per pixel, with DiffSplat's published pixel mapping.

    Args:
        height, width: image size in pixels.
        c2w: (.., 4, 4) camera-to-world, OpenCV camera axes.
        fxfycxcy: (.., 4) normalised intrinsics.

    Returns:
        (.., 6, H, W): channels 0:3 the moment ``o x d``, channels 3:6 the unit direction ``d``.

    Pixel (i, j) uses camera direction ``((j/(W-1) + 0.5 - cx)/fx, (i/(H-1) + 0.5 - cy)/fy, 1)``: this is
    the "bug=True" mapping inherited from GRM that GSRecon and GSDiff were trained with; a correct mapping
    would give different rays and degrade the published checkpoints.
    """
    c2w = torch.as_tensor(c2w)
    batch_shape = c2w.shape[:-2]
    dtype = c2w.dtype if c2w.dtype.is_floating_point else torch.float32
    c2w = c2w.to(dtype)
    fxfycxcy = torch.as_tensor(fxfycxcy, dtype=dtype, device=c2w.device).expand(*batch_shape, 4)
    i, j = torch.meshgrid(
        torch.arange(height, dtype=dtype, device=c2w.device),
        torch.arange(width, dtype=dtype, device=c2w.device),
        indexing="ij",
    )  # (H, W)
    fx, fy, cx, cy = (fxfycxcy[..., k, None, None] for k in range(4))  # (.., 1, 1)
    x = (j / (width - 1) + 0.5 - cx) / fx  # (.., H, W)
    y = (i / (height - 1) + 0.5 - cy) / fy
    d_cam = torch.stack([x, y, torch.ones_like(x)], dim=-1)  # (.., H, W, 3)
    with torch.autocast(c2w.device.type, enabled=False):  # rays in c2w's dtype under fp16/bf16 autocast too
        d = torch.einsum("...rc,...hwc->...hwr", c2w[..., :3, :3], d_cam)
    d = d / d.norm(dim=-1, keepdim=True)
    o = c2w[..., None, None, :3, 3].expand_as(d)
    plucker = torch.cat([torch.cross(o, d, dim=-1), d], dim=-1)  # (.., H, W, 6)
    return plucker.movedim(-1, -3)  # (.., 6, H, W)


def unproject_depth(depth: Tensor, c2w: Tensor, fxfycxcy: Tensor) -> Tensor:
    """Camera z-depth map -> world points, with DiffSplat's published pixel grid.

    Args:
        depth: (.., H, W) planar depth along the camera z axis.
        c2w: (.., 4, 4) camera-to-world, OpenCV camera axes.
        fxfycxcy: (.., 4) normalised intrinsics.

    Returns:
        (.., 3, H, W) world coordinates.

    Pixel (i, j) sits at normalised image coordinate ``(j/(W-1), i/(H-1))`` (no half-pixel offset), as in
    DiffSplat's ``unproject_depth``; GSRecon's depth head learned to place Gaussians through this grid.
    """
    depth = torch.as_tensor(depth)
    height, width = depth.shape[-2:]
    dtype = depth.dtype if depth.dtype.is_floating_point else torch.float32
    c2w = torch.as_tensor(c2w, dtype=dtype, device=depth.device)
    fxfycxcy = torch.as_tensor(fxfycxcy, dtype=dtype, device=depth.device).expand(*c2w.shape[:-2], 4)
    i, j = torch.meshgrid(
        torch.arange(height, dtype=dtype, device=depth.device),
        torch.arange(width, dtype=dtype, device=depth.device),
        indexing="ij",
    )
    fx, fy, cx, cy = (fxfycxcy[..., k, None, None] for k in range(4))
    x = (j / (width - 1) - cx) / fx * depth  # (.., H, W)
    y = (i / (height - 1) - cy) / fy * depth
    cam = torch.stack([x, y, depth.expand_as(x)], dim=-1)  # (.., H, W, 3)
    world = torch.einsum("...rc,...hwc->...hwr", c2w[..., :3, :3], cam) + c2w[..., None, None, :3, 3]
    return world.movedim(-1, -3)


def _look_at_opengl(campos: Tensor, target: Tensor) -> Tensor:
    """(.., 3) camera positions -> (.., 3, 3) rotation with OpenGL camera axes (z from target to camera, y up)."""
    forward = torch.nn.functional.normalize(campos - target, dim=-1)
    up = torch.tensor([0.0, 1.0, 0.0], dtype=campos.dtype, device=campos.device).expand_as(forward)
    right = torch.nn.functional.normalize(torch.cross(up, forward, dim=-1), dim=-1)
    up = torch.nn.functional.normalize(torch.cross(forward, right, dim=-1), dim=-1)
    return torch.stack([right, up, forward], dim=-1)


def orbit_camera(elevation_deg, azimuth_deg, radius=1.0, target=None) -> Tensor:
    """kiui/DiffSplat orbit pose in the OpenGL world, OpenGL camera axes.

    Args:
        elevation_deg: (..) degrees; **negative = camera above** the xz-plane (kiui convention:
            campos.y = -r sin(elevation)). DiffSplat inference calls this with ``-user_elevation``.
        azimuth_deg: (..) degrees; 0 puts the camera on +z, 90 on +x.
        radius: (..) distance to ``target``.
        target: (.., 3) look-at point, default the origin.

    Returns:
        (.., 4, 4) camera-to-world (float32 unless a float64 tensor is given).
    """
    e, a, r = (torch.as_tensor(v) for v in (elevation_deg, azimuth_deg, radius))
    dtype = torch.promote_types(torch.promote_types(e.dtype, a.dtype), r.dtype)
    dtype = dtype if dtype.is_floating_point and dtype != torch.float16 else torch.float32
    e, a, r = torch.broadcast_tensors(e.to(dtype), a.to(dtype), r.to(dtype))
    e, a = torch.deg2rad(e), torch.deg2rad(a)
    campos = torch.stack([r * torch.cos(e) * torch.sin(a), -r * torch.sin(e), r * torch.cos(e) * torch.cos(a)], dim=-1)
    target = torch.zeros_like(campos) if target is None else torch.as_tensor(target, dtype=dtype).expand_as(campos)
    campos = campos + target
    c2w = torch.zeros(*campos.shape[:-1], 4, 4, dtype=dtype)
    c2w[..., :3, :3] = _look_at_opengl(campos, target)
    c2w[..., :3, 3] = campos
    c2w[..., 3, 3] = 1.0
    return c2w


def undo_orbit_camera(c2w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`orbit_camera` for a look-at of the origin.

    Args:
        c2w: (.., 4, 4) in the OpenGL world (camera axes do not matter, only the position is read).

    Returns:
        ``(elevation_deg, azimuth_deg, radius)``, each (..); elevation in [-90, 90] (negative = above),
        azimuth in (-180, 180].
    """
    c2w = torch.as_tensor(c2w)
    campos = c2w[..., :3, 3]
    radius = campos.norm(dim=-1)
    elevation = torch.rad2deg(torch.asin((-campos[..., 1] / radius).clamp(-1.0, 1.0)))
    azimuth = torch.rad2deg(torch.atan2(campos[..., 0], campos[..., 2]))
    return elevation, azimuth, radius


def _copy(m):
    return m.copy() if isinstance(m, np.ndarray) else torch.as_tensor(m).clone()


def blender_opencv_to_opengl(c2w):
    """Blender world + OpenCV camera -> OpenGL world + OpenGL camera (G-Objaverse loader, docs/diffsplat-reference.md §5).

    World: ``x' = x, y' = z, z' = -y`` (Blender's Z-up becomes OpenGL's y-up; Blender's front, -Y,
    becomes +z, where kiui's azimuth 0 lies). Camera: y and z axes negated (OpenCV -> OpenGL).

    Args:
        c2w: (.., 4, 4) tensor or numpy array.

    Returns:
        (.., 4, 4) of the same type.
    """
    out = _copy(c2w)
    out[..., 1, :] = c2w[..., 2, :]
    out[..., 2, :] = -c2w[..., 1, :]
    return flip_camera_axes(out)


def opengl_to_opencv_camera(c2w):
    """Flip camera y and z axes (:func:`chibisplat.protocol.flip_camera_axes`): OpenGL camera <-> OpenCV camera,
    world unchanged.

    Args:
        c2w: (.., 4, 4) tensor, numpy array or nested list.

    Returns:
        (.., 4, 4) of the same type, a tensor for a list (the map is its own inverse).
    """
    return flip_camera_axes(c2w if isinstance(c2w, np.ndarray) else torch.as_tensor(c2w))


def fov_from_focal(focal_normalised: float = FOCAL_NORMALISED) -> float:
    """Field of view in radians for a normalised focal length: ``2 atan(1 / (2 f))``."""
    return 2.0 * math.atan(0.5 / focal_normalised)
