"""The pure-PyTorch rasterizer against a dense per-pixel reference, finite differences, and splatter activation."""

import math

import pytest
import torch

from chibisplat import cameras
from chibisplat.geometry import normalised_intrinsics, opengl_to_opencv_camera, orbit_camera, unproject_depth
from chibisplat.splats.rasterize import ALPHA_MAX, project_gaussians, rasterize, rasterize_torch
from chibisplat.splats.splatter import SCALE_MAX, SCALE_MIN, Gaussians, splatter_to_gaussians


def random_gaussians(n, seed=0, dtype=torch.float32, scale=(0.01, 0.06)):
    g = torch.Generator().manual_seed(seed)
    return Gaussians(
        means=(torch.rand(n, 3, generator=g, dtype=dtype) - 0.5) * 0.8,
        quats=torch.randn(n, 4, generator=g, dtype=dtype),
        scales=torch.rand(n, 3, generator=g, dtype=dtype) * (scale[1] - scale[0]) + scale[0],
        opacities=torch.rand(n, generator=g, dtype=dtype) * 0.9 + 0.05,
        colors=torch.rand(n, 3, generator=g, dtype=dtype),
    )


def dense_reference(g, c2w, K, width, height, bg=(1.0, 1.0, 1.0)):
    """Every Gaussian at every pixel, depth-sorted, no tiles, no 3-sigma cut (slow; tests only)."""
    mean2d, cov2d, depth, opacity_scale = project_gaussians(g.means, g.quats, g.scales, c2w, K, width, height)
    opacities = g.opacities * opacity_scale
    order = torch.argsort(depth)
    mean2d, cov2d, depth = mean2d[order], cov2d[order], depth[order]
    v, u = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    pix = torch.stack([u, v], -1).reshape(-1, 2).to(g.means.dtype) + 0.5
    d = pix[None] - mean2d[:, None]  # (N, P, 2)
    power = -0.5 * torch.einsum("npi,nij,npj->np", d, torch.linalg.inv(cov2d), d)
    alpha = (opacities[order, None] * torch.exp(power)).clamp(max=ALPHA_MAX)
    alpha = torch.where(alpha >= 1 / 255, alpha, torch.zeros_like(alpha))
    trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:1]), 1 - alpha]), 0)
    w = alpha * trans[:-1]
    rgb = w.T @ g.colors[order] + trans[-1][:, None] * torch.tensor(bg, dtype=alpha.dtype)
    return rgb.T.reshape(3, height, width), (1 - trans[-1]).reshape(1, height, width)


def camera(res, slot=3, dtype=torch.float32):
    c2w = torch.tensor(cameras.slot_c2w(cameras.camera_slots()[slot]), dtype=dtype)
    return c2w, torch.tensor(cameras.intrinsics(res, res), dtype=dtype)


def test_matches_dense_reference():
    g = random_gaussians(300, dtype=torch.float64)
    c2w, K = camera(40, dtype=torch.float64)
    out = rasterize_torch(g, c2w, K, 40, 36, max_block_entries=5000)  # non-multiple of the tile, many blocks
    ref_rgb, ref_alpha = dense_reference(g, c2w, K, 40, 36)
    assert out["image"].shape == (3, 36, 40) and out["depth"].shape == (1, 36, 40)
    # Differences come only from the 3-sigma tile cut (contributions of a few 1/255 at most).
    assert (out["image"] - ref_rgb).abs().max() < 0.03
    assert (out["image"] - ref_rgb).abs().mean() < 1e-3
    assert (out["alpha"] - ref_alpha).abs().mean() < 1e-3


@pytest.mark.parametrize("formation", ["diffsplat", "3dgs"])
def test_single_gaussian_centre_and_depth(formation):
    c2w, K = camera(32, dtype=torch.float64)
    centre = torch.tensor([[0.0, 0.0, 0.0]], dtype=torch.float64)
    g = Gaussians(centre, torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64), torch.full((1, 3), 0.05, dtype=torch.float64),
                  torch.tensor([0.8], dtype=torch.float64), torch.tensor([[0.9, 0.5, 0.1]], dtype=torch.float64))
    out = rasterize_torch(g, c2w, K, 32, 32, image_formation=formation)
    alpha = out["alpha"][0]
    peak = torch.nonzero(alpha == alpha.max())[0].tolist()
    assert peak in ([15, 15], [15, 16], [16, 15], [16, 16])  # the origin projects to the image centre
    dist = cameras.DISTANCE_RING_A
    # Pixel centres sit half a pixel from the projected centre in x and y; "3dgs": 0.3 px^2 low-pass dilation;
    # "diffsplat": none, and the opacity times RaDe-GS's sqrt(det / (det + 1e-6) + 1e-6), det = var^2 here.
    var = (0.05 * K[0, 0].item() / dist) ** 2
    if formation == "3dgs":
        var, coef = var + 0.3, 1.0
    else:
        coef = math.sqrt(var**2 / (var**2 + 1e-6) + 1e-6)
    assert alpha.max().item() == pytest.approx(0.8 * coef * math.exp(-0.5 * 0.5 / var), rel=1e-3)
    expected_depth = out["depth"][0] / alpha.clamp(min=1e-9)
    assert expected_depth[16, 16].item() == pytest.approx(dist, abs=1e-6)
    assert out["image"][1, 0, 0].item() == pytest.approx(1.0)  # white background far from it
    # Each channel at every pixel: its own colour over the white background, colour * alpha + (1 - alpha).
    for c, colour in enumerate((0.9, 0.5, 0.1)):
        assert torch.allclose(out["image"][c], colour * alpha + (1 - alpha), rtol=0, atol=1e-12), c


def test_gradients_match_finite_differences():
    """float64 autograd vs central differences for every Gaussian field, through tiles and sorting."""
    g = random_gaussians(6, seed=4, dtype=torch.float64, scale=(0.08, 0.15))
    c2w, K = camera(16, slot=2, dtype=torch.float64)
    weights = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fields = ("means", "quats", "scales", "opacities", "colors")

    def loss(params):
        out = rasterize_torch(Gaussians(*params), c2w, K, 16, 16, alpha_min=0.0, max_block_entries=200)
        return (out["image"] * weights).sum() + out["alpha"].sum() + out["depth"].sum()

    params = [getattr(g, f).clone().requires_grad_(True) for f in fields]
    loss(params).backward()
    eps, worst = 1e-6, 0.0
    for i, f in enumerate(fields):
        flat = params[i].detach().reshape(-1)
        for j in range(flat.numel()):
            plus = [p.detach().clone() for p in params]
            minus = [p.detach().clone() for p in params]
            plus[i].view(-1)[j] += eps
            minus[i].view(-1)[j] -= eps
            numeric = (loss(plus) - loss(minus)).item() / (2 * eps)
            analytic = params[i].grad.reshape(-1)[j].item()
            err = abs(numeric - analytic) / max(1.0, abs(numeric))
            worst = max(worst, err)
            assert err < 1e-5, (f, j, numeric, analytic)
    print(f"max relative gradient error {worst:.2e}")


def test_splatter_to_gaussians_follows_diffsplat_mapping():
    V, H, W = 2, 4, 4
    c2w = opengl_to_opencv_camera(orbit_camera(torch.tensor([-20.0, 0.0]), torch.tensor([0.0, 90.0]), 1.4))
    f = normalised_intrinsics().expand(V, 4)
    splatter = torch.zeros(V, 12, H, W)
    splatter[:, 3:6] = 1.0  # normalised scale 1 -> the smallest scale (inverted range)
    splatter[:, 6] = 2.0  # un-normalised quaternion (w=2)
    splatter[:, 10] = 0.5  # opacity 0.75
    splatter[:, 11] = -0.4  # depth: z = -0.4 + 1.4 = 1.0
    g = splatter_to_gaussians(splatter, c2w, f)
    assert len(g) == V * H * W
    assert torch.allclose(g.scales, torch.full_like(g.scales, SCALE_MIN))
    assert torch.allclose(g.opacities, torch.full_like(g.opacities, 0.75))
    assert torch.allclose(g.colors, torch.full_like(g.colors, 0.5))
    assert torch.allclose(g.quats[:, 0], torch.full((V * H * W,), 2.0))  # kept as decoded
    assert torch.allclose(splatter_to_gaussians(splatter, c2w, f, normalize_rotation=True).quats[:, 0], torch.ones(V * H * W))
    xyz = unproject_depth(torch.ones(V, H, W), c2w, f).permute(0, 2, 3, 1).reshape(-1, 3)
    assert torch.allclose(g.means, xyz, atol=1e-6)
    splatter[:, 3:6] = -1.0
    assert torch.allclose(splatter_to_gaussians(splatter, c2w, f).scales, torch.full((V * H * W, 3), SCALE_MAX))
    assert splatter_to_gaussians(splatter, c2w, f, opacity_threshold=0.8).opacities.max() == 0


def test_backend_selection_errors():
    g = random_gaussians(3)
    c2w, K = camera(8)
    with pytest.raises(ValueError, match="backend"):
        rasterize(g, c2w, K, 8, 8, backend="optix")
    try:
        import gsplat  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install gsplat"):
            rasterize(g, c2w, K, 8, 8, backend="gsplat")
    assert math.isfinite(rasterize(g, c2w, K, 8, 8)["image"].sum().item())


@pytest.mark.parametrize("formation", ["diffsplat", "3dgs"])
def test_gsplat_adapter_conventions_with_a_stand_in(monkeypatch, formation):
    """No GPU here and gsplat has no CPU path, so the adapter is checked against a stand-in `gsplat` module that
    implements gsplat's documented `rasterization` contract (tests/gsplat_stand_in.py). What this proves: our
    conversion into and out of gsplat's API (viewmat = inverse c2w, K, eps2d, covars, compensated opacities, the white
    background composited after) is right in both image formations. What it cannot: that gsplat's CUDA kernels agree
    with ours numerically (tests/test_image_formation.py, where a GPU is present)."""
    from chibisplat.splats import rasterize as rz
    from gsplat_stand_in import install

    calls = install(monkeypatch)
    g = random_gaussians(200)
    g.quats = g.quats * 1.3  # raw quaternions of length != 1: only "3dgs" may normalise them
    c2w, K = camera(24)
    ours = rasterize(g, c2w, K, 24, 20, backend="torch", image_formation=formation)
    via = rasterize(g, c2w, K, 24, 20, backend="gsplat", image_formation=formation)
    for key in ("image", "alpha", "depth"):
        assert via[key].shape == ours[key].shape
        assert torch.allclose(via[key], ours[key], atol=1e-5), key
    (call,) = calls
    assert torch.allclose(call["viewmats"][0] @ torch.as_tensor(c2w, dtype=call["viewmats"].dtype), torch.eye(4), atol=1e-5)
    assert torch.equal(call["Ks"][0], torch.as_tensor(K, dtype=call["Ks"].dtype))
    assert call["render_mode"] == "RGB+D" and call["size"] == (24, 20) and call["mode"] == "classic"
    if formation == "3dgs":
        assert call["eps2d"] == rz.LOW_PASS_DILATION and call["covars"] is None
        assert torch.equal(call["opacities"], g.opacities)
    else:
        assert call["eps2d"] == 0.0
        assert torch.allclose(call["covars"], rz.covariance_3d(g.quats, g.scales, "diffsplat"))
        assert not torch.allclose(call["covars"], rz.covariance_3d(g.quats, g.scales, "3dgs"))
        ratio = call["opacities"] / g.opacities  # RaDe-GS's compensation: in [0, sqrt(1 + 1e-6)], not all 1
        assert (ratio <= math.sqrt(1 + 1e-6) + 1e-6).all() and (ratio >= 0).all() and (ratio < 1 - 1e-5).any()
