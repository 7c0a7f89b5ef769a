"""The two image formations (docs/image-formation.md) against a plain float64 reference written from the published
kernels' formulas, and gsplat against our torch path where CUDA and gsplat are present.

The reference below is deliberately naive: one Gaussian at a time for the projection, one pixel at a time for the
compositing, NumPy float64, no tiles except the 16x16 tile boxes RaDe-GS/graphdeco use to decide which pixels a
Gaussian is evaluated at (``getRect``). It follows RaDe-GS ``forward.cu`` (``computeCov3D``, ``computeCov2D``,
``preprocessCUDA``, ``renderCUDA``) for "diffsplat" (kernel_size 0) and graphdeco 3DGS for "3dgs".
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from chibisplat import cameras
from chibisplat.config_schema import DEFAULT_IMAGE_FORMATION, IMAGE_FORMATIONS
from chibisplat.splats.rasterize import rasterize, rasterize_torch
from chibisplat.splats.splatter import Gaussians

RADE_TILE = 16  # BLOCK_X = BLOCK_Y in graphdeco / RaDe-GS
NEAR = 0.2  # graphdeco / RaDe-GS in_frustum: p_view.z <= 0.2 is culled


def reference_render(g: Gaussians, c2w, K, width: int, height: int, formation: str, bg=(1.0, 1.0, 1.0)):
    """float64 image (3, H, W), alpha (1, H, W) and counters of the rules that fired."""
    dilation, normalise, compensate = {"diffsplat": (0.0, False, True), "3dgs": (0.3, True, False)}[formation]
    means, quats, scales = (getattr(g, f).detach().double().numpy() for f in ("means", "quats", "scales"))
    opac, colors = g.opacities.detach().double().numpy(), g.colors.detach().double().numpy()
    w2c = np.linalg.inv(np.asarray(c2w, dtype=np.float64))
    R, t = w2c[:3, :3], w2c[:3, 3]
    K = np.asarray(K, dtype=np.float64)
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    grid_x, grid_y = math.ceil(width / RADE_TILE), math.ceil(height / RADE_TILE)
    stats = {"zero_compensation": 0, "clamped": 0, "terminated": 0}
    splats = []
    for i in range(len(means)):
        x, y, z = R @ means[i] + t
        if z <= NEAR:
            continue
        w, qx, qy, qz = quats[i] / np.linalg.norm(quats[i]) if normalise else quats[i]
        rot = np.array([
            [1 - 2 * (qy * qy + qz * qz), 2 * (qx * qy - w * qz), 2 * (qx * qz + w * qy)],
            [2 * (qx * qy + w * qz), 1 - 2 * (qx * qx + qz * qz), 2 * (qy * qz - w * qx)],
            [2 * (qx * qz - w * qy), 2 * (qy * qz + w * qx), 1 - 2 * (qx * qx + qy * qy)],
        ])
        m = rot @ np.diag(scales[i])
        sigma = m @ m.T
        limx, limy = 1.3 * width / (2 * fx), 1.3 * height / (2 * fy)  # 1.3 * tan(fov / 2)
        tx, ty = min(limx, max(-limx, x / z)) * z, min(limy, max(-limy, y / z)) * z
        J = np.array([[fx / z, 0.0, -fx * tx / (z * z)], [0.0, fy / z, -fy * ty / (z * z)]])
        cov = J @ R @ sigma @ R.T @ J.T
        det0 = cov[0, 0] * cov[1, 1] - cov[0, 1] ** 2
        cov = cov + dilation * np.eye(2)
        det1 = cov[0, 0] * cov[1, 1] - cov[0, 1] ** 2
        o = opac[i]
        if compensate:
            if det0 <= 1e-6 or det1 <= 1e-6:
                coef = 0.0
                stats["zero_compensation"] += 1
            else:
                coef = math.sqrt(det0 / (det1 + 1e-6) + 1e-6)
            o = o * coef
        if det1 <= 0 or o <= 0:
            continue  # never drawn (RaDe-GS: det == 0 returns; det < 0 has compensation 0)
        conic = np.linalg.inv(cov)
        mid = 0.5 * (cov[0, 0] + cov[1, 1])
        radius = math.ceil(3.0 * math.sqrt(mid + math.sqrt(max(0.1, mid * mid - det1))))
        u, v = fx * x / z + cx, fy * y / z + cy  # continuous; the centre of pixel (i, j) is (i + 0.5, j + 0.5)
        pu, pv = u - 0.5, v - 0.5  # RaDe-GS's point_image (pixel-index coordinates)
        x0, y0 = max(0, math.floor((pu - radius) / RADE_TILE)), max(0, math.floor((pv - radius) / RADE_TILE))
        x1 = min(grid_x, max(0, math.floor((pu + radius - 1) / RADE_TILE) + 1))  # exclusive
        y1 = min(grid_y, max(0, math.floor((pv + radius - 1) / RADE_TILE) + 1))
        if x1 <= x0 or y1 <= y0:
            continue
        splats.append((z, u, v, conic, o, colors[i], (x0, x1, y0, y1)))
    splats.sort(key=lambda s: s[0])
    image = np.zeros((3, height, width))
    alpha = np.zeros((1, height, width))
    for j in range(height):
        for i in range(width):
            T, C = 1.0, np.zeros(3)
            tile_x, tile_y = i // RADE_TILE, j // RADE_TILE
            for _, u, v, conic, o, colour, (x0, x1, y0, y1) in splats:
                if not (x0 <= tile_x < x1 and y0 <= tile_y < y1):
                    continue
                dx, dy = i + 0.5 - u, j + 0.5 - v
                power = -0.5 * (conic[0, 0] * dx * dx + conic[1, 1] * dy * dy) - conic[0, 1] * dx * dy
                if power > 0:
                    continue
                a = o * math.exp(power)
                if a > 0.99:
                    a = 0.99
                    stats["clamped"] += 1
                if a < 1.0 / 255.0:
                    continue
                if T * (1 - a) < 1e-4:
                    stats["terminated"] += 1
                    break
                C += colour * a * T
                T *= 1 - a
            image[:, j, i] = C + T * np.asarray(bg)
            alpha[0, j, i] = 1 - T
    return image, alpha, stats


def scene(dtype=torch.float64) -> Gaussians:
    """DiffSplat-like Gaussians around the origin: raw quaternions of length 0.6..1.4, scales of 0.3..2 px, a
    degenerate needle (zero compensation under "diffsplat"), and an opaque stack on the camera's axis (the alpha clamp
    and early termination)."""
    gen = torch.Generator().manual_seed(7)
    n = 48
    quats = torch.randn(n, 4, generator=gen, dtype=dtype)
    quats = quats / quats.norm(dim=-1, keepdim=True) * (0.6 + 0.8 * torch.rand(n, 1, generator=gen, dtype=dtype))
    g = Gaussians(
        means=(torch.rand(n, 3, generator=gen, dtype=dtype) - 0.5) * 0.7,
        quats=quats,
        scales=0.01 + 0.05 * torch.rand(n, 3, generator=gen, dtype=dtype),
        opacities=0.1 + 0.85 * torch.rand(n, generator=gen, dtype=dtype),
        colors=torch.rand(n, 3, generator=gen, dtype=dtype),
    )
    g.scales[0] = torch.tensor([2e-5, 2e-5, 0.05], dtype=dtype)  # a needle: its 2D determinant is ~1e-9 px^4
    c2w, _ = camera(8, 8, dtype)
    centre, forward = c2w[:3, 3], c2w[:3, 2]
    for k in range(1, 5):  # opacity 0.999 (clamped to 0.99), then 0.97s: T = 0.01, 3e-4, 9e-6 < 1e-4 stops
        g.means[k] = centre + forward * (centre.norm() - 0.15 * k)
        g.scales[k] = torch.full((3,), 0.15 if k == 4 else 0.08, dtype=dtype)
        g.quats[k] = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=dtype)
        g.opacities[k] = 0.999 if k == 4 else 0.97
    # Dots of ~0.06 px standard deviation exactly on pixel centres (2D determinant ~1e-5 px^4: compensation ~0.96).
    f = cameras.intrinsics(40, 36)[0][0]  # the reference test's camera
    for k, (u, v) in enumerate([(5, 6), (30, 9), (12, 28), (33, 30)], start=5):
        ray = torch.linalg.inv(torch.tensor(cameras.intrinsics(40, 36), dtype=dtype)) @ torch.tensor(
            [u + 0.5, v + 0.5, 1.0], dtype=dtype)
        z = 1.2
        g.means[k] = centre + c2w[:3, :3] @ (ray * z)
        g.scales[k] = torch.full((3,), 0.06 * z / f, dtype=dtype)
        g.quats[k] = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=dtype)
        g.opacities[k] = 0.9
    return g


def camera(res_w: int, res_h: int, dtype=torch.float64):
    c2w = torch.tensor(cameras.slot_c2w(cameras.camera_slots()[3]), dtype=dtype)
    K = torch.tensor(cameras.intrinsics(res_w, res_h), dtype=dtype)
    return c2w, K


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("formation", IMAGE_FORMATIONS)
def test_torch_path_matches_the_float64_reference(formation):
    W, H = 40, 36  # not multiples of the 16-px tiles
    g = scene()
    c2w, K = camera(W, H)
    ref_image, ref_alpha, stats = reference_render(g, c2w, K, W, H, formation)
    # The scene exercises every rule: the 0.99 clamp and early termination (both), zero compensation (diffsplat).
    assert stats["clamped"] > 0 and stats["terminated"] > 0, stats
    assert (stats["zero_compensation"] > 0) == (formation == "diffsplat"), stats
    for tile in (8, 16, 4):  # our default tile size, RaDe-GS's, and a small one: the same pixels are evaluated
        out = rasterize_torch(g, c2w, K, W, H, near=NEAR, tile_size=tile, max_block_entries=4000,
                              image_formation=formation)
        err_image, err_alpha = rel_l2(out["image"], ref_image), rel_l2(out["alpha"], ref_alpha)
        print(f"{formation}, tiles of {tile}: relative L2 image {err_image:.2e}, alpha {err_alpha:.2e}")
        assert err_image < 1e-5 and err_alpha < 1e-5
        assert np.abs(out["alpha"].numpy() - ref_alpha).max() < 1e-9  # per pixel too (early termination: ~1e-4)
    # float32 (how renders run) stays close too
    g32 = Gaussians(*(getattr(g, f).float() for f in ("means", "quats", "scales", "opacities", "colors")))
    out32 = rasterize_torch(g32, c2w.float(), K.float(), W, H, near=NEAR, image_formation=formation)
    assert rel_l2(out32["image"], ref_image) < 1e-6  # measured 6e-8


def test_the_two_formations_differ_where_the_published_kernels_do():
    """diffsplat != 3dgs on the same Gaussians, and only diffsplat sees the quaternion's length."""
    W = H = 32
    g = scene()
    c2w, K = camera(W, H)
    images = {f: rasterize_torch(g, c2w, K, W, H, image_formation=f)["image"] for f in IMAGE_FORMATIONS}
    assert (images["diffsplat"] - images["3dgs"]).abs().max() > 0.05
    longer = Gaussians(g.means, g.quats * 1.25, g.scales, g.opacities, g.colors)
    for f, changes in (("diffsplat", True), ("3dgs", False)):
        other = rasterize_torch(longer, c2w, K, W, H, image_formation=f)["image"]
        diff = (other - images[f]).abs().max().item()
        assert (diff > 0.05) if changes else (diff < 1e-12), (f, diff)


def test_default_is_diffsplat_and_unknown_names_are_errors():
    assert DEFAULT_IMAGE_FORMATION == "diffsplat"
    W = H = 24
    g = scene()
    c2w, K = camera(W, H)
    default = rasterize(g, c2w, K, W, H, backend="torch")["image"]
    assert torch.equal(default, rasterize(g, c2w, K, W, H, backend="torch", image_formation="diffsplat")["image"])
    with pytest.raises(ValueError, match="image formation 'mip'.*'diffsplat' or '3dgs'"):
        rasterize(g, c2w, K, W, H, backend="torch", image_formation="mip")
    with pytest.raises(ValueError, match="tile_size must divide 16"):
        rasterize(g, c2w, K, W, H, backend="torch", tile_size=12)


def _has_cuda_gsplat() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import gsplat  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_cuda_gsplat(), reason="needs a CUDA GPU and gsplat")
@pytest.mark.parametrize("formation", IMAGE_FORMATIONS)
def test_gsplat_agrees_with_the_torch_path_on_cuda(formation):
    """gsplat (CUDA kernels) vs our torch path on the same GPU: images and gradients of every Gaussian field."""
    from chibisplat.splats.rasterize import rasterize_views

    gen = torch.Generator().manual_seed(3)
    n, res = 4000, 128
    quats = torch.randn(n, 4, generator=gen)
    quats = quats / quats.norm(dim=-1, keepdim=True) * (0.8 + 0.4 * torch.rand(n, 1, generator=gen))
    fields = {
        "means": (torch.rand(n, 3, generator=gen) - 0.5) * 0.8, "quats": quats,
        "scales": 0.0005 + 0.0195 * torch.rand(n, 3, generator=gen),  # DiffSplat's scale range
        "opacities": torch.rand(n, generator=gen) * 0.95, "colors": torch.rand(n, 3, generator=gen),
    }
    slots = cameras.camera_slots()
    c2ws = torch.stack([torch.tensor(cameras.slot_c2w(slots[s]), dtype=torch.float32) for s in (0, 6, 12, 30)]).cuda()
    Ks = torch.tensor(cameras.intrinsics(res, res), dtype=torch.float32).expand(4, 3, 3).cuda()
    weights = torch.rand(4, 3, res, res, generator=gen).cuda()
    results = {}
    for backend in ("gsplat", "torch"):
        params = {k: v.cuda().requires_grad_(True) for k, v in fields.items()}
        out = rasterize_views(Gaussians(**params), c2ws, Ks, res, res, backend=backend, image_formation=formation)
        ((out["image"] * weights).sum() + out["alpha"].sum()).backward()
        results[backend] = (out["image"].detach(), {k: p.grad for k, p in params.items()})
    a, b = results["gsplat"][0], results["torch"][0]
    psnr = -10 * math.log10(((a - b) ** 2).mean().item() + 1e-20)
    print(f"{formation}: gsplat vs torch PSNR {psnr:.1f} dB")
    assert psnr > 60
    for k in fields:
        ga, gb = results["gsplat"][1][k].flatten(), results["torch"][1][k].flatten()
        cos = torch.nn.functional.cosine_similarity(ga, gb, dim=0).item()
        assert cos > 0.9999, (formation, k, cos)
