"""DVC stage ``train``: fine-tune the multi-view UNet on data/latents (GSRecon, GSVAE frozen).

Reads ``train:`` (its preset for ``models.source`` merged underneath) and ``models:``; with
``models.image_conditioned: true`` it trains DiffSplat's image model, reading each object's condition view from
``train.packed_dir`` (docs/image-to-3d.md). One process on a CPU;
on GPUs: ``accelerate launch -m stages.train``. See chibisplat/training/train.py.
"""

from __future__ import annotations

import sys

from chibisplat.config import Config
from chibisplat.params import run_stage
from chibisplat.training.errors import NonFiniteLoss
from chibisplat.training.train import train


def main(argv: list[str] | None = None) -> int:
    def body(cfg: Config) -> None:
        train(cfg.train, cfg.models)

    return run_stage("train", __doc__, body, (NonFiniteLoss, KeyError, ValueError), argv)


if __name__ == "__main__":
    sys.exit(main())
