"""DiffSplat's published defaults where we used to differ (issue 12): opacity threshold 0 at inference, and the
loader's ``cam_pose`` distance rescaled with the cameras. (PLY bytes: tests/test_splats_ply.py; image formation:
tests/test_image_formation.py.)"""

from __future__ import annotations

import math

import numpy as np
import torch

from chibisplat import cameras
from chibisplat.dataset.loader import canonical_cameras
from chibisplat.params import load_params
from project_config import REPO


def test_opacity_threshold_is_zero_at_inference_and_in_the_ply():
    """DiffSplat's infer script: --opacity_threshold 0 and --opacity_threshold_ply 0 (keep opacity > 0)."""
    from chibisplat.config import config_from_params

    params = load_params(REPO / "params.yaml")
    for source in ("tiny", "pretrained"):
        p = {**params, "models": {**params["models"], "source": source}}
        cfg = config_from_params(p, ("generate", "evaluate", "latents", "models"))
        assert cfg.generate.opacity_threshold == 0.0, source
        assert cfg.evaluate.opacity_threshold == 0.0, source


def test_cam_pose_distance_is_rescaled_like_the_cameras():
    """gobjaverse_parquet_dataset: ``cam_pose[:, 2] *= scale`` with scale = 1.4 / |C2W[0] origin| (norm_camera)."""
    slots = cameras.camera_slots()
    ring_a = next(s for s in slots if s.distance == cameras.DISTANCE_RING_A)
    ring_b = next(s for s in slots if s.distance == cameras.DISTANCE_RING_B)
    c2w = np.stack([cameras.slot_c2w(ring_b), cameras.slot_c2w(ring_a)])  # first view on ring B
    out = canonical_cameras(c2w)
    # by hand: view 0 -> 1.4; view 1 -> 1.4 * 1.6450 / 1.9547
    expected = [1.4, 1.4 * 1.6450 / 1.9547]
    assert np.allclose(out["cam_pose"][:, 2].numpy(), expected, atol=1e-9)
    assert torch.allclose(out["cam_pose"][:, 2], out["C2W"][:, :3, 3].norm(dim=-1))  # the cameras' own distances
    assert math.isclose(float(out["cam_pose"][1, 0]), -math.radians(ring_a.elevation_deg), abs_tol=1e-9)
