"""Render on Ray vs locally: characters/hour and the driver's overhead per character, on this machine.

    .venv/bin/python benchmarks/bench_ray.py [--characters 4] [--resolution 64] [--samples 4]

Renders ``--characters`` copies of the bundled sample (data/assets) with the params.yaml render settings at a small
size, four ways: the local path with 1 worker (2 Cycles threads) and with 2 workers (1 thread each), and Ray with
one worker node of 2 CPUs (tasks of 2 CPUs) and with two worker nodes of 1 CPU (tasks of 1 CPU), the head holding
no CPUs. The Ray nodes are ``ray.cluster_utils.Cluster`` nodes on loopback, so "nodes" share this machine's cores:
the numbers show the executor's cost, not a cluster's speed-up. Cluster start-up is timed apart and not counted.

Driver overhead = the stage process's own time per character on the Ray path (reading and shipping the asset,
receiving and installing the 121 files), excluding the waiting.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every node and the driver on 127.0.0.1

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from chibisplat.executors import ExecutorConfig  # noqa: E402
from chibisplat.params import section  # noqa: E402
from chibisplat.render.stage import run_render_stage  # noqa: E402

OBJECT_STORE = 80 * 1024**2


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def render(root: Path, base: dict, n: int, executor=None, workers: int = 1) -> tuple[float, dict]:
    assets = root / "assets"
    assets.mkdir(parents=True)
    src = next(p for p in sorted((REPO / "data" / "assets").iterdir()) if p.suffix.lower() in (".glb", ".fbx", ".vrm"))
    for i in range(n):
        shutil.copy(src, assets / f"char{i}{src.suffix}")
    params = {**base, "assets_dir": str(assets), "out_dir": str(root / "renders"),
              "report": str(root / "render.json"), "scratch_dir": str(root / "scratch"), "workers": workers}
    t0 = time.perf_counter()
    run = run_render_stage(params, log=lambda *_: None, executor=executor)
    wall = time.perf_counter() - t0
    assert run["counts"]["rendered"] == n, run["counts"]
    return wall, run


def ray_run(root: Path, base: dict, n: int, nodes: int, cpus_per_node: int) -> tuple[float, dict, float]:
    import ray
    from ray.cluster_utils import Cluster

    t0 = time.perf_counter()
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "object_store_memory": OBJECT_STORE, "node_ip_address": "127.0.0.1"})
    for _ in range(nodes):
        cluster.add_node(num_cpus=cpus_per_node, object_store_memory=OBJECT_STORE, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    startup = time.perf_counter() - t0
    try:
        cfg = ExecutorConfig(stage="render", executor="ray", num_cpus=cpus_per_node, max_retries=3)
        wall, run = render(root, base, n, executor=cfg)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return wall, run, startup


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--characters", type=int, default=4)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--samples", type=int, default=4)
    args = ap.parse_args()
    base = {**section("render", REPO / "params.yaml"), "resolution": args.resolution, "samples": args.samples}
    n = args.characters
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_ray_") as tmp:
        tmp = Path(tmp)
        for workers in (1, 2):
            wall, _ = render(tmp / f"local{workers}", base, n, workers=workers)
            rows.append((f"local, {workers} worker(s)", wall, None, None))
        for nodes, cpus in ((1, 2), (2, 1)):
            wall, run, startup = ray_run(tmp / f"ray{nodes}", base, n, nodes, cpus)
            stats = run["executor"]
            rows.append((f"ray, {nodes} worker node(s) x {cpus} CPU", wall, stats["driver_seconds"] / n, startup))
        same = files(tmp / "local2" / "renders") == files(tmp / "ray2" / "renders")
    print(f"\n{n} characters x 40 views at {args.resolution} px, {args.samples} samples, {os.cpu_count()} cores "
          "(shared machine; Ray nodes on loopback share them)")
    print(f"{'executor':<28} {'wall s':>8} {'chars/hour':>11} {'driver ms/char':>15} {'cluster start s':>16}")
    for name, wall, overhead, startup in rows:
        o = f"{1000 * overhead:.0f}" if overhead is not None else "-"
        s = f"{startup:.1f}" if startup is not None else "-"
        print(f"{name:<28} {wall:>8.1f} {3600 * n / wall:>11.0f} {o:>15} {s:>16}")
    print(f"ray output byte-identical to local: {same}")


if __name__ == "__main__":
    main()
