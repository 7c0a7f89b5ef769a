"""The bundled sample characters in data/assets (built by chibisplat/tools/samples.py, `make samples`).

The fast tests only read the committed files. The slow test rebuilds the samples in a subprocess
(bpy is never imported into the pytest process) and compares them with the committed ones: the same bytes for
the FBX and glTF files and the captions (they are DVC inputs: other bytes would re-render them), the same geometry
for the .blend (Blender stores session ids in it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "data" / "assets"
MAX_BYTES = 300 * 1024

# name -> format; must match chibisplat.tools.samples.CHARACTERS (which needs bpy to import)
EXPECTED = {
    "witch_girl": "fbx",
    "cat_girl": "fbx",
    "adventurer_boy": "fbx",
    "idol_girl": "fbx",
    "gamer_boy": "fbx",
    "bookworm_girl": "blend",
    "princess": "glb",
}
RIGGED = "adventurer_boy"


def _asset(name: str) -> Path:
    return ASSETS / f"{name}.{EXPECTED[name]}"


def test_seven_sample_characters_are_committed():
    assert len(EXPECTED) == 7
    missing = [str(_asset(n)) for n in EXPECTED if not _asset(n).is_file()]
    assert not missing, f"missing sample assets: {missing}"


def test_formats_mix():
    fmts = list(EXPECTED.values())
    assert fmts.count("blend") >= 1
    assert fmts.count("glb") >= 1
    assert all(f in ("fbx", "blend", "glb") for f in fmts)
    assert fmts.count("fbx") == len(fmts) - fmts.count("blend") - fmts.count("glb")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_asset_header_and_size(name):
    path = _asset(name)
    data = path.read_bytes()
    assert 0 < len(data) < MAX_BYTES, f"{path.name}: {len(data)} bytes (limit {MAX_BYTES})"
    fmt = EXPECTED[name]
    if fmt == "fbx":
        assert data.startswith(b"Kaydara FBX Binary"), f"{path.name} is not a binary FBX"
        version = int.from_bytes(data[23:27], "little")
        assert version >= 7100, f"{path.name}: FBX version {version} is too old for Blender's importer"
    elif fmt == "glb":
        assert data[:4] == b"glTF" and int.from_bytes(data[4:8], "little") == 2
        assert int.from_bytes(data[8:12], "little") == len(data)
    elif fmt == "blend":
        # plain .blend starts with "BLENDER"; a compressed one (compress=True) is a zstd frame
        assert data.startswith(b"BLENDER") or data[:4] == b"\x28\xb5\x2f\xfd"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_caption_sidecar(name):
    txt = ASSETS / f"{name}.txt"
    assert txt.is_file(), f"missing caption {txt}"
    lines = txt.read_text(encoding="utf-8").strip().splitlines()
    assert len(lines) == 1 and len(lines[0]) > 20, f"{txt.name}: expected one non-empty caption line"
    assert "chibi" in lines[0]


def test_file_names_are_snake_case():
    for name in EXPECTED:
        assert name == name.lower() and name.replace("_", "").isalnum()


def _summary(out_dir: Path, summary: Path, build: bool) -> dict:
    cmd = [sys.executable, "-m", "chibisplat.tools.samples", "--out", str(out_dir), "--summary", str(summary)]
    if not build:
        cmd.append("--no-build")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                              p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)))
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads(summary.read_text())


GEOMETRY_KEYS = ("format", "meshes", "vertices", "faces", "materials", "armatures", "bones",
                 "active_actions", "bbox_rest", "bbox_frame1", "eyes_minus_head_centre")


@pytest.mark.slow
def test_regenerated_samples_match_committed(tmp_path):
    new = _summary(tmp_path / "assets", tmp_path / "new.json", build=True)
    old = _summary(ASSETS, tmp_path / "committed.json", build=False)
    assert sorted(new) == sorted(old) == sorted(EXPECTED)
    for name in EXPECTED:
        for key in GEOMETRY_KEYS:
            got, want = new[name].get(key), old[name].get(key)
            assert got == want, f"{name}.{key}: regenerated {got} != committed {want}"
        assert (tmp_path / "assets" / f"{name}.txt").read_text() == (ASSETS / f"{name}.txt").read_text()
        if EXPECTED[name] != "blend":
            rebuilt, committed = tmp_path / "assets" / _asset(name).name, _asset(name)
            assert rebuilt.read_bytes() == committed.read_bytes(), f"{name}: rebuilt bytes differ from {committed}"

    # properties of the committed characters (as re-imported by Blender)
    for name, s in old.items():
        (x0, y0, z0), (x1, y1, z1) = s["bbox_rest"]
        assert abs(z0) < 1e-3, f"{name}: feet not on z=0"
        assert 0.9 < z1 < 1.4, f"{name}: unexpected height {z1}"
        assert s["eyes_minus_head_centre"][1] < -0.1, f"{name}: eyes are not on the -Y (front) side"
        assert 0.4 < s["head_height_fraction"] < 0.6 or name == "witch_girl"  # her hat is extra height
        assert s["bytes"] < MAX_BYTES
    rig = old[RIGGED]
    assert rig["armatures"] == 1 and rig["bones"] >= 4 and rig["active_actions"], rig
    rest_w = rig["bbox_rest"][1][0] - rig["bbox_rest"][0][0]
    posed_w = rig["bbox_frame1"][1][0] - rig["bbox_frame1"][0][0]
    assert rest_w > posed_w + 0.05, f"T-pose rest ({rest_w}) should be wider than the frame-1 pose ({posed_w})"
