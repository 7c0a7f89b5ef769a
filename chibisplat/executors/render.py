"""The render stage's characters as Ray tasks (see :mod:`chibisplat.executors` for the design).

Separate from the latents executor so that each stage's import closure (dvc.yaml deps) holds only its own code.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from chibisplat.executors import ExecutorConfig, RunStats, node_label, node_of, ray_session


def asset_bundle(asset_path: Path, external: list[str]) -> tuple[str, dict[str, bytes]]:
    """The asset and the files it references as ``{relative path: bytes}`` that keeps their relative layout
    (``external`` is relative to the asset's folder and may climb with ``..``), and the asset's key in it."""
    base = asset_path.parent.resolve()
    files = [asset_path.resolve()] + [Path(os.path.normpath(base / name)) for name in external]
    root = Path(os.path.commonpath([p.parent for p in files]))
    bundle = {p.relative_to(root).as_posix(): p.read_bytes() for p in files}
    return asset_path.resolve().relative_to(root).as_posix(), bundle


def render_task(job: dict, asset_key: str, bundle: dict[str, bytes], threads: int) -> dict:
    """A Ray task: render one character on this node exactly as the local path does (the same worker module in a
    child process) into a temp folder, and return its files. Runs on the worker node."""
    from chibisplat.render import stage

    node = node_of()
    expected = job["config"]
    mine = stage.render_config({k: expected.get(k) for k in stage.PIXEL_PARAMS})
    for key in ("bpy_version", "render_code_sha256"):
        if mine[key] != expected[key]:
            return {"node": node, "files": {}, "log": b"", "result": {
                "status": "failed",
                "reason": f"the Ray node {node_label(node)} has {key} {mine[key]} but the driver {expected[key]}",
                "action": "install the same chibisplat and bpy on every node (pip install -e '.[ray]' from the same "
                          "checkout) and re-run the stage"}}
    with tempfile.TemporaryDirectory(prefix=f"chibisplat-render-{job['uid']}-") as tmp:
        root = Path(tmp)
        for rel, data in bundle.items():
            target = root / "src" / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        local = {**job, "asset": str(root / "src" / asset_key), "out_dir": str(root / "out"),
                 "scratch_dir": str(root / "scratch"), "parent_pid": os.getpid(), "log": str(root / "worker.log"),
                 "result": str(root / "result.json")}
        (root / "out").mkdir()
        (root / "scratch").mkdir()
        job_path = root / "job.json"
        job_path.write_text(json.dumps(local))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
               "CHIBISPLAT_CYCLES_THREADS": str(threads)}
        # Dies with this Ray worker (PR_SET_PDEATHSIG), so a killed node leaves no Blender behind.
        proc = subprocess.run(stage.worker_command(job_path), env=env, preexec_fn=stage.die_with_parent(os.getpid()),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        result_path = Path(local["result"])
        log_bytes = Path(local["log"]).read_bytes() if Path(local["log"]).is_file() else b""
        if result_path.is_file():
            result = json.loads(result_path.read_text())
        else:
            result = {"status": "failed",
                      "reason": f"the Blender process died (exit code {proc.returncode}) while rendering",
                      "action": f"see the log {job['log']}; open the file in Blender or re-export it"}
        files = {}
        if result.get("status") == "rendered":
            folder = root / "out" / job["uid"]
            files = {name: (folder / name).read_bytes() for name in stage.CHARACTER_FILES}
        # Paths in messages name the driver's copy of the log, as a local run's do.
        for k in ("reason", "action"):
            if isinstance(result.get(k), str):
                result[k] = result[k].replace(local["log"], job["log"])
        return {"node": node, "files": files, "log": log_bytes, "result": result}


def render_on_ray(todo, cfg: ExecutorConfig, make_job, out_dir: Path, scratch: Path, log=print) -> tuple[list[dict], RunStats]:
    """Render the stale characters ``todo`` (``(asset, source_sha, external names)``, as the stage computed them)
    as Ray tasks; install each returned character into ``out_dir/<uid>`` atomically as it arrives.

    ``make_job(asset, source_sha, external, threads)`` -> the local job dict of one character. Returns the
    per-character result entries (the same dicts the local path returns) and the :class:`RunStats`."""
    from chibisplat.files import install_folder, write_atomic

    stats = RunStats(kind="ray")
    results: list[dict] = []
    if not todo:
        return results, stats
    threads = max(1, int(cfg.num_cpus))
    with ray_session(cfg, log) as ray:
        remote = ray.remote(render_task).options(
            num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus or 0, max_retries=cfg.max_retries, retry_exceptions=False)
        # Bounded in flight: the inputs of 10,000 characters never sit in the object store at once.
        limit = max(2, int(2 * ray.cluster_resources().get("CPU", 1) / cfg.num_cpus))
        pending = list(todo)
        running: dict = {}
        t0 = time.perf_counter()
        total, done = len(todo), 0
        try:
            while pending or running:
                while pending and len(running) < limit:
                    d0 = time.perf_counter()
                    asset, source_sha, external = pending.pop(0)
                    job = make_job(asset, source_sha, external, threads)
                    asset_key, bundle = asset_bundle(asset.path, external)
                    stats.bytes_sent += sum(map(len, bundle.values()))
                    ref = remote.remote(job, asset_key, ray.put(bundle), threads)
                    running[ref] = (asset, job)
                    stats.shipped.append(asset.uid)
                    stats.driver_seconds += time.perf_counter() - d0
                ready, _ = ray.wait(list(running), num_returns=1)
                for ref in ready:
                    asset, job = running.pop(ref)
                    done += 1
                    try:
                        out = ray.get(ref)
                    except ray.exceptions.RayError as e:  # died max_retries + 1 times, or a bug in render_task
                        stats.system_failures += 1
                        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                        result = {"status": "failed",
                                  "reason": f"the Ray task died {cfg.max_retries + 1} times or failed: {type(e).__name__}: {first}",
                                  "action": "check the cluster (`ray status`, the nodes' logs) and re-run the stage; "
                                            "the finished characters are kept"}
                        results.append({"uid": asset.uid, "source": asset.source, **result})
                        log(f"{cfg.stage}: [{done}/{total}] {asset.uid}: failed on the cluster: {result['reason']}")
                        continue
                    d0 = time.perf_counter()
                    result, where = out["result"], node_label(out["node"])
                    stats.nodes[where] = stats.nodes.get(where, 0) + 1
                    Path(job["log"]).parent.mkdir(parents=True, exist_ok=True)
                    write_atomic(Path(job["log"]), out["log"])  # a killed driver leaves no half log
                    if result["status"] == "rendered":
                        stats.bytes_received += sum(map(len, out["files"].values()))
                        staged = scratch / "tmp" / f"{asset.uid}.{os.getpid()}"
                        shutil.rmtree(staged, ignore_errors=True)
                        staged.mkdir(parents=True)
                        for name, data in out["files"].items():
                            (staged / name).write_bytes(data)
                        install_folder(staged, out_dir / asset.uid, scratch / "trash")
                        extra = f", {len(result['warnings'])} warnings" if result.get("warnings") else ""
                        log(f"{cfg.stage}: [{done}/{total}] {asset.uid}: 40 views in {result['seconds']:.1f} s on "
                            f"{where} (clipped {result['clipped_fraction']:.2%}{extra})")
                    else:
                        log(f"{cfg.stage}: [{done}/{total}] {asset.uid} on {where}: failed: {result['reason']}")
                    results.append({"uid": asset.uid, "source": asset.source, **result})
                    stats.driver_seconds += time.perf_counter() - d0
        finally:
            for ref in running:
                ray.cancel(ref, force=True)
        stats.seconds = time.perf_counter() - t0
    log(stats.totals(cfg.stage))
    return results, stats
