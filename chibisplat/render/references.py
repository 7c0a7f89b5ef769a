"""The external files an asset references (textures, buffers, linked libraries), found without running Blender
in the stage process, so that they are part of the asset's cache key (``identity.sha256_sources``).

- glTF / GLB / VRM: the ``uri`` of every buffer and image in the JSON (a .glb can keep images outside its
  binary chunk), URI-decoded, relative to the file's folder; ``data:`` URIs are inside the file.
- FBX: every file the importer may read: the ``<stem>.fbm/`` folder, and each image path stored in the FBX
  (Texture/Video ``FileName``/``RelativeFilename``, binary or ASCII) looked up the way Blender's importer does
  (as stored, relative to the FBX, by name next to the FBX or in the .fbm folder; a name found nowhere there is
  searched anywhere below the FBX's folder, ``use_image_search``). Without a full FBX parser, strings are not
  paired with their Texture node: every stored image path counts, so the key may cover a file the importer does
  not end up using (a spare re-render of this character, never a missed one).
- .blend: the file paths of its external (not packed) images, fonts, volumes, cache files and linked libraries
  (followed recursively). A .blend cannot be parsed reliably without Blender, so a short Blender query lists them
  once per .blend content (sha256) and the answer is cached in ``<scratch>/blend_refs/<sha256>.json``.

Only files that exist are returned: a referenced file that appears later changes the list, hence the key.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

from chibisplat.files import write_atomic
from chibisplat.identity import sha256_file
from chibisplat.render.errors import AssetError
from chibisplat.render.formats import read_gltf_json

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "tga", "bmp", "tif", "tiff", "dds", "exr", "hdr", "psd", "gif", "webp",
                    "ktx", "ktx2", "tx")
# A run of path characters ending in an image extension: binary FBX stores strings as length-prefixed bytes (the
# length's high bytes are 0, which ends the run), ASCII FBX in double quotes.
_FBX_IMAGE_PATH = re.compile(
    rb'[^\x00-\x1f"<>|*?\x7f]+?\.(?:' + "|".join(IMAGE_EXTENSIONS).encode() + rb')(?![A-Za-z0-9_])', re.IGNORECASE
)
BLEND_QUERY_TIMEOUT_S = 300
_BLEND_DEPTH = 8

_BLEND_QUERY = r"""
import json, sys
import bpy
bpy.context.preferences.filepaths.use_scripts_auto_execute = False
bpy.ops.wm.open_mainfile(filepath=sys.argv[1], load_ui=False, use_scripts=False)
paths = []
for img in bpy.data.images:
    if img.source in {"FILE", "SEQUENCE", "TILED", "MOVIE"} and img.packed_file is None and img.filepath:
        paths.append(img.filepath)
for coll in (bpy.data.fonts, bpy.data.volumes, bpy.data.cache_files, bpy.data.sounds, bpy.data.movieclips):
    for item in coll:
        if getattr(item, "packed_file", None) is None and item.filepath and item.filepath != "<builtin>":
            paths.append(item.filepath)
libraries = [lib.filepath for lib in bpy.data.libraries if lib.filepath]
with open(sys.argv[2], "w") as f:
    json.dump({"paths": sorted(set(paths)), "libraries": sorted(set(libraries))}, f)
"""


def referenced_files(asset: Path, scratch: Path | None = None) -> list[Path]:
    """Existing external files ``asset`` references, sorted by path, without the asset itself."""
    suffix = asset.suffix.lower()
    if suffix in (".gltf", ".glb", ".vrm"):
        found = _gltf_references(asset)
    elif suffix == ".fbx":
        found = _fbx_references(asset)
    elif suffix == ".blend":
        found = _blend_references(asset, scratch)
    else:
        found = set()
    me = asset.resolve()
    return sorted({p.resolve() for p in found if p.is_file()} - {me}, key=lambda p: p.as_posix())


def _gltf_references(asset: Path) -> set[Path]:
    try:
        gltf = read_gltf_json(asset)
    except (AssetError, ValueError, UnicodeDecodeError, OSError):
        return set()  # the worker reports the broken file
    found = set()
    for entry in list(gltf.get("buffers") or []) + list(gltf.get("images") or []):
        uri = entry.get("uri") if isinstance(entry, dict) else None
        if isinstance(uri, str) and uri and not uri.startswith("data:"):
            found.add(asset.parent / unquote(uri))
    return found


def fbx_image_paths(data: bytes) -> list[str]:
    """The image file paths stored in an FBX file's bytes (binary or ASCII), in order, without duplicates."""
    out = []
    for m in _FBX_IMAGE_PATH.finditer(data):
        text = m.group(0).decode("utf-8", errors="replace").strip()
        if text and text not in out:
            out.append(text)
    return out


def _fbx_references(asset: Path) -> set[Path]:
    folder = asset.parent
    fbm = asset.with_suffix(".fbm")
    found = set(p for p in fbm.rglob("*") if p.is_file()) if fbm.is_dir() else set()
    by_name: dict[str, bool] = {}  # file name -> found at a stored path
    for stored in fbx_image_paths(asset.read_bytes()):
        norm = stored.replace("\\", "/")
        name = norm.rsplit("/", 1)[-1]
        candidates = [folder / norm, folder / name, fbm / name]
        if Path(norm).is_absolute():
            candidates.insert(0, Path(norm))
        direct = [c for c in candidates if c.is_file()]
        found.update(direct)
        by_name[name] = by_name.get(name, False) or bool(direct)
    unresolved = {name for name, hit in by_name.items() if not hit}
    if unresolved:  # Blender's image search: by file name anywhere below the FBX's folder
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found.update(Path(root) / f for f in files if f in unresolved)
    return found


def _resolve_blend_path(stored: str, blend: Path) -> Path:
    if stored.startswith("//"):
        return (blend.parent / stored[2:].replace("\\", "/")).resolve()
    return Path(stored)


def blend_query(blend: Path, scratch: Path | None) -> dict:
    """{"paths": [...], "libraries": [...]} as stored in the .blend (``//`` = relative to it); cached by sha256."""
    sha = sha256_file(blend)
    cache = (scratch / "blend_refs" / f"{sha}.json") if scratch is not None else None
    if cache is not None and cache.is_file():
        try:
            return json.loads(cache.read_text())
        except ValueError:
            pass
    out_dir = (scratch / "blend_refs") if scratch is not None else blend.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{sha}.{os.getpid()}.json"
    try:
        proc = subprocess.run([sys.executable, "-c", _BLEND_QUERY, str(blend), str(tmp)], capture_output=True,
                              timeout=BLEND_QUERY_TIMEOUT_S, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        answer = json.loads(tmp.read_text()) if proc.returncode == 0 and tmp.is_file() else None
    except (subprocess.TimeoutExpired, ValueError, OSError):
        answer = None
    finally:
        tmp.unlink(missing_ok=True)
    if answer is None:
        return {"paths": [], "libraries": [], "error": True}  # an unreadable .blend: the worker reports it
    if cache is not None:
        write_atomic(cache, json.dumps(answer, sort_keys=True))
    return answer


def _blend_references(blend: Path, scratch: Path | None, depth: int = 0, seen: set | None = None) -> set[Path]:
    seen = set() if seen is None else seen
    seen.add(blend.resolve())
    answer = blend_query(blend, scratch)
    found = {_resolve_blend_path(p, blend) for p in answer.get("paths", [])}
    for lib in answer.get("libraries", []):
        path = _resolve_blend_path(lib, blend)
        found.add(path)
        if path.is_file() and path.resolve() not in seen and depth < _BLEND_DEPTH:
            found |= _blend_references(path, scratch, depth + 1, seen)
    return found
