"""Bundled sample characters: 7 small stylised anime chibi characters built from primitives.

Run ``make samples`` (``python -m chibisplat.tools.samples --out data/assets``) to (re)build them. Each character is
written as one asset file (5 binary FBX, 1 ``.blend``, 1 ``.glb``) plus a one-line caption sidecar ``<stem>.txt``.
The files are DVC inputs of the render stage: a rebuild that changes their bytes re-renders those characters.

Conventions (see docs/dataset-contract.md §2): the character's front faces Blender -Y, the feet
rest on z=0 and it stands along +Z, about 1 unit tall, with a big head (about 45-50 % of the height).

``adventurer_boy.fbx`` is rigged: its armature's REST pose is a T-pose (arms out) and its only action
(``arms_down``) poses the arms down, so frame 1 after import shows the action pose and the rest-pose
bounding box is wider than the posed one. This exercises the "render the rest pose" policy.

The build is deterministic: no randomness, every part is generated from the table ``CHARACTERS`` with
hand-written primitives (bmesh's own UV sphere changes its vertex order from run to run). FBX files get a
fixed creation time stamp, and the CLI re-runs itself with PYTHONHASHSEED=0 because the FBX exporter derives
object UIDs from Python's salted hash(); so rebuilding gives byte-identical .fbx and .glb files. The
.blend file is not byte-identical between runs (Blender stores session ids), only its geometry is.

Other modes (all run in a bpy process; they import, pose and measure the assets with the render stage's own code,
chibisplat/render/blender.py, and frame them with its camera, chibisplat/cameras.py):
  --summary PATH   after building (or with --no-build: for the files already in --out) re-import every
                   asset into a fresh scene and write a JSON summary (mesh/vertex counts, bboxes, facing).
  --preview PNG    render a small front-view montage of the assets in --out (Cycles, CPU).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import bpy  # noqa: I001  (bpy must come first: it makes bmesh and mathutils importable)
import bmesh
from mathutils import Matrix, Vector

from chibisplat import cameras, png
from chibisplat.images import contact_sheet
from chibisplat.render import blender as render

# --------------------------------------------------------------------------------------------------
# The character table
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Character:
    name: str  # file stem, lowercase snake_case
    fmt: str  # "fbx" | "blend" | "glb"
    caption: str
    hair_style: str  # "long" | "bob" | "spiky" | "twin_tails" | "messy" | "bun" | "ponytail"
    hair: str  # hex sRGB colours ...
    eyes: str
    outfit: str  # "dress" | "tunic" | "hoodie" | "sailor" | "gown"
    outfit_color: str
    accent: str  # second clothes colour (skirt, collar, trim, ...)
    legs: str  # trousers / socks colour ("skin" for bare legs)
    shoes: str
    accessories: tuple[str, ...] = ()
    rigged: bool = False


CHARACTERS: list[Character] = [
    Character(
        name="witch_girl", fmt="fbx",
        caption="a chibi anime witch girl with long purple hair, a big black pointed hat and an orange dress",
        hair_style="long", hair="#7B4FC9", eyes="#E08A1E",
        outfit="dress", outfit_color="#F28C28", accent="#F28C28", legs="#2B2B33", shoes="#3A2A4A",
        accessories=("witch_hat",),
    ),
    Character(
        name="cat_girl", fmt="fbx",
        caption="a chibi anime cat girl with a pink bob haircut, pink cat ears, a cat tail and a yellow dress",
        hair_style="bob", hair="#F48FB1", eyes="#3FAF5A",
        outfit="dress", outfit_color="#FFD54A", accent="#FFFFFF", legs="skin", shoes="#C2185B",
        accessories=("cat_ears", "cat_tail"),
    ),
    Character(
        name="adventurer_boy", fmt="fbx",
        caption="a chibi anime adventurer boy with spiky orange hair, a red scarf, a green tunic and a brown backpack",
        hair_style="spiky", hair="#FF8A1F", eyes="#2F7FD8",
        outfit="tunic", outfit_color="#4C9A3B", accent="#7A4A24", legs="#6B4A2E", shoes="#4A3020",
        accessories=("scarf", "backpack"), rigged=True,
    ),
    Character(
        name="idol_girl", fmt="fbx",
        caption="a chibi anime idol girl with long teal twin tails tied with red ribbons, a big red bow, "
                "a white top and a teal skirt",
        hair_style="twin_tails", hair="#2EC4B6", eyes="#1A9E94",
        outfit="dress", outfit_color="#F4F4F8", accent="#2EC4B6", legs="#33333D", shoes="#222228",
        accessories=("head_bow", "tail_ribbons"),
    ),
    Character(
        name="gamer_boy", fmt="fbx",
        caption="a chibi anime gamer boy with short messy green hair, big black headphones and a light blue hoodie",
        hair_style="messy", hair="#47B04B", eyes="#8A5A2B",
        outfit="hoodie", outfit_color="#7EC8F0", accent="#FFFFFF", legs="#55585F", shoes="#E8E8E8",
        accessories=("headphones", "hood"),
    ),
    Character(
        name="bookworm_girl", fmt="blend",
        caption="a chibi anime schoolgirl with brown hair in a bun, round glasses and a navy sailor uniform "
                "with a red ribbon",
        hair_style="bun", hair="#7A4B2A", eyes="#5A3A22",
        outfit="sailor", outfit_color="#2C3E74", accent="#FFFFFF", legs="#FFFFFF", shoes="#3B2A20",
        accessories=("glasses", "neck_ribbon"),
    ),
    Character(
        name="princess", fmt="glb",
        caption="a chibi anime princess with long blonde hair in a high ponytail, a golden crown and a pink gown",
        hair_style="ponytail", hair="#F7D56B", eyes="#4A6FE0",
        outfit="gown", outfit_color="#F6A5C8", accent="#FFFFFF", legs="skin", shoes="#F06292",
        accessories=("crown",),
    ),
]

SKIN = "#FFE2D1"
BLUSH = "#FF9FAE"
MOUTH = "#B3474F"
EYE_DARK = "#2A1C2E"
WHITE = "#FFFFFF"

# Body layout (units: metres, total height about 1.0).
HEAD_C = Vector((0.0, 0.0, 0.75))  # head centre
HEAD_R = Vector((0.25, 0.225, 0.23))  # head ellipsoid radii (x, y, z)
SHOULDER = Vector((0.105, 0.0, 0.465))  # left shoulder (+X); right is mirrored
ARM_LEN = 0.19
ARM_DOWN_DEG = 65.0  # posed / built arm angle below horizontal
RIG_ACTION = "arms_down"
FIXED_FBX_TIME = datetime.datetime(1970, 1, 1, 10, 0, 0)  # matches io_scene_fbx.encode_bin._TIME_ID

# --------------------------------------------------------------------------------------------------
# Small geometry helpers (bmesh, no operators; every helper returns a fresh bmesh)
# --------------------------------------------------------------------------------------------------


def srgb(hex_colour: str) -> tuple[float, float, float, float]:
    """'#RRGGBB' (sRGB) -> linear RGBA, as Blender's colour sockets expect."""
    h = hex_colour.lstrip("#")
    out = []
    for i in (0, 2, 4):
        c = int(h[i:i + 2], 16) / 255.0
        out.append(c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4)
    return (out[0], out[1], out[2], 1.0)


def trs(loc=(0, 0, 0), rot: Matrix | None = None, scale=(1, 1, 1)) -> Matrix:
    m = Matrix.Translation(Vector(loc))
    if rot is not None:
        m = m @ rot.to_4x4()
    return m @ Matrix.Diagonal(Vector((*scale, 1.0)))


def rot_xyz(x=0.0, y=0.0, z=0.0) -> Matrix:
    """Rotation matrix from Euler angles in degrees (XYZ order)."""
    from mathutils import Euler
    return Euler((math.radians(x), math.radians(y), math.radians(z)), "XYZ").to_matrix()


def frame(normal: Vector, up: Vector = Vector((0, 0, 1))) -> Matrix:
    """3x3 rotation whose local -Y is `normal` and local +Z is `up` projected onto the tangent plane."""
    n = normal.normalized()
    y = -n
    z = (up - up.dot(n) * n)
    if z.length < 1e-6:
        z = Vector((0, 1, 0)) - Vector((0, 1, 0)).dot(n) * n
    z.normalize()
    x = y.cross(z)
    return Matrix((x, y, z)).transposed()


# Note: bmesh.ops.create_uvsphere is not deterministic in its vertex/face order from one run to the next
# (checked with bpy 5.0.1), so the round primitives are built vertex by vertex here.


def ellipsoid(m: Matrix, segs: int = 24, rings: int = 12) -> bmesh.types.BMesh:
    """UV sphere of radius 1 (poles on local Z; `rings` latitude bands) transformed by `m`."""
    bm = bmesh.new()
    top = bm.verts.new(m @ Vector((0, 0, 1)))
    bands = []
    for r in range(1, rings):
        th = math.pi * r / rings
        bands.append([bm.verts.new(m @ Vector((math.sin(th) * math.cos(2 * math.pi * k / segs),
                                                math.sin(th) * math.sin(2 * math.pi * k / segs),
                                                math.cos(th)))) for k in range(segs)])
    bottom = bm.verts.new(m @ Vector((0, 0, -1)))
    for k in range(segs):
        k1 = (k + 1) % segs
        bm.faces.new((top, bands[0][k], bands[0][k1]))
        for r in range(rings - 2):
            bm.faces.new((bands[r][k], bands[r + 1][k], bands[r + 1][k1], bands[r][k1]))
        bm.faces.new((bands[-1][k], bottom, bands[-1][k1]))
    _fix_normals(bm, m)
    return bm


def cone(m: Matrix, r_bottom: float, r_top: float, depth: float, segs: int = 16) -> bmesh.types.BMesh:
    """Capped cylinder / cone along local Z, centred at the origin of `m`; a radius of 0 makes a tip."""
    bm = bmesh.new()
    rings = []
    for z, r in ((-depth / 2, r_bottom), (depth / 2, r_top)):
        if r <= 0:
            rings.append([bm.verts.new(m @ Vector((0, 0, z)))])
        else:
            rings.append([bm.verts.new(m @ Vector((r * math.cos(2 * math.pi * k / segs),
                                                    r * math.sin(2 * math.pi * k / segs), z)))
                          for k in range(segs)])
    lo, hi = rings
    for k in range(segs):
        k1 = (k + 1) % segs
        if len(lo) == 1:
            bm.faces.new((lo[0], hi[k1], hi[k]))
        elif len(hi) == 1:
            bm.faces.new((lo[k], lo[k1], hi[0]))
        else:
            bm.faces.new((lo[k], lo[k1], hi[k1], hi[k]))
    if len(lo) > 1:
        bm.faces.new(lo[::-1])
    if len(hi) > 1:
        bm.faces.new(hi)
    _fix_normals(bm, m)
    return bm


def _fix_normals(bm: bmesh.types.BMesh, m: Matrix) -> None:
    """Faces are built outward-facing; a mirroring matrix (negative determinant) flips them back."""
    if m.to_3x3().determinant() < 0:
        bmesh.ops.reverse_faces(bm, faces=list(bm.faces))
    bm.normal_update()


def box(m: Matrix, bevel: float = 0.0) -> bmesh.types.BMesh:
    """Unit-half-size cube (-1..1) transformed by `m`, optionally bevelled (in cube units)."""
    bm = bmesh.new()
    bmesh.ops.create_cube(bm, size=2.0)
    if bevel > 0:
        bmesh.ops.bevel(bm, geom=list(bm.verts) + list(bm.edges), offset=bevel, segments=2,
                        affect="EDGES", profile=0.5)
    bm.transform(m)
    return bm


def catmull_rom(points, radii, steps: int):
    """Uniform Catmull-Rom resampling of an open polyline (and linear resampling of its radii)."""
    pts = [Vector(p) for p in points]
    ext = [2 * pts[0] - pts[1]] + pts + [2 * pts[-1] - pts[-2]]
    out_p, out_r = [], []
    for i in range(len(pts) - 1):
        p0, p1, p2, p3 = ext[i], ext[i + 1], ext[i + 2], ext[i + 3]
        for k in range(steps):
            t = k / steps
            t2, t3 = t * t, t * t * t
            out_p.append(0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t2
                                + (3 * p1 - p0 - 3 * p2 + p3) * t3))
            out_r.append(radii[i] + (radii[i + 1] - radii[i]) * t)
    out_p.append(pts[-1])
    out_r.append(radii[-1])
    return out_p, out_r


def tube(points, radii, segs: int = 10, closed: bool = False, flatten: float = 1.0, smooth: int = 3,
         ) -> bmesh.types.BMesh:
    """A swept circle along a polyline (parallel-transport frames). Open tubes get capped ends;
    a radius of 0 at an end makes a pointed tip. `flatten` scales the section along the second axis.
    Open polylines of 3+ points are first resampled as a Catmull-Rom spline (`smooth` steps a span)."""
    if not closed and len(points) >= 3 and smooth > 1:
        points, radii = catmull_rom(points, radii, smooth)
    pts = [Vector(p) for p in points]
    n = len(pts)
    bm = bmesh.new()

    def tangent(i):
        if closed:
            return (pts[(i + 1) % n] - pts[i - 1]).normalized()
        a, b = pts[max(i - 1, 0)], pts[min(i + 1, n - 1)]
        return (b - a).normalized()

    t0 = tangent(0)
    ref = Vector((0, 0, 1)) if abs(t0.z) < 0.9 else Vector((1, 0, 0))
    u = (ref - ref.dot(t0) * t0).normalized()
    rings = []
    for i in range(n):
        t = tangent(i)
        # parallel transport of u along the curve
        u = (u - u.dot(t) * t)
        if u.length < 1e-8:
            u = ref - ref.dot(t) * t
        u.normalize()
        v = t.cross(u)
        if radii[i] <= 0:
            rings.append([bm.verts.new(pts[i])])
            continue
        rings.append([bm.verts.new(pts[i] + (math.cos(2 * math.pi * k / segs) * u
                                             + math.sin(2 * math.pi * k / segs) * flatten * v) * radii[i])
                      for k in range(segs)])
    spans = range(n) if closed else range(n - 1)
    for i in spans:
        r0, r1 = rings[i], rings[(i + 1) % n]
        for k in range(segs):
            k1 = (k + 1) % segs
            if len(r0) == 1 and len(r1) == 1:
                break
            if len(r0) == 1:
                bm.faces.new((r0[0], r1[k], r1[k1]))
            elif len(r1) == 1:
                bm.faces.new((r0[k], r0[k1], r1[0]))
            else:
                bm.faces.new((r0[k], r0[k1], r1[k1], r1[k]))
    if not closed:
        for ring, p, first in ((rings[0], pts[0], True), (rings[-1], pts[-1], False)):
            if len(ring) > 1:
                c = bm.verts.new(p)
                for k in range(segs):
                    f = (ring[k], ring[(k + 1) % segs], c)
                    bm.faces.new(f[::-1] if first else f)
    bm.normal_update()
    return bm


def head_point(d: Vector, lift: float = 1.0) -> tuple[Vector, Vector]:
    """Point on the head ellipsoid (scaled by `lift`) in unit-sphere direction d, and its outward normal."""
    d = d.normalized()
    p = HEAD_C + Vector((d.x * HEAD_R.x, d.y * HEAD_R.y, d.z * HEAD_R.z)) * lift
    nrm = Vector((d.x / HEAD_R.x, d.y / HEAD_R.y, d.z / HEAD_R.z)).normalized()
    return p, nrm


def face_dir(x: float, z: float) -> Vector:
    """Unit direction on the front (-Y) of the head, given its normalised x and z."""
    return Vector((x, -math.sqrt(max(1.0 - x * x - z * z, 0.0)), z))


def smoothstep(e0: float, e1: float, x: float) -> float:
    t = min(max((x - e0) / (e1 - e0), 0.0), 1.0)
    return t * t * (3 - 2 * t)


# --------------------------------------------------------------------------------------------------
# The builder: one per character; owns materials and records which bone each part follows
# --------------------------------------------------------------------------------------------------


BONES = ("root", "spine", "head", "upper_arm.L", "upper_arm.R")  # vertex group order of the rigged character


@dataclass
class Builder:
    """Collects the parts of one character into a few named objects ("groups": head, eyes, hair, body,
    arm_L, arm_R, one per accessory). Each group becomes one multi-material mesh object. For the rigged
    character every part is also weighted 100 % to the bone that is current when it is added."""

    ch: Character
    mats: dict = field(default_factory=dict)
    groups: dict = field(default_factory=dict)  # group name -> {"bm": BMesh, "mats": [Material]}
    group: str = "body"
    bone: str = "spine"

    def mat(self, key: str, hex_colour: str, rough: float = 0.75) -> bpy.types.Material:
        if hex_colour == "skin":
            key, hex_colour = "skin", SKIN
        if key in self.mats:
            return self.mats[key]
        m = bpy.data.materials.new(f"{self.ch.name}_{key}")
        m.use_nodes = True
        bsdf = m.node_tree.nodes.get("Principled BSDF")
        col = srgb(hex_colour)
        bsdf.inputs["Base Color"].default_value = col
        bsdf.inputs["Roughness"].default_value = rough
        bsdf.inputs["Specular IOR Level"].default_value = 0.25
        m.diffuse_color = col
        m.roughness = rough
        self.mats[key] = m
        return m

    def add(self, name: str, bm: bmesh.types.BMesh, mat: bpy.types.Material,
            sharp_deg: float | None = None, group: str | None = None) -> None:
        """Add one part (`name` is documentation only): smooth shaded, or with edges sharper than
        `sharp_deg` kept sharp (cylinder caps, cone rims)."""
        del name
        entry = self.groups.setdefault(group or self.group, {"bm": bmesh.new(), "mats": []})
        if mat not in entry["mats"]:
            entry["mats"].append(mat)
        idx = entry["mats"].index(mat)
        for f in bm.faces:
            f.smooth = True
            f.material_index = idx
        if sharp_deg is not None:
            limit = math.radians(sharp_deg)
            for e in bm.edges:
                if len(e.link_faces) == 2 and e.calc_face_angle(0.0) > limit:
                    e.smooth = False
        if self.ch.rigged:
            layer = bm.verts.layers.deform.verify()
            bi = BONES.index(self.bone)
            for v in bm.verts:
                v[layer][bi] = 1.0
        _merge(entry["bm"], bm)

    def finalize(self) -> list[bpy.types.Object]:
        objs = []
        for gname, entry in self.groups.items():
            me = bpy.data.meshes.new(gname)
            entry["bm"].to_mesh(me)
            entry["bm"].free()
            for m in entry["mats"]:
                me.materials.append(m)
            ob = bpy.data.objects.new(gname, me)
            bpy.context.scene.collection.objects.link(ob)
            objs.append(ob)
        self.groups.clear()
        return objs


# --------------------------------------------------------------------------------------------------
# Head and face
# --------------------------------------------------------------------------------------------------


def build_head(b: Builder) -> None:
    skin = b.mat("skin", SKIN, 0.8)
    b.add("head", ellipsoid(trs(HEAD_C, scale=HEAD_R), 32, 16), skin)
    b.add("neck", cone(trs((0, 0, 0.525)), 0.042, 0.042, 0.07, 12), skin, group="body")
    for side, sx in (("L", 1), ("R", -1)):  # small ears (mostly hidden by hair)
        p, n = head_point(Vector((sx, 0.05, -0.08)))
        b.add(f"ear_{side}", ellipsoid(trs(p, frame(n), (0.035, 0.02, 0.05)), 12, 6), skin)


def build_eyes(b: Builder) -> None:
    dark = b.mat("eye_dark", EYE_DARK, 0.4)
    iris = b.mat("iris", b.ch.eyes, 0.4)
    white = b.mat("eye_white", WHITE, 0.3)
    blush = b.mat("blush", BLUSH, 0.9)
    mouth = b.mat("mouth", MOUTH, 0.6)
    for side, sx in (("L", 1), ("R", -1)):
        p, n = head_point(face_dir(0.38 * sx, -0.16))
        f = trs(p, frame(n)) @ Matrix.Translation((0, 0.004, 0))
        b.add(f"eye_{side}", ellipsoid(f @ trs(scale=(0.05, 0.014, 0.066)), 20, 10), dark)
        b.add(f"iris_{side}", ellipsoid(f @ trs((0, -0.006, -0.012), scale=(0.036, 0.012, 0.044)), 16, 8), iris)
        b.add(f"highlight_{side}", ellipsoid(f @ trs((-0.016, -0.015, 0.024), scale=(0.016,) * 3), 10, 6), white)
        b.add(f"highlight2_{side}", ellipsoid(f @ trs((0.017, -0.014, -0.028), scale=(0.008,) * 3), 8, 4), white)
        q, m = head_point(face_dir(0.62 * sx, -0.42))
        b.add(f"blush_{side}", ellipsoid(trs(q, frame(m), (0.04, 0.006, 0.02)), 12, 6), blush, group="head")
    p, n = head_point(face_dir(0.0, -0.52))
    b.add("mouth", ellipsoid(trs(p, frame(n), (0.024, 0.008, 0.011)), 12, 6), mouth, group="head")


# --------------------------------------------------------------------------------------------------
# Hair
# --------------------------------------------------------------------------------------------------


def hair_shell(b: Builder, hairline, thickness, bump=None, segs: int = 40, rings: int = 20) -> None:
    """A sphere around the head, pushed out where the hair is and pulled inside the head elsewhere.

    hairline(phi) -> normalised height w of the hairline at azimuth phi (0 = front/-Y, +-pi = back);
    thickness(phi, w) -> hair thickness as a fraction of the head radius; bump(phi, w) -> extra offset.
    Where w > hairline the shell lies outside the head, below it inside (hidden), so the visible edge
    of the hair is the clean intersection curve of the two surfaces."""
    bm = ellipsoid(Matrix.Identity(4), segs, rings)
    for v in bm.verts:
        d = v.co.normalized()
        phi = math.atan2(d.x, -d.y)
        w = d.z
        h = hairline(phi)
        s = 2.0 * smoothstep(h - 0.06, h + 0.06, w) - 1.0  # -1 below the line, +1 above
        t = thickness(phi, w) + (bump(phi, w) if bump else 0.0)
        m = 1.0 + (t if s > 0 else 0.08) * s
        v.co = HEAD_C + Vector((d.x * HEAD_R.x, d.y * HEAD_R.y, d.z * HEAD_R.z)) * m
    b.add("hair", bm, b.mat("hair", b.ch.hair, 0.6))


def hairline_fn(front: float, side: float, back: float, fringe_half_deg: float = 50.0):
    """Piecewise-smooth hairline: `front` across the fringe, `side` at +-90 deg, `back` behind."""
    fh = math.radians(fringe_half_deg)

    def f(phi: float) -> float:
        a = abs(phi)
        if a <= fh:
            return front
        if a <= math.pi / 2:
            return front + (side - front) * smoothstep(fh, math.pi / 2, a)
        return side + (back - side) * smoothstep(math.pi / 2, math.pi, a)
    return f


def bangs(b: Builder, n: int = 7, spread_deg: float = 62.0, length: float = 0.13, width: float = 0.055,
          top: float = 0.62, lift: float = 1.09, tilt_deg: float = 14.0, name: str = "bangs") -> None:
    """A row of flattened, downward-pointing cones over the forehead (anime fringe)."""
    hair = b.mat("hair", b.ch.hair, 0.6)
    bm_all = bmesh.new()
    for i in range(n):
        a = math.radians(-spread_deg + 2 * spread_deg * i / (n - 1)) if n > 1 else 0.0
        d = Vector((math.sin(a) * math.sqrt(1 - top * top), -math.cos(a) * math.sqrt(1 - top * top), top))
        p, nrm = head_point(d, lift)
        ln = length * (1.0 - 0.25 * abs(i - (n - 1) / 2) / max((n - 1) / 2, 1))
        tilt = -tilt_deg * math.sin(a) * 2.0
        m = trs(p, frame(nrm)) @ trs(rot=rot_xyz(y=tilt)) @ Matrix.Translation((0, 0, -ln * 0.45))
        bm = cone(m @ trs(scale=(1.0, 0.4, 1.0)), 0.0, width, ln, 8)
        _merge(bm_all, bm)
    b.add(name, bm_all, hair)


def _merge(dst: bmesh.types.BMesh, src: bmesh.types.BMesh) -> None:
    """Append the geometry of src to dst (and free src)."""
    me = bpy.data.meshes.new("_tmp")
    src.to_mesh(me)
    src.free()
    dst.from_mesh(me)
    bpy.data.meshes.remove(me)


def hair_long(b: Builder) -> None:
    hair_shell(b, hairline_fn(0.55, -0.35, -1.2), lambda p, w: 0.09 + 0.03 * max(0.0, -math.cos(p)))
    bangs(b, n=7)
    hair = b.mat("hair", b.ch.hair, 0.6)
    # back curtain down to the waist and two locks in front of the shoulders
    b.add("hair_back", tube([(0, 0.13, 0.80), (0, 0.16, 0.62), (0, 0.15, 0.45), (0, 0.13, 0.30)],
                            [0.21, 0.22, 0.19, 0.12], 16, flatten=0.45), hair)
    for side, sx in (("L", 1), ("R", -1)):
        b.add(f"hair_lock_{side}", tube([(0.2 * sx, -0.02, 0.74), (0.23 * sx, -0.04, 0.58),
                                         (0.22 * sx, -0.04, 0.44), (0.2 * sx, -0.03, 0.36)],
                                        [0.055, 0.05, 0.04, 0.0], 10, flatten=0.6), hair)


def hair_bob(b: Builder) -> None:
    hair_shell(b, hairline_fn(0.42, -0.6, -0.72, 42.0),
               lambda p, w: 0.1 + 0.14 * smoothstep(0.3, -0.6, w))
    bangs(b, n=9, spread_deg=60, length=0.1, width=0.05, top=0.62, tilt_deg=0)


def hair_spiky(b: Builder) -> None:
    hair_shell(b, hairline_fn(0.5, -0.25, -0.55), lambda p, w: 0.09)
    hair = b.mat("hair", b.ch.hair, 0.6)
    bm_all = bmesh.new()
    # spikes radiating from the crown and the back of the head (fixed directions: deterministic)
    dirs = [(0.0, 0.1, 1.0), (0.55, 0.1, 0.85), (-0.55, 0.1, 0.85), (0.3, 0.5, 0.8), (-0.3, 0.5, 0.8),
            (0.8, 0.35, 0.35), (-0.8, 0.35, 0.35), (0.0, 0.75, 0.6), (0.45, 0.8, 0.1), (-0.45, 0.8, 0.1),
            (0.0, 0.95, -0.1), (0.3, -0.45, 0.85), (-0.3, -0.45, 0.85)]
    for x, y, z in dirs:
        d = Vector((x, y, z)).normalized()
        p, nrm = head_point(d, 0.95)
        ln = 0.16 if z > 0.5 else 0.13
        rot = Vector((0, 0, 1)).rotation_difference(nrm).to_matrix()
        bm = cone(trs(p, rot) @ Matrix.Translation((0, 0, ln * 0.5)), 0.065, 0.0, ln, 8)
        _merge(bm_all, bm)
    b.add("hair_spikes", bm_all, hair)
    bangs(b, n=5, spread_deg=55, length=0.16, width=0.06, top=0.6, tilt_deg=22, name="bangs")


def hair_twin_tails(b: Builder) -> None:
    hair_shell(b, hairline_fn(0.55, -0.3, -0.6), lambda p, w: 0.09)
    bangs(b, n=7, spread_deg=58, length=0.13)
    hair = b.mat("hair", b.ch.hair, 0.6)
    tie = b.mat("accent2", "#E53946", 0.6)
    for side, sx in (("L", 1), ("R", -1)):
        base = Vector((0.24 * sx, 0.06, 0.87))
        pts = [base, base + Vector((0.07 * sx, 0.02, 0.0)), base + Vector((0.14 * sx, 0.04, -0.1)),
               base + Vector((0.17 * sx, 0.05, -0.26)), base + Vector((0.16 * sx, 0.05, -0.42)),
               base + Vector((0.12 * sx, 0.04, -0.56)), base + Vector((0.08 * sx, 0.03, -0.64))]
        b.add(f"twin_tail_{side}", tube(pts, [0.04, 0.065, 0.08, 0.075, 0.06, 0.035, 0.0], 12), hair)
        b.add(f"hair_tie_{side}", ellipsoid(trs(base + Vector((0.035 * sx, 0.01, 0.0)), rot_xyz(y=90 * sx),
                                                (0.045, 0.045, 0.025)), 12, 6), tie)


def hair_messy(b: Builder) -> None:
    hair_shell(b, hairline_fn(0.5, -0.3, -0.6), lambda p, w: 0.09,
               bump=lambda p, w: 0.035 * math.sin(5 * p + 1.0) * math.cos(3 * w) * (w > 0.0))
    hair = b.mat("hair", b.ch.hair, 0.6)
    bm_all = bmesh.new()
    tufts = [(0.5, 0.3, 0.8, 25), (-0.5, 0.2, 0.8, -30), (0.85, 0.3, 0.2, 40), (-0.85, 0.3, 0.2, -40),
             (0.2, 0.85, 0.45, 10), (-0.3, 0.8, 0.3, -15), (0.0, 0.9, -0.2, 0)]
    for x, y, z, tw in tufts:
        d = Vector((x, y, z)).normalized()
        p, nrm = head_point(d, 1.0)
        rot = Vector((0, 0, 1)).rotation_difference(nrm).to_matrix() @ rot_xyz(x=35, z=tw)
        bm = cone(trs(p, rot) @ Matrix.Translation((0, 0, 0.05)), 0.05, 0.0, 0.1, 8)
        _merge(bm_all, bm)
    b.add("hair_tufts", bm_all, hair)
    # ahoge: one curved strand sticking up from the crown
    b.add("ahoge", tube([(0.0, 0.0, 0.99), (0.01, -0.02, 1.05), (0.04, -0.06, 1.08), (0.08, -0.08, 1.06)],
                        [0.02, 0.018, 0.012, 0.0], 8, flatten=0.5), hair)
    bangs(b, n=6, spread_deg=55, length=0.14, width=0.06, tilt_deg=25)


def hair_bun(b: Builder) -> None:
    hair_shell(b, hairline_fn(0.5, -0.35, -0.55), lambda p, w: 0.08)
    bangs(b, n=7, spread_deg=55, length=0.11, width=0.05, tilt_deg=8)
    hair = b.mat("hair", b.ch.hair, 0.6)
    b.add("hair_bun", ellipsoid(trs((0, 0.1, 1.0), scale=(0.09, 0.09, 0.085)), 20, 10), hair)
    b.add("hair_bun_tie", tube([(0.0615 * math.cos(a), 0.1 + 0.0615 * math.sin(a), 0.945)
                                for a in [2 * math.pi * k / 12 for k in range(12)]],
                               [0.012] * 12, 8, closed=True), b.mat("accent2", "#D64550", 0.6))
    for side, sx in (("L", 1), ("R", -1)):
        b.add(f"hair_lock_{side}", tube([(0.2 * sx, -0.1, 0.82), (0.215 * sx, -0.12, 0.68),
                                         (0.2 * sx, -0.12, 0.58)], [0.04, 0.035, 0.0], 8, flatten=0.5), hair)


def hair_ponytail(b: Builder) -> None:
    hair_shell(b, hairline_fn(0.55, -0.3, -0.55), lambda p, w: 0.085)
    bangs(b, n=7, spread_deg=60, length=0.13, tilt_deg=10)
    hair = b.mat("hair", b.ch.hair, 0.6)
    pts = [(0, 0.2, 0.93), (0, 0.27, 0.95), (0, 0.34, 0.88), (0, 0.37, 0.74), (0, 0.35, 0.58),
           (0, 0.31, 0.44), (0, 0.3, 0.34)]
    b.add("ponytail", tube(pts, [0.05, 0.075, 0.09, 0.085, 0.07, 0.045, 0.0], 12), hair)
    b.add("hair_tie", ellipsoid(trs((0, 0.225, 0.94), rot_xyz(x=-70), (0.045, 0.045, 0.025)), 12, 6),
          b.mat("accent2", "#E0407B", 0.5))
    for side, sx in (("L", 1), ("R", -1)):
        b.add(f"hair_lock_{side}", tube([(0.21 * sx, -0.06, 0.8), (0.23 * sx, -0.08, 0.62),
                                         (0.21 * sx, -0.08, 0.5)], [0.045, 0.04, 0.0], 8, flatten=0.5), hair)


HAIR_STYLES = {
    "long": hair_long, "bob": hair_bob, "spiky": hair_spiky, "twin_tails": hair_twin_tails,
    "messy": hair_messy, "bun": hair_bun, "ponytail": hair_ponytail,
}

# --------------------------------------------------------------------------------------------------
# Body
# --------------------------------------------------------------------------------------------------


def build_body(b: Builder) -> None:
    ch = b.ch
    cloth = b.mat("outfit", ch.outfit_color, 0.85)
    accent = b.mat("accent", ch.accent, 0.85)
    legs = b.mat("legs", ch.legs, 0.85)
    shoes = b.mat("shoes", ch.shoes, 0.6)
    b.add("torso", ellipsoid(trs((0, 0, 0.37), scale=(0.115, 0.095, 0.16)), 24, 12), cloth)
    if ch.outfit == "dress":
        b.add("skirt", cone(trs((0, 0, 0.255)), 0.17, 0.1, 0.17, 16), b.mat(
            "skirt", ch.accent if ch.accent not in ("#FFFFFF",) else ch.outfit_color, 0.85), sharp_deg=50)
        if ch.accent == "#FFFFFF":
            b.add("collar", tube([(0.07 * math.cos(a), -0.065 * math.sin(a) + 0.0, 0.5)
                                  for a in [2 * math.pi * k / 16 for k in range(16)]],
                                 [0.02] * 16, 8, closed=True, flatten=0.5), accent)
    elif ch.outfit == "sailor":
        b.add("skirt", cone(trs((0, 0, 0.245)), 0.175, 0.1, 0.15, 12), cloth, sharp_deg=20)  # pleats
        b.add("sailor_collar", box(trs((0, 0.055, 0.49), rot_xyz(x=-20), (0.11, 0.05, 0.012)), 0.4), accent)
    elif ch.outfit == "gown":
        b.add("skirt", cone(trs((0, 0, 0.16)), 0.24, 0.1, 0.3, 20), cloth, sharp_deg=50)
        b.add("skirt_frill", tube([(0.235 * math.cos(a), 0.235 * math.sin(a), 0.022)
                                   for a in [2 * math.pi * k / 20 for k in range(20)]],
                                  [0.022] * 20, 8, closed=True), accent)
        for side, sx in (("L", 1), ("R", -1)):
            b.add(f"puff_sleeve_{side}", ellipsoid(trs((0.11 * sx, 0, 0.46), scale=(0.055, 0.055, 0.05)), 16, 8),
                  accent)
    else:  # tunic / hoodie: top to the hips + trousers
        b.add("hem", cone(trs((0, 0, 0.245)), 0.13, 0.112, 0.06, 16), cloth, sharp_deg=50)
        if ch.outfit == "tunic":
            b.add("belt", cone(trs((0, 0, 0.29)), 0.121, 0.117, 0.025, 16), accent, sharp_deg=50)
        else:
            for side, sx in (("L", 1), ("R", -1)):
                b.add(f"hoodie_string_{side}", tube([(0.03 * sx, -0.095, 0.47), (0.035 * sx, -0.105, 0.4)],
                                                     [0.006, 0.006], 6), accent)
        b.add("hips", ellipsoid(trs((0, 0, 0.2), scale=(0.1, 0.085, 0.05)), 16, 8), legs)
    b.bone = "root"  # legs and shoes follow the root bone of the rigged character
    leg_top = 0.22 if ch.outfit in ("tunic", "hoodie") else 0.2
    for side, sx in (("L", 1), ("R", -1)):
        b.add(f"leg_{side}", cone(trs((0.055 * sx, 0, (leg_top + 0.03) / 2)), 0.038, 0.042, leg_top - 0.03, 12),
              legs)
        b.add(f"shoe_{side}", ellipsoid(trs((0.055 * sx, -0.018, 0.034), scale=(0.048, 0.068, 0.034)), 16, 8),
              shoes)
    b.bone = "spine"


def build_arms(b: Builder, angle_down_deg: float) -> None:
    cloth = b.mat("outfit", b.ch.outfit_color, 0.85)
    skin = b.mat("skin", SKIN, 0.8)
    for side, sx in (("L", 1), ("R", -1)):
        b.bone, b.group = f"upper_arm.{side}", f"arm_{side}"
        a = math.radians(angle_down_deg)
        direction = Vector((math.cos(a) * sx, 0.0, -math.sin(a)))
        s = Vector((SHOULDER.x * sx, SHOULDER.y, SHOULDER.z))
        rot = Vector((0, 0, 1)).rotation_difference(direction).to_matrix()
        mid = s + direction * (ARM_LEN * 0.5)
        b.add(f"arm_{side}", cone(trs(mid, rot), 0.036, 0.032, ARM_LEN, 12), cloth, sharp_deg=50)
        b.add(f"hand_{side}", ellipsoid(trs(s + direction * (ARM_LEN + 0.025), scale=(0.042,) * 3), 16, 8), skin)
    b.bone, b.group = "spine", "body"


# --------------------------------------------------------------------------------------------------
# Accessories
# --------------------------------------------------------------------------------------------------


def acc_witch_hat(b: Builder) -> None:
    black = b.mat("hat", "#26212E", 0.7)
    band = b.mat("hat_band", "#9B59D0", 0.6)
    tilt = trs((0, 0.0, 0.92), rot_xyz(x=10))  # tipped back a little
    b.add("hat_brim", cone(tilt @ trs(), 0.38, 0.38, 0.016, 28), black, sharp_deg=50)
    pts = [(0, 0, 0.0), (0, 0.0, 0.1), (0, 0.015, 0.2), (0, 0.05, 0.28), (0, 0.11, 0.33), (0, 0.19, 0.32)]
    pts = [tilt @ Vector(p) for p in pts]
    b.add("hat_cone", tube(pts, [0.215, 0.16, 0.105, 0.06, 0.03, 0.0], 16), black)
    b.add("hat_band", cone(tilt @ trs((0, 0, 0.035)), 0.222, 0.2, 0.05, 24), band, sharp_deg=50)


def acc_cat_ears(b: Builder) -> None:
    hair = b.mat("hair", b.ch.hair, 0.6)
    inner = b.mat("ear_inner", "#FFD1DC", 0.8)
    for side, sx in (("L", 1), ("R", -1)):
        d = Vector((0.55 * sx, 0.05, 0.83))
        p, nrm = head_point(d, 1.02)
        f = trs(p, frame(Vector((0, -1, 0)), up=nrm)) @ trs(rot=rot_xyz(y=-15 * sx))
        b.add(f"cat_ear_{side}", cone(f @ trs((0, 0, 0.06), scale=(1, 0.4, 1)), 0.075, 0.0, 0.14, 8), hair,
              sharp_deg=60)
        b.add(f"cat_ear_inner_{side}", cone(f @ trs((0, -0.014, 0.045), scale=(1, 0.3, 1)), 0.045, 0.0, 0.09, 8),
              inner, sharp_deg=60)


def acc_cat_tail(b: Builder) -> None:
    pts = [(0, 0.08, 0.24), (0, 0.18, 0.2), (0.03, 0.27, 0.24), (0.06, 0.31, 0.33), (0.06, 0.3, 0.43),
           (0.03, 0.26, 0.5), (0.0, 0.22, 0.5)]
    b.add("cat_tail", tube(pts, [0.028, 0.03, 0.03, 0.03, 0.028, 0.022, 0.0], 10),
          b.mat("hair", b.ch.hair, 0.6))


def acc_scarf(b: Builder) -> None:
    red = b.mat("scarf", "#E53935", 0.85)
    ring = [(0.075 * math.cos(a), 0.07 * math.sin(a), 0.525 - 0.012 * math.sin(a))
            for a in [2 * math.pi * k / 16 for k in range(16)]]
    b.add("scarf", tube(ring, [0.035] * 16, 10, closed=True), red)
    b.add("scarf_tail", tube([(0.05, -0.07, 0.52), (0.07, -0.1, 0.45), (0.075, -0.105, 0.36)],
                             [0.03, 0.032, 0.03], 8, flatten=0.35), red)


def acc_backpack(b: Builder) -> None:
    brown = b.mat("backpack", "#8D5A2B", 0.8)
    strap = b.mat("strap", "#5D3A1A", 0.8)
    b.add("backpack", box(trs((0, 0.155, 0.36), scale=(0.1, 0.055, 0.11)), 0.35), brown, sharp_deg=40)
    b.add("backpack_flap", box(trs((0, 0.16, 0.44), rot_xyz(x=8), (0.102, 0.06, 0.035)), 0.5), strap,
          sharp_deg=40)
    for side, sx in (("L", 1), ("R", -1)):
        b.add(f"strap_{side}", tube([(0.07 * sx, 0.12, 0.45), (0.08 * sx, 0.05, 0.5), (0.085 * sx, -0.08, 0.45),
                                     (0.085 * sx, -0.095, 0.34), (0.075 * sx, 0.0, 0.27)],
                                    [0.012] * 5, 6, flatten=0.5), strap)


def _bow(b: Builder, name: str, centre: Vector, size: float, mat, rot: Matrix | None = None) -> None:
    rot = rot or Matrix.Identity(3)
    bm_all = bmesh.new()
    for sx in (1, -1):
        m = trs(centre, rot) @ trs((sx * 0.9 * size, 0, 0.1 * size), rot_xyz(y=-15 * sx),
                                   (size, 0.45 * size, 0.62 * size))
        _merge(bm_all, ellipsoid(m, 16, 8))
        tail = trs(centre, rot) @ trs((sx * 0.45 * size, 0.1 * size, -0.8 * size), rot_xyz(y=25 * sx),
                                      (0.28 * size, 0.2 * size, 0.75 * size))
        _merge(bm_all, ellipsoid(tail, 10, 6))
    _merge(bm_all, ellipsoid(trs(centre, rot) @ trs(scale=(0.38 * size, 0.4 * size, 0.38 * size)), 10, 6))
    b.add(name, bm_all, mat)


def acc_head_bow(b: Builder) -> None:
    p, nrm = head_point(Vector((0.0, 0.25, 1.0)), 1.12)
    _bow(b, "head_bow", p, 0.085, b.mat("accent2", "#E53946", 0.6), rot=rot_xyz(x=-20))


def acc_tail_ribbons(b: Builder) -> None:
    red = b.mat("accent2", "#E53946", 0.6)
    for side, sx in (("L", 1), ("R", -1)):
        _bow(b, f"tail_ribbon_{side}", Vector((0.28 * sx, 0.04, 0.9)), 0.04, red, rot=rot_xyz(y=60 * sx))


def acc_neck_ribbon(b: Builder) -> None:
    _bow(b, "neck_ribbon", Vector((0, -0.1, 0.48)), 0.04, b.mat("accent2", "#D64550", 0.6))


def acc_glasses(b: Builder) -> None:
    frame_mat = b.mat("glasses", "#3A2A28", 0.4)
    bm_all = bmesh.new()
    for sx in (1, -1):
        p, _ = head_point(face_dir(0.38 * sx, -0.16))
        c = Vector((p.x, p.y - 0.03, p.z))
        ring = [c + Vector((0.062 * math.cos(a), 0.0, 0.058 * math.sin(a)))
                for a in [2 * math.pi * k / 16 for k in range(16)]]
        _merge(bm_all, tube(ring, [0.007] * 16, 6, closed=True))
        q, _ = head_point(Vector((0.97 * sx, 0.1, -0.08)), 1.02)
        _merge(bm_all, tube([c + Vector((0.062 * sx, 0, 0.0)), Vector((0.245 * sx, -0.12, c.z)), q],
                            [0.006, 0.006, 0.006], 6))
    y0 = head_point(face_dir(0.38, -0.16))[0].y - 0.03
    z0 = head_point(face_dir(0.38, -0.16))[0].z
    _merge(bm_all, tube([(-0.034, y0, z0 + 0.01), (0.0, y0 - 0.004, z0 + 0.02), (0.034, y0, z0 + 0.01)],
                        [0.006] * 3, 6))
    b.add("glasses", bm_all, frame_mat)


def acc_headphones(b: Builder) -> None:
    black = b.mat("headphones", "#23232A", 0.45)
    pad = b.mat("headphone_pad", "#E53935", 0.7)
    arc = [(0.285 * math.cos(a), 0.0, HEAD_C.z + 0.01 + 0.27 * math.sin(a))
           for a in [math.pi * k / 12 for k in range(13)]]
    b.add("headphone_band", tube(arc, [0.02] * 13, 8, flatten=0.6), black)
    for side, sx in (("L", 1), ("R", -1)):
        c = Vector((0.29 * sx, 0.0, HEAD_C.z - 0.01))
        rot = rot_xyz(y=90)
        b.add(f"headphone_cup_{side}", cone(trs(c, rot), 0.085, 0.085, 0.05, 16), black, sharp_deg=50)
        b.add(f"headphone_pad_{side}", cone(trs(c + Vector((0.03 * sx, 0, 0)), rot), 0.055, 0.055, 0.02, 16),
              pad, sharp_deg=50)


def acc_hood(b: Builder) -> None:
    b.add("hood", ellipsoid(trs((0, 0.11, 0.51), rot_xyz(x=-25), (0.14, 0.06, 0.09)), 16, 8),
          b.mat("outfit", b.ch.outfit_color, 0.85))


def acc_crown(b: Builder) -> None:
    gold = b.mat("gold", "#F2B705", 0.35)
    gem = b.mat("gem", "#E0245E", 0.2)
    c = Vector((0.0, 0.02, 0.985))
    b.add("crown_band", cone(trs(c), 0.1, 0.11, 0.05, 20), gold, sharp_deg=50)
    bm_all = bmesh.new()
    for k in range(5):
        a = 2 * math.pi * k / 5 - math.pi / 2  # first point at the front (-Y)
        p = c + Vector((0.1 * math.cos(a), 0.1 * math.sin(a), 0.06))
        _merge(bm_all, cone(trs(p, rot_xyz()), 0.035, 0.0, 0.07, 8))
        _merge(bm_all, ellipsoid(trs(p + Vector((0, 0, 0.045)), scale=(0.012,) * 3), 8, 4))
    b.add("crown_points", bm_all, gold, sharp_deg=60)
    b.add("crown_gem", ellipsoid(trs(c + Vector((0, -0.108, 0.0)), scale=(0.02, 0.01, 0.02)), 12, 6), gem)


ACCESSORIES = {
    "witch_hat": acc_witch_hat, "cat_ears": acc_cat_ears, "cat_tail": acc_cat_tail, "scarf": acc_scarf,
    "backpack": acc_backpack, "head_bow": acc_head_bow, "tail_ribbons": acc_tail_ribbons,
    "neck_ribbon": acc_neck_ribbon, "glasses": acc_glasses, "headphones": acc_headphones, "hood": acc_hood,
    "crown": acc_crown,
}

# --------------------------------------------------------------------------------------------------
# Rig (T-pose rest, arms-down action)
# --------------------------------------------------------------------------------------------------


def build_rig(b: Builder, objs: list[bpy.types.Object]) -> bpy.types.Object:
    arm_data = bpy.data.armatures.new(f"{b.ch.name}_rig")
    arm = bpy.data.objects.new("Armature", arm_data)
    bpy.context.scene.collection.objects.link(arm)
    bpy.context.view_layer.objects.active = arm
    bpy.ops.object.mode_set(mode="EDIT")
    eb = arm_data.edit_bones

    def bone(name, head, tail, parent=None):
        e = eb.new(name)
        e.head, e.tail, e.roll = head, tail, 0.0
        if parent:
            e.parent = eb[parent]
        return e

    bone("root", (0, 0, 0), (0, 0, 0.15))
    bone("spine", (0, 0, 0.15), (0, 0, 0.5), "root")
    bone("head", (0, 0, 0.52), (0, 0, 0.98), "spine")
    for side, sx in (("L", 1), ("R", -1)):
        s = (SHOULDER.x * sx, 0.0, SHOULDER.z)
        bone(f"upper_arm.{side}", s, (s[0] + ARM_LEN * sx, 0.0, s[2]), "spine")  # T-pose
    bpy.ops.object.mode_set(mode="OBJECT")

    for ob in objs:
        for name in BONES:  # same order as the deform layer indices written by Builder.add
            ob.vertex_groups.new(name=name)
        ob.parent = arm
        mod = ob.modifiers.new("Armature", "ARMATURE")
        mod.object = arm

    # action: both arms rotated down about world Y, keyed at frames 1 and 24 (a slight sway in between)
    scene = bpy.context.scene
    scene.frame_start, scene.frame_end = 1, 24
    for frame_no, angle in ((1, ARM_DOWN_DEG), (12, ARM_DOWN_DEG - 8.0), (24, ARM_DOWN_DEG)):
        for side, sx in (("L", 1), ("R", -1)):
            pb = arm.pose.bones[f"upper_arm.{side}"]
            pb.rotation_mode = "QUATERNION"
            r = pb.bone.matrix_local.to_3x3()
            world_rot = Matrix.Rotation(math.radians(angle) * sx, 3, "Y")
            pb.rotation_quaternion = (r.inverted() @ world_rot @ r).to_quaternion()
            pb.keyframe_insert("rotation_quaternion", frame=frame_no)
    arm.animation_data.action.name = RIG_ACTION
    scene.frame_set(1)
    return arm


# --------------------------------------------------------------------------------------------------
# Build + export
# --------------------------------------------------------------------------------------------------


HEAD_ACCESSORIES = ("witch_hat", "cat_ears", "head_bow", "tail_ribbons", "glasses", "headphones", "crown")
ACCESSORY_GROUP = {"tail_ribbons": "hair", "hood": "body", "neck_ribbon": "body", "cat_tail": "body"}


def build_character(ch: Character) -> list[bpy.types.Object]:
    """Empty scene -> the character's mesh objects (and armature if rigged). Returns the mesh objects."""
    bpy.ops.wm.read_factory_settings(use_empty=True)
    b = Builder(ch)
    b.bone, b.group = "head", "head"
    build_head(b)
    b.group = "eyes"
    build_eyes(b)
    b.group = "hair"
    HAIR_STYLES[ch.hair_style](b)
    b.bone, b.group = "spine", "body"
    build_body(b)
    build_arms(b, 0.0 if ch.rigged else ARM_DOWN_DEG)
    for acc in ch.accessories:
        b.bone = "head" if acc in HEAD_ACCESSORIES else "spine"
        b.group = ACCESSORY_GROUP.get(acc, acc)
        ACCESSORIES[acc](b)
    objs = b.finalize()
    if ch.rigged:
        build_rig(b, objs)
    bpy.context.view_layer.update()
    return objs


def _fixed_time_fbx_header():
    """The FBX exporter stamps the current time into the header; make it a fixed time instead."""
    mod = sys.modules.get("io_scene_fbx.export_fbx_bin")
    if mod is None:
        import io_scene_fbx.export_fbx_bin as mod  # noqa: F811
    orig = getattr(mod, "_chibisplat_orig_header", None) or mod.fbx_header_elements
    mod._chibisplat_orig_header = orig

    def header(root, scene_data, time=None):
        return orig(root, scene_data, FIXED_FBX_TIME)
    mod.fbx_header_elements = header


def export_character(ch: Character, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{ch.name}.{ch.fmt}"
    if ch.fmt == "fbx":
        _fixed_time_fbx_header()
        bpy.ops.export_scene.fbx(
            filepath=str(path), object_types={"MESH", "ARMATURE"}, use_mesh_modifiers=False,
            mesh_smooth_type="FACE", add_leaf_bones=False, use_armature_deform_only=False,
            bake_anim=ch.rigged, bake_anim_use_all_actions=True, bake_anim_use_nla_strips=False,
            bake_anim_force_startend_keying=False, bake_anim_simplify_factor=1.0,
            path_mode="AUTO", embed_textures=False, use_metadata=True,
        )
    elif ch.fmt == "glb":
        bpy.ops.export_scene.gltf(filepath=str(path), export_format="GLB", export_texcoords=False,
                                  export_animations=False, export_cameras=False, export_lights=False)
    elif ch.fmt == "blend":
        bpy.context.scene.frame_set(1)
        bpy.ops.wm.save_as_mainfile(filepath=str(path), compress=True, copy=True)
    else:
        raise ValueError(f"unknown format {ch.fmt!r}")
    (out_dir / f"{ch.name}.txt").write_text(ch.caption + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# Re-import + summary (used by the tests and for verification)
# --------------------------------------------------------------------------------------------------


def load_asset(path: Path, pose: str) -> list[bpy.types.Object]:
    """A fresh scene holding only the asset, imported and posed by the render stage's own code
    (``pose``: its pose policy, ``rest`` or ``frame:<n>``). Returns the visible mesh objects."""
    render.reset_scene()
    render.import_asset(path, pose)
    render.apply_pose(pose)
    return [o for o in render.renderable_objects() if o.type == "MESH"]


def _bbox(objs) -> tuple[list[float], list[float]]:
    """World bbox of the evaluated meshes (the render stage's measure), rounded to 0.1 mm for the JSON summary."""
    bbox, _, _ = render.evaluated_bbox(objs)
    return [round(float(x), 4) + 0.0 for x in bbox[0]], [round(float(x), 4) + 0.0 for x in bbox[1]]  # no -0.0


def summarize(path: Path) -> dict:
    meshes = load_asset(path, "frame:1")
    arms = [o for o in bpy.context.scene.objects if o.type == "ARMATURE"]
    actions = sorted(a.animation_data.action.name for a in arms if a.animation_data and a.animation_data.action)
    posed = _bbox(meshes)
    render.apply_pose("rest")  # armatures in their rest position (this also unassigns the actions: read above)
    rest = _bbox(meshes)
    by_name = {o.name: o for o in meshes}
    head = by_name.get("head")
    eyes = [o for o in meshes if o.name.startswith("eye")]
    info = {
        "file": path.name,
        "format": path.suffix.lstrip(".").lower(),
        "bytes": path.stat().st_size,
        "meshes": len(meshes),
        "vertices": sum(len(o.data.vertices) for o in meshes),
        "faces": sum(len(o.data.polygons) for o in meshes),
        "materials": len({m.name for o in meshes for m in o.data.materials if m}),
        "armatures": len(arms),
        "bones": sum(len(a.data.bones) for a in arms),
        "active_actions": actions,
        "bbox_rest": rest,
        "bbox_frame1": posed,
    }
    if head is not None and eyes:
        hlo, hhi = _bbox([head])
        elo, ehi = _bbox(eyes)
        hc = [(a + b) / 2 for a, b in zip(hlo, hhi)]
        ec = [(a + b) / 2 for a, b in zip(elo, ehi)]
        info["eyes_minus_head_centre"] = [round(e - h, 4) for e, h in zip(ec, hc)]
        top = max(hhi[2], _bbox([by_name["hair"]])[1][2]) if "hair" in by_name else hhi[2]
        info["head_height_fraction"] = round((top - hlo[2]) / max(rest[1][2] - rest[0][2], 1e-9), 4)
    return info


# --------------------------------------------------------------------------------------------------
# Preview montage (small Cycles renders of the re-imported assets, rest pose)
# --------------------------------------------------------------------------------------------------

PREVIEW_ELEVATION = 10.0  # degrees
PREVIEW_MARGIN = 1.25  # the frame is this many times the character's largest extent


def _render_view(path: Path, png_path: Path, azimuth_deg: float, res: int, samples: int) -> None:
    """The asset as the render stage sees it (rest pose, normalised to extent 1 around the origin), through the
    stage's camera (lens, sensor, orbit convention) at a distance that frames it; a soft key/fill look."""
    objects = load_asset(path, "rest")
    scene = bpy.context.scene
    for o in list(scene.objects):
        if o.type in ("CAMERA", "LIGHT"):
            bpy.data.objects.remove(o)
    render.normalise_scene(objects)
    cam_data = bpy.data.cameras.new("cam")
    cam_data.lens = cameras.LENS_MM
    cam_data.sensor_width = cam_data.sensor_height = cameras.SENSOR_MM
    cam = bpy.data.objects.new("cam", cam_data)
    scene.collection.objects.link(cam)
    scene.camera = cam
    distance = PREVIEW_MARGIN / 2 / math.tan(cameras.FOV_RAD / 2)
    c2w = cameras.look_at_c2w(cameras.camera_position(azimuth_deg, PREVIEW_ELEVATION, distance))
    cam.matrix_world = Matrix(cameras.opencv_to_blender_camera(c2w).tolist())
    for name, energy, rot in (("key", 3.0, (50, 0, -30)), ("fill", 1.2, (60, 0, 140))):
        light = bpy.data.objects.new(name, bpy.data.lights.new(name, "SUN"))
        light.data.energy = energy
        light.rotation_euler = [math.radians(a) for a in rot]
        scene.collection.objects.link(light)
    world = bpy.data.worlds.new("w")
    world.use_nodes = True
    world.node_tree.nodes["Background"].inputs["Color"].default_value = (0.6, 0.6, 0.6, 1)
    scene.world = world
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = samples
    scene.cycles.seed = 0
    scene.cycles.use_denoising = True
    scene.render.resolution_x = scene.render.resolution_y = res
    scene.render.film_transparent = True
    scene.view_settings.view_transform = "Standard"
    scene.render.image_settings.file_format = "PNG"
    scene.render.image_settings.color_mode = "RGBA"
    scene.render.filepath = str(png_path)
    bpy.ops.render.render(write_still=True)


def make_preview(out_dir: Path, png_path: Path, res: int = 160, samples: int = 8, views=(0.0,),
                 chars: list[Character] | None = None) -> None:
    """One row per azimuth in ``views``, one column per character, composited on white and labelled."""
    import tempfile

    chars = chars or CHARACTERS
    tiles, labels = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for view in views:
            for c in chars:
                f = Path(tmp) / f"{c.name}_{int(view)}.png"
                _render_view(out_dir / f"{c.name}.{c.fmt}", f, view, res, samples)
                tiles.append(png.read_png(f))
                labels.append(c.name)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    png.write_png(png_path, contact_sheet(tiles, labels, columns=len(chars), cell=res))


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _reexec_with_fixed_hash_seed() -> None:
    """The FBX exporter derives its object UIDs from Python's hash() of name keys, which is salted per
    process. Re-run this module once with PYTHONHASHSEED=0 so that rebuilding gives the same FBX bytes."""
    if os.environ.get("PYTHONHASHSEED") == "0":
        return
    if __spec__ is None:
        sys.exit("run the sample builder as a module: make samples, or python -m chibisplat.tools.samples")
    env = dict(os.environ, PYTHONHASHSEED="0")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", __spec__.name, *sys.argv[1:]], env)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("data/assets"), help="output folder (default data/assets)")
    ap.add_argument("--only", nargs="*", help="build only these character names")
    ap.add_argument("--no-build", action="store_true", help="do not build; only --summary / --preview")
    ap.add_argument("--summary", type=Path, help="write a JSON summary of the re-imported assets here")
    ap.add_argument("--preview", type=Path, help="render a front-view montage PNG of the assets here")
    ap.add_argument("--preview-views", type=float, nargs="*", default=[0.0], help="azimuths (deg) of the rows")
    ap.add_argument("--preview-res", type=int, default=160)
    ap.add_argument("--preview-samples", type=int, default=8)
    args = ap.parse_args(argv)

    chars = [c for c in CHARACTERS if not args.only or c.name in args.only]
    if not args.no_build:
        for c in chars:
            build_character(c)
            p = export_character(c, args.out)
            print(f"[samples] wrote {p} ({p.stat().st_size / 1024:.1f} KB)", flush=True)
    if args.summary:
        data = {c.name: summarize(args.out / f"{c.name}.{c.fmt}") for c in chars}
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        print(f"[samples] summary -> {args.summary}", flush=True)
    if args.preview:
        make_preview(args.out, args.preview, args.preview_res, args.preview_samples, args.preview_views, chars)
        print(f"[samples] preview -> {args.preview}", flush=True)
    return 0


if __name__ == "__main__":
    _reexec_with_fixed_hash_seed()
    sys.exit(main())
