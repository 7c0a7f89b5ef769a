"""Benchmarks: CPU rasterizer forward/backward time, and parameter counts of the full-size models.

Run: ``python benchmarks/bench_models.py [--threads 1] [--sizes 64 128 256] [--counts 10000 30000 100000]``.
Full-size models are built on the meta device (no weights allocated).
"""

from __future__ import annotations

import argparse
import time

import torch

from chibisplat import cameras
from chibisplat.models.sources import build_full_size_empty
from chibisplat.splats.rasterize import rasterize_torch
from chibisplat.splats.splatter import Gaussians


def character_like_gaussians(n: int, seed: int = 0) -> Gaussians:
    """Gaussians filling [-0.5, 0.5]^3 with DiffSplat-range scales (0.0005..0.02)."""
    g = torch.Generator().manual_seed(seed)
    return Gaussians(
        means=torch.rand(n, 3, generator=g) - 0.5,
        quats=torch.randn(n, 4, generator=g),
        scales=torch.rand(n, 3, generator=g) * 0.0195 + 0.0005,
        opacities=torch.rand(n, generator=g),
        colors=torch.rand(n, 3, generator=g),
    )


def time_rasterizer(n: int, res: int) -> tuple[float, float]:
    g = character_like_gaussians(n)
    fields = [g.means, g.quats, g.scales, g.opacities, g.colors]
    for t in fields:
        t.requires_grad_(True)
    c2w = torch.tensor(cameras.slot_c2w(cameras.camera_slots()[3]), dtype=torch.float32)
    K = torch.tensor(cameras.intrinsics(res, res), dtype=torch.float32)
    t0 = time.perf_counter()
    out = rasterize_torch(g, c2w, K, res, res)
    t1 = time.perf_counter()
    (out["image"].sum() + out["alpha"].sum()).backward()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--counts", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    time_rasterizer(1000, 32)  # warm-up (first-call allocations)

    print(f"CPU rasterizer (torch {torch.__version__}, {args.threads} thread(s)); seconds per view")
    print(f"{'gaussians':>10} {'px':>5} {'forward':>9} {'backward':>9}")
    for n in args.counts:
        for res in args.sizes:
            fwd, bwd = time_rasterizer(n, res)
            print(f"{n:>10} {res:>5} {fwd:>9.3f} {bwd:>9.3f}", flush=True)

    print("\nFull-size modules (meta device)")
    for name, module in build_full_size_empty().items():
        total = sum(p.numel() for p in module.parameters())
        print(f"{name:>10} {total:>14,d}")


if __name__ == "__main__":
    main()
