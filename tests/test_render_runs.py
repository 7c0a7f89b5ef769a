"""The light rig and the render stage's runs (issue 10, items 5, 6 and 7): light materials keep their shading, the
clipped share is measured per character, the DVC-tracked report is a function of the inputs only, and a killed
stage takes its Blender workers with it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from asset_factory import write_diffuse_glb
from conftest import REPO, SHARED_ASSETS, render_params, sample_asset, skip_or_fail

from chibisplat import png
from chibisplat.identity import sha256_file, sha256_json
from chibisplat.render.options import srgb_encode, white_response
from chibisplat.render.quality import clipped_fraction
from chibisplat.render.stage import CHARACTER_FILES, Asset, render_config, run_render_stage, worker_command, write_job

QUIET = dict(log=lambda *_: None)


def numpy_clipped(folder: Path) -> tuple[int, int]:
    """(clipped, foreground) pixels over the 40 views, counted here independently of the stage's code."""
    clipped = foreground = 0
    for i in range(40):
        rgba = png.read_png(folder / f"{i:05d}.png").astype(np.int64)
        fg = rgba[..., 3] > 0
        foreground += int(fg.sum())
        clipped += int((fg & ((rgba[..., 0] == 255) | (rgba[..., 1] == 255) | (rgba[..., 2] == 255))).sum())
    return clipped, foreground


# ----------------------------------------------------------------------------- fast


def test_clipped_fraction_by_hand():
    a = np.zeros((2, 3, 4), np.uint8)
    a[0, 0] = (255, 10, 10, 255)  # clipped, foreground
    a[0, 1] = (254, 254, 254, 255)  # foreground, not clipped
    a[0, 2] = (10, 10, 255, 1)  # clipped, barely foreground
    a[1, 0] = (255, 255, 255, 0)  # clipped but background: not counted
    a[1, 1] = (1, 2, 3, 200)  # foreground, dark
    b = np.zeros((1, 1, 4), np.uint8)
    b[0, 0] = (0, 0, 0, 128)  # foreground, black
    assert clipped_fraction([a, b]) == pytest.approx(2 / 5)
    assert clipped_fraction([np.zeros((4, 4, 4), np.uint8)]) == 0.0


def _proc_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has exited; it only waits to be reaped


def worker_pids(marker: str) -> list[int]:
    """Live processes whose command line runs the render worker on a job below ``marker``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"chibisplat.render.worker" in cmd and marker.encode() in cmd and _proc_alive(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def _job(tmp_path: Path, asset_path: Path, parent_pid: int) -> tuple[Path, dict]:
    params = render_params(tmp_path, resolution=32, samples=1)
    config = render_config(params)
    asset = Asset(asset_path, asset_path.name, asset_path.stem)
    return write_job(asset, sha256_file(asset_path), [], {**config, "threads": 1}, sha256_json(config),
                     tmp_path / "renders", tmp_path / "scratch", parent_pid)


def test_worker_whose_stage_is_gone_does_nothing(tmp_path):
    """A worker that starts after its stage died (it was re-parented) exits at once: no result, no output."""
    (tmp_path / "assets").mkdir()
    asset = write_diffuse_glb(tmp_path / "assets" / "ball.glb")
    (tmp_path / "renders").mkdir()
    job_path, job = _job(tmp_path, asset, parent_pid=os.getpid() + 10_000_000)  # not this worker's parent
    proc = subprocess.run(worker_command(job_path), cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == 1
    assert not Path(job["result"]).exists() and not Path(job["log"]).exists()
    assert list((tmp_path / "renders").iterdir()) == []


# ----------------------------------------------------------------------------- slow: Blender renders


@pytest.mark.slow
def test_worker_does_not_install_after_its_stage_is_gone(tmp_path):
    """The stage dies while its worker renders (here the worker was started without the death signal, by a stand-in
    stage process that exits mid-render): the finished character is discarded, never installed."""
    (tmp_path / "assets").mkdir()
    asset = write_diffuse_glb(tmp_path / "assets" / "ball.glb")
    (tmp_path / "renders").mkdir()
    job_path, job = _job(tmp_path, asset, parent_pid=0)
    progress = tmp_path / "progress.log"
    stand_in = f"""
import json, os, subprocess, sys, time
job = json.loads(open({str(job_path)!r}).read())
job["parent_pid"] = os.getpid()
open({str(job_path)!r}, "w").write(json.dumps(job))
with open({str(progress)!r}, "wb") as err:
    subprocess.Popen({worker_command(job_path)!r}, stderr=err, cwd={str(REPO)!r})
while "10/40 views" not in open({str(progress)!r}).read():
    time.sleep(0.02)
os._exit(0)  # the stage is gone; its worker goes on rendering
"""
    subprocess.run([sys.executable, "-c", stand_in], check=True, timeout=300)
    result = Path(job["result"])
    deadline = time.time() + 300
    while time.time() < deadline and not result.exists():
        time.sleep(0.1)
    outcome = json.loads(result.read_text())
    assert outcome["status"] == "failed" and "stage that started this worker is gone" in outcome["reason"]
    assert list((tmp_path / "renders").iterdir()) == []
    assert list((tmp_path / "scratch" / "tmp").iterdir()) == []  # the staged copy is deleted too



@pytest.mark.slow
def test_white_diffuse_surfaces_stay_below_clipping(tmp_path):
    """A white (albedo 1) diffuse sphere and cube through the rig of params.yaml: the brightest fully covered pixel
    is <= 0.9 * 255 and close to the rig's analytic peak; meta.json's clipped_fraction equals a numpy count."""
    assets = tmp_path / "assets"
    assets.mkdir()
    write_diffuse_glb(assets / "white_sphere.glb", "sphere")
    write_diffuse_glb(assets / "white_cube.glb", "cube")
    params = render_params(tmp_path, resolution=48, samples=16)
    report = run_render_stage(params, **QUIET)
    assert report["counts"]["rendered"] == 2
    expected_peak = srgb_encode(white_response(params["lights"])) * 255
    peaks = {}
    for uid in ("white_sphere", "white_cube"):
        folder = tmp_path / "renders" / uid
        views = [png.read_png(folder / f"{i:05d}.png") for i in range(40)]
        # Fully covered pixels: a silhouette pixel is an average that includes grazing-angle reflections.
        peaks[uid] = max(int(v[..., :3][v[..., 3] == 255].max()) for v in views)
        clipped, foreground = numpy_clipped(folder)
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["clipped_fraction"] == pytest.approx(clipped / foreground, abs=1e-6)
        assert meta["clipped_fraction"] <= 0.001
        entry = {e["uid"]: e for e in report["report"]["characters"]}[uid]
        assert entry["clipped_fraction"] == meta["clipped_fraction"]
    assert max(peaks.values()) <= 0.9 * 255, peaks
    assert peaks["white_sphere"] >= expected_peak - 12, (peaks, expected_peak)  # the rig is not just dimmer


@pytest.mark.slow
def test_every_bundled_sample_and_shared_asset_clips_at_most_5_percent(tmp_path):
    assets = tmp_path / "assets"
    assets.mkdir()
    for path in sorted((REPO / "data" / "assets").iterdir()):
        if path.suffix != ".txt":
            shutil.copy(path, assets / path.name)
    shared = sorted(p for p in SHARED_ASSETS.glob("*") if p.suffix in (".fbx", ".glb", ".vrm", ".blend"))
    if not shared:
        skip_or_fail(f"no shared assets in {SHARED_ASSETS}: the clipping bound must hold for them too")
    for path in shared:
        shutil.copy(path, assets / path.name)
    # base_color: the Kenney character's texture atlas is not shipped with it.
    params = render_params(tmp_path, resolution=32, samples=4, missing_textures="base_color")
    report = run_render_stage(params, **QUIET)
    assert report["counts"]["failed"] == 0, report["characters"]
    assert report["counts"]["rendered"] == 7 + len(shared)
    fractions = {}
    for entry in report["report"]["characters"]:
        clipped, foreground = numpy_clipped(tmp_path / "renders" / entry["uid"])
        assert entry["clipped_fraction"] == pytest.approx(clipped / foreground, abs=1e-6)
        fractions[entry["uid"]] = entry["clipped_fraction"]
    print("\nclipped fraction per character:", json.dumps(fractions, indent=1))
    assert max(fractions.values()) <= 0.05, fractions


@pytest.mark.slow
def test_report_bytes_do_not_depend_on_the_run(tmp_path):
    """Same inputs -> same data/reports/render.json bytes: after a first render, a cached re-run, and a forced
    re-render of one character. Timings live in the untracked last_run.json."""
    assets = tmp_path / "assets"
    assets.mkdir()
    write_diffuse_glb(assets / "ball.glb", base_color=(0.9, 0.5, 0.2))
    shutil.copy(sample_asset(), assets / sample_asset().name)
    (assets / "..fbx").write_bytes(b"skipped, and reported")
    params = render_params(tmp_path, resolution=32, samples=1)
    report_path = Path(params["report"])
    first = run_render_stage(params, **QUIET)
    assert first["counts"]["rendered"] == 2
    first_bytes = report_path.read_bytes()
    saved = json.loads(first_bytes)
    assert b"seconds" not in first_bytes and "removed" not in saved
    assert [(e["source"], e["status"]) for e in saved["characters"]] == [
        ("..fbx", "skipped"), ("ball.glb", "ok"), (sample_asset().name, "ok")]
    second = run_render_stage(params, **QUIET)
    assert second["counts"]["cached"] == 2
    assert report_path.read_bytes() == first_bytes
    shutil.rmtree(tmp_path / "renders" / "ball")
    third = run_render_stage(params, **QUIET)
    assert third["counts"] == {"rendered": 1, "cached": 1, "failed": 0, "removed": 0}
    assert report_path.read_bytes() == first_bytes
    run = json.loads((tmp_path / ".cache" / "render" / "last_run.json").read_text())
    assert [e["seconds"] > 0 for e in run["characters"] if e["status"] == "rendered"] == [True]


@pytest.mark.slow
def test_sigkill_of_the_stage_kills_its_workers_and_nothing_is_installed_after(tmp_path):
    """SIGKILL to the stage process only (not its group, as a scheduler or OOM killer would): its Blender workers
    die with it (PR_SET_PDEATHSIG) and no character folder appears afterwards."""
    assets = tmp_path / "assets"
    assets.mkdir()
    src = sample_asset()
    for i in range(3):
        shutil.copy(src, assets / f"char{i}{src.suffix}")
    # Slow enough per character that a surviving worker is still rendering when the check below runs.
    params = render_params(tmp_path, resolution=96, samples=32, workers=2)
    (tmp_path / "params.yaml").write_text(json.dumps({"render": params}))
    log = tmp_path / "stage.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "stages.render"], cwd=tmp_path, stdout=out, stderr=out,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
    marker = str(tmp_path)
    deadline = time.time() + 180
    while time.time() < deadline and "10/40 views" not in log.read_text(errors="replace"):
        assert proc.poll() is None, log.read_text()
        time.sleep(0.05)
    workers = worker_pids(marker)
    assert workers, "no worker process found while rendering"
    renders = tmp_path / "renders"
    installed_at_kill = sorted(p.name for p in renders.iterdir())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 2  # the death signal is immediate; a character takes far longer than this
    while time.time() < deadline and any(_proc_alive(p) for p in workers):
        time.sleep(0.05)
    assert not [p for p in workers if _proc_alive(p)], "a Blender worker outlived the killed stage"
    assert worker_pids(marker) == []
    time.sleep(20)  # longer than the rest of a character's render: an orphan would have installed it by now
    assert sorted(p.name for p in renders.iterdir()) == installed_at_kill
    for name in installed_at_kill:  # whatever is there is complete
        assert sorted(p.name for p in (renders / name).iterdir()) == sorted(CHARACTER_FILES)
    # The next run resumes and finishes the job.
    report = run_render_stage(params, **QUIET)
    assert report["counts"]["failed"] == 0 and report["counts"]["rendered"] == 3 - len(installed_at_kill)
