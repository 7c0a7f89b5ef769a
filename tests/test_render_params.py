"""The render stage's inputs (issue 10, items 2 and 9): invalid `render:` values stop the stage before any work,
with the key and the allowed values; files that look like characters are never skipped silently; the closing
message is true to the counts. No Blender involved."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import REPO, render_params

from chibisplat.render.options import RenderParamsError, srgb_encode, validate_render_params, white_response
from chibisplat.render.stage import run_render_stage
from stages.render import summary

QUIET = dict(log=lambda *_: None)


def _sun(az, el, e):
    return {"azimuth": az, "elevation": el, "energy": e}


@pytest.mark.parametrize(
    "change, key, allowed",
    [
        ({"resolution": -5}, "render.resolution", "[8, 4096]"),
        ({"resolution": 64.5}, "render.resolution", "an integer"),
        ({"samples": 0}, "render.samples", "[1, 65536]"),
        ({"pose": "sideways"}, "render.pose", "'rest' or 'frame:<n>'"),
        ({"pose": "frame:x"}, "render.pose", "'rest' or 'frame:<n>'"),
        ({"missing_textures": "warn"}, "render.missing_textures", "fail, base_color"),
        ({"missing_textures": "magenta"}, "render.missing_textures", "fail, base_color"),
        ({"engine": "BLENDER_EEVEE"}, "render.engine", "CYCLES"),
        ({"device": "gpu"}, "render.device", "auto, CPU, OPTIX"),
        ({"denoise": "yes"}, "render.denoise", "true, false"),
        ({"workers": 0}, "render.workers", "[1, 256]"),
        ({"resolutoin": 64}, "render.resolutoin", "did you mean 'resolution'"),
        ({"cameras": {"ring_a_elevation": 95.0, "ring_b_elevation": 0.0, "ring_a_distance": 1.6, "ring_b_distance": 2.0}},
         "render.cameras.ring_a_elevation", "[-89.9, 89.9]"),
        ({"cameras": {"ring_a_elevation": 20.0, "ring_b_elevation": 0.0, "ring_a_distance": 0.5, "ring_b_distance": 2.0}},
         "render.cameras.ring_a_distance", "(0.866025"),
        ({"lights": {"world_strength": 0.3, "suns": [{"azimuth": 0.0, "elevation": 45.0, "energy": -1.0}]}},
         "render.lights.suns[0].energy", "[0, 1000]"),
        ({"lights": {"world_strength": 0.3, "sun": []}}, "render.lights.sun", "did you mean 'suns'"),
        # The pre-issue-10 rig: a white surface reached 1.64 linear (clipped).
        ({"lights": {"world_strength": 0.6, "suns": [_sun(30.0, 45.0, 2.5), _sun(-120.0, 30.0, 1.2), _sun(180.0, 60.0, 1.0)]}},
         "render.lights", "above the allowed 0.9"),
    ],
)
def test_invalid_render_values_fail_before_any_work(tmp_path, change, key, allowed):
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "a.glb").write_bytes(b"not rendered")
    renders = tmp_path / "renders"
    (renders / "old").mkdir(parents=True)
    (renders / "old" / "meta.json").write_text("{}")  # an existing output of an asset that is gone
    params = render_params(tmp_path)
    params.update(change)
    with pytest.raises(RenderParamsError) as info:
        run_render_stage(params, **QUIET)
    message = str(info.value)
    assert message.startswith(key) and allowed in message, message
    # Nothing touched: the stale render would have been removed by a run, and no report or scratch was written.
    assert (renders / "old" / "meta.json").read_text() == "{}"
    assert not (tmp_path / "reports").exists() and not (tmp_path / ".cache").exists()


def test_warn_migration_names_the_new_choices():
    params = render_params(REPO / "unused", missing_textures="warn")
    with pytest.raises(RenderParamsError, match="'warn' is no longer accepted.*magenta.*fail, base_color"):
        validate_render_params(params)


def test_repository_params_are_valid_and_default_to_fail():
    params = render_params(REPO / "unused")
    validate_render_params(params)
    assert params["missing_textures"] == "fail"


def test_white_response_by_hand():
    """world + sum(E cos / pi) at the brightest normal, for rigs where it is known in closed form."""
    one = {"world_strength": 0.2, "suns": [_sun(0.0, 90.0, math.pi)]}  # straight down, E = pi: 1.0 at the top
    assert white_response(one) == pytest.approx(1.2, abs=1e-9)
    opposite = {"world_strength": 0.0, "suns": [_sun(0.0, 0.0, 2.0), _sun(180.0, 0.0, 1.0)]}  # never both lit
    assert white_response(opposite) == pytest.approx(2.0 / math.pi, abs=1e-9)
    # 90 degrees apart, equal energy: the bisector sees both at cos 45: 2 * E * 0.7071 / pi.
    square = {"world_strength": 0.1, "suns": [_sun(0.0, 0.0, 1.0), _sun(90.0, 0.0, 1.0)]}
    assert white_response(square) == pytest.approx(0.1 + 2 * math.cos(math.pi / 4) / math.pi, abs=1e-6)
    assert srgb_encode(0.5) == pytest.approx(0.735357, abs=1e-6) and srgb_encode(2.0) == pytest.approx(1.0)


def test_stage_cli_bad_pose_is_one_clear_line_and_touches_nothing(tmp_path):
    (tmp_path / "assets").mkdir()
    params = render_params(tmp_path, pose="sideways")
    (tmp_path / "params.yaml").write_text(json.dumps({"render": params}))
    proc = subprocess.run([sys.executable, "-m", "stages.render"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 1
    assert "render.pose" in proc.stderr and "'rest' or 'frame:<n>'" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "renders").exists() and not (tmp_path / "reports").exists()


def test_names_that_are_not_rendered_are_reported(tmp_path):
    assets = tmp_path / "assets"
    (assets / ".git").mkdir(parents=True)
    (assets / "..fbx").write_bytes(b"x")
    (assets / ".hidden.glb").write_bytes(b"x")
    (assets / "statue.obj").write_text("v 0 0 0\n")
    (assets / "notes.txt").write_text("a caption sidecar, not a character")
    (assets / ".git" / "x.fbx").write_bytes(b"x")  # hidden folders are not the user's content: not listed
    report = run_render_stage(render_params(tmp_path), **QUIET)
    by_source = {e["source"]: e for e in report["characters"]}
    assert set(by_source) == {"..fbx", ".hidden.glb", "statue.obj"}
    for source in ("..fbx", ".hidden.glb"):
        assert by_source[source]["status"] == "skipped" and "hidden file" in by_source[source]["reason"]
        assert "rename" in by_source[source]["action"]
    assert by_source["statue.obj"]["status"] == "skipped" and ".obj files are not supported" in by_source["statue.obj"]["reason"]
    assert report["report"]["counts"] == {"ok": 0, "failed": 0, "skipped": 3}
    saved = json.loads((tmp_path / "reports" / "render.json").read_text())
    assert saved == report["report"] and [e["source"] for e in saved["characters"]] == ["..fbx", ".hidden.glb", "statue.obj"]


@pytest.mark.parametrize(
    "run_counts, code, says, never",
    [
        ({"rendered": 0, "cached": 0, "failed": 2, "removed": 0}, 1, "no character was rendered", "the other"),
        ({"rendered": 1, "cached": 3, "failed": 1, "removed": 0}, 1, "the other 4 are rendered (1 now, 3 up to date)",
         "no character"),
        ({"rendered": 2, "cached": 0, "failed": 0, "removed": 0}, 0, None, None),
    ],
)
def test_closing_message_is_true_to_the_counts(run_counts, code, says, never):
    got_code, message = summary({"counts": run_counts, "report_path": "r.json"}, allow_failures=False)
    assert got_code == code
    if says is None:
        assert message is None
    else:
        assert says in message and never not in message


def test_stage_cli_all_failed_does_not_claim_others_were_rendered(tmp_path):
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "a.fbx").write_bytes(b"1")
    (tmp_path / "assets" / "A.glb").write_bytes(b"2")  # same uid: both fail, without Blender
    (tmp_path / "params.yaml").write_text(json.dumps({"render": render_params(tmp_path)}))
    proc = subprocess.run([sys.executable, "-m", "stages.render"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 1
    assert "2 character(s) failed" in proc.stderr and "no character was rendered" in proc.stderr, proc.stderr
    assert "the others were rendered" not in proc.stderr and "the other " not in proc.stderr
