"""Training-side benchmark (CPU, tiny models): steps/s with the latent cache vs encoding every step, LoRA vs
full fine-tuning size for the tiny UNet and the full-size SD1.5 multi-view UNet (on the meta device: no memory),
and seconds per GSRecon / GSVAE fine-tuning step (the optional finetune stage) at 64 and 128 px.

    .venv/bin/python benchmarks/bench_train.py [--steps 5] [--resolution 128] [--finetune-steps 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from chibisplat.dataset.loader import PackedViewsDataset, ViewConfig  # noqa: E402
from chibisplat.dataset.pack import packed_files  # noqa: E402
from chibisplat.models.sources import build_full_size_empty, tiny_model_stack  # noqa: E402
from chibisplat.protocol import NUM_INPUT_VIEWS  # noqa: E402
from chibisplat.training.latents import encode_views, load_latent_set  # noqa: E402
from chibisplat.training.objective import (  # noqa: E402
    Batch, diffusion_step_inputs, noise_scheduler, sample_batch, step_generator,
)
from chibisplat.training.train import parameter_counts  # noqa: E402


def unet_step(unet, opt, scheduler, stack, batch, null, resolution, g):
    inputs = diffusion_step_inputs(batch, scheduler, stack.gsvae.scale_latents, null, 0.1, resolution, g)
    pred = unet(inputs["unet_input"], inputs["timesteps"], inputs["encoder_hidden_states"],
                cross_attention_kwargs={"num_views": NUM_INPUT_VIEWS}).sample
    F.mse_loss(pred, inputs["target"]).backward()
    opt.step()
    opt.zero_grad()


def bench_steps(steps: int, resolution: int) -> tuple[float, float]:
    stack = tiny_model_stack(0)
    scheduler = noise_scheduler(stack)
    unet = stack.unet.train()
    opt = torch.optim.AdamW(unet.parameters(), 1e-4)
    data = load_latent_set(REPO / "data/latents", "train", REPO / "data/embeddings/prompt_embeds.parquet")
    if data.resolution != resolution:
        raise SystemExit(f"data/latents is at {data.resolution} px; run with --resolution {data.resolution}")
    unet_step(unet, opt, scheduler, stack, sample_batch(data, 1, step_generator(0, 0)), data.null_embed, resolution,
              step_generator(0, 0))  # warm-up
    t = time.perf_counter()
    for s in range(steps):
        g = step_generator(0, s)
        unet_step(unet, opt, scheduler, stack, sample_batch(data, 1, g), data.null_embed, resolution, g)
    cached = steps / (time.perf_counter() - t)

    dataset = PackedViewsDataset(packed_files(REPO / "data/packed", "train"), REPO / "data/embeddings/prompt_embeds.parquet",
                                 ViewConfig(resolution=resolution), seed=0, repeat=True)
    it = iter(dataset)
    t = time.perf_counter()
    for s in range(steps):
        obj = next(it)  # decode 8 views, GSRecon, GSVAE every step (what the cache saves)
        latents = encode_views(stack, obj)
        batch = Batch(latents[None], obj["C2W"][None], obj["fxfycxcy"][None], torch.zeros(1), obj["prompt_embed"][None],
                      torch.zeros(1))
        g = step_generator(0, s)
        unet_step(unet, opt, scheduler, stack, batch, data.null_embed, resolution, g)
    uncached = steps / (time.perf_counter() - t)
    return cached, uncached


def bench_finetune(steps: int, resolution: int) -> dict[str, float]:
    """Seconds per fine-tuning step (batch 1 object, 8 rendered views at ``resolution``) on data/packed."""
    from chibisplat.config import load_config
    from chibisplat.training.finetune import gsrecon_step_loss, gsvae_step_loss, object_batches

    base = load_config(REPO / "params.yaml", sections=("finetune", "models")).finetune  # the rest: params.yaml's
    p = dataclasses.replace(base, packed_dir=REPO / "data/packed", resolution=resolution, render_resolution=resolution,
                            rasterizer="torch")
    stack = tiny_model_stack(0)
    batches = object_batches(p)
    out = {}
    for name, module, loss in (
        ("gsrecon", stack.gsrecon, lambda b: gsrecon_step_loss(stack, b, p, None)),
        ("gsvae", stack.gsvae.vae, lambda b: gsvae_step_loss(stack, b, p, None, tiny=False)),
    ):
        module.train().requires_grad_(True)
        opt = torch.optim.AdamW(module.parameters(), 1e-4)
        times = []
        for s in range(steps + 1):  # the first is a warm-up
            b = next(batches)
            t = time.perf_counter()
            loss(b)["loss"].backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - t)
        module.requires_grad_(False).eval()
        out[name] = sum(times[1:]) / steps
    return out


def sizes(unet_factory, rank: int = 4) -> list[tuple[str, int, int, float]]:
    rows = []
    for mode in ("lora", "full"):
        trainable, total = parameter_counts(unet_factory(), mode, rank, rank)
        # fp32 weights + gradients and two AdamW moments of the trainable parameters
        mib = (total * 4 + trainable * 4 * 3) / 2**20
        rows.append((mode, trainable, total, mib))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--finetune-steps", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    cached, uncached = bench_steps(args.steps, args.resolution)
    print(f"\nTiny GSDiff training on CPU ({torch.get_num_threads()} threads), batch 1 object x 4 views, "
          f"{args.resolution} px, {args.steps} steps")
    print("| path | steps/s |\n|---|---|")
    print(f"| latent cache (UNet only) | {cached:.2f} |")
    print(f"| no cache (decode + GSRecon + GSVAE + UNet) | {uncached:.2f} |")
    print("\nLoRA (r=4, to_q/k/v/out.0) vs full fine-tuning (fp32 weights + grads + AdamW states)")
    print("| UNet | mode | trainable | total | weights+grads+Adam MiB |\n|---|---|---|---|---|")
    for name, factory in (("tiny", lambda: tiny_model_stack(0).unet), ("SD1.5 size (meta)", lambda: build_full_size_empty()["unet"])):
        for mode, trainable, total, mib in sizes(factory):
            print(f"| {name} | {mode} | {trainable:,} | {total:,} | {mib:,.0f} |")
    print("\nOptional finetune stage (tiny models, CPU rasterizer): seconds per step, 1 object, 4 input views "
          "-> 8 rendered views")
    print("| resolution | GSRecon step s | GSVAE step s |\n|---|---|---|")
    for res in (64, 128):
        t = bench_finetune(args.finetune_steps, res)
        print(f"| {res} | {t['gsrecon']:.2f} | {t['gsvae']:.2f} |")


if __name__ == "__main__":
    main()
