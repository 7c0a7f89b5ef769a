"""The render stage: every asset in ``render.assets_dir`` -> ``render.out_dir/<uid>/`` (docs/dataset-contract.md §1-§4).

Incremental by design: a character is re-rendered only when its ``(source_sha256, render_config_sha256)``
differs from the one recorded in its ``meta.json``; ``source_sha256`` covers every external file the asset
references (``references.py``). Renders of deleted assets are removed. Characters render in parallel worker
processes (one process per character), failures are collected into a report and never stop the other characters.
With ``cluster.render.executor: ray`` the stale characters are Ray tasks instead (``chibisplat/executors/render.py``):
this process still decides what is stale and installs every returned character itself, into the same cache.

Two records: ``render.report`` (data/reports/render.json, DVC-tracked) is a pure function of the inputs: the
state of every character (ok / failed / skipped, warnings, clipped_fraction), no timings and nothing about what
this particular run did. What the run did (rendered / cached / removed, seconds per character) goes to the log and
to ``<scratch>/last_run.json`` (untracked).

Workers die with the stage (``PR_SET_PDEATHSIG``, plus an explicit kill on any exit of the stage) and check that
the stage that started them is still there before they install a finished character.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from chibisplat import cameras, protocol
from chibisplat.config import RenderParams, build, plain
from chibisplat.files import write_atomic
from chibisplat.identity import ASSET_SUFFIXES, sha256_code, sha256_json, sha256_sources, uid_for
from chibisplat.render.options import MISSING_TEXTURES_DEFAULT, validate_render_params, white_response
from chibisplat.render.quality import MAX_CLIPPED_FRACTION
from chibisplat.render.references import referenced_files

VIEW_FILES = tuple(f"{i:05d}{ext}" for i in range(protocol.NUM_SLOTS) for ext in (".png", "_nd.png", ".json"))
CHARACTER_FILES = VIEW_FILES + ("meta.json", "contact_sheet.png")
PIXEL_PARAMS = ("resolution", "samples", "seed", "denoise", "engine", "device", "pose", "cameras", "lights", "missing_textures")


@dataclass
class Asset:
    path: Path
    source: str  # path relative to the assets folder (posix)
    uid: str


def render_config(params: Mapping) -> dict:
    """Everything that changes pixels: the parameters (as params.yaml holds them: ``plain(RenderParams)``), the
    Blender version and the Blender-side code (the scene script, the camera layout and the DiffSplat protocol facts
    it imports: focal length, slot numbering, axis flip)."""
    code = sha256_code((Path(__file__).with_name("blender.py"), cameras.__file__, protocol.__file__))
    config = {k: params.get(k) for k in PIXEL_PARAMS}
    config["missing_textures"] = config["missing_textures"] or MISSING_TEXTURES_DEFAULT
    config["bpy_version"] = metadata.version("bpy")
    config["render_code_sha256"] = code  # code, not comments or docstrings (identity.sha256_code)
    return config


# Formats that look like characters but that the stage cannot read: reported (never silently ignored).
UNSUPPORTED_3D_SUFFIXES = (".obj", ".dae", ".3ds", ".max", ".ma", ".mb", ".stl", ".ply", ".usd", ".usda", ".usdc",
                           ".usdz", ".abc", ".pmx", ".pmd", ".x3d", ".c4d", ".lwo", ".blend1")


def scan_assets(assets_dir: Path) -> tuple[list[Path], list[dict]]:
    """Asset files below ``assets_dir`` in sorted order, and the report entries of files that look like
    characters but are not rendered (hidden files such as ``..fbx``, unsupported 3D formats). Hidden folders
    (``.git``, ``.dvc``) and FBX texture folders (``<stem>.fbm/``) are not scanned."""
    found, skipped = [], []
    for path in sorted(assets_dir.rglob("*")):
        rel = path.relative_to(assets_dir)
        if any(part.startswith(".") or part.lower().endswith(".fbm") for part in rel.parts[:-1]):
            continue
        if not path.is_file():
            continue
        suffix = path.suffix.lower()
        if suffix in ASSET_SUFFIXES and not path.name.startswith("."):
            found.append(path)
        elif suffix in ASSET_SUFFIXES or (path.name.startswith(".") and path.name.lower().endswith(ASSET_SUFFIXES)):
            skipped.append(_skipped(rel.as_posix(), "a hidden file (its name starts with '.'), not rendered",
                                    "if it is a character, rename it to a name without the leading dot (and with "
                                    "letters or digits); otherwise move it out of render.assets_dir"))
        elif suffix in UNSUPPORTED_3D_SUFFIXES:
            skipped.append(_skipped(rel.as_posix(), f"{suffix} files are not supported, not rendered",
                                    f"export the character as {', '.join(ASSET_SUFFIXES)} (binary FBX or .glb "
                                    "preferred), or move the file out of render.assets_dir"))
    return found, skipped


def discover_assets(assets_dir: Path) -> list[Path]:
    """Asset files below ``assets_dir`` in sorted order (see :func:`scan_assets`)."""
    return scan_assets(assets_dir)[0]


def source_files(path: Path, scratch: Path | None = None) -> list[Path]:
    """Every file the import reads: the asset, then the external files it references (docs/dataset-contract.md §1)."""
    return [path, *referenced_files(path, scratch)]


def _skipped(source: str, reason: str, action: str) -> dict:
    return {"uid": "", "source": source, "status": "skipped", "reason": reason, "action": action}


def _failure(asset_source: str, uid: str, reason: str, action: str) -> dict:
    return {"uid": uid, "source": asset_source, "status": "failed", "reason": reason, "action": action}


def run_render_stage(params: RenderParams | Mapping, log=print, executor=None) -> dict:
    """Render every asset. Writes the report (``params['report']``, a pure function of the inputs) and returns what
    this run did (also written to ``<scratch>/last_run.json``): ``counts`` = {rendered, cached, failed, removed},
    ``characters`` (status rendered / cached / failed / skipped, warnings, clipped_fraction, seconds), ``removed``,
    and the written report under ``"report"``.

    Every ``render:`` value is validated first (:class:`RenderParamsError`), before any file is touched.
    ``executor``: where the stale characters render (:class:`chibisplat.executors.ExecutorConfig`, params.yaml
    ``cluster.render``); None: worker processes on this machine. The run's ``"executor"`` says what it shipped."""
    if isinstance(params, RenderParams):
        validate_render_params(plain(params))
    else:  # a ``render:`` mapping (tools, tests): checked, then typed by the loader's builder
        validate_render_params(params)
        params = build(RenderParams, params, "render")
    assets_dir, out_dir, scratch = params.assets_dir, params.out_dir, params.scratch_path
    if not assets_dir.is_dir():
        raise FileNotFoundError(f"render.assets_dir {assets_dir} is not a folder; point it at your characters")
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    with _StageLock(scratch / "stage.lock"), _TerminateAsExit():
        return _run(params, assets_dir, out_dir, scratch, log, executor)


def _run(params: RenderParams, assets_dir: Path, out_dir: Path, scratch: Path, log, executor=None) -> dict:
    for sub in ("tmp", "trash", "jobs"):
        shutil.rmtree(scratch / sub, ignore_errors=True)  # leftovers of a killed run
    (scratch / "jobs").mkdir(parents=True, exist_ok=True)
    (scratch / "logs").mkdir(parents=True, exist_ok=True)

    config = render_config(plain(params))
    config_sha = sha256_json(config)
    found, skipped = scan_assets(assets_dir)
    entries: list[dict] = list(skipped)
    for e in skipped:
        log(f"render: SKIPPED {e['source']}: {e['reason']}. What to do: {e['action']}")

    # Identity: uids, and duplicates are an error naming both files.
    by_uid: dict[str, list[Path]] = {}
    for path in found:
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

    todo: list[tuple[Asset, str, list[str]]] = []
    for asset in assets:
        external = referenced_files(asset.path, scratch)
        source_sha = sha256_sources(asset.path, external)
        meta = _cached_meta(out_dir / asset.uid, source_sha, config_sha)
        if meta is not None:
            entries.append({"uid": asset.uid, "source": asset.source, "status": "cached", **_quality(meta)})
        else:
            names = [os.path.relpath(p, asset.path.parent).replace(os.sep, "/") for p in external]
            todo.append((asset, source_sha, names))
    on_ray = executor is not None and executor.is_ray
    where = f"as Ray tasks of {executor.num_cpus:g} CPUs" if on_ray else f"with {params.workers} workers"
    log(
        f"render: {len(assets)} characters, {len(assets) - len(todo)} up to date, {len(todo)} to render "
        f"{where} ({params.resolution} px, {params.samples} samples)"
    )
    stats = {"kind": "local", "shipped": []}
    if on_ray:
        from chibisplat.executors.render import render_on_ray

        def make_job(asset, source_sha, external, threads):
            return write_job(asset, source_sha, external, {**config, "threads": threads}, config_sha, out_dir,
                             scratch, os.getpid())[1]

        done, run_stats = render_on_ray(todo, executor, make_job, out_dir, scratch, log)
        entries += done
        stats = run_stats.as_dict()
    else:
        entries += _run_workers(todo, params, config, config_sha, out_dir, scratch, log)

    entries.sort(key=lambda e: (e["uid"], e["source"]))
    counts = {s: sum(e["status"] == s for e in entries) for s in ("rendered", "cached", "failed")}
    report = {
        "render_config_sha256": config_sha,
        "render_config": config,
        "white_response": round(white_response(config["lights"]), 6),
        "counts": {
            "ok": counts["rendered"] + counts["cached"],
            "failed": counts["failed"],
            "skipped": sum(e["status"] == "skipped" for e in entries),
        },
        "characters": [_report_entry(e) for e in entries],
    }
    report_path = params.report_path
    _write_json(report_path, report)
    run = {
        "render_config_sha256": config_sha,
        "counts": {**counts, "removed": len(removed)},
        "removed": removed,
        "characters": entries,
        "executor": stats,
    }
    _write_json(scratch / "last_run.json", run)
    for e in entries:
        if e["status"] == "failed":
            log(f"render: FAILED {e['source']}: {e['reason']}. What to do: {e['action']}")
        elif e.get("clipped_fraction", 0.0) > MAX_CLIPPED_FRACTION:
            log(f"render: WARNING {e['uid']}: {e['clipped_fraction']:.1%} of its foreground pixels are clipped "
                "(a channel at 255); lower render.lights")
    log(
        f"render: {counts['rendered']} rendered, {counts['cached']} cached, {counts['failed']} failed, "
        f"{len(removed)} removed, {report['counts']['skipped']} skipped; report: {report_path}; "
        f"this run: {scratch / 'last_run.json'}"
    )
    return {**run, "report": report, "report_path": str(report_path)}


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def _quality(meta: dict) -> dict:
    return {"warnings": list(meta.get("warnings", [])), "clipped_fraction": meta.get("clipped_fraction")}


def _report_entry(entry: dict) -> dict:
    """The run-independent part of a character's outcome (no timings; rendered and cached are both "ok")."""
    out = {"uid": entry["uid"], "source": entry["source"]}
    if entry["status"] in ("rendered", "cached"):
        out.update(status="ok", warnings=entry.get("warnings", []), clipped_fraction=entry.get("clipped_fraction"))
    else:
        out.update(status=entry["status"], reason=entry["reason"], action=entry["action"])
    return out


def _cached_meta(folder: Path, source_sha: str, config_sha: str) -> dict | None:
    """The character's meta.json when its renders are complete and up to date, else None."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("source_sha256") != source_sha or meta.get("render_config_sha256") != config_sha:
        return None
    if "clipped_fraction" not in meta or not all((folder / name).is_file() for name in CHARACTER_FILES):
        return None
    return meta


class _StageLock:
    """One render stage per scratch folder at a time (a second one would delete the first one's work in
    progress). The lock dies with the process, so a killed stage never leaves it behind."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise RuntimeError(
                f"another render stage is running with the scratch folder {self.path.parent} (lock {self.path}); "
                "wait for it to finish"
            ) from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


class _TerminateAsExit:
    """SIGTERM (what DVC and most schedulers send) unwinds like an exception, so the workers are killed."""

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    @staticmethod
    def _handler(signum, frame):
        raise SystemExit(128 + signum)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int):
    """``preexec_fn`` of a worker: the kernel sends it SIGKILL when the stage dies, however it dies (SIGKILL
    included). If the stage died before this ran, exit at once."""

    def preexec() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # not Linux: the explicit kill on exit and the worker's check remain
            pass
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


def write_job(asset: Asset, source_sha: str, external: list[str], config: dict, config_sha: str, out_dir: Path,
              scratch: Path, parent_pid: int) -> tuple[Path, dict]:
    """The job file of one character (what ``chibisplat.render.worker`` reads); returns its path and content."""
    job = {
        "asset": str(asset.path.resolve()),
        "source": asset.source,
        "uid": asset.uid,
        "source_sha256": source_sha,
        "external_files": external,
        "render_config_sha256": config_sha,
        "config": config,
        "out_dir": str(out_dir.resolve()),
        "scratch_dir": str(scratch.resolve()),
        "parent_pid": parent_pid,  # the worker installs only while this process is its parent
        "log": str((scratch / "logs" / f"{asset.uid}.log").resolve()),
        "result": str((scratch / "jobs" / f"{asset.uid}.result.json").resolve()),
    }
    job_path = scratch / "jobs" / f"{asset.uid}.json"
    job_path.parent.mkdir(parents=True, exist_ok=True)
    (scratch / "logs").mkdir(parents=True, exist_ok=True)
    job_path.write_text(json.dumps(job))
    Path(job["result"]).unlink(missing_ok=True)
    return job_path, job


def worker_command(job_path: Path) -> list[str]:
    return [sys.executable, "-m", "chibisplat.render.worker", str(job_path)]


def _run_workers(todo, params, config, config_sha, out_dir, scratch, log) -> list[dict]:
    """One Blender process per character, at most ``workers`` at a time. Whatever ends this function (an error,
    Ctrl-C, SIGTERM), the workers still running are killed."""
    # Fewer characters than workers (an incremental run): the cores go to the characters there are.
    workers = max(1, min(params.workers, len(todo)))
    threads = max(1, (os.cpu_count() or 1) // workers)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    env["CHIBISPLAT_CYCLES_THREADS"] = str(threads)
    pending = list(todo)
    running: dict = {}
    results: list[dict] = []
    total, done = len(todo), 0
    try:
        while pending or running:
            while pending and len(running) < workers:
                asset, source_sha, external = pending.pop(0)
                job_path, job = write_job(asset, source_sha, external, {**config, "threads": threads}, config_sha,
                                          out_dir, scratch, os.getpid())
                proc = subprocess.Popen(worker_command(job_path), env=env, preexec_fn=die_with_parent(os.getpid()))
                running[proc] = (asset, job)
            time.sleep(0.05)
            for proc in [p for p in running if p.poll() is not None]:
                asset, job = running.pop(proc)
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
                    extra = f", {len(result['warnings'])} warnings" if result.get("warnings") else ""
                    log(f"render: [{done}/{total}] {asset.uid}: 40 views in {result['seconds']:.1f} s "
                        f"(clipped {result['clipped_fraction']:.2%}{extra})")
                else:
                    log(f"render: [{done}/{total}] {asset.uid}: failed: {result['reason']}")
    finally:
        for proc in running:
            proc.kill()
        for proc in running:
            proc.wait()
    return results
