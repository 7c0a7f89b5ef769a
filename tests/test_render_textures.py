"""Missing textures (issue 10, item 1): never magenta; external files are part of an asset's cache key.

Fast tests check the cache key without Blender; slow ones render a .glb whose texture lives in textures/."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from asset_factory import write_ascii_fbx, write_diffuse_glb, write_texture_png, write_textured_glb
from conftest import render_params

from chibisplat import png
from chibisplat.identity import sha256_file, sha256_sources
from chibisplat.render.references import fbx_image_paths, referenced_files
from chibisplat.render.stage import run_render_stage, source_files

QUIET = dict(log=lambda *_: None)


def magenta_pixels(folder: Path) -> int:
    """Pixels that look like Blender's missing-texture placeholder over the 40 views: R>200, G<60, B>200."""
    n = 0
    for i in range(40):
        rgba = png.read_png(folder / f"{i:05d}.png")
        r, g, b, a = (rgba[..., c].astype(int) for c in range(4))
        n += int(((r > 200) & (g < 60) & (b > 200) & (a > 0)).sum())
    return n


def _key(asset: Path, scratch: Path | None = None) -> str:
    files = source_files(asset, scratch)
    return sha256_sources(files[0], files[1:])


# ----------------------------------------------------------------------------- fast: the cache key


def test_glb_external_texture_is_part_of_its_key_and_only_its_key(tmp_path):
    glb = write_textured_glb(tmp_path / "boxy.glb", texture_uri="textures/my%20skin.png")  # URI-encoded space
    other = write_diffuse_glb(tmp_path / "ball.glb")
    missing_key, other_key = _key(glb), _key(other)
    assert missing_key == sha256_file(glb)  # nothing external exists: the key is the file's own sha256
    tex = write_texture_png(tmp_path / "textures" / "my skin.png", (200, 40, 40))
    assert referenced_files(glb) == [tex.resolve()]
    with_tex = _key(glb)
    assert with_tex != missing_key
    write_texture_png(tex, (40, 200, 40))  # changed texture -> changed key
    assert _key(glb) not in (with_tex, missing_key)
    assert _key(other) == other_key  # the other character's key never moved
    # Independent recomputation of the documented hash: per file, relative name, size, sha256.
    import hashlib

    h = hashlib.sha256()
    for name, p in (("boxy.glb", glb), ("textures/my skin.png", tex)):
        h.update(len(name.encode()).to_bytes(4, "little") + name.encode())
        h.update(p.stat().st_size.to_bytes(8, "little") + bytes.fromhex(sha256_file(p)))
    assert _key(glb) == h.hexdigest()


def test_gltf_buffers_and_data_uris(tmp_path):
    gltf = tmp_path / "a.gltf"
    gltf.write_text(json.dumps({"asset": {"version": "2.0"}, "buffers": [{"uri": "a.bin", "byteLength": 4},
                                                                        {"uri": "data:application/octet-stream;base64,AAAA"}],
                                "images": [{"uri": "tex/b.png"}]}))
    (tmp_path / "a.bin").write_bytes(b"1234")
    assert referenced_files(gltf) == [(tmp_path / "a.bin").resolve()]
    write_texture_png(tmp_path / "tex" / "b.png")
    assert referenced_files(gltf) == [(tmp_path / "a.bin").resolve(), (tmp_path / "tex" / "b.png").resolve()]


def _binary_fbx_with_texture_paths(path: Path, relative: str, absolute: str) -> Path:
    """Bytes shaped like a binary FBX's Texture node: length-prefixed 'S' string properties (the real importer is
    not needed to find the paths, only the stored strings)."""
    def prop(text: str) -> bytes:
        data = text.encode()
        return b"S" + struct.pack("<I", len(data)) + data

    body = b"\x00" * 13 + b"\x07Texture" + prop("skin.png\x00\x01Texture") + prop("TextureVideoClip")
    body += b"\x00" * 9 + b"\x10RelativeFilename" + prop(relative) + b"\x00" * 9 + b"\x08FileName" + prop(absolute)
    path.write_bytes(b"Kaydara FBX Binary  \x00\x1a\x00" + struct.pack("<I", 7400) + body + b"\x00" * 160)
    return path


def test_fbx_texture_paths_binary_and_ascii(tmp_path):
    fbx = _binary_fbx_with_texture_paths(tmp_path / "hero.fbx", "tex\\skin.png", "C:\\Users\\artist\\hero\\tex\\skin.png")
    assert fbx_image_paths(fbx.read_bytes()) == ["skin.png", "tex\\skin.png", "C:\\Users\\artist\\hero\\tex\\skin.png"]
    ascii_fbx = write_ascii_fbx(tmp_path / "box.fbx")
    ascii_fbx.write_text(ascii_fbx.read_text() + '\tVideo: 3000, "Video::skin", "Clip" {\n'
                         '\t\tRelativeFilename: "textures\\face.jpg"\n\t\tFilename: "/abs/textures/face.jpg"\n\t}\n')
    assert fbx_image_paths(ascii_fbx.read_bytes()) == ["textures\\face.jpg", "/abs/textures/face.jpg"]


def test_fbx_texture_next_to_it_in_fbm_or_found_by_name_changes_only_its_key(tmp_path):
    assets = tmp_path / "assets"
    (assets / "heroes").mkdir(parents=True)
    fbx = _binary_fbx_with_texture_paths(assets / "heroes" / "hero.fbx", "tex\\skin.png", "C:\\x\\skin.png")
    other = write_ascii_fbx(assets / "box.fbx")
    other_key = _key(other)
    k0 = _key(fbx)
    assert k0 == sha256_file(fbx)
    # 1. by name anywhere below the FBX's folder (Blender's image search)
    write_texture_png(assets / "heroes" / "deep" / "skin.png", (1, 2, 3))
    k1 = _key(fbx)
    assert referenced_files(fbx) == [(assets / "heroes" / "deep" / "skin.png").resolve()]
    # 2. at the stored relative path: that one is used (the search is not needed any more)
    write_texture_png(assets / "heroes" / "tex" / "skin.png", (4, 5, 6))
    k2 = _key(fbx)
    assert referenced_files(fbx) == [(assets / "heroes" / "tex" / "skin.png").resolve()]
    # 3. anything in the .fbm folder
    write_texture_png(assets / "heroes" / "hero.fbm" / "normal.png", (7, 8, 9))
    k3 = _key(fbx)
    assert len({k0, k1, k2, k3}) == 4
    assert _key(other) == other_key


# ----------------------------------------------------------------------------- slow: Blender renders


@pytest.mark.slow
def test_missing_texture_fails_base_color_is_never_magenta_and_texture_back_rerenders_one(tmp_path):
    assets = tmp_path / "assets"
    assets.mkdir()
    factor = (0.15, 0.55, 0.2)  # the material's own base colour: green
    write_textured_glb(assets / "boxy.glb", "textures/skin.png", base_color=factor)
    # Factor 1 (the texture alone gives the colour): Blender's placeholder would show as pure magenta here.
    write_textured_glb(assets / "plain.glb", "textures/plain.png", base_color=(1.0, 1.0, 1.0))
    write_diffuse_glb(assets / "ball.glb", base_color=(0.6, 0.6, 0.6))

    # Default: the character fails and the report lists the missing file and what to do.
    params = render_params(tmp_path, resolution=32, samples=2)
    assert params["missing_textures"] == "fail"
    report = run_render_stage(params, **QUIET)
    entry = {e["source"]: e for e in report["characters"]}["boxy.glb"]
    assert entry["status"] == "failed"
    assert "textures/skin.png" in entry["reason"] and "missing" in entry["reason"]
    assert "base_color" in entry["action"] and "put the listed files" in entry["action"]
    assert not (tmp_path / "renders" / "boxy").exists()
    assert report["counts"] == {"rendered": 1, "cached": 0, "failed": 2, "removed": 0}

    # base_color: rendered with the material's base colour (green, not magenta, not the 0.8 grey default).
    params = render_params(tmp_path, resolution=32, samples=2, missing_textures="base_color")
    report = run_render_stage(params, **QUIET)
    assert report["counts"]["failed"] == 0
    boxy = tmp_path / "renders" / "boxy"
    assert magenta_pixels(boxy) == 0 and magenta_pixels(tmp_path / "renders" / "plain") == 0
    plain = png.read_png(tmp_path / "renders" / "plain" / "00000.png")
    grey = plain[..., :3][plain[..., 3] == 255].astype(float).mean(0)
    assert np.ptp(grey) < 3 and grey.min() > 60, grey  # the Principled default (0.8 grey), lit
    front = png.read_png(boxy / "00000.png")
    mean = front[..., :3][front[..., 3] == 255].mean(0)
    assert mean[1] > 1.5 * mean[0] and mean[1] > 1.5 * mean[2], mean  # the hue of the factor (0.15, 0.55, 0.2)
    meta = json.loads((boxy / "meta.json").read_text())
    assert any("textures/skin.png" in w and "base colour" in w for w in meta["warnings"])
    before = {p.relative_to(tmp_path).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
              for uid in ("ball", "plain") for p in (tmp_path / "renders" / uid).iterdir()}

    # The texture appears: exactly that character re-renders, now with the texture (red x green factor).
    write_texture_png(assets / "textures" / "skin.png", (250, 40, 40))
    report = run_render_stage(params, **QUIET)
    assert report["counts"] == {"rendered": 1, "cached": 2, "failed": 0, "removed": 0}
    assert [e["uid"] for e in report["characters"] if e["status"] == "rendered"] == ["boxy"]
    after = {p.relative_to(tmp_path).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
             for uid in ("ball", "plain") for p in (tmp_path / "renders" / uid).iterdir()}
    assert after == before
    meta = json.loads((boxy / "meta.json").read_text())
    assert meta["external_files"] == ["textures/skin.png"] and meta["warnings"] == []
    front = png.read_png(boxy / "00000.png")
    textured = front[..., :3][front[..., 3] == 255].mean(0)
    assert textured[0] > textured[2] and textured[1] < 0.6 * mean[1], (textured, mean)
    # Changing the texture's bytes re-renders it again, and nothing else.
    write_texture_png(assets / "textures" / "skin.png", (40, 40, 250))
    report = run_render_stage(params, **QUIET)
    assert [e["uid"] for e in report["characters"] if e["status"] == "rendered"] == ["boxy"]


@pytest.mark.slow
def test_blend_external_image_is_part_of_its_key(tmp_path):
    """A .blend that uses an image file next to it (relative '//' path): the Blender query finds it, the answer is
    cached by the .blend's sha256, and changing the image changes only this .blend's key."""
    assets = tmp_path / "assets"
    assets.mkdir()
    tex = write_texture_png(assets / "maps" / "wood.png", (120, 80, 40))
    blend = assets / "chair.blend"
    maker = f"""
import bpy
bpy.ops.wm.read_factory_settings(use_empty=True)
bpy.ops.mesh.primitive_cube_add(size=1)
img = bpy.data.images.load({str(tex)!r})
mat = bpy.data.materials.new("wood")
node = mat.node_tree.nodes.new("ShaderNodeTexImage")
node.image = img
bpy.context.active_object.data.materials.append(mat)
bpy.ops.wm.save_as_mainfile(filepath={str(blend)!r}, relative_remap=True)
"""
    subprocess.run([sys.executable, "-c", maker], check=True, capture_output=True)
    scratch = tmp_path / "scratch"
    assert referenced_files(blend, scratch) == [tex.resolve()]
    cached = list((scratch / "blend_refs").glob("*.json"))
    assert [p.stem for p in cached] == [sha256_file(blend)]
    assert json.loads(cached[0].read_text())["paths"] == ["//maps/wood.png"]  # stored relative to the .blend
    k1 = _key(blend, scratch)
    write_texture_png(tex, (10, 10, 10))
    assert _key(blend, scratch) != k1
    shutil.move(tex, tmp_path / "wood.png")  # gone: the key falls back to the .blend's own bytes
    assert _key(blend, scratch) == sha256_file(blend)


@pytest.mark.slow
def test_shared_kenney_missing_atlas_fails_by_default_and_is_not_magenta_with_base_color(tmp_path):
    """The CC0 Kenney character references Textures/colormap.png, which is not shipped with it."""
    from conftest import shared_asset

    (tmp_path / "assets").mkdir()
    shutil.copy(shared_asset("kenney_platformer_character.glb"), tmp_path / "assets" / "kenney.glb")
    report = run_render_stage(render_params(tmp_path, resolution=32, samples=1), **QUIET)
    entry = report["characters"][0]
    assert entry["status"] == "failed" and "Textures/colormap.png" in entry["reason"]
    report = run_render_stage(render_params(tmp_path, resolution=32, samples=1, missing_textures="base_color"), **QUIET)
    assert report["characters"][0]["status"] == "rendered"
    assert magenta_pixels(tmp_path / "renders" / "kenney") == 0
    rgba = np.concatenate([png.read_png(tmp_path / "renders" / "kenney" / f"{i:05d}.png").reshape(-1, 4) for i in range(40)])
    fg = rgba[rgba[:, 3] == 255, :3].astype(int)
    assert np.abs(fg[:, 0] - fg[:, 2]).mean() < 3  # the Principled default grey (the material's factor is 1)
