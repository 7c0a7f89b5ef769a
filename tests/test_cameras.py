"""The 40-slot table and camera conventions (docs/dataset-contract.md §1, §3, §4), without Blender."""

import math

import numpy as np
import pytest

from chibisplat import cameras
from chibisplat.identity import uid_for


def test_slot_table_matches_contract():
    slots = cameras.camera_slots()
    assert [s.index for s in slots] == list(range(40))
    for i in range(24):
        assert (slots[i].azimuth_deg, slots[i].elevation_deg, slots[i].distance) == (15.0 * i, 20.0, 1.6450)
    assert (slots[24].azimuth_deg, slots[24].elevation_deg, slots[24].distance) == (0.0, 10.0, 1.6450)
    assert (slots[25].elevation_deg, slots[26].elevation_deg) == (89.9, -89.9)
    for i in range(27, 39):
        assert (slots[i].azimuth_deg, slots[i].elevation_deg, slots[i].distance) == (30.0 * (i - 27), 0.0, 1.9547)
    assert (slots[39].azimuth_deg, slots[39].elevation_deg, slots[39].distance) == (45.0, 10.0, 1.6450)


def test_fov_is_blender_default_camera():
    assert math.isclose(cameras.FOV_DEG, 39.5978, abs_tol=1e-3)
    K = cameras.intrinsics(512, 512)
    assert math.isclose(K[0, 0] / 512, 1422.222 / 1024, rel_tol=1e-5)  # DiffSplat's fxfy
    assert (K[0, 2], K[1, 2]) == (256.0, 256.0)


@pytest.mark.parametrize("slot", cameras.camera_slots(), ids=lambda s: f"slot{s.index}")
def test_c2w_is_a_look_at_with_opencv_axes(slot):
    c2w = cameras.slot_c2w(slot)
    R, t = c2w[:3, :3], c2w[:3, 3]
    assert np.allclose(R.T @ R, np.eye(3), atol=1e-12) and math.isclose(np.linalg.det(R), 1.0, abs_tol=1e-12)
    assert math.isclose(np.linalg.norm(t), slot.distance, rel_tol=1e-12)
    assert np.allclose(R[:, 2], -t / np.linalg.norm(t))  # z forward, towards the origin
    assert R[2, 1] < 0 or abs(slot.elevation_deg) > 89  # y down in the world (except at the poles)
    uv, z = cameras.project(np.zeros((1, 3)), cameras.intrinsics(64, 64), c2w)
    assert np.allclose(uv, [[32.0, 32.0]]) and z[0] > 0  # the origin projects to the image centre


def test_azimuth_zero_is_front_and_90_is_plus_x():
    assert np.allclose(cameras.camera_position(0, 0, 1), [0, -1, 0], atol=1e-12)
    assert np.allclose(cameras.camera_position(90, 0, 1), [1, 0, 0], atol=1e-12)
    c2w = cameras.slot_c2w(cameras.camera_slots()[0])
    assert np.allclose(c2w[:3, 0], [1, 0, 0], atol=1e-12)  # image right = world +X in the front view
    for pole in (25, 26):
        assert np.allclose(cameras.slot_c2w(cameras.camera_slots()[pole])[:3, 0], [1, 0, 0], atol=1e-9)


def test_camera_record_fields_are_consistent():
    slot = cameras.camera_slots()[7]
    rec = cameras.camera_record(slot, 256, 256, [[-0.5] * 3, [0.5] * 3])
    c2w = np.array(rec["c2w"])
    assert np.allclose(np.array([rec["x"], rec["y"], rec["z"], rec["origin"]]).T, c2w[:3])
    assert math.isclose(rec["x_fov"], cameras.FOV_RAD, rel_tol=1e-9) and rec["convention"] == cameras.CONVENTION
    # A point on the optical axis projects to the principal point; unprojecting it gives it back.
    p = c2w[:3, 3] + 0.7 * c2w[:3, 2]
    uv, z = cameras.project(p[None], np.array(rec["K"]), c2w)
    assert np.allclose(uv, [[128, 128]]) and math.isclose(z[0], 0.7)
    depth = np.full((256, 256), 0.7)
    xyz = cameras.unproject_depth(depth, np.array(rec["K"]), c2w)
    uv2, _ = cameras.project(xyz.reshape(-1, 3), np.array(rec["K"]), c2w)
    v, u = np.divmod(np.arange(256 * 256), 256)
    assert np.allclose(uv2, np.stack([u + 0.5, v + 0.5], 1))


@pytest.mark.parametrize(
    "rel, uid",
    [("heroes/Mika Chan.fbx", "heroes_mika_chan"), ("A--b.GLB", "a_b"), ("x/y/Z9.blend", "x_y_z9"), ("__ok__.vrm", "_ok_")],
)
def test_uid_rule(tmp_path, rel, uid):
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    assert uid_for(path, tmp_path) == uid


def test_uid_can_never_escape_the_output_folder(tmp_path):
    for name in ("..fbx", "....glb", "..\\..\\evil.fbx"):
        path = tmp_path / name
        path.touch()
        try:
            uid = uid_for(path, tmp_path)
        except ValueError:
            continue
        assert "/" not in uid and "\\" not in uid and uid not in ("", ".", "..")
        assert (tmp_path / uid).resolve().parent == tmp_path.resolve()
