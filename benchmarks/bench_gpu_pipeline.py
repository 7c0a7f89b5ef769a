"""GPU speed of the real stage code: the `train` stage's train() and the `latents` stage's encoder, full size.

    .venv/bin/python benchmarks/bench_gpu_pipeline.py                   # on a CUDA machine: every table (~10 min)
    .venv/bin/python benchmarks/bench_gpu_pipeline.py --only train      # one group: train | render | latents
    .venv/bin/python benchmarks/bench_gpu_pipeline.py --device cpu --tiny   # smoke run of the same code paths

No CUDA (and no `--device cpu`): prints "skipped: no CUDA" and exits 0, so `make bench` runs anywhere.

What is timed (random weights; time and memory do not depend on their values):

* train: `chibisplat.training.train.train()` itself, the function `stages.train` runs (accelerate, the micro-batch
  loader, the UNet step, rendering loss, gradient clipping, AdamW, EMA, dvclive logging), on a latent cache in the
  real file format (32x32 latents = 256 px, 256 px render targets). The models are the full-size classes
  (GSRecon, GSVAE + tiny decoder, the SD1.5-size conv_in-10 multi-view UNet) built in memory with random weights
  and handed to train() in place of `load_model_stack` (no 6 GB fixture on disk needed; `--fixture DIR` reads
  them instead with the real loader from `python -m chibisplat.models.fixture --out DIR`). Each configuration runs
  in its own process (accelerate fixes mixed precision once per process; clean peak-memory statistics); s/step is
  the median of the timed steps after warm-up (compilation included in the warm-up), taken from train()'s own
  per-step log lines; the run stops before train() writes its final checkpoint.
* render: the rendering loss' renders (`objective.splatter_render_loss`: splatter -> Gaussians -> 8 views -> MSE,
  forward + backward) for 8 objects x 8 views at 256 px (262,144 Gaussians per object, random splatter values),
  one rasterizer call per view vs one per object.
* latents: `latents.encode_character` (the stage's per-character work: PNG decoding, 9 view sets through the frozen
  GSRecon + GSVAE) on synthetic packed characters at 256 px, float32 vs bf16 autocast.

Columns: s/step, objects/s (batch x accumulation / s/step), peak GiB (torch.cuda.max_memory_allocated).
The configurations are the rows of issue 9's table; the `preset` rows are the pretrained preset of params.yaml.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # synthetic_renders: packed characters for the latents rows

import yaml  # noqa: E402

from chibisplat.protocol import CANONICAL_RADIUS  # noqa: E402
from chibisplat.config import TrainParams, build, load_config, resolved_section  # noqa: E402

LEGACY = dict(mode="full", mixed_precision="fp16", gradient_checkpointing=True, fused_adamw=False,
              ema_foreach=False, compile=False, rendering_loss_prob=0.0, gradient_accumulation_steps=1,
              dataloader_workers=0, lr=1e-5)
# (label, overrides of the pretrained train preset), issue 9's table first.
TRAIN_ROWS = [
    ("full, fp16 + GradScaler, checkpointing, AdamW, EMA (bench_gpu_train_step today)", dict(LEGACY)),
    ("full, no gradient checkpointing", dict(LEGACY, gradient_checkpointing=False)),
    ("full, + fused AdamW, foreach EMA", dict(LEGACY, gradient_checkpointing=False, fused_adamw=True,
                                               ema_foreach=True)),
    ("full, + bf16 (no scaler)", dict(LEGACY, gradient_checkpointing=False, fused_adamw=True, ema_foreach=True,
                                      mixed_precision="bf16")),
    ("full, + torch.compile of the UNet", dict(LEGACY, gradient_checkpointing=False, fused_adamw=True,
                                               ema_foreach=True, mixed_precision="bf16", compile=True)),
    ("full, bf16 + fused + foreach + checkpointing (24 GB cards)", dict(LEGACY, mixed_precision="bf16",
                                                                       fused_adamw=True, ema_foreach=True)),
    ("LoRA r=4, fp16, checkpointing, AdamW (as today)", dict(LEGACY, mode="lora", lr=1e-4)),
    ("LoRA r=4, preset levers (bf16, no checkpointing, fused, foreach), no rendering loss",
     dict(rendering_loss_prob=0.0, gradient_accumulation_steps=1)),
    ("train preset: LoRA, rendering loss on, 2 accumulation steps, 2 loader workers", {}),
    ("train preset + torch.compile", dict(compile=True)),
]
WARMUP, TIMED = 3, 8  # steps (compilation happens in the warm-up)
TINY_WARMUP, TINY_TIMED = 1, 2


class _Enough(Exception):
    """Raised from train()'s log callback once the timed steps are done (skips the final checkpoint write)."""


def pretrained_models():
    """params.yaml ``models:`` with ``source: pretrained`` and no fine-tuned modules."""
    models = load_config(REPO / "params.yaml", sections=("models",)).models
    return dataclasses.replace(models, source="pretrained", finetuned=None)


def fixture_models_cfg(folder: str):
    """params.yaml ``models:`` for a folder written by ``python -m chibisplat.models.fixture --out DIR``."""
    from chibisplat.models.fixture import DIFFSPLAT_DIR, SD15_DIR

    models = pretrained_models()
    diffsplat = dataclasses.replace(models.diffsplat, path=Path(folder) / DIFFSPLAT_DIR)
    sd15 = dataclasses.replace(models.sd15, path=Path(folder) / SD15_DIR)
    return dataclasses.replace(models, diffsplat=diffsplat, sd15=sd15)


def full_size_stack(tiny: bool, fixture: str | None = None):
    """The full-size modules with random weights: read by the real loader from a published-layout fixture folder
    (``--fixture``), else built in memory; or the tiny stack for the CPU smoke run."""
    from chibisplat.models.sources import ModelStack, load_model_stack, tiny_model_stack

    if tiny:
        return tiny_model_stack(0)
    if fixture:
        return load_model_stack(fixture_models_cfg(fixture))
    from chibisplat.models.gsdiff import build_mv_unet, mv_unet_config
    from chibisplat.models.gsrecon import GSRecon
    from chibisplat.models.gsvae import GSAutoencoderKL

    torch.manual_seed(0)
    return ModelStack("pretrained", GSRecon().eval(), GSAutoencoderKL().eval(), build_mv_unet(mv_unet_config()).eval(),
                      None)


def write_latent_cache(root: Path, n_chars: int, latent: int, render_res: int) -> tuple[Path, Path]:
    """A latent cache + prompt embeddings in the real file formats (random values, 9 view sets per character)."""
    import numpy as np
    import pyarrow.parquet as pq
    from safetensors.torch import save_file

    from chibisplat.dataset.embeddings import embeddings_table
    from chibisplat.identity import sha256_text
    from chibisplat.training.inference import inference_cameras
    from chibisplat.protocol import EVEN_VIEW_SETS
    from chibisplat.training.latents import FORMAT_VERSION

    g = torch.Generator().manual_seed(0)
    captions = [f"a chibi character number {i}" for i in range(n_chars)]
    embeddings = root / "prompt_embeds.parquet"
    emb = torch.randn(n_chars + 1, 77, 768, generator=g).numpy().astype(np.float32)
    pq.write_table(embeddings_table([""] + captions, emb, "bench-encoder"), embeddings)
    c2w, intr = inference_cameras(20.0, CANONICAL_RADIUS, tuple(range(0, 360, 45)))
    s = len(EVEN_VIEW_SETS)
    yy, xx = torch.meshgrid(torch.arange(render_res), torch.arange(render_res), indexing="ij")
    disc = ((xx - render_res / 2) ** 2 + (yy - render_res / 2) ** 2 < (render_res / 3) ** 2)
    rgba = torch.full((s, 8, 4, render_res, render_res), 255, dtype=torch.uint8)
    rgba[:, :, :3] = torch.where(disc, torch.randint(0, 255, (3, render_res, render_res), generator=g,
                                                     dtype=torch.uint8), rgba[0, 0, :3])
    rgba[:, :, 3] = disc.to(torch.uint8) * 255
    out = root / "latents" / "train"
    out.mkdir(parents=True)
    for i, caption in enumerate(captions):
        tensors = {
            "latents": torch.randn(s, 4, 4, latent, latent, generator=g) * 4.0,
            "C2W": c2w[None].expand(s, -1, -1, -1).contiguous(),
            "fxfycxcy": intr[None].expand(s, -1, -1).contiguous(),
            "view_indices": torch.arange(8)[None].expand(s, -1).contiguous(),
            "target_rgba": rgba.clone(),
        }
        meta = {"format": str(FORMAT_VERSION), "uid": f"char{i}", "caption": caption,
                "caption_sha256": sha256_text(caption), "cache_key": f"bench{i}", "models": "bench"}
        save_file(tensors, str(out / f"char{i}.safetensors"), metadata=meta)
    return root / "latents", embeddings


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def worker_train(job: dict) -> dict:
    """One train() run in this process: median s/step of the timed steps, peak memory."""
    from chibisplat.training import train as train_mod

    tiny, device = job["tiny"], job["device"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["models"]["source"] = "pretrained"  # the pretrained preset is the base of every row
    section = resolved_section(params, "train")
    warmup, timed = (TINY_WARMUP, TINY_TIMED) if tiny else (WARMUP, TIMED)
    section.update(job["overrides"])
    section.update(latents_dir=job["latents_dir"], embeddings=job["embeddings"], out_dir=job["out_dir"],
                   metrics_dir=job["out_dir"] + "/metrics", max_steps=warmup + timed + 1, checkpointing_steps=10**6,
                   log_every=1, resume="never", lpips_weights=None, seed=0)
    if tiny:
        section.update(batch_size=2)
    p = build(TrainParams, {k: v for k, v in section.items() if k != "presets"}, "train")
    if tiny and p.compile:
        train_mod.COMPILE_BACKEND = "aot_eager"  # inductor's C++ build of the tiny UNet takes minutes on 2 cores
    stack = full_size_stack(tiny, job.get("fixture"))
    train_mod.load_model_stack = lambda cfg: stack  # the real train() on in-memory full-size random weights
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    stamps: list[float] = []

    def log(msg: str) -> None:
        if msg.startswith("train: step "):
            stamps.append(time.perf_counter())  # train() logs after the step's loss .item(): the step is done
            if len(stamps) == warmup + timed:
                raise _Enough

    try:
        train_mod.train(p, pretrained_models(), log=log)  # its load_model_stack returns the random full-size stack
    except _Enough:
        pass
    _sync(device)
    steps = [b - a for a, b in zip(stamps[warmup - 1:], stamps[warmup:])]
    s = statistics.median(steps)
    return {"s_step": s, "objects_s": p.batch_size * p.gradient_accumulation_steps / s, "peak_gib": _peak(device),
            "batch": f"{p.batch_size} x {p.gradient_accumulation_steps}"}


def worker_render(job: dict) -> dict:
    """The rendering loss (forward + backward) of 8 objects x 8 views, per view vs per object."""
    from chibisplat.training import objective
    from chibisplat.training.inference import inference_cameras

    tiny, device = job["tiny"], job["device"]
    b, res = (2, 32) if tiny else (8, 256)
    res_splat = res  # the tiny decoder's splatter images are as large as the views (256 px -> 262,144 Gaussians)
    g = torch.Generator().manual_seed(0)
    # Splatter values uniform in [-1, 1] (the decoder's clamp range): Gaussians of every size the activations allow.
    # (A random-weight decoder gives a degenerate all-transparent output, so it is not used here.)
    splatter = (torch.rand(b, 4, 12, res_splat, res_splat, generator=g) * 2 - 1).to(device)
    c2w, intr = inference_cameras(20.0, CANONICAL_RADIUS, tuple(range(0, 360, 45)))
    C2W, fxfycxcy = c2w[None].expand(b, -1, -1, -1).to(device), intr[None].expand(b, -1, -1).to(device)
    gt = torch.ones(b, 8, 3, res, res, device=device)
    mask = torch.zeros(b, 8, 1, res, res, device=device)
    out = {}
    # Under "diffsplat" (the default) gsplat gets precomputed covariances, one call per camera either way; the
    # batching lever is measured under "3dgs", where one call takes all 8 cameras (README "GPU speed levers").
    for formation, batched in (("3dgs", False), ("3dgs", True), ("diffsplat", True)):
        orig = objective.render_objects

        def render(*a, _batched=batched, _formation=formation, **k):
            return orig(*a, batch_views=_batched, **{**k, "image_formation": _formation})

        objective.render_objects = render
        try:
            times = []
            for i in range(2 + (2 if tiny else 5)):
                s = splatter.clone().requires_grad_(True)
                _sync(device)
                t0 = time.perf_counter()
                loss = objective.splatter_render_loss(s, C2W, fxfycxcy, gt, mask, None, 0.0)["render_loss"]
                loss.backward()
                _sync(device)
                if i >= 2:
                    times.append(time.perf_counter() - t0)
        finally:
            objective.render_objects = orig
        out[(formation, batched)] = statistics.median(times)
    return {"per_view_s": out[("3dgs", False)], "per_object_s": out[("3dgs", True)],
            "diffsplat_s": out[("diffsplat", True)], "objects": b, "res": res,
            "gaussians": 4 * res_splat * res_splat, "peak_gib": _peak(device)}


def worker_latents(job: dict) -> dict:
    """The latents stage's per-character encoding (9 view sets), characters/s."""
    from chibisplat.dataset.pack import packed_files
    from chibisplat.dataset.rows import shard_rows
    from chibisplat.training.latents import encode_character

    tiny, device = job["tiny"], job["device"]
    stack = full_size_stack(tiny, job.get("fixture"))
    stack.gsrecon.to(device)
    stack.gsvae.to(device)
    rows = [r for f in packed_files(Path(job["packed"]), "train") for r in shard_rows(f)]
    res = job["resolution"]
    base = load_config(REPO / "params.yaml", sections=("latents", "models")).latents  # the rest: params.yaml's
    params = dataclasses.replace(base, resolution=res, render_resolution=res, device=device,
                                 mixed_precision=job["mixed_precision"])
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    encode_character(stack, rows[0], params)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for row in rows:
        encode_character(stack, row, params)
    _sync(device)
    s = (time.perf_counter() - t0) / len(rows)
    return {"chars_s": 1.0 / s, "s_char": s, "peak_gib": _peak(device), "characters": len(rows)}


def run_worker(kind: str, job: dict) -> dict:
    """Run one job in a fresh process; returns its result (or {"error": ...})."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, json.dumps(job)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    oom = "OutOfMemoryError" in proc.stderr or "out of memory" in proc.stderr
    return {"error": "OOM" if oom else " | ".join(tail)[-300:]}


def _gib(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny models and sizes (a CPU smoke run of every code path)")
    ap.add_argument("--only", nargs="+", choices=("train", "render", "latents"), default=["train", "render", "latents"])
    ap.add_argument("--rows", type=int, nargs="+", help="train rows to run (0-based indices into the table)")
    ap.add_argument("--characters", type=int, default=8, help="characters encoded in the latents rows")
    ap.add_argument("--fixture", help="a folder written by `python -m chibisplat.models.fixture --out DIR`: load the "
                    "full-size models from it with the real loader (default: build them in memory)")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, job = args.worker[0], json.loads(args.worker[1])
        result = {"train": worker_train, "render": worker_render, "latents": worker_latents}[kind](job)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("\nbench_gpu_pipeline: skipped: no CUDA (run it on a GPU machine, or `--device cpu --tiny` to run the "
              "same code paths on tiny models)")
        return 0
    tiny, device = args.tiny, args.device
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    print(f"\nbench_gpu_pipeline: {'TINY models (smoke run)' if tiny else 'full-size models, random weights'}, "
          f"{name}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="bench_gpu_pipeline-") as tmp:
        root = Path(tmp)
        if "train" in args.only:
            latent, render_res = (8, 32) if tiny else (32, 256)
            latents_dir, embeddings = write_latent_cache(root, 4, latent, render_res)
            print(f"\ntrain() (the `train` stage), {'batch 2 (tiny)' if tiny else 'batch 8'} objects x 4 views, "
                  f"{latent}x{latent} latents, EMA on, render targets {render_res} px; median of "
                  f"{TINY_TIMED if tiny else TIMED} steps after {TINY_WARMUP if tiny else WARMUP} warm-up steps")
            print("| # | configuration | batch x accum | s/step | objects/s | peak GiB |\n|---|---|---|---|---|---|")
            for i, (label, overrides) in enumerate(TRAIN_ROWS):
                if args.rows is not None and i not in args.rows:
                    continue
                if tiny and overrides.get("compile"):
                    label += " [tiny: aot_eager backend]"
                job = {"tiny": tiny, "device": device, "overrides": overrides, "latents_dir": str(latents_dir),
                       "fixture": args.fixture,
                       "embeddings": str(embeddings), "out_dir": str(root / f"train{i}")}
                r = run_worker("train", job)
                if "error" in r:
                    print(f"| {i} | {label} | - | {r['error']} | - | - |", flush=True)
                else:
                    print(f"| {i} | {label} | {r['batch']} | {r['s_step']:.3f} | {r['objects_s']:.1f} | "
                          f"{_gib(r['peak_gib'])} |", flush=True)
        if "render" in args.only:
            r = run_worker("render", {"tiny": tiny, "device": device})
            if "error" in r:
                print(f"\nrendering loss: {r['error']}")
            else:
                print(f"\nrendering loss (splatter_render_loss, forward + backward), {r['objects']} objects x 8 views "
                      f"at {r['res']} px, {r['gaussians']:,} Gaussians per object")
                print("| image formation | rasterizer calls | ms | peak GiB |\n|---|---|---|---|")
                print(f"| 3dgs | one per view | {r['per_view_s'] * 1e3:.1f} | {_gib(r['peak_gib'])} |")
                print(f"| 3dgs | one per object (8 cameras batched) | {r['per_object_s'] * 1e3:.1f} | {_gib(r['peak_gib'])} |")
                print(f"| diffsplat (default) | one per camera (precomputed covariances) | {r['diffsplat_s'] * 1e3:.1f} | "
                      f"{_gib(r['peak_gib'])} |")
        if "latents" in args.only:
            from synthetic_renders import make_packed

            res = 64 if tiny else 256
            n = 2 if tiny else args.characters
            packed = make_packed(root / "data", n=n, size=res)
            print(f"\nlatents (encode_character: {n} characters x 9 view sets, {res} px, frozen GSRecon + GSVAE)")
            print("| mixed precision | characters/s | s/character | peak GiB |\n|---|---|---|---|")
            for mp in ("no", "bf16"):
                r = run_worker("latents", {"tiny": tiny, "device": device, "packed": str(packed), "resolution": res,
                                           "mixed_precision": mp, "fixture": args.fixture})
                if "error" in r:
                    print(f"| {mp} | {r['error']} | - | - |", flush=True)
                else:
                    print(f"| {mp} | {r['chars_s']:.2f} | {r['s_char']:.3f} | {_gib(r['peak_gib'])} |", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
