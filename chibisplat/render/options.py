"""The ``render:`` section of params.yaml: allowed keys, values and ranges, checked before any work.

``validate_render_params`` is the first thing the render stage does: a bad value stops the stage with one
error naming the key and what is allowed, before a single file is touched. Blender-free (the stage process
never imports ``bpy``).
"""

from __future__ import annotations

import difflib
import math
import re

import numpy as np

from chibisplat import cameras

# How a texture file that an asset references but that is not there is handled (issue 10, item 1).
MISSING_TEXTURES_FAIL = "fail"  # the character fails, listing the missing files
MISSING_TEXTURES_BASE_COLOR = "base_color"  # rendered with the materials' own base colour, with a warning
MISSING_TEXTURES_CHOICES = (MISSING_TEXTURES_FAIL, MISSING_TEXTURES_BASE_COLOR)
MISSING_TEXTURES_DEFAULT = MISSING_TEXTURES_FAIL

ENGINES = ("CYCLES",)  # EEVEE needs a display/GPU context and takes minutes per view on CPU (rendering-notes)
DEVICES = ("auto", "CPU", "OPTIX", "CUDA", "HIP", "ONEAPI", "METAL")
POSE_PATTERN = re.compile(r"^(rest|frame:-?\d+)$")
POSE_CHOICES = "'rest' or 'frame:<n>' (an integer frame, e.g. frame:1)"

# The light rig may not push a white diffuse surface (albedo 1) above this display value (sRGB-encoded, 1 = 255):
# above it the shading the models learn from is clipped away.
MAX_WHITE_RESPONSE = 0.9
# Camera distances: outside the normalised cube's bounding sphere (sqrt(3)/2), and depth below cameras.DEPTH_SCALE.
MIN_CAMERA_DISTANCE = math.sqrt(3.0) / 2.0
MAX_CAMERA_DISTANCE = cameras.DEPTH_SCALE - math.sqrt(3.0) / 2.0

KEYS = (
    "assets_dir", "out_dir", "report", "scratch_dir", "resolution", "samples", "seed", "denoise", "workers", "engine",
    "device", "allow_failures", "pose", "missing_textures", "cameras", "lights",
)
REQUIRED = ("assets_dir", "out_dir", "resolution", "samples", "seed", "pose", "cameras", "lights")
CAMERA_KEYS = ("ring_a_elevation", "ring_b_elevation", "ring_a_distance", "ring_b_distance")
LIGHT_KEYS = ("world_strength", "suns")
SUN_KEYS = ("azimuth", "elevation", "energy", "angle")


class RenderParamsError(ValueError):
    """An invalid value in params.yaml ``render:``; the message names the key and the allowed values."""


def _unknown(keys, allowed, where: str) -> None:
    for key in keys:
        if key not in allowed:
            near = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise RenderParamsError(f"{where}.{key}: unknown key{hint}; allowed keys: {', '.join(allowed)}")


def _number(value, key: str, lo: float | None = None, hi: float | None = None, integer: bool = False,
            lo_open: bool = False) -> float:
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or (not integer and not math.isfinite(value)):
        raise RenderParamsError(f"{key}: {value!r} is not {kind}; allowed: {kind}{_range(lo, hi, lo_open)}")
    if (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi):
        raise RenderParamsError(f"{key}: {value!r} is out of range; allowed: {kind}{_range(lo, hi, lo_open)}")
    return value


def _range(lo, hi, lo_open) -> str:
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo:g}"
    return f" <= {hi:g}" if hi is not None else ""


def _choice(value, key: str, choices) -> None:
    if value not in choices:
        raise RenderParamsError(f"{key}: {value!r} is not allowed; allowed values: {', '.join(map(str, choices))}")


def _bool(value, key: str) -> None:
    if not isinstance(value, bool):
        raise RenderParamsError(f"{key}: {value!r} is not allowed; allowed values: true, false")


def _path(value, key: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise RenderParamsError(f"{key}: {value!r} is not a path; allowed: a non-empty folder or file path")


def white_response(lights: dict) -> float:
    """The brightest linear radiance the rig gives a white (albedo 1) Lambertian surface, over every normal:
    world strength (a uniform environment seen by an unoccluded convex surface) + sum of sun irradiance * cos / pi.
    Evaluated on a dense Fibonacci sphere of normals plus every sun direction and every pairwise bisector."""
    dirs = np.array([cameras.camera_position(float(s["azimuth"]), float(s["elevation"]), 1.0) for s in lights["suns"]])
    energy = np.array([float(s["energy"]) for s in lights["suns"]])
    n = 20000
    k = np.arange(n) + 0.5
    z = 1 - 2 * k / n
    phi = math.pi * (1 + 5**0.5) * k
    normals = np.stack([np.sqrt(1 - z * z) * np.cos(phi), np.sqrt(1 - z * z) * np.sin(phi), z], axis=1)
    if len(dirs):
        extra = [dirs, dirs.sum(0, keepdims=True)]
        extra += [(dirs[i] + dirs[j])[None] for i in range(len(dirs)) for j in range(i + 1, len(dirs))]
        extra = np.concatenate(extra)
        norm = np.linalg.norm(extra, axis=1, keepdims=True)
        normals = np.concatenate([normals, extra[norm[:, 0] > 1e-9] / norm[norm[:, 0] > 1e-9]])
        sun = (np.clip(normals @ dirs.T, 0.0, None) * energy).sum(1) / math.pi
    else:
        sun = np.zeros(len(normals))
    return float(lights["world_strength"]) + float(sun.max())


def srgb_encode(linear: float) -> float:
    """Linear -> sRGB display value (what the ``Standard`` view transform writes), clipped to [0, 1]."""
    x = min(max(linear, 0.0), 1.0)
    return 12.92 * x if x <= 0.0031308 else 1.055 * x ** (1 / 2.4) - 0.055


def validate_render_params(params: dict) -> None:
    """Raise :class:`RenderParamsError` for the first invalid value of params.yaml ``render:``."""
    if not isinstance(params, dict):
        raise RenderParamsError(f"render: expected a mapping of keys, got {type(params).__name__}")
    _unknown(params, KEYS, "render")
    for key in REQUIRED:
        if key not in params:
            raise RenderParamsError(f"render.{key}: missing; add it to params.yaml (see the README, ### render)")
    for key in ("assets_dir", "out_dir"):
        _path(params[key], f"render.{key}")
    for key in ("report", "scratch_dir"):
        if params.get(key) is not None:
            _path(params[key], f"render.{key}")
    _number(params["resolution"], "render.resolution", 8, 4096, integer=True)
    _number(params["samples"], "render.samples", 1, 65536, integer=True)
    _number(params["seed"], "render.seed", 0, 2**31 - 1, integer=True)
    _number(params.get("workers", 1), "render.workers", 1, 256, integer=True)
    for key in ("denoise", "allow_failures"):
        if key in params:
            _bool(params[key], f"render.{key}")
    _choice(params.get("engine", "CYCLES"), "render.engine", ENGINES)
    _choice(params.get("device", "auto"), "render.device", DEVICES)
    pose = params["pose"]
    if not isinstance(pose, str) or not POSE_PATTERN.match(pose):
        raise RenderParamsError(f"render.pose: {pose!r} is not allowed; allowed values: {POSE_CHOICES}")
    missing = params.get("missing_textures", MISSING_TEXTURES_DEFAULT)
    if missing == "warn":
        raise RenderParamsError(
            "render.missing_textures: 'warn' is no longer accepted (it rendered missing textures as Blender's magenta "
            f"placeholder); allowed values: {', '.join(MISSING_TEXTURES_CHOICES)} ('{MISSING_TEXTURES_FAIL}': the "
            f"character fails and the missing files are listed; '{MISSING_TEXTURES_BASE_COLOR}': rendered with the "
            "materials' own base colour, with a warning)"
        )
    _choice(missing, "render.missing_textures", MISSING_TEXTURES_CHOICES)

    cams = params["cameras"]
    if not isinstance(cams, dict):
        raise RenderParamsError(f"render.cameras: expected a mapping with keys {', '.join(CAMERA_KEYS)}")
    _unknown(cams, CAMERA_KEYS, "render.cameras")
    for key in CAMERA_KEYS:
        if key not in cams:
            raise RenderParamsError(f"render.cameras.{key}: missing; allowed keys: {', '.join(CAMERA_KEYS)}")
    for key in ("ring_a_elevation", "ring_b_elevation"):
        _number(cams[key], f"render.cameras.{key}", -cameras.POLE_ELEVATION, cameras.POLE_ELEVATION)
    for key in ("ring_a_distance", "ring_b_distance"):
        _number(cams[key], f"render.cameras.{key}", MIN_CAMERA_DISTANCE, MAX_CAMERA_DISTANCE, lo_open=True)

    lights = params["lights"]
    if not isinstance(lights, dict):
        raise RenderParamsError(f"render.lights: expected a mapping with keys {', '.join(LIGHT_KEYS)}")
    _unknown(lights, LIGHT_KEYS, "render.lights")
    _number(lights.get("world_strength"), "render.lights.world_strength", 0.0, 100.0)
    suns = lights.get("suns")
    if not isinstance(suns, list):
        raise RenderParamsError("render.lights.suns: expected a list of {azimuth, elevation, energy[, angle]}")
    for i, sun in enumerate(suns):
        where = f"render.lights.suns[{i}]"
        if not isinstance(sun, dict):
            raise RenderParamsError(f"{where}: expected a mapping with keys {', '.join(SUN_KEYS)}")
        _unknown(sun, SUN_KEYS, where)
        _number(sun.get("azimuth"), f"{where}.azimuth", -360.0, 360.0)
        _number(sun.get("elevation"), f"{where}.elevation", -90.0, 90.0)
        _number(sun.get("energy"), f"{where}.energy", 0.0, 1000.0)
        if "angle" in sun:
            _number(sun["angle"], f"{where}.angle", 0.0, 180.0)
    linear = white_response(lights)
    response = srgb_encode(linear)
    if response > MAX_WHITE_RESPONSE:
        clip = " (1.0 = 255: clipped)" if linear >= 1.0 else ""
        raise RenderParamsError(
            f"render.lights: a white diffuse surface would reach {linear:.3f} linear{clip}, display value "
            f"{response:.3f}, above the allowed {MAX_WHITE_RESPONSE} ({round(MAX_WHITE_RESPONSE * 255)}/255); bright "
            "materials would clip to 255 and lose their shading. Lower render.lights.world_strength and/or the suns' "
            "energy (white response = world_strength + "
            "sum of energy * cos / pi, in linear units)"
        )
