"""Full-size GSDiff training step (SD1.5 multi-view UNet, random weights): step time and peak GPU memory.

    .venv/bin/python benchmarks/bench_gpu_train_step.py                      # on a CUDA machine
    .venv/bin/python benchmarks/bench_gpu_train_step.py --tiny --device cpu  # smoke run of the same code on a CPU

What one step of `stages.train` does on the latent cache, at batch 1/4/8 objects x 4 views of 32x32 latents
(256 px): the conv_in-10 UNet forward with multi-view self-attention, epsilon MSE, backward, gradient clipping,
AdamW, EMA update; LoRA (r=4 on to_q/k/v/out.0) or full fine-tuning; fp16 autocast with fp32 master weights
(accelerate's mixed_precision: fp16), gradient checkpointing on. Weights are random (no download needed): time
and memory do not depend on their values. The issue's target: a full fine-tune step at batch 8 within 24 GB.

This is a synthetic loop (the issue 9 table's first row). benchmarks/bench_gpu_pipeline.py times the stage code
itself (train() with the speed levers: bf16, fused AdamW, foreach EMA, torch.compile, no checkpointing, the
rendering loss per object; and the latents encoding): use that one for the README's numbers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from chibisplat.models.gsdiff import build_mv_unet, mv_unet_config  # noqa: E402
from chibisplat.models.sources import tiny_model_stack  # noqa: E402
from chibisplat.protocol import NUM_INPUT_VIEWS  # noqa: E402
from chibisplat.training.train import lora_config  # noqa: E402


def build(mode: str, tiny: bool, device: str, checkpointing: bool, rank: int = 4):
    torch.manual_seed(0)
    unet = tiny_model_stack(0).unet if tiny else build_mv_unet(mv_unet_config())
    unet.requires_grad_(False)
    if mode == "lora":
        unet.add_adapter(lora_config(rank, rank))
    else:
        unet.requires_grad_(True)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.to(device).train()
    return unet, [p for p in unet.parameters() if p.requires_grad]


def run(mode: str, objects: int, steps: int, tiny: bool, device: str, fp16: bool, checkpointing: bool, ema: bool):
    from diffusers.training_utils import EMAModel

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    unet, trainable = build(mode, tiny, device, checkpointing)
    opt = torch.optim.AdamW(trainable, lr=1e-5)
    scaler = torch.amp.GradScaler(device, enabled=fp16 and device == "cuda")
    ema_model = EMAModel(trainable, decay=0.9999) if ema else None
    if ema_model is not None:
        ema_model.to(device)
    n = objects * NUM_INPUT_VIEWS
    size = unet.config.sample_size if not tiny else 16
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(n, unet.config.in_channels, size, size, generator=g).to(device)
    target = torch.randn(n, 4, size, size, generator=g).to(device)
    text = torch.randn(n, 77, 768, generator=g).to(device)
    t = torch.randint(0, 1000, (objects,), generator=g).repeat_interleave(NUM_INPUT_VIEWS).to(device)

    def step():
        with torch.autocast(device_type=device, dtype=torch.float16, enabled=fp16 and device == "cuda"):
            pred = unet(x, t, text, cross_attention_kwargs={"num_views": NUM_INPUT_VIEWS}).sample
            loss = F.mse_loss(pred.float(), target)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if ema_model is not None:
            ema_model.step(trainable)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):  # warm-up (cuDNN autotuning, allocator)
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return seconds, peak, sum(p.numel() for p in trainable)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--objects", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--modes", nargs="+", default=["lora", "full"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the tiny UNet (a CPU smoke run of this script)")
    ap.add_argument("--no-fp16", action="store_true")
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--no-ema", action="store_true")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        # Skipped, not failed: `make bench` runs every benchmark on CPU-only machines too.
        print("\nbench_gpu_train_step: skipped, no CUDA device here; run it on a GPU machine "
              "(or `--tiny --device cpu` to check the script)")
        return
    fp16, ckpt, ema = not args.no_fp16 and args.device == "cuda", not args.no_checkpointing, not args.no_ema
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"\nGSDiff training step, {'tiny' if args.tiny else 'SD1.5-size'} multi-view UNet (random weights), {name}, "
          f"fp16 autocast {fp16}, gradient checkpointing {ckpt}, EMA {ema}, {args.steps} timed steps")
    print("| mode | objects (x4 views) | trainable params | s/step | peak GiB |\n|---|---|---|---|---|")
    for mode in args.modes:
        for objects in args.objects:
            try:
                s, peak, trainable = run(mode, objects, args.steps, args.tiny, args.device, fp16, ckpt, ema)
                print(f"| {mode} | {objects} | {trainable:,} | {s:.3f} | {peak:.1f} |", flush=True)
            except torch.OutOfMemoryError:
                print(f"| {mode} | {objects} | - | OOM | - |", flush=True)
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
