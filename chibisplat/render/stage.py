"""The render stage: every asset in ``render.assets_dir`` -> ``render.out_dir/<uid>/`` (contract sections 1-4).

Incremental by design: a character is re-rendered only when its ``(source_sha256, render_config_sha256)``
differs from the one recorded in its ``meta.json``; renders of deleted assets are removed. Characters render
in parallel worker processes (one process per character), failures are collected into a report and never
stop the other characters.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from chibisplat import cameras
from chibisplat.identity import ASSET_SUFFIXES, sha256_files, sha256_json, uid_for

VIEW_FILES = tuple(f"{i:05d}{ext}" for i in range(cameras.NUM_VIEWS) for ext in (".png", "_nd.png", ".json"))
CHARACTER_FILES = VIEW_FILES + ("meta.json", "contact_sheet.png")
PIXEL_PARAMS = ("resolution", "samples", "seed", "denoise", "engine", "device", "pose", "cameras", "lights", "missing_textures")


@dataclass
class Asset:
    path: Path
    source: str  # path relative to the assets folder (posix)
    uid: str


def render_config(params: dict) -> dict:
    """Everything that changes pixels: the parameters, the Blender version and the Blender-side code."""
    code = Path(__file__).with_name("blender.py").read_bytes() + Path(cameras.__file__).read_bytes()
    config = {k: params.get(k) for k in PIXEL_PARAMS}
    config["missing_textures"] = config["missing_textures"] or "warn"
    config["bpy_version"] = metadata.version("bpy")
    config["render_code_sha256"] = hashlib.sha256(code).hexdigest()
    return config


def discover_assets(assets_dir: Path) -> list[Path]:
    """Asset files below ``assets_dir`` in sorted order (hidden folders and texture folders skipped)."""
    found = []
    for path in sorted(assets_dir.rglob("*")):
        rel = path.relative_to(assets_dir)
        if any(part.startswith(".") or part.endswith(".fbm") for part in rel.parts[:-1]):
            continue
        if path.is_file() and path.suffix.lower() in ASSET_SUFFIXES and not path.name.startswith("."):
            found.append(path)
    return found


def source_files(path: Path) -> list[Path]:
    """Every file the import reads, in a fixed order (contract section 1)."""
    files = [path]
    suffix = path.suffix.lower()
    if suffix == ".fbx":
        fbm = path.with_suffix(".fbm")
        if fbm.is_dir():
            files += sorted(p for p in fbm.rglob("*") if p.is_file())
    elif suffix == ".gltf":
        try:
            gltf = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            return files
        for entry in gltf.get("buffers", []) + gltf.get("images", []):
            uri = entry.get("uri")
            if uri and not uri.startswith("data:"):
                ext = (path.parent / uri).resolve()
                if ext.is_file():
                    files.append(ext)
    return files


def _failure(asset_source: str, uid: str, reason: str, action: str) -> dict:
    return {"uid": uid, "source": asset_source, "status": "failed", "reason": reason, "action": action}


def _is_cached(folder: Path, source_sha: str, config_sha: str) -> bool:
    meta_path = folder / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return False
    if meta.get("source_sha256") != source_sha or meta.get("render_config_sha256") != config_sha:
        return False
    return all((folder / name).is_file() for name in CHARACTER_FILES)


def run_render_stage(params: dict, log=print) -> dict:
    """Render every asset; returns the report (also written to ``params['report']``)."""
    assets_dir = Path(params["assets_dir"])
    out_dir = Path(params["out_dir"])
    scratch = Path(params.get("scratch_dir") or out_dir.parent / ".cache" / "render")
    if not assets_dir.is_dir():
        raise FileNotFoundError(f"render.assets_dir {assets_dir} is not a folder; point it at your characters")
    out_dir.mkdir(parents=True, exist_ok=True)
    for sub in ("tmp", "trash", "jobs"):
        shutil.rmtree(scratch / sub, ignore_errors=True)  # leftovers of a killed run
    (scratch / "jobs").mkdir(parents=True, exist_ok=True)
    (scratch / "logs").mkdir(parents=True, exist_ok=True)

    config = render_config(params)
    config_sha = sha256_json(config)
    entries: list[dict] = []

    # Identity: uids, and duplicates are an error naming both files.
    by_uid: dict[str, list[Path]] = {}
    for path in discover_assets(assets_dir):
        try:
            by_uid.setdefault(uid_for(path, assets_dir), []).append(path)
        except ValueError as e:
            entries.append(_failure(path.relative_to(assets_dir).as_posix(), "", str(e), "rename the file"))
    assets: list[Asset] = []
    for uid, paths in sorted(by_uid.items()):
        sources = [p.relative_to(assets_dir).as_posix() for p in paths]
        if len(paths) > 1:
            for src in sources:
                entries.append(
                    _failure(
                        src,
                        uid,
                        f"{len(paths)} assets map to the same uid '{uid}': {', '.join(sources)}",
                        "rename or remove all but one of them; none of them was rendered and the existing "
                        f"renders of '{uid}' were kept",
                    )
                )
            continue
        assets.append(Asset(paths[0], sources[0], uid))

    # Renders of assets that no longer exist are removed (only folders this stage wrote: they have meta.json).
    keep = set(by_uid)
    removed = []
    for folder in sorted(p for p in out_dir.iterdir() if p.is_dir()):
        if folder.name not in keep and (folder / "meta.json").is_file():
            shutil.rmtree(folder)
            removed.append(folder.name)
    for uid in removed:
        log(f"render: removed {uid} (its asset is gone)")

    todo: list[tuple[Asset, str]] = []
    for asset in assets:
        source_sha = sha256_files(source_files(asset.path))
        if _is_cached(out_dir / asset.uid, source_sha, config_sha):
            entries.append({"uid": asset.uid, "source": asset.source, "status": "cached"})
        else:
            todo.append((asset, source_sha))
    log(
        f"render: {len(assets)} characters, {len(assets) - len(todo)} up to date, {len(todo)} to render "
        f"with {params.get('workers', 1)} workers ({params['resolution']} px, {params['samples']} samples)"
    )
    entries += _run_workers(todo, params, config, config_sha, out_dir, scratch, log)

    entries.sort(key=lambda e: (e["uid"], e["source"]))
    counts = {s: sum(e["status"] == s for e in entries) for s in ("rendered", "cached", "failed")}
    report = {
        "render_config_sha256": config_sha,
        "render_config": config,
        "counts": {**counts, "removed": len(removed)},
        "removed": removed,
        "characters": entries,
    }
    report_path = Path(params.get("report") or out_dir.parent / "reports" / "render.json")
    report_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = report_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, report_path)
    for e in entries:
        if e["status"] == "failed":
            log(f"render: FAILED {e['source']}: {e['reason']}. What to do: {e['action']}")
    log(
        f"render: {counts['rendered']} rendered, {counts['cached']} cached, {counts['failed']} failed, "
        f"{len(removed)} removed; report: {report_path}"
    )
    return report


def _run_workers(todo, params, config, config_sha, out_dir, scratch, log) -> list[dict]:
    """One Blender process per character, at most ``workers`` at a time."""
    # Fewer characters than workers (an incremental run): the cores go to the characters there are.
    workers = max(1, min(int(params.get("workers", 1)), len(todo)))
    threads = max(1, (os.cpu_count() or 1) // workers)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    env["CHIBISPLAT_CYCLES_THREADS"] = str(threads)
    pending = list(todo)
    running: dict = {}
    results: list[dict] = []
    total, done = len(todo), 0
    while pending or running:
        while pending and len(running) < workers:
            asset, source_sha = pending.pop(0)
            job_path = scratch / "jobs" / f"{asset.uid}.json"
            job = {
                "asset": str(asset.path.resolve()),
                "source": asset.source,
                "uid": asset.uid,
                "source_sha256": source_sha,
                "render_config_sha256": config_sha,
                "config": {**config, "threads": threads},
                "out_dir": str(out_dir.resolve()),
                "scratch_dir": str(scratch.resolve()),
                "log": str((scratch / "logs" / f"{asset.uid}.log").resolve()),
                "result": str((scratch / "jobs" / f"{asset.uid}.result.json").resolve()),
            }
            job_path.write_text(json.dumps(job))
            Path(job["result"]).unlink(missing_ok=True)
            proc = subprocess.Popen([sys.executable, "-m", "chibisplat.render.worker", str(job_path)], env=env)
            running[proc] = (asset, job, time.perf_counter())
        time.sleep(0.05)
        for proc in [p for p in running if p.poll() is not None]:
            asset, job, t0 = running.pop(proc)
            done += 1
            result_path = Path(job["result"])
            if result_path.is_file():
                result = json.loads(result_path.read_text())
            else:
                result = {
                    "status": "failed",
                    "reason": f"the Blender process died (exit code {proc.returncode}) while rendering",
                    "action": f"see the log {job['log']}; open the file in Blender or re-export it",
                }
            entry = {"uid": asset.uid, "source": asset.source, **result}
            results.append(entry)
            if result["status"] == "rendered":
                extra = f" ({len(result['warnings'])} warnings)" if result.get("warnings") else ""
                log(f"render: [{done}/{total}] {asset.uid}: 40 views in {result['seconds']:.1f} s{extra}")
            else:
                log(f"render: [{done}/{total}] {asset.uid}: failed: {result['reason']}")
    return results
