"""Where the per-character work of ``render`` and ``latents`` runs: this machine's processes, or a Ray cluster.

Why Ray: both stages are embarrassingly parallel over characters (about 16 s of Cycles per character on two cores;
a studio library of 10,000 is 44 hours on one machine). Ray is a pip-installable engine that schedules Python
functions onto whatever nodes ``ray.init(address=...)`` reaches, with per-task resource requests (CPUs for
Cycles' threads, a GPU per encoder), bounded retries when a worker process or node dies (system failures, kept
apart from the application errors a broken asset raises), and an object store that moves the inputs and results
of a task without a shared file system. Nothing of the pipeline's guarantees moves to the cluster:

* the **driver** (the DVC stage process) still decides what is stale (the per-character content-addressed cache:
  ``meta.json``'s ``(source_sha256, render_config_sha256)``, the latents' ``cache_key``), so an unchanged character
  is never shipped; it alone writes ``data/renders`` / ``data/latents``, with the same atomic installs as the local
  path (a staged folder swapped in with renames; a temp file + ``os.replace``), so a killed driver leaves no half
  character and the next run resumes from the cache;
* a **task** gets the character's bytes (the asset and every file it references, or the packed views), runs
  exactly the local code (``python -m chibisplat.render.worker`` in a child process with the same job file, or
  ``encode_character``) in a node-local temp folder, and returns the finished files (about 1 MB per character);
* a character's own failure comes back as the same result dict the local worker writes (reported, the others go
  on); a dead worker/node is retried up to ``max_retries`` times, then reported as failed for that character.

Mapping onto the local path: ``render.workers`` processes <-> Ray tasks of ``num_cpus`` CPUs (= Cycles threads,
``CHIBISPLAT_CYCLES_THREADS``); the job file's ``out_dir``/``scratch_dir`` <-> a temp folder on the node; the
worker's install into ``out_dir/<uid>`` <-> the driver's :func:`chibisplat.files.install_folder` of the returned
files. The driver ships its own ``chibisplat`` package with the tasks (Ray ``runtime_env`` ``py_modules``), and each
task checks that its node renders with the driver's render code and bpy version (``render_config``), so the
per-character cache cannot be filled with another code version's pixels.

The settings live in params.yaml ``cluster:`` (:func:`executor_config`), which no stage's dvc.yaml ``params:``
tracks: where a character is computed never changes a byte of it (``tests/test_ray_executor.py``), so switching
executors re-runs nothing. Ray is an optional extra (``pip install .[ray]``); it is imported only when used.
"""

from __future__ import annotations

import dataclasses
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from chibisplat.config_schema import EXECUTORS  # noqa: F401  (the allowed values live in the schema)

SECTION = "cluster"
STAGES = ("render", "latents")


class ExecutorError(RuntimeError):
    """A bad ``cluster:`` setting or an unusable cluster; the message says what to do."""


@dataclass(frozen=True)
class ExecutorConfig:
    """One stage's entry of params.yaml ``cluster:`` (defaults here; the schema is in config_schema.py)."""

    stage: str = "render"
    executor: str = "local"
    ray_address: str | None = None  # None: $RAY_ADDRESS when set, else start a Ray instance on this machine
    num_cpus: float = 1.0  # per task (render: Cycles threads) / per encoder actor
    num_gpus: float | None = 0.0  # per task / actor; latents: None = 1 when CUDA is wanted, else 0
    workers: int = 1  # latents: encoder actors (each loads GSRecon + GSVAE once)
    max_retries: int = 3  # re-runs of a character whose worker process or node died
    worker_device: str = "auto"  # latents: latents.device as written (resolved on each worker, not the driver)

    @property
    def is_ray(self) -> bool:
        return self.executor == "ray"


def executor_config(params: dict | None, stage: str) -> ExecutorConfig:
    """The ``cluster.<stage>`` settings of a loaded params.yaml (all optional; a missing section means local).

    Checked here with :mod:`chibisplat.config_schema` (the stages validate only the sections DVC tracks for them)."""
    from chibisplat.config_schema import validate_params

    if stage not in STAGES:
        raise ValueError(f"executor_config: stage must be one of {STAGES}, got {stage!r}")
    section = (params or {}).get(SECTION)
    if section is None:
        return ExecutorConfig(stage=stage)
    validate_params({SECTION: section}, sections=(SECTION,))
    values = dict(section.get(stage) or {})
    if stage == "latents":
        values["worker_device"] = str((params.get("latents") or {}).get("device") or "auto")
    cfg = ExecutorConfig(stage=stage, **values)
    if cfg.is_ray and stage == "render" and cfg.num_cpus < 1:
        raise ExecutorError("params.yaml cluster.render.num_cpus must be >= 1 (Cycles threads per character)")
    return cfg


def ray_module():
    """``import ray`` with an error that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ExecutorError(
            "params.yaml cluster.<stage>.executor is 'ray' but Ray is not installed; install the extra "
            "(pip install -e '.[ray]') or set the executor to local"
        ) from None
    return ray


@contextmanager
def ray_session(cfg: ExecutorConfig, log=print):
    """A connected Ray client for one stage run. An already initialised Ray (a test's cluster, a notebook) is used
    as is and left running; otherwise ``ray.init`` at ``cfg.ray_address`` ($RAY_ADDRESS, else a new local
    instance) with the driver's ``chibisplat`` package as ``py_modules``, shut down on exit."""
    ray = ray_module()
    started = False
    if not ray.is_initialized():
        address = cfg.ray_address or os.environ.get("RAY_ADDRESS") or "local"
        kwargs = {"include_dashboard": False} if address == "local" else {}
        _check_reachable(address, cfg)
        try:
            ray.init(address=address, runtime_env=package_runtime_env(), log_to_driver=False, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ExecutorError(
                f"cannot reach the Ray cluster at {address!r} (params.yaml cluster.{cfg.stage}.ray_address): {e}; "
                "start it with `ray start --head` (README, 'Rendering and encoding on a Ray cluster') or set "
                "ray_address: null for a local instance"
            ) from None
        started = True
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        res = ray.cluster_resources()
        log(f"{cfg.stage}: ray cluster with {len(nodes)} nodes, {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs")
        yield ray
    finally:
        if started:
            ray.shutdown()


def _check_reachable(address: str, cfg: ExecutorConfig, timeout: float = 10.0) -> None:
    """A ``host:port`` that does not answer is an error now (``ray.init`` would retry it for minutes)."""
    import socket

    if address in ("local", "auto") or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as e:
        raise ExecutorError(
            f"cannot reach the Ray cluster at {address!r} (params.yaml cluster.{cfg.stage}.ray_address, or "
            f"$RAY_ADDRESS): {e}; start its head with `ray start --head --port=6379` (README, 'Rendering and "
            "encoding on a Ray cluster') or set ray_address: null for a Ray instance on this machine"
        ) from None


def package_runtime_env() -> dict:
    """Ship the driver's ``chibisplat`` to every worker, so all nodes run the code the driver hashes."""
    import chibisplat

    return {"py_modules": [str(Path(chibisplat.__file__).parent)], "excludes": ["__pycache__", "*.pyc"]}


def node_of() -> dict:
    """Where a task runs (inside a task): the node's IP and Ray node id."""
    import ray

    return {"ip": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id()}


def node_label(node: dict) -> str:
    return f"{node.get('ip', '?')} (node {str(node.get('node_id', '?'))[:8]})"


@dataclass
class RunStats:
    """What one executor run did: the counts the tests and the benchmark read."""

    kind: str = "local"
    shipped: list[str] = field(default_factory=list)  # uids sent to the cluster, in submission order
    bytes_sent: int = 0
    bytes_received: int = 0
    nodes: dict[str, int] = field(default_factory=dict)  # node label -> finished characters
    system_failures: int = 0  # characters whose task died more than max_retries times
    seconds: float = 0.0  # wall time of the distributed part
    driver_seconds: float = 0.0  # time the driver spent packing inputs, unpacking and installing results

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def totals(self, stage: str) -> str:
        n = sum(self.nodes.values())
        rate = f"{3600 * n / self.seconds:.0f} characters/hour" if self.seconds > 0 and n else "no characters"
        per_node = ", ".join(f"{k}: {v}" for k, v in sorted(self.nodes.items())) or "none"
        overhead = f"{1000 * self.driver_seconds / len(self.shipped):.0f} ms" if self.shipped else "-"
        return (f"{stage}: ray: {len(self.shipped)} shipped, {n} returned in {self.seconds:.1f} s ({rate}); "
                f"per node: {per_node}; {self.system_failures} lost to dead workers/nodes; "
                f"sent {self.bytes_sent / 1e6:.1f} MB, received {self.bytes_received / 1e6:.1f} MB; "
                f"driver overhead {overhead} per character")


