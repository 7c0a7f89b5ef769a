"""Render one character in this process: ``python -m chibisplat.render.worker JOB.json``.

The job file names the asset, its uid, the output folder and the render configuration. The worker
renders into a scratch folder and then swaps the finished folder into place, so a killed worker never
leaves a half-written character behind. It installs only while the stage that started it (``job['parent_pid']``)
is alive: a worker whose stage is gone discards its work. The outcome is written to ``job['result']`` as JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

from chibisplat.files import install_folder, write_atomic


def _redirect_blender_output(log_path: Path):
    """Blender prints a lot on fd 1/2; send it to the character's log and keep a handle for progress lines."""
    progress = os.fdopen(os.dup(2), "w", buffering=1)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    return progress


def run_job(job: dict, progress) -> dict:
    from chibisplat import png
    from chibisplat.images import contact_sheet
    from chibisplat.render import blender
    from chibisplat.render.errors import AssetError
    from chibisplat.render.quality import MAX_CLIPPED_FRACTION, clipped_fraction

    uid = job["uid"]
    scratch = Path(job["scratch_dir"])
    staged = scratch / "tmp" / f"{uid}.{os.getpid()}"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    t0 = time.perf_counter()

    def on_view(index: int) -> None:
        if (index + 1) % 10 == 0:
            progress.write(f"  {uid}: {index + 1}/40 views ({time.perf_counter() - t0:.1f} s)\n")

    try:
        record = blender.render_character(Path(job["asset"]), staged, job["config"], progress=on_view)
    except AssetError as e:
        shutil.rmtree(staged, ignore_errors=True)
        return {"status": "failed", "reason": e.reason, "action": e.action}
    except Exception as e:  # an importer or Blender error we did not foresee: report it, keep going
        shutil.rmtree(staged, ignore_errors=True)
        detail = "".join(traceback.format_exception_only(type(e), e)).strip()
        return {
            "status": "failed",
            "reason": f"Blender could not import or render the file: {detail}",
            "action": "open the file in Blender to check it, or re-export it (binary FBX 7.4 / glTF 2.0); "
            f"the full Blender log is in {job['log']}",
        }
    views = [png.read_png(staged / f"{i:05d}.png") for i in range(40)]
    clipped = clipped_fraction(views)
    if clipped > MAX_CLIPPED_FRACTION:
        record["warnings"].append(f"{clipped:.1%} of the foreground pixels are clipped (a channel at 255): bright "
                                  "materials lost their shading; lower render.lights")
    meta = {
        "uid": uid,
        "source": job["source"],
        "source_sha256": job["source_sha256"],
        "external_files": job.get("external_files", []),
        "render_config_sha256": job["render_config_sha256"],
        "clipped_fraction": clipped,
        **record,
    }
    (staged / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    png.write_png(staged / "contact_sheet.png", contact_sheet(views, [str(i) for i in range(40)]))
    if not stage_alive(job):
        shutil.rmtree(staged, ignore_errors=True)
        return {"status": "failed", "reason": "the render stage that started this worker is gone; nothing installed",
                "action": "re-run the render stage"}
    install_folder(staged, Path(job["out_dir"]) / uid, scratch / "trash")
    return {"status": "rendered", "seconds": round(time.perf_counter() - t0, 2), "warnings": record["warnings"],
            "clipped_fraction": clipped}


def stage_alive(job: dict) -> bool:
    """The stage that started this worker is still its parent (an orphan is re-parented to init or a reaper)."""
    return os.getppid() == job.get("parent_pid", os.getppid())


def main() -> int:
    job = json.loads(Path(sys.argv[1]).read_text())
    if not stage_alive(job):
        return 1
    progress = _redirect_blender_output(Path(job["log"]))
    result = run_job(job, progress)
    write_atomic(Path(job["result"]), json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
