"""The latents stage's encoding on Ray: encoder actors holding GSRecon + GSVAE (see :mod:`chibisplat.executors`).

Separate from the render executor so that each stage's import closure (dvc.yaml deps) holds only its own code.
"""

from __future__ import annotations

import dataclasses
import time

from chibisplat.config import ModelsParams
from chibisplat.executors import ExecutorConfig, ExecutorError, RunStats, node_label, node_of, ray_session


def plain_row(row: dict) -> dict:
    """A packed row (views still in Arrow) as plain Python values a Ray task can receive."""
    from chibisplat.dataset import schema

    n = len(row[schema.CAMERAS])
    out = {k: v for k, v in row.items() if k not in (schema.IMAGES, schema.NORMAL_DEPTH, schema.CAMERAS)}
    for k in (schema.IMAGES, schema.NORMAL_DEPTH, schema.CAMERAS):
        out[k] = [row[k][i] for i in range(n)]
    return out


class LatentEncoder:
    """An encoder actor (one per worker, holding GSRecon + GSVAE); created with ``ray.remote``. Runs on the node."""

    def __init__(self, models_cfg: ModelsParams, params, device: str, models_id: str, threads: int):
        import torch

        from chibisplat.device import resolve_device, to_device
        from chibisplat.models.sources import load_model_stack
        from chibisplat.training.latents import model_identity

        # Float reductions on the CPU depend on torch's intra-op thread count (about 2e-7 apart between 1 and 2
        # threads): the encoders use the driver's, so a Ray run writes the bytes a local run writes.
        torch.set_num_threads(threads)
        self.params = dataclasses.replace(params, device=str(resolve_device(device, "params.yaml latents.device")))
        self.stack = load_model_stack(models_cfg, with_unet=False)
        to_device((self.stack.gsrecon, self.stack.gsvae), self.params.device)
        self.node = node_of()
        mine = model_identity(self.stack)
        if mine != models_id:
            raise ExecutorError(f"the Ray node {node_label(self.node)} loads GSRecon/GSVAE weights {mine[:12]} but the "
                                f"driver {models_id[:12]}; give every node the same model files (models: in params.yaml)")

    def encode(self, row: dict):
        from chibisplat.training.latents import encode_character

        return self.node, encode_character(self.stack, row, self.params)


def latent_encoder(cfg: ExecutorConfig | None, encode_local, params, models_cfg: ModelsParams, models_id: str, log=print):
    """The encoder ``build_latents`` submits stale rows to: :class:`LocalLatents` (``encode_local(row)`` in this
    process) or :class:`RayLatents` for ``cluster.latents.executor: ray``."""
    if cfg is None or not cfg.is_ray:
        return LocalLatents(encode_local)
    return RayLatents(cfg, params, models_cfg, cfg.worker_device, models_id, log)


class LocalLatents:
    """The local path: encode in this process, at once (today's behaviour)."""

    stats = RunStats(kind="local")

    def __init__(self, encode):
        self.encode = encode

    def submit(self, uid: str, row: dict, done) -> None:
        done(self.encode(row), None)

    def drain(self) -> None:
        pass

    def close(self) -> None:
        pass


class RayLatents:
    """Rows go to ``cfg.workers`` encoder actors (bounded in flight); ``done(tensors)`` installs each result in the
    driver as it arrives (the caller's atomic write)."""

    def __init__(self, cfg: ExecutorConfig, params, models_cfg: ModelsParams, device: str, models_id: str, log=print):
        self.cfg, self.log = cfg, log
        self.stats = RunStats(kind="ray")
        self._session = ray_session(cfg, log)
        self.ray = ray = self._session.__enter__()
        gpus = cfg.num_gpus
        if gpus is None:  # one GPU per worker when CUDA is wanted
            wants = str(device).startswith("cuda") or (device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
            gpus = 1 if wants else 0
        actor = ray.remote(LatentEncoder).options(num_cpus=cfg.num_cpus, num_gpus=gpus, max_restarts=cfg.max_retries,
                                                  max_task_retries=cfg.max_retries)
        import torch

        threads = torch.get_num_threads()  # the local path's count (see LatentEncoder)
        self.actors = [actor.remote(models_cfg, params, device, models_id, threads) for _ in range(cfg.workers)]
        self.running: dict = {}  # ref -> (uid, done, actor index)
        self.load = [0] * len(self.actors)
        self.t0 = time.perf_counter()
        self.errors: list[str] = []

    def submit(self, uid: str, row: dict, done) -> None:
        d0 = time.perf_counter()
        while len(self.running) >= 2 * len(self.actors):
            self._collect(1)
        i = min(range(len(self.actors)), key=self.load.__getitem__)
        from chibisplat.dataset import schema

        row = plain_row(row)
        self.stats.bytes_sent += sum(len(b) for b in row[schema.IMAGES])
        self.running[self.actors[i].encode.remote(row)] = (uid, done, i)
        self.load[i] += 1
        self.stats.shipped.append(uid)
        self.stats.driver_seconds += time.perf_counter() - d0

    def _collect(self, n: int) -> None:
        ready, _ = self.ray.wait(list(self.running), num_returns=min(n, len(self.running)))
        for ref in ready:
            uid, done, i = self.running.pop(ref)
            self.load[i] -= 1
            try:
                node, tensors = self.ray.get(ref)
            except self.ray.exceptions.RayError as e:
                self.stats.system_failures += 1
                raise ExecutorError(f"latents: character {uid} could not be encoded on the Ray cluster: "
                                    f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}; "
                                    "the characters encoded so far are kept; re-run the stage") from None
            d0 = time.perf_counter()
            where = node_label(node)
            self.stats.nodes[where] = self.stats.nodes.get(where, 0) + 1
            self.stats.bytes_received += sum(t.numel() * t.element_size() for t in tensors.values())
            done(tensors, where)
            self.stats.driver_seconds += time.perf_counter() - d0

    def drain(self) -> None:
        while self.running:
            self._collect(len(self.running))

    def close(self) -> None:
        try:
            for ref in self.running:
                self.ray.cancel(ref, force=True)
            self.running.clear()
            for a in self.actors:
                self.ray.kill(a)
        finally:
            self.stats.seconds = time.perf_counter() - self.t0
            self._session.__exit__(None, None, None)
            if self.stats.shipped:
                self.log(self.stats.totals(self.cfg.stage))
