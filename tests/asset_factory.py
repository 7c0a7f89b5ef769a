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
