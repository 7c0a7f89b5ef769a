"""The DiffSplat protocol: the facts chibisplat must share with DiffSplat's published checkpoints and its loader.

One home for them (docs/diffsplat-reference.md); every other module imports them from here:

* views: 4 input views per object (GSRecon's input, GSDiff's generated latents), rendered into 8 for the losses;
* the canonical frame: the first input view at distance 1.4, azimuth 0;
* the fixed normalised intrinsics ``fxfycxcy``;
* the inference cameras (azimuths 0/90/180/270, the default elevations);
* G-Objaverse's 40-slot numbering as DiffSplat's loader indexes it, and its "even" input-view sets;
* the OpenCV <-> OpenGL camera-axis flip.

It imports numpy only: the Blender render worker reaches it through :mod:`chibisplat.cameras`.
"""

from __future__ import annotations

import numpy as np

# --- Views (docs/diffsplat-reference.md §2 "Inputs", §4 "Multi-view latent arrangement", §5 "View selection").
NUM_INPUT_VIEWS = 4  # V_in: the views GSRecon reads and GSDiff denoises per object (views 0..3)
NUM_RENDER_VIEWS = 8  # V: the Gaussians of the inputs are rendered into the inputs and 4 supervision views
NUM_SUPERVISION_VIEWS = NUM_RENDER_VIEWS - NUM_INPUT_VIEWS  # views 4..7

# --- Canonical frame (§5 "Decoding": norm_camera; §6): cameras are rescaled so the first input view sits at this
# distance from the origin, at azimuth 0; the inference cameras use it too (§4 "Inference": --distance 1.4).
CANONICAL_RADIUS = 1.4

# --- Intrinsics (§5 "Decoding"): fixed, the camera JSON's FOV is ignored. DiffSplat's fxfy = 1422.222 / 1024 is the
# G-Objaverse renders' 50 mm lens on a 36 mm sensor (FOV 39.6 degrees), kept here as the exact ratio.
FOCAL_NORMALISED = 50.0 / 36.0  # fx / W = fy / H
PRINCIPAL_POINT_NORMALISED = 0.5  # cx / W = cy / H: the image centre

# --- Inference cameras (§4 "Inference"): 4 views around the object, elevation measured upwards from the xz-plane.
INFERENCE_AZIMUTHS = (0.0, 90.0, 180.0, 270.0)  # degrees; view 0 (azimuth 0) on +z
INFERENCE_ELEVATION = 10.0  # degrees above the object: the text model's --elevation default
IMAGE_INFERENCE_ELEVATION = 20.0  # the README's image-to-3D example (and chibisplat's ring-A renders)

# --- G-Objaverse's 40 slots as DiffSplat's loader numbers them (§5 "View selection", §9); the dataset contract
# (docs/dataset-contract.md §3, chibisplat.cameras) renders them in this numbering.
NUM_SLOTS = 40
RING_A = tuple(range(0, 24))  # 24 orbit views, 15 degrees apart
PORTRAIT = 24
TOP_DOWN = 25
BOTTOM_UP = 26
RING_B = tuple(range(27, 39))  # 12 orbit views, 30 degrees apart
THREE_QUARTER = 39
DUPLICATE_SLOTS = (PORTRAIT, THREE_QUARTER)  # never picked, neither as input nor as supervision view
TOP_DOWN_SLOTS = (TOP_DOWN, BOTTOM_UP)  # left out of the supervision views only with exclude_topdown_views
RING_A_PROBABILITY = 2.0 / 3.0  # the loader draws its input views from ring A with this probability, else ring B


def even_views(ring: tuple[int, ...], start: int, count: int = NUM_INPUT_VIEWS) -> tuple[int, ...]:
    """``count`` slots of ``ring`` evenly spaced from position ``start``: ``ring[(start + k * len(ring) // count) %
    len(ring)]`` (DiffSplat's ``_pick_even_view_indices``; 90 degrees apart for 4 views)."""
    step = len(ring) // count
    return tuple(ring[(start + step * k) % len(ring)] for k in range(count))


# Every distinct set of even input views: starts beyond one step repeat the same cameras in another order, so
# 6 sets on ring A and 3 on ring B cover them all (the latent cache encodes each).
EVEN_VIEW_SETS: tuple[tuple[int, ...], ...] = tuple(
    even_views(ring, start) for ring in (RING_A, RING_B) for start in range(len(ring) // NUM_INPUT_VIEWS)
)

# --- Camera axes (§5 "Decoding", §6): DiffSplat's world is OpenGL's, but its renderer, Plücker rays and depth
# unprojection take OpenCV camera axes (x right, y down, z forward); OpenGL's (and Blender's) camera has y up and
# looks along -z. Right-multiplying a camera-to-world matrix by this diagonal switches between the two; it is its
# own inverse.
CAMERA_AXIS_SIGNS = (1.0, -1.0, -1.0, 1.0)
CAMERA_AXIS_FLIP = np.diag(CAMERA_AXIS_SIGNS)
CAMERA_AXIS_FLIP.flags.writeable = False


def flip_camera_axes(c2w):
    """OpenCV <-> OpenGL camera axes of camera-to-world matrices, the world unchanged: ``c2w @ CAMERA_AXIS_FLIP``,
    computed as a sign change of the camera's y and z axes (columns 1 and 2), so values are exact.

    Args:
        c2w: (.., 4, 4) numpy array or torch tensor.

    Returns:
        A new (.., 4, 4) array or tensor of the same type, dtype and device.
    """
    if isinstance(c2w, np.ndarray):
        out = c2w.copy()
        out[..., :3, :] *= np.asarray(CAMERA_AXIS_SIGNS, dtype=out.dtype)
        return out
    out = c2w.clone()
    out[..., :3, :] *= out.new_tensor(CAMERA_AXIS_SIGNS)
    return out
