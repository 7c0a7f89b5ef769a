"""Differentiable Gaussian splatting: a pure-PyTorch tile rasterizer (CPU, tests, reference) and gsplat (CUDA).

Both paths share one signature, :func:`rasterize` (one view; :func:`rasterize_views` renders C cameras of the same
Gaussians, in ONE gsplat call on CUDA), and the 3DGS image formation model:
EWA projection of the 3D covariance through the perspective Jacobian, a 0.3 px^2 low-pass dilation of the
2D covariance, opacity * exp(-0.5 d^T Sigma^-1 d) clamped to 0.99, and front-to-back alpha compositing of
the Gaussians sorted by camera depth, then the background weighted by the remaining transmittance.

Cameras: ``c2w`` (4, 4) camera-to-world with OpenCV camera axes (x right, y down, z forward) in any world
frame, ``K`` (3, 3) in pixels; pixel (u, v) is sampled at (u + 0.5, v + 0.5) (dataset contract §4, gsplat).
Quaternions are ``(w, x, y, z)`` and are normalised inside (gsplat does the same).

The torch path works on 8x8 pixel tiles: every Gaussian is paired with the tiles its 3-sigma box touches,
pairs are sorted by (tile, depth), and tiles with similar pair counts are processed together as padded
(tiles, gaussians, pixels) blocks whose transmittance is one ``cumprod``. Blocks are recomputed in the
backward pass (activation checkpointing), so memory stays bounded by ``max_block_entries``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from chibisplat.config_schema import RASTERIZERS
from chibisplat.splats.splatter import Gaussians

GSPLAT_DEVICES = ("cuda",)  # where gsplat's kernels run (tests widen it to exercise the adapter with a stand-in)
LOW_PASS_DILATION = 0.3  # px^2 added to the 2D covariance (3DGS), also gsplat's eps2d
ALPHA_MAX = 0.99  # 3DGS clamp: keeps 1 - alpha > 0, so transmittance never hits exactly 0
ALPHA_MIN = 1.0 / 255.0  # 3DGS skips contributions below one 8-bit level
FRUSTUM_MARGIN = 1.3  # 3DGS clamps x/z, y/z to 1.3x the half field of view before the Jacobian


def quaternion_to_rotation(quats: Tensor) -> Tensor:
    """(N, 4) quaternions (w, x, y, z), any length -> (N, 3, 3) rotation matrices."""
    w, x, y, z = torch.nn.functional.normalize(quats, dim=-1).unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(-1, 3, 3)


def project_gaussians(
    means: Tensor, quats: Tensor, scales: Tensor, c2w: Tensor, K: Tensor, width: int, height: int
) -> tuple[Tensor, Tensor, Tensor]:
    """World Gaussians -> screen space.

    Returns:
        mean2d (N, 2) continuous pixel coordinates, cov2d (N, 2, 2) in px^2 including the low-pass
        dilation, depth (N,) camera z.
    """
    w2c = torch.linalg.inv(c2w)
    R_wc, t_wc = w2c[:3, :3], w2c[:3, 3]
    p = means @ R_wc.T + t_wc  # (N, 3) camera coordinates
    x, y, z = p.unbind(-1)
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    lim_x = FRUSTUM_MARGIN * width / (2 * fx)
    lim_y = FRUSTUM_MARGIN * height / (2 * fy)
    tx = (x / z).clamp(-lim_x, lim_x) * z
    ty = (y / z).clamp(-lim_y, lim_y) * z
    zeros = torch.zeros_like(z)
    J = torch.stack([fx / z, zeros, -fx * tx / (z * z), zeros, fy / z, -fy * ty / (z * z)], dim=-1).reshape(-1, 2, 3)
    M = quaternion_to_rotation(quats) * scales[:, None, :]  # R diag(s): (N, 3, 3)
    cov3d = M @ M.transpose(1, 2)
    T = J @ R_wc  # (N, 2, 3)
    cov2d = T @ cov3d @ T.transpose(1, 2)
    cov2d = cov2d + LOW_PASS_DILATION * torch.eye(2, dtype=cov2d.dtype, device=cov2d.device)
    mean2d = torch.stack([fx * x / z + cx, fy * y / z + cy], dim=-1)
    return mean2d, cov2d, z


def _composite_block(
    pix: Tensor, mean2d: Tensor, conic: Tensor, opacity: Tensor, feats: Tensor, valid: Tensor, alpha_min: float
) -> tuple[Tensor, Tensor]:
    """One padded block of tiles.

    pix (T, P, 2) pixel centres; mean2d (T, K, 2), conic (T, K, 3) = (a, b, c) of Sigma^-1, opacity (T, K),
    feats (T, K, F) colour + depth, valid (T, K) padding mask. Returns weighted features (T, P, F) and the
    final transmittance (T, P).
    """
    d = pix[:, None, :, :] - mean2d[:, :, None, :]  # (T, K, P, 2)
    dx, dy = d[..., 0], d[..., 1]
    a, b, c = conic[..., 0:1], conic[..., 1:2], conic[..., 2:3]
    power = -0.5 * (a * dx * dx + c * dy * dy) - b * dx * dy  # (T, K, P)
    alpha = (opacity[..., None] * torch.exp(power)).clamp(max=ALPHA_MAX)
    keep = valid[..., None] & (power <= 0) & (alpha >= alpha_min)
    alpha = torch.where(keep, alpha, torch.zeros_like(alpha))
    trans = torch.cumprod(1.0 - alpha, dim=1)  # transmittance after each Gaussian
    trans_before = torch.cat([torch.ones_like(trans[:, :1]), trans[:, :-1]], dim=1)
    weights = alpha * trans_before  # (T, K, P)
    return torch.einsum("tkp,tkf->tpf", weights, feats), trans[:, -1]


def rasterize_torch(
    gaussians: Gaussians,
    c2w: Tensor,
    K: Tensor,
    width: int,
    height: int,
    background: tuple[float, float, float] | Tensor = (1.0, 1.0, 1.0),
    near: float = 0.01,
    far: float = 100.0,
    tile_size: int = 8,
    max_block_entries: int = 1 << 22,
    alpha_min: float = ALPHA_MIN,
    checkpoint_blocks: bool = True,
) -> dict[str, Tensor]:
    """Render one view with the pure-PyTorch tile rasterizer (differentiable w.r.t. every Gaussian field).

    Args:
        gaussians: N Gaussians (world frame of ``c2w``).
        c2w: (4, 4) camera-to-world, OpenCV camera axes.
        K: (3, 3) intrinsics in pixels.
        width, height: image size in pixels.
        background: RGB composited behind the Gaussians (white by default, as in DiffSplat).
        near, far: camera-z range of Gaussians that are drawn.
        tile_size: side of the square pixel tiles.
        max_block_entries: upper bound on tiles x gaussians x pixels evaluated at once (memory bound).
        alpha_min: contributions below it are skipped (3DGS: 1/255; 0 makes the image smooth in all inputs).
        checkpoint_blocks: recompute blocks in backward instead of storing them (bounded memory).

    Returns:
        ``{"image": (3, H, W), "alpha": (1, H, W), "depth": (1, H, W)}``; depth is the alpha-weighted sum
        of camera z (divide by alpha for the expected depth).
    """
    dtype, device = gaussians.means.dtype, gaussians.means.device
    c2w = torch.as_tensor(c2w, dtype=dtype, device=device)
    K = torch.as_tensor(K, dtype=dtype, device=device)
    bg = torch.as_tensor(background, dtype=dtype, device=device)
    ts = tile_size
    ntx, nty = math.ceil(width / ts), math.ceil(height / ts)
    num_tiles = ntx * nty

    mean2d, cov2d, depth = project_gaussians(gaussians.means, gaussians.quats, gaussians.scales, c2w, K, width, height)
    det = cov2d[:, 0, 0] * cov2d[:, 1, 1] - cov2d[:, 0, 1] * cov2d[:, 1, 0]
    conic = torch.stack([cov2d[:, 1, 1], -cov2d[:, 0, 1], cov2d[:, 0, 0]], dim=-1) / det[:, None]
    with torch.no_grad():
        mid = 0.5 * (cov2d[:, 0, 0] + cov2d[:, 1, 1])
        lambda_max = mid + torch.sqrt((mid * mid - det).clamp(min=0.1))
        radius = torch.ceil(3.0 * torch.sqrt(lambda_max))
        finite = torch.isfinite(mean2d).all(-1) & torch.isfinite(radius)
        mx, my = mean2d[:, 0].nan_to_num(0.0), mean2d[:, 1].nan_to_num(0.0)
        tx0 = torch.floor((mx - radius) / ts).clamp(0, ntx - 1)
        tx1 = torch.floor((mx + radius) / ts).clamp(0, ntx - 1)
        ty0 = torch.floor((my - radius) / ts).clamp(0, nty - 1)
        ty1 = torch.floor((my + radius) / ts).clamp(0, nty - 1)
        on_screen = (mx + radius >= 0) & (mx - radius < width) & (my + radius >= 0) & (my - radius < height)
        visible = (depth > near) & (depth < far) & (det > 0) & finite & on_screen & (gaussians.opacities > 0)
        ids = torch.nonzero(visible).squeeze(1)

    feats = torch.cat([gaussians.colors, depth[:, None]], dim=-1)  # (N, 4): RGB + z
    out = torch.zeros(num_tiles, ts * ts, 4, dtype=dtype, device=device)
    final_trans = torch.ones(num_tiles, ts * ts, dtype=dtype, device=device)

    if ids.numel() > 0:
        with torch.no_grad():
            wx = (tx1[ids] - tx0[ids] + 1).long()
            wy = (ty1[ids] - ty0[ids] + 1).long()
            counts = wx * wy
            pair_gauss = torch.repeat_interleave(ids, counts)  # (pairs,) Gaussian index
            first = torch.cumsum(counts, 0) - counts
            local = torch.arange(pair_gauss.numel(), device=device) - torch.repeat_interleave(first, counts)
            pw = torch.repeat_interleave(wx, counts)
            ptx = torch.repeat_interleave(tx0[ids].long(), counts) + local % pw
            pty = torch.repeat_interleave(ty0[ids].long(), counts) + local // pw
            pair_tile = pty * ntx + ptx
            depth_rank = torch.empty(depth.shape[0], dtype=torch.long, device=device)
            depth_rank[torch.argsort(depth.detach())] = torch.arange(depth.shape[0], device=device)
            order = torch.argsort(pair_tile * depth.shape[0] + depth_rank[pair_gauss])
            pair_gauss, pair_tile = pair_gauss[order], pair_tile[order]
            tile_count = torch.bincount(pair_tile, minlength=num_tiles)
            tile_first = torch.cumsum(tile_count, 0) - tile_count
            pair_rank = torch.arange(pair_tile.numel(), device=device) - tile_first[pair_tile]
            # Tiles in order of pair count, so a block pads to a count close to each of its tiles'.
            busy = torch.nonzero(tile_count).squeeze(1)
            busy = busy[torch.argsort(tile_count[busy])]
            # Pixel centres of every tile: (num_tiles, ts*ts, 2).
            py, px = torch.meshgrid(torch.arange(ts, device=device), torch.arange(ts, device=device), indexing="ij")
            tile_x = (torch.arange(num_tiles, device=device) % ntx)[:, None] * ts + px.reshape(1, -1)
            tile_y = (torch.arange(num_tiles, device=device) // ntx)[:, None] * ts + py.reshape(1, -1)
            tile_pix = torch.stack([tile_x, tile_y], dim=-1).to(dtype) + 0.5

        opacity = gaussians.opacities
        start = 0
        busy_list = busy.tolist()
        counts_sorted = tile_count[busy].tolist()
        while start < len(busy_list):
            # Grow the block while tiles x max-count x pixels stays within budget (counts are ascending).
            stop = start + 1
            while stop < len(busy_list) and (stop + 1 - start) * counts_sorted[stop] * ts * ts <= max_block_entries:
                stop += 1
            block_tiles = busy[start:stop]
            kmax = counts_sorted[stop - 1]
            with torch.no_grad():
                slot = torch.full((num_tiles,), -1, dtype=torch.long, device=device)
                slot[block_tiles] = torch.arange(block_tiles.numel(), device=device)
                in_block = slot[pair_tile] >= 0
                # Padding points at a visible Gaussian so its finite values keep the backward pass NaN-free.
                index = torch.full((block_tiles.numel(), kmax), int(ids[0]), dtype=torch.long, device=device)
                valid = torch.zeros(block_tiles.numel(), kmax, dtype=torch.bool, device=device)
                index[slot[pair_tile[in_block]], pair_rank[in_block]] = pair_gauss[in_block]
                valid[slot[pair_tile[in_block]], pair_rank[in_block]] = True
            args = (tile_pix[block_tiles], mean2d[index], conic[index], opacity[index], feats[index], valid)
            if checkpoint_blocks and torch.is_grad_enabled():
                block_out, block_trans = checkpoint(_composite_block, *args, alpha_min, use_reentrant=False)
            else:
                block_out, block_trans = _composite_block(*args, alpha_min)
            out = out.index_copy(0, block_tiles, block_out)
            final_trans = final_trans.index_copy(0, block_tiles, block_trans)
            start = stop

    def to_image(t: Tensor) -> Tensor:  # (num_tiles, ts*ts, C) -> (C, H, W)
        c = t.shape[-1]
        img = t.reshape(nty, ntx, ts, ts, c).permute(4, 0, 2, 1, 3).reshape(c, nty * ts, ntx * ts)
        return img[:, :height, :width]

    acc = to_image(out)
    trans = to_image(final_trans[..., None])
    return {"image": acc[:3] + trans * bg[:, None, None], "alpha": 1.0 - trans, "depth": acc[3:4]}


def _import_gsplat():
    try:
        import gsplat
    except ImportError as e:
        raise ImportError(
            "the CUDA rasterizer needs gsplat: `pip install gsplat` (it compiles its CUDA kernels on first use); "
            "or call rasterize(..., backend='torch') for the pure-PyTorch rasterizer"
        ) from e
    return gsplat


def rasterize_gsplat_views(
    gaussians: Gaussians,
    c2ws: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    background: tuple[float, float, float] | Tensor = (1.0, 1.0, 1.0),
    near: float = 0.01,
    far: float = 100.0,
    **_torch_only_options,
) -> dict[str, Tensor]:
    """C views of the same Gaussians in ONE ``gsplat.rasterization`` call (its kernels batch the cameras).

    ``c2ws`` (C, 4, 4), ``Ks`` (C, 3, 3); returns ``image`` (C, 3, H, W), ``alpha`` (C, 1, H, W), ``depth``
    (C, 1, H, W), each view equal to :func:`rasterize_gsplat` of that camera alone.
    """
    gsplat = _import_gsplat()
    if gaussians.means.device.type not in GSPLAT_DEVICES:
        raise ValueError("gsplat rasterizes CUDA tensors only; move the Gaussians to a GPU or use backend='torch'")
    dtype, device = gaussians.means.dtype, gaussians.means.device
    viewmats = torch.linalg.inv(torch.as_tensor(c2ws, dtype=dtype, device=device))  # (C, 4, 4) world-to-camera
    Ks = torch.as_tensor(Ks, dtype=dtype, device=device)
    if viewmats.ndim != 3 or Ks.ndim != 3 or viewmats.shape[0] != Ks.shape[0]:
        raise ValueError(f"rasterize_views: c2ws must be (C, 4, 4) and Ks (C, 3, 3) with the same C, got "
                         f"{tuple(viewmats.shape)} and {tuple(Ks.shape)}")
    colors, alphas, _ = gsplat.rasterization(
        gaussians.means, gaussians.quats, gaussians.scales, gaussians.opacities, gaussians.colors,
        viewmats, Ks, width, height, near_plane=near, far_plane=far, render_mode="RGB+D",
        eps2d=LOW_PASS_DILATION, rasterize_mode="classic",
    )  # (C, H, W, 4) accumulated RGB + z, (C, H, W, 1)
    colors, alpha = colors.permute(0, 3, 1, 2), alphas.permute(0, 3, 1, 2)
    bg = torch.as_tensor(background, dtype=dtype, device=device)[None, :, None, None]
    return {"image": colors[:, :3] + (1.0 - alpha) * bg, "alpha": alpha, "depth": colors[:, 3:4]}


def rasterize_gsplat(
    gaussians: Gaussians,
    c2w: Tensor,
    K: Tensor,
    width: int,
    height: int,
    background: tuple[float, float, float] | Tensor = (1.0, 1.0, 1.0),
    near: float = 0.01,
    far: float = 100.0,
    **_torch_only_options,
) -> dict[str, Tensor]:
    """Same contract as :func:`rasterize_torch`, on CUDA through ``gsplat.rasterization`` (one camera)."""
    dtype, device = gaussians.means.dtype, gaussians.means.device
    out = rasterize_gsplat_views(gaussians, torch.as_tensor(c2w, dtype=dtype, device=device)[None],
                                 torch.as_tensor(K, dtype=dtype, device=device)[None], width, height, background,
                                 near, far)
    return {k: v[0] for k, v in out.items()}


def _backend(gaussians: Gaussians, backend: str) -> str:
    if backend not in RASTERIZERS:
        raise ValueError(f"unknown rasterizer backend {backend!r}; use {', '.join(map(repr, RASTERIZERS))}")
    if backend == "auto":
        backend = "gsplat" if gaussians.means.is_cuda else "torch"
    return backend


def rasterize_views(
    gaussians: Gaussians,
    c2ws: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    background: tuple[float, float, float] | Tensor = (1.0, 1.0, 1.0),
    near: float = 0.01,
    far: float = 100.0,
    backend: str = "auto",
    **options,
) -> dict[str, Tensor]:
    """Render C views (``c2ws`` (C, 4, 4), ``Ks`` (C, 3, 3)) of the same Gaussians.

    gsplat: one kernel launch for all C cameras (8 views of one object: ~4x faster than 8 calls on an H100, see
    the README); torch: one view after the other. Every view equals :func:`rasterize` of its camera alone.
    Returns ``image`` (C, 3, H, W), ``alpha`` (C, 1, H, W), ``depth`` (C, 1, H, W).
    """
    if _backend(gaussians, backend) == "gsplat":
        return rasterize_gsplat_views(gaussians, c2ws, Ks, width, height, background, near, far, **options)
    views = [rasterize_torch(gaussians, c2ws[i], Ks[i], width, height, background, near, far, **options)
             for i in range(len(c2ws))]
    return {k: torch.stack([v[k] for v in views]) for k in ("image", "alpha", "depth")}


def rasterize(
    gaussians: Gaussians,
    c2w: Tensor,
    K: Tensor,
    width: int,
    height: int,
    background: tuple[float, float, float] | Tensor = (1.0, 1.0, 1.0),
    near: float = 0.01,
    far: float = 100.0,
    backend: str = "auto",
    **options,
) -> dict[str, Tensor]:
    """Render one view; ``backend`` is ``"torch"``, ``"gsplat"`` or ``"auto"`` (gsplat for CUDA tensors).

    See :func:`rasterize_torch` for the arguments and the returned ``image``/``alpha``/``depth``.
    """
    if _backend(gaussians, backend) == "torch":
        return rasterize_torch(gaussians, c2w, K, width, height, background, near, far, **options)
    return rasterize_gsplat(gaussians, c2w, K, width, height, background, near, far, **options)
