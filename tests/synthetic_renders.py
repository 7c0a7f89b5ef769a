"""Contract-conforming render folders without Blender: a few spheres ray-cast analytically with numpy.

Each view is rendered through ``chibisplat.cameras`` (the same slots, intrinsics and camera JSON the render stage
writes) with exact planar depth and exact world normals, so loader tests can check geometry to sub-pixel precision.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chibisplat import cameras
from chibisplat.identity import sha256_json, sha256_text
from chibisplat.png import encode_png, write_png


@dataclass(frozen=True)
class Sphere:
    centre: tuple[float, float, float]  # Blender world
    radius: float
    colour: tuple[float, float, float]  # linear 0..1


# A chibi: big head, small body, a nose on the front (-Y) so that front and back differ. Fits in [-0.5, 0.5]^3.
CHIBI = (
    Sphere((0.0, 0.0, 0.17), 0.30, (0.95, 0.80, 0.70)),
    Sphere((0.0, 0.0, -0.30), 0.20, (0.20, 0.35, 0.90)),
    Sphere((0.0, -0.29, 0.19), 0.06, (0.90, 0.20, 0.20)),
)


def ray_cast(spheres, c2w: np.ndarray, K: np.ndarray, width: int, height: int):
    """Per pixel centre: planar depth (H, W) (0 = miss), world normal (H, W, 3), colour (H, W, 3), hit mask."""
    u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    d_cam = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], axis=-1)
    d = d_cam @ c2w[:3, :3].T  # not normalised: t is then the planar camera z-depth
    o = c2w[:3, 3]
    depth = np.full((height, width), np.inf)
    normal = np.zeros((height, width, 3))
    colour = np.zeros((height, width, 3))
    for s in spheres:
        c = np.asarray(s.centre)
        oc = o - c
        a = np.einsum("hwk,hwk->hw", d, d)
        b = 2.0 * d @ oc
        disc = b * b - 4.0 * a * (oc @ oc - s.radius**2)
        t = np.where(disc >= 0, (-b - np.sqrt(np.maximum(disc, 0.0))) / (2.0 * a), np.inf)
        closer = (t > 0) & (t < depth)
        p = o + d * t[..., None]
        n = (p - c) / s.radius
        depth = np.where(closer, t, depth)
        normal = np.where(closer[..., None], n, normal)
        shade = 0.75 + 0.25 * np.clip(p[..., 2:3] + 0.5, 0.0, 1.0)  # a vertical gradient, so pixels differ
        colour = np.where(closer[..., None], np.asarray(s.colour) * shade, colour)
    hit = np.isfinite(depth)
    return np.where(hit, depth, 0.0), normal, colour, hit


def render_character(
    renders_dir: Path,
    uid: str,
    *,
    source: str | None = None,
    size: int = 64,
    spheres=CHIBI,
    layout: cameras.SlotLayout | None = None,
) -> Path:
    """Writes ``<renders_dir>/<uid>/`` as the render stage would (40 views, meta.json, a contact sheet)."""
    folder = Path(renders_dir) / uid
    folder.mkdir(parents=True, exist_ok=True)
    bbox = [[-0.5, -0.5, -0.5], [0.5, 0.5, 0.5]]
    for slot in cameras.camera_slots(layout):
        rec = cameras.camera_record(slot, size, size, bbox)
        c2w, K = np.asarray(rec["c2w"]), np.asarray(rec["K"])
        depth, normal, colour, hit = ray_cast(spheres, c2w, K, size, size)
        rgba = np.zeros((size, size, 4), np.uint8)
        rgba[..., :3] = np.round(np.clip(colour, 0, 1) * 255).astype(np.uint8)
        rgba[..., 3] = np.where(hit, 255, 0)
        nd = np.zeros((size, size, 4), np.uint16)
        nd[..., :3] = np.where(hit[..., None], np.round((normal * 0.5 + 0.5) * 65535), 0).astype(np.uint16)
        nd[..., 3] = np.round(np.clip(depth / cameras.DEPTH_SCALE, 0, 1) * 65535).astype(np.uint16)
        write_png(folder / f"{slot.index:05d}.png", rgba)
        write_png(folder / f"{slot.index:05d}_nd.png", nd)
        (folder / f"{slot.index:05d}.json").write_text(json.dumps(rec, indent=1) + "\n")
    source = source or f"{uid}.fbx"
    meta = {
        "uid": uid,
        "source": source,
        "source_sha256": sha256_text(f"synthetic:{uid}:{spheres!r}"),
        "render_config_sha256": sha256_json({"synthetic": True, "size": size}),
        "importer": "synthetic",
        "pose": "rest",
        "scale": 1.0,
        "offset": [0.0, 0.0, 0.0],
        "bbox_original": bbox,
        "counts": {"vertices": 0, "faces": 0, "materials": len(spheres)},
        "warnings": [],
        "bpy_version": "none",
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    (folder / "contact_sheet.png").write_bytes(encode_png(np.full((8, 8, 3), 128, np.uint8)))
    return folder


def tinted(spheres, k: int):
    """A variant of ``spheres`` with shifted colours (a 'different character' with the same geometry)."""
    return tuple(Sphere(s.centre, s.radius, tuple((c + 0.13 * k) % 1.0 for c in s.colour)) for s in spheres)


def make_dataset(root: Path, n: int = 6, *, size: int = 32, captions: bool = True) -> tuple[Path, Path]:
    """``n`` characters under ``root/renders`` with sidecar captions under ``root/assets``; returns both folders."""
    renders, assets = Path(root) / "renders", Path(root) / "assets"
    assets.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        uid = f"chibi_{k:02d}"
        render_character(renders, uid, source=f"{uid}.fbx", size=size, spheres=tinted(CHIBI, k))
        if captions:
            (assets / f"{uid}.txt").write_text(f"a chibi character number {k}\n")
    return renders, assets


def make_packed(root: Path, n: int = 4, *, size: int = 32, val_fraction: float = 0.0, num_shards: int = 1) -> Path:
    """:func:`make_dataset` packed by the real pack stage (one character per row group); returns the packed folder."""
    from project_config import section_params

    from chibisplat.dataset.pack import pack

    renders, assets = make_dataset(root, n, size=size)
    out = Path(root) / "packed"
    pack(section_params("pack", renders_dir=renders, assets_dir=assets, out_dir=out, num_shards=num_shards,
                    val_fraction=val_fraction, rows_per_group=1), log=lambda *_: None)
    return out
