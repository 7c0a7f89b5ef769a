"""PLY files in the standard 3DGS layout (DiffSplat ``save_ply(compatible=True)``; docs/diffsplat-reference.md §8).

Vertex properties, in order: ``x y z f_dc_0 f_dc_1 f_dc_2 opacity scale_0 scale_1 scale_2 rot_0..rot_3``
(float32, pre-activation values as 3DGS viewers expect: logit opacity, log scale, SH-DC colour) and
``red green blue`` (uint8) for viewers that only read point colours. Binary little endian.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from chibisplat.splats.splatter import Gaussians

SH_C0 = 0.28209479177387814  # degree-0 spherical harmonic: colour = 0.5 + SH_C0 * f_dc
FLOAT_FIELDS = ("x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
                "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3")
COLOR_FIELDS = ("red", "green", "blue")
VERTEX_DTYPE = np.dtype([(f, "<f4") for f in FLOAT_FIELDS] + [(f, "u1") for f in COLOR_FIELDS])
LOGIT_EPS = 1e-6  # keeps the logit of opacity 0 or 1 finite
SCALE_EPS = 1e-8  # DiffSplat: log(scale + 1e-8)


def write_ply(path: Path, gaussians: Gaussians, opacity_threshold: float = 0.0) -> int:
    """Write Gaussians with opacity > ``opacity_threshold``; returns how many were written.

    Byte-compatible with DiffSplat's ``save_ply(compatible=True)``: every value computed in float32 as it does
    (logit ``log(o / (1 - o))`` of the opacity clamped to [1e-6, 1 - 1e-6], ``log(scale + 1e-8)``,
    ``(rgb - 0.5) / SH_C0``), and the uint8 colours TRUNCATED: ``uint8(clip(rgb * 255, 0, 255))``.
    """
    keep = gaussians.opacities.detach() > opacity_threshold
    g = gaussians.select(keep)

    def f32(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", torch.float32)

    rgb = f32(g.colors)
    opacity = f32(g.opacities).clamp(LOGIT_EPS, 1.0 - LOGIT_EPS)
    logit = torch.log(opacity / (1.0 - opacity)).numpy()
    scale = torch.log(f32(g.scales) + SCALE_EPS).numpy()
    f_dc = (rgb - 0.5).numpy() / np.float32(SH_C0)
    rgb8 = (rgb.numpy() * np.float32(255.0)).clip(0.0, 255.0).astype(np.uint8)  # truncation, as DiffSplat
    xyz, rot = f32(g.means).numpy(), f32(g.quats).numpy()
    v = np.empty(len(g), dtype=VERTEX_DTYPE)
    for i, axis in enumerate("xyz"):
        v[axis] = xyz[:, i]
    for i in range(3):
        v[f"f_dc_{i}"] = f_dc[:, i]
        v[f"scale_{i}"] = scale[:, i]
    for i in range(4):
        v[f"rot_{i}"] = rot[:, i]
    v["opacity"] = logit
    for i, f in enumerate(COLOR_FIELDS):
        v[f] = rgb8[:, i]
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {len(g)}"]
    header += [f"property float {f}" for f in FLOAT_FIELDS] + [f"property uchar {f}" for f in COLOR_FIELDS]
    header.append("end_header")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(("\n".join(header) + "\n").encode("ascii"))
        fh.write(v.tobytes())
    return len(g)


_PLY_TYPES = {"float": "<f4", "float32": "<f4", "double": "<f8", "uchar": "u1", "uint8": "u1", "int": "<i4", "uint": "<u4", "short": "<i2", "ushort": "<u2", "char": "i1"}


def read_ply(path: Path, dtype: torch.dtype = torch.float32) -> Gaussians:
    """Read a binary little-endian 3DGS PLY (ours or any file with the same float fields)."""
    path = Path(path)
    data = path.read_bytes()
    end = data.find(b"end_header\n")
    if not data.startswith(b"ply") or end < 0:
        raise ValueError(f"{path}: not a PLY file")
    lines = data[:end].decode("ascii").splitlines()
    if "format binary_little_endian 1.0" not in lines:
        raise ValueError(f"{path}: only binary_little_endian PLY is supported")
    count, fields = 0, []
    for line in lines:
        parts = line.split()
        if parts[:2] == ["element", "vertex"]:
            count = int(parts[2])
        elif parts[:1] == ["property"] and len(parts) == 3:
            if parts[1] not in _PLY_TYPES:
                raise ValueError(f"{path}: unsupported property type {parts[1]!r}")
            fields.append((parts[2], _PLY_TYPES[parts[1]]))
    v = np.frombuffer(data, dtype=np.dtype(fields), count=count, offset=end + len(b"end_header\n"))
    missing = [f for f in FLOAT_FIELDS if f not in v.dtype.names]
    if missing:
        raise ValueError(f"{path}: missing 3DGS properties {missing}")

    def col(*names):
        return torch.from_numpy(np.stack([v[n].astype(np.float64) for n in names], axis=-1)).to(dtype)

    return Gaussians(
        means=col("x", "y", "z"),
        quats=col("rot_0", "rot_1", "rot_2", "rot_3"),
        scales=torch.exp(col("scale_0", "scale_1", "scale_2")),
        opacities=torch.sigmoid(col("opacity")[:, 0]),
        colors=col("f_dc_0", "f_dc_1", "f_dc_2") * SH_C0 + 0.5,
    )
