"""The 40 camera slots and the camera conventions (docs/dataset-contract.md §3, §4).

This module is the one place where the slots' geometry (azimuth, elevation, distance), the Blender camera (lens,
sensor, field of view), the pixel intrinsics and the camera-to-world convention of the dataset are defined.
Everything else (Blender rendering, packing, the training loader, the Gaussian renderer) imports them from here.
The slot numbering (rings, poles, duplicates), the normalised focal length and the camera-axis flip are DiffSplat's
and come from :mod:`chibisplat.protocol`.

Conventions
-----------
* World: Blender (Z up, the character's front faces -Y).
* Camera axes: OpenCV (x right, y down, z forward). ``c2w`` is 4x4 camera-to-world.
* A world point ``p`` projects to pixel ``K @ (inv(c2w) @ [p, 1])[:3]`` (then divide by z);
  the centre of pixel (u, v) is at (u + 0.5, v + 0.5).
* Azimuth 0 puts the camera on -Y (front view); azimuth grows counter-clockwise seen from +Z,
  so azimuth 90 is on +X. Elevation is positive above the XY plane.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from chibisplat.protocol import (
    BOTTOM_UP, CAMERA_AXIS_FLIP, FOCAL_NORMALISED, NUM_SLOTS, PORTRAIT, RING_A, RING_B, THREE_QUARTER, TOP_DOWN,
)

CONVENTION = "opencv_camera_blender_world"

# Blender's default 36 mm sensor with the lens that gives DiffSplat's focal length (50 mm): a square image has a
# FOV of 2*atan(0.36) = 39.598 deg.
SENSOR_MM = 36.0
LENS_MM = FOCAL_NORMALISED * SENSOR_MM
FOV_RAD = 2.0 * math.atan(SENSOR_MM / 2.0 / LENS_MM)
FOV_DEG = math.degrees(FOV_RAD)

DISTANCE_RING_A = 1.6450
DISTANCE_RING_B = 1.9547
RING_A_ELEVATION = 20.0
RING_B_ELEVATION = 0.0
POLE_ELEVATION = 89.9  # 0.1 degree short of the pole keeps the look-at basis defined

# Depth is stored as depth / DEPTH_SCALE in a 16-bit channel, so depth must stay below 5.
DEPTH_SCALE = 5.0


@dataclass(frozen=True)
class CameraSlot:
    """One of the 40 fixed viewpoints; every camera looks at the origin."""

    index: int
    azimuth_deg: float
    elevation_deg: float
    distance: float
    group: str  # ring_a | portrait | top_down | bottom_up | ring_b | three_quarter


@dataclass(frozen=True)
class SlotLayout:
    """The parameters of the slot table (params.yaml ``render.cameras``)."""

    ring_a_elevation: float = RING_A_ELEVATION
    ring_b_elevation: float = RING_B_ELEVATION
    ring_a_distance: float = DISTANCE_RING_A
    ring_b_distance: float = DISTANCE_RING_B

    def to_dict(self) -> dict:
        return asdict(self)


def camera_slots(layout: SlotLayout | None = None) -> list[CameraSlot]:
    """The 40 slots of the contract's table, in index order."""
    lay = layout or SlotLayout()
    slots: list[CameraSlot] = []
    for i in RING_A:
        slots.append(CameraSlot(i, 15.0 * i, lay.ring_a_elevation, lay.ring_a_distance, "ring_a"))
    slots.append(CameraSlot(PORTRAIT, 0.0, 10.0, lay.ring_a_distance, "portrait"))
    slots.append(CameraSlot(TOP_DOWN, 0.0, POLE_ELEVATION, lay.ring_a_distance, "top_down"))
    slots.append(CameraSlot(BOTTOM_UP, 0.0, -POLE_ELEVATION, lay.ring_a_distance, "bottom_up"))
    for i in RING_B:
        slots.append(CameraSlot(i, 30.0 * (i - 27), lay.ring_b_elevation, lay.ring_b_distance, "ring_b"))
    slots.append(CameraSlot(THREE_QUARTER, 45.0, 10.0, lay.ring_a_distance, "three_quarter"))
    assert len(slots) == NUM_SLOTS
    return slots


def camera_position(azimuth_deg: float, elevation_deg: float, distance: float) -> np.ndarray:
    """Camera centre in the Blender world for an orbit pose around the origin."""
    a, e = math.radians(azimuth_deg), math.radians(elevation_deg)
    return distance * np.array([math.cos(e) * math.sin(a), -math.cos(e) * math.cos(a), math.sin(e)])


def look_at_c2w(position: np.ndarray, target=(0.0, 0.0, 0.0), up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """4x4 camera-to-world with OpenCV camera axes: z forward, x = forward x up, y = z x x (down)."""
    position = np.asarray(position, dtype=np.float64)
    z = np.asarray(target, dtype=np.float64) - position
    z /= np.linalg.norm(z)
    x = np.cross(z, np.asarray(up, dtype=np.float64))
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = x, y, z, position
    return c2w


def slot_c2w(slot: CameraSlot) -> np.ndarray:
    return look_at_c2w(camera_position(slot.azimuth_deg, slot.elevation_deg, slot.distance))


def intrinsics(width: int, height: int) -> np.ndarray:
    """3x3 K in pixels; principal point at the image centre (square pixels, FOV along the wider side)."""
    f = max(width, height) * FOCAL_NORMALISED
    return np.array([[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]])


def opencv_to_blender_camera(c2w: np.ndarray) -> np.ndarray:
    """OpenCV camera axes (y down, z forward) -> Blender camera axes (y up, -z forward)."""
    return c2w @ CAMERA_AXIS_FLIP


def camera_record(slot: CameraSlot, width: int, height: int, bbox) -> dict:
    """The ``{i:05d}.json`` content (docs/dataset-contract.md §4)."""
    c2w = slot_c2w(slot)
    K = intrinsics(width, height)
    fov_x = 2.0 * math.atan(width / 2.0 / K[0, 0])
    fov_y = 2.0 * math.atan(height / 2.0 / K[1, 1])
    return {
        "index": slot.index,
        "azimuth_deg": slot.azimuth_deg,
        "elevation_deg": slot.elevation_deg,
        "distance": slot.distance,
        "width": width,
        "height": height,
        "K": _round(K),
        "c2w": _round(c2w),
        "x": _round(c2w[:3, 0]),
        "y": _round(c2w[:3, 1]),
        "z": _round(c2w[:3, 2]),
        "origin": _round(c2w[:3, 3]),
        "x_fov": round(fov_x, 12),
        "y_fov": round(fov_y, 12),
        "bbox": _round(np.asarray(bbox, dtype=np.float64)),
        "convention": CONVENTION,
    }


def project(points: np.ndarray, K: np.ndarray, c2w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World points (N, 3) -> continuous pixel coordinates (N, 2) and camera z (N,)."""
    w2c = np.linalg.inv(c2w)
    cam = points @ w2c[:3, :3].T + w2c[:3, 3]
    uvw = cam @ K.T
    return uvw[:, :2] / uvw[:, 2:3], cam[:, 2]


def unproject_depth(depth: np.ndarray, K: np.ndarray, c2w: np.ndarray) -> np.ndarray:
    """Planar z-depth map (H, W) -> world points (H, W, 3), sampling pixel centres (u + 0.5, v + 0.5)."""
    h, w = depth.shape
    u, v = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    x = (u - K[0, 2]) / K[0, 0] * depth
    y = (v - K[1, 2]) / K[1, 1] * depth
    cam = np.stack([x, y, depth], axis=-1)
    return cam @ c2w[:3, :3].T + c2w[:3, 3]


def _round(a: np.ndarray, digits: int = 12):
    """Rounded nested lists, so the JSON text is stable across platforms' last-bit noise."""
    out = np.round(np.asarray(a, dtype=np.float64), digits) + 0.0  # + 0.0 turns -0.0 into 0.0
    return out.tolist()
