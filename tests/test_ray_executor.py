"""The Ray executor of the render stage (chibisplat/executors/) on a real Ray cluster on this machine: a head with
no CPUs and two 1-CPU worker nodes on loopback (``ray.cluster_utils.Cluster``), so every character runs on a worker
node. Byte-identical output to the local path, incremental runs that ship only what changed, a node killed in the
middle of a run, and a killed driver. Slow: each character is a real (tiny) Cycles render."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Ray's switch for a single-machine cluster: every node, and the driver, on 127.0.0.1 (never the machine's network
# address). Read when ray is imported, so before the import below.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from asset_factory import write_ascii_fbx, write_gltf_without_mesh
from conftest import REPO, render_params, sample_asset

from chibisplat.executors import ExecutorConfig, ExecutorError, executor_config
from chibisplat.render.stage import CHARACTER_FILES, run_render_stage

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")

QUIET = dict(log=lambda *_: None)
OBJECT_STORE = 80 * 1024**2  # small: the machine's cores and memory are shared
LOOPBACK = "127.0.0.1"


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _assets(tmp: Path, n: int) -> Path:
    assets = tmp / "assets"
    assets.mkdir(parents=True)
    src = sample_asset()
    for i in range(n):
        shutil.copy(src, assets / f"char{i}{src.suffix}")
    return assets


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "object_store_memory": OBJECT_STORE, "node_ip_address": LOOPBACK})
    workers = [c.add_node(num_cpus=1, object_store_memory=OBJECT_STORE, node_ip_address=LOOPBACK) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    c.workers = workers
    yield c
    ray.shutdown()
    c.shutdown()


RAY = ExecutorConfig(stage="render", executor="ray", num_cpus=1, max_retries=3)


# ----------------------------------------------------------------------------------------------------------- fast


def test_cluster_section_is_validated_and_defaults_to_local():
    assert executor_config({}, "render") == ExecutorConfig(stage="render")
    cfg = executor_config({"cluster": {"render": {"executor": "ray", "ray_address": "10.0.0.1:6379"}}}, "render")
    assert cfg.is_ray and cfg.ray_address == "10.0.0.1:6379"
    with pytest.raises(ValueError, match=r"cluster\.render\.executer.*did you mean cluster\.render\.executor"):
        executor_config({"cluster": {"render": {"executer": "ray"}}}, "render")
    with pytest.raises(ValueError, match=r"cluster\.latents\.executor = 'spark' is not allowed"):
        executor_config({"cluster": {"latents": {"executor": "spark"}}}, "latents")
    with pytest.raises(ExecutorError, match=r"cluster\.render\.num_cpus must be >= 1"):
        executor_config({"cluster": {"render": {"executor": "ray", "num_cpus": 0.5}}}, "render")


def test_cluster_section_is_tracked_by_no_stage():
    """Where a character is computed never changes its bytes, so no stage re-runs when the executor changes."""
    from ruamel.yaml import YAML

    stages = YAML(typ="safe").load((REPO / "dvc.yaml").read_text())["stages"]
    assert all(not str(p).startswith("cluster") for s in stages.values() for p in s.get("params", []))


def test_asset_bundle_keeps_the_relative_layout_of_referenced_files(tmp_path):
    from chibisplat.executors.render import asset_bundle

    (tmp_path / "chars" / "a").mkdir(parents=True)
    (tmp_path / "textures").mkdir()
    (tmp_path / "chars" / "a" / "hero.gltf").write_bytes(b"asset")
    (tmp_path / "chars" / "a" / "hero.bin").write_bytes(b"buffer")
    (tmp_path / "textures" / "skin.png").write_bytes(b"png")
    key, bundle = asset_bundle(tmp_path / "chars" / "a" / "hero.gltf", ["hero.bin", "../../textures/skin.png"])
    assert key == "chars/a/hero.gltf"
    assert bundle == {"chars/a/hero.gltf": b"asset", "chars/a/hero.bin": b"buffer", "textures/skin.png": b"png"}


# ----------------------------------------------------------------------------------------------------------- slow


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_ray_run_equals_local_run_byte_for_byte_and_ships_only_what_changed(cluster, tmp_path):
    local_dir, ray_dir = tmp_path / "local", tmp_path / "ray"
    for d in (local_dir, ray_dir):
        _assets(d, 2)
        write_ascii_fbx(d / "assets" / "box.fbx")
        write_gltf_without_mesh(d / "assets" / "empty.gltf")  # fails for its own reasons, the others go on
    local = run_render_stage(render_params(local_dir, resolution=32, samples=1), **QUIET)
    lines: list[str] = []
    params = render_params(ray_dir, resolution=32, samples=1)
    first = run_render_stage(params, log=lines.append, executor=RAY)
    assert local["counts"] == first["counts"] == {"rendered": 3, "cached": 0, "failed": 1, "removed": 0}
    assert _files(ray_dir / "renders") == _files(local_dir / "renders")
    assert (ray_dir / "reports" / "render.json").read_bytes() == (local_dir / "reports" / "render.json").read_bytes()
    assert sorted(first["executor"]["shipped"]) == ["box", "char0", "char1", "empty"]
    assert local["executor"] == {"kind": "local", "shipped": []}
    # Progress: one line per finished character naming the node it ran on, and the totals.
    done = [line for line in lines if line.startswith("render: [")]
    assert len(done) == 4 and all(f" on {LOOPBACK} (node " in line for line in done)
    assert any(line.startswith("render: ray: 4 shipped, 4 returned") for line in lines)
    worker_ids = {n.node_id[:8] for n in cluster.workers}
    assert {line.split("(node ")[1][:8] for line in done} <= worker_ids  # never the CPU-less head
    assert set(first["executor"]["nodes"]) <= {f"{LOOPBACK} (node {i})" for i in worker_ids}

    # Nothing changed: nothing is shipped. One asset changed: exactly that one is (plus the failing one, which
    # has no cached render and is retried on every run, as in the local path).
    second = run_render_stage(params, **QUIET, executor=RAY)
    assert second["executor"]["shipped"] == ["empty"] and second["counts"]["cached"] == 3
    (ray_dir / "assets" / "empty.gltf").unlink()
    write_ascii_fbx(ray_dir / "assets" / "box.fbx", size=(0.5, 0.5, 1.0))
    before = _files(ray_dir / "renders")
    third = run_render_stage(params, **QUIET, executor=RAY)
    assert third["executor"]["shipped"] == ["box"]
    assert third["counts"] == {"rendered": 1, "cached": 2, "failed": 0, "removed": 0}
    after = _files(ray_dir / "renders")
    assert {k: v for k, v in after.items() if not k.startswith("box/")} == \
        {k: v for k, v in before.items() if not k.startswith("box/")}
    assert {k: v for k, v in after.items() if k.startswith("box/")} != {k: v for k, v in before.items() if k.startswith("box/")}


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_node_killed_mid_run_loses_no_character(cluster, tmp_path):
    _assets(tmp_path, 3)
    params = render_params(tmp_path, resolution=32, samples=1)
    killed: list[str] = []

    def log(line: str) -> None:
        # At the first finished character the other worker node is busy with another one: kill that node.
        if line.startswith("render: [1/") and not killed:
            finished_on = line.split("(node ")[1][:8]
            victim = next(n for n in cluster.workers if n.node_id[:8] != finished_on)
            killed.append(victim.node_id[:8])
            cluster.remove_node(victim, allow_graceful=False)
            cluster.workers.remove(victim)

    try:
        run = run_render_stage(params, log=log, executor=RAY)
    finally:  # the later tests get two worker nodes again
        while len(cluster.workers) < 2:
            cluster.workers.append(cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE,
                                                    node_ip_address=LOOPBACK))
        cluster.wait_for_nodes()
    assert killed, "the run finished before a node could be killed"
    assert run["counts"] == {"rendered": 3, "cached": 0, "failed": 0, "removed": 0}
    assert run["executor"]["system_failures"] == 0
    assert not any(killed[0] in node for node in run["executor"]["nodes"])  # its character was retried elsewhere
    for uid in ("char0", "char1", "char2"):
        assert sorted(p.name for p in (tmp_path / "renders" / uid).iterdir()) == sorted(CHARACTER_FILES)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_killed_driver_leaves_no_half_character_and_the_next_run_resumes(cluster, tmp_path):
    """The stage process (the Ray driver) is SIGKILLed after its first install; params.yaml points it at the
    cluster (``cluster.render.ray_address``), as `dvc repro` would run it."""
    _assets(tmp_path, 3)
    params = render_params(tmp_path, resolution=48, samples=2)
    cluster_section = {"render": {"executor": "ray", "ray_address": cluster.address, "num_cpus": 1}}
    (tmp_path / "params.yaml").write_text(json.dumps({"render": params, "cluster": cluster_section}))
    proc = subprocess.Popen([sys.executable, "-m", "stages.render"], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    renders = tmp_path / "renders"
    deadline = time.time() + 180
    while time.time() < deadline and not any(renders.glob("*/meta.json")) and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = [p.name for p in renders.iterdir() if p.is_dir()]
    assert 1 <= len(done) < 3
    for name in done:  # whatever exists is complete
        assert sorted(p.name for p in (renders / name).iterdir()) == sorted(CHARACTER_FILES)
    run = run_render_stage(params, **QUIET, executor=RAY)
    assert run["counts"]["cached"] == len(done) and run["counts"]["rendered"] == 3 - len(done)
    assert sorted(run["executor"]["shipped"]) == sorted(set(["char0", "char1", "char2"]) - set(done))


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_ray_latents_equal_local_latents_byte_for_byte_and_ship_only_what_changed(cluster, tmp_path):
    import numpy as np
    import pyarrow.parquet as pq
    from synthetic_renders import make_packed

    from chibisplat.dataset import schema
    from chibisplat.dataset.embeddings import embeddings_table
    from chibisplat.dataset.pack import packed_files
    from project_config import models_params, section_params

    from chibisplat.training.latents import build_latents

    packed = make_packed(tmp_path, n=3, size=16)
    captions = sorted({c for f in packed_files(packed) for c in pq.read_table(f).column(schema.CAPTION).to_pylist()})
    embeddings = tmp_path / "prompt_embeds.parquet"
    pq.write_table(embeddings_table([""] + captions, np.zeros((len(captions) + 1, 77, 768), np.float32), "zeros"),
                   embeddings)
    models = models_params()
    cfg = ExecutorConfig(stage="latents", executor="ray", workers=2, num_cpus=1, num_gpus=None, worker_device="cpu")

    def params(name):
        return section_params("latents", packed_dir=packed, embeddings=embeddings, out_dir=tmp_path / name,
                              resolution=16, render_resolution=8, view_sets=(0, 6), device="cpu")

    local = build_latents(params("local"), models, log=lambda *_: None)
    lines: list[str] = []
    first = build_latents(params("ray"), models, log=lines.append, executor=cfg)
    assert len(local.encoded) == len(first.encoded) == 3 and local.executor["kind"] == "local"
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")
    assert sorted(first.executor["shipped"]) == sorted(first.encoded)
    assert all(f" on {LOOPBACK} (node " in line for line in lines if line.endswith("encoded") or " encoded on " in line)
    assert sum(" encoded on " in line for line in lines) == 3

    victim = sorted(first.encoded)[1]
    next(p for p in (tmp_path / "ray").rglob(f"{victim}.safetensors")).unlink()
    again = build_latents(params("ray"), models, log=lambda *_: None, executor=cfg)
    assert again.executor["shipped"] == [victim] and len(again.reused) == 2
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")


def test_an_unreachable_cluster_is_a_clear_error_at_once(tmp_path, monkeypatch):
    import socket

    from chibisplat.executors import ray_session

    with socket.socket() as s:  # a port nobody listens on
        s.bind((LOOPBACK, 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    cfg = ExecutorConfig(stage="render", executor="ray", ray_address=f"{LOOPBACK}:{port}")
    t0 = time.perf_counter()
    with pytest.raises(ExecutorError, match=rf"cannot reach the Ray cluster at '{LOOPBACK}:{port}'.*ray start --head"):
        with ray_session(cfg, log=lambda *_: None):
            pass
    assert time.perf_counter() - t0 < 5
