"""Recognising asset files without Blender: FBX flavour and version, glTF JSON, VRM version."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from chibisplat.render.errors import AssetError

FBX_BINARY_MAGIC = b"Kaydara FBX Binary  \x00"
LEGACY_FBX_MIN_VERSION = 7100  # Blender's Python FBX importer rejects older binary files


def sniff_fbx(path: Path) -> tuple[str, int]:
    """('binary', version) or ('ascii', version or 0); raises AssetError for anything else."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        raise AssetError("the file is empty", "re-export the asset from its DCC tool")
    if head.startswith(FBX_BINARY_MAGIC):
        if len(head) < 27:
            raise AssetError("binary FBX header is truncated", "re-export or re-download the file")
        return "binary", struct.unpack("<I", head[23:27])[0]
    text = head.decode("latin-1", errors="replace")
    if text.lstrip().startswith(";") and "FBX" in text[:200] or "FBXHeaderExtension" in text:
        version = 0
        marker = text.find("FBXVersion:")
        if marker >= 0:
            digits = "".join(ch for ch in text[marker + 11 : marker + 20] if ch.isdigit())
            version = int(digits) if digits else 0
        return "ascii", version
    raise AssetError(
        "not an FBX file (no binary 'Kaydara FBX Binary' header and no ASCII FBX header); the file is corrupt or "
        "has the wrong extension",
        "re-export the asset as binary FBX (FBX 2014/7.4 or newer) or check that the download is complete",
    )


def read_gltf_json(path: Path) -> dict:
    """The JSON chunk of a .glb/.vrm or the whole .gltf."""
    data = Path(path).read_bytes()
    if not data:
        raise AssetError("the file is empty", "re-export the asset")
    if data[:4] == b"glTF":
        if len(data) < 20:
            raise AssetError("GLB header is truncated", "re-export or re-download the file")
        length, chunk_type = struct.unpack("<I4s", data[12:20])
        if chunk_type != b"JSON":
            raise AssetError("GLB has no JSON chunk", "re-export the asset as glTF 2.0 binary")
        return json.loads(data[20 : 20 + length])
    try:
        return json.loads(data)
    except ValueError:
        raise AssetError("neither a binary GLB nor glTF JSON", "re-export the asset as glTF 2.0 (.glb)") from None


def vrm_major_version(gltf: dict) -> int | None:
    ext = gltf.get("extensions", {}) or {}
    if "VRMC_vrm" in ext:
        return 1
    if "VRM" in ext:
        return 0
    return None
