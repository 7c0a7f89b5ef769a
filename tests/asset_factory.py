"""Small hand-made asset files for tests of the import paths (no Blender needed to write them)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

CUBE_VERTICES = [(x, y, z) for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]
# Quads as vertex indices into CUBE_VERTICES (index = 4x + 2y + z with 0/1 coordinates).
CUBE_QUADS = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]


def write_ascii_fbx(path: Path, size=(0.6, 0.4, 1.0)) -> Path:
    """A box as an ASCII FBX 7.4 file (Blender's Python FBX importer refuses ASCII; ufbx reads it)."""
    verts = ",".join(f"{x * size[0] / 2:g},{y * size[1] / 2:g},{z * size[2] / 2:g}" for x, y, z in CUBE_VERTICES)
    idx = ",".join(",".join(str(i) for i in q[:3]) + f",{-q[3] - 1}" for q in CUBE_QUADS)
    text = f"""; FBX 7.4.0 project file
; hand-written test file
FBXHeaderExtension:  {{
\tFBXHeaderVersion: 1003
\tFBXVersion: 7400
}}
GlobalSettings:  {{
\tVersion: 1000
\tProperties70:  {{
\t\tP: "UpAxis", "int", "Integer", "",2
\t\tP: "UpAxisSign", "int", "Integer", "",1
\t\tP: "FrontAxis", "int", "Integer", "",1
\t\tP: "FrontAxisSign", "int", "Integer", "",-1
\t\tP: "CoordAxis", "int", "Integer", "",0
\t\tP: "CoordAxisSign", "int", "Integer", "",1
\t\tP: "UnitScaleFactor", "double", "Number", "",100
\t}}
}}
Objects:  {{
\tGeometry: 1000, "Geometry::Box", "Mesh" {{
\t\tVertices: *{len(CUBE_VERTICES) * 3} {{
\t\t\ta: {verts}
\t\t}}
\t\tPolygonVertexIndex: *{len(CUBE_QUADS) * 4} {{
\t\t\ta: {idx}
\t\t}}
\t\tGeometryVersion: 124
\t}}
\tModel: 2000, "Model::Box", "Mesh" {{
\t\tVersion: 232
\t\tProperties70:  {{
\t\t}}
\t\tShading: T
\t\tCulling: "CullingOff"
\t}}
}}
Connections:  {{
\tC: "OO",1000,2000
\tC: "OO",2000,0
}}
"""
    path.write_text(text)
    return path


def write_gltf_without_mesh(path: Path) -> Path:
    """A valid glTF 2.0 scene that holds one empty node and no mesh."""
    gltf = {"asset": {"version": "2.0"}, "scene": 0, "scenes": [{"nodes": [0]}], "nodes": [{"name": "empty"}]}
    path.write_text(json.dumps(gltf))
    return path


def glb_chunks(data: bytes) -> tuple[dict, bytes]:
    """Split a GLB into its JSON dict and its BIN chunk (or b'')."""
    json_len = struct.unpack("<I", data[12:16])[0]
    gltf = json.loads(data[20 : 20 + json_len])
    rest = data[20 + json_len :]
    binary = rest[8 : 8 + struct.unpack("<I", rest[:4])[0]] if len(rest) >= 8 else b""
    return gltf, binary


def write_glb(path: Path, gltf: dict, binary: bytes) -> Path:
    js = json.dumps(gltf, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 4)
    binary += b"\0" * (-len(binary) % 4)
    chunks = struct.pack("<I4s", len(js), b"JSON") + js
    if binary:
        chunks += struct.pack("<I4s", len(binary), b"BIN\0") + binary
    path.write_bytes(struct.pack("<4sII", b"glTF", 2, 12 + len(chunks)) + chunks)
    return path


def vrm0_from_glb(glb: Path, out: Path) -> Path:
    """The same model tagged as VRM 0.x (which, by that spec, faces -Z in glTF)."""
    gltf, binary = glb_chunks(glb.read_bytes())
    gltf.setdefault("extensions", {})["VRM"] = {"specVersion": "0.0", "meta": {"title": "test"}}
    gltf.setdefault("extensionsUsed", []).append("VRM")
    return write_glb(out, gltf, binary)


# ----------------------------------------------------------------------------- meshes as GLB (materials, textures)


def _mesh_glb(path: Path, positions, normals, uvs, indices, material: dict, images: list[dict] | None = None) -> Path:
    """One mesh, one primitive, one material. ``material`` is a glTF material dict; ``images`` the glTF images
    (external ``uri`` entries stay external: the .glb then references files next to it)."""
    import numpy as np

    pos = np.asarray(positions, np.float32)
    arrays = [(pos, "VEC3", 5126, 34962), (np.asarray(normals, np.float32), "VEC3", 5126, 34962),
              (np.asarray(uvs, np.float32), "VEC2", 5126, 34962), (np.asarray(indices, np.uint32).ravel(), "SCALAR", 5125, 34963)]
    binary, views, accessors = b"", [], []
    for i, (a, kind, ctype, target) in enumerate(arrays):
        data = a.tobytes()
        views.append({"buffer": 0, "byteOffset": len(binary), "byteLength": len(data), "target": target})
        acc = {"bufferView": i, "componentType": ctype, "count": len(a), "type": kind}
        if i == 0:
            acc["min"], acc["max"] = pos.min(0).tolist(), pos.max(0).tolist()
        accessors.append(acc)
        binary += data + b"\0" * (-len(data) % 4)
    gltf = {
        "asset": {"version": "2.0"}, "scene": 0, "scenes": [{"nodes": [0]}], "nodes": [{"mesh": 0, "name": "body"}],
        "meshes": [{"primitives": [{"attributes": {"POSITION": 0, "NORMAL": 1, "TEXCOORD_0": 2}, "indices": 3,
                                    "material": 0}]}],
        "materials": [material], "accessors": accessors, "bufferViews": views, "buffers": [{"byteLength": len(binary)}],
    }
    if images:
        gltf["images"] = images
        gltf["textures"] = [{"source": i} for i in range(len(images))]
    return write_glb(path, gltf, binary)


def _cube_mesh(half=(0.5, 0.5, 0.5)):
    """24 vertices (flat normals per face, UVs 0..1 per face) and 12 triangles."""
    positions, normals, uvs, indices = [], [], [], []
    for axis in range(3):
        for sign in (-1.0, 1.0):
            n = [0.0, 0.0, 0.0]
            n[axis] = sign
            u_axis, v_axis = [a for a in range(3) if a != axis]
            base = len(positions)
            for du, dv in ((-1, -1), (1, -1), (1, 1), (-1, 1)):
                p = [0.0, 0.0, 0.0]
                p[axis], p[u_axis], p[v_axis] = sign * half[axis], du * half[u_axis], dv * half[v_axis]
                positions.append(p)
                normals.append(list(n))
                uvs.append([(du + 1) / 2, (dv + 1) / 2])
            quad = [(0, 1, 2), (0, 2, 3)] if sign > 0 else [(0, 2, 1), (0, 3, 2)]
            if axis == 1:  # the cyclic (u, v, n) order flips for the y faces
                quad = [(a, c, b) for a, b, c in quad]
            indices += [[base + a, base + b, base + c] for a, b, c in quad]
    return positions, normals, uvs, indices


def _sphere_mesh(rings: int = 24, segments: int = 48):
    import math

    positions, normals, uvs, indices = [], [], [], []
    for r in range(rings + 1):
        theta = math.pi * r / rings
        for s in range(segments + 1):
            phi = 2 * math.pi * s / segments
            n = [math.sin(theta) * math.cos(phi), math.cos(theta), math.sin(theta) * math.sin(phi)]
            positions.append([0.5 * c for c in n])
            normals.append(n)
            uvs.append([s / segments, r / rings])
    for r in range(rings):
        for s in range(segments):
            a, b = r * (segments + 1) + s, (r + 1) * (segments + 1) + s
            indices += [[a, a + 1, b], [a + 1, b + 1, b]]
    return positions, normals, uvs, indices


def write_diffuse_glb(path: Path, shape: str = "sphere", base_color=(1.0, 1.0, 1.0)) -> Path:
    """A white (or ``base_color``) purely diffuse sphere or cube: metallic 0, roughness 1, no texture."""
    mesh = _sphere_mesh() if shape == "sphere" else _cube_mesh()
    material = {"name": "diffuse", "pbrMetallicRoughness": {"baseColorFactor": [*base_color, 1.0], "metallicFactor": 0.0,
                                                            "roughnessFactor": 1.0}}
    return _mesh_glb(path, *mesh, material)


def write_textured_glb(path: Path, texture_uri: str = "textures/skin.png", base_color=(0.15, 0.55, 0.2)) -> Path:
    """A box whose base colour texture is an external file (``texture_uri``, relative to the .glb, not written
    here): a .glb can keep images outside its binary chunk. ``base_color`` is the material's baseColorFactor."""
    material = {"name": "skin", "pbrMetallicRoughness": {"baseColorTexture": {"index": 0}, "metallicFactor": 0.0,
                                                         "roughnessFactor": 0.9, "baseColorFactor": [*base_color, 1.0]}}
    return _mesh_glb(path, *_cube_mesh((0.3, 0.2, 0.5)), material, images=[{"uri": texture_uri, "name": "skin"}])


def write_texture_png(path: Path, rgb=(230, 230, 230), size: int = 8) -> Path:
    """A plain RGB texture image."""
    import numpy as np

    from chibisplat import png

    path.parent.mkdir(parents=True, exist_ok=True)
    png.write_png(path, np.tile(np.array(rgb, np.uint8), (size, size, 1)))
    return path
