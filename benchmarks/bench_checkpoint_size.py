"""Size of one train-stage checkpoint folder (accelerate ``save_state`` + the state file), LoRA rank r: the adapter-only
checkpoint (chibisplat/training/checkpointing.py) against accelerate's default, which writes the whole UNet; full
fine-tuning for reference. Real ``Accelerator.save_state`` calls on the tiny UNet and, with ``--full-size``, on the
SD1.5-size multi-view UNet (uninitialised memory: only the sizes matter; about 7 GB of RAM and disk).

    .venv/bin/python benchmarks/bench_checkpoint_size.py [--rank 4] [--full-size]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from chibisplat.models.sources import build_full_size_empty, tiny_model_stack  # noqa: E402
from chibisplat.training.checkpointing import adapter_only_checkpoints, save_checkpoint  # noqa: E402
from chibisplat.training.train import lora_config  # noqa: E402


def checkpoint_bytes(unet, mode: str, rank: int, adapter_only: bool, root: Path) -> tuple[int, int]:
    """(bytes of the checkpoint folder, trainable parameters) after one optimizer and EMA step."""
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

    unet.requires_grad_(False)
    if mode == "lora":
        unet.add_adapter(lora_config(rank, rank))
    else:
        unet.requires_grad_(True)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    for p in trainable:
        p.grad = torch.ones_like(p)
    optimizer.step()  # AdamW's moments exist from the first step on
    accelerator = Accelerator(cpu=True)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    ema = EMAModel(trainable)
    accelerator.register_for_checkpointing(ema)
    if adapter_only:
        adapter_only_checkpoints(accelerator, unet)
    folder = save_checkpoint(accelerator, root / "checkpoints", 1, "bench", 1, log=lambda *_: None)
    size = sum(p.stat().st_size for p in folder.iterdir())
    accelerator.free_memory()
    shutil.rmtree(root / "checkpoints")
    return size, sum(p.numel() for p in trainable)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--full-size", action="store_true", help="also the SD1.5-size UNet (about 7 GB RAM and disk)")
    args = ap.parse_args(argv)

    def tiny():
        return tiny_model_stack(0).unet

    def full_size():
        return build_full_size_empty()["unet"].to_empty(device="cpu")

    models = [("tiny", tiny)] + ([("SD1.5 size", full_size)] if args.full_size else [])
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as d:
        for name, build in models:
            for label, mode, adapter_only in (("lora, adapter only", "lora", True),
                                              ("lora, whole UNet (before)", "lora", False),
                                              ("full", "full", False)):
                if name != "tiny" and mode == "full":
                    continue  # 3 x 3.4 GB of moments and EMA: the table's point is LoRA
                size, n = checkpoint_bytes(build(), mode, args.rank, adapter_only, Path(d))
                rows.append((name, label, n, size))
                print(f"  {name:10s} {label:28s} {n:>12,d} trainable  {size / 1e6:10.2f} MB", flush=True)
    print(f"\n| UNet | checkpoint (rank {args.rank}) | trainable parameters | folder size |")
    print("|---|---|---:|---:|")
    for name, label, n, size in rows:
        print(f"| {name} | {label} | {n:,} | {size / 1e6:.2f} MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
