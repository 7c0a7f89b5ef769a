"""DVC stage ``evaluate``: val split -> metrics/evaluate.json (GSRecon PSNR/SSIM/LPIPS, val diffusion loss) and
preview PNGs in metrics/evaluate/previews (reconstructions, generations from the val captions; with
``models.image_conditioned: true`` from the val characters' front views, scored against their true views).

Reads ``evaluate:`` (preset for ``models.source`` merged underneath), ``models:`` and ``latents:`` (resolution).
See chibisplat/training/evaluate.py.
"""

from __future__ import annotations

import sys

from chibisplat.config import Config
from chibisplat.params import run_stage
from chibisplat.training.evaluate import evaluate


def main(argv: list[str] | None = None) -> int:
    def body(cfg: Config) -> None:
        evaluate(cfg.evaluate, cfg.models, cfg.evaluate.resolution)  # latents.resolution, derived by the loader

    return run_stage("evaluate", __doc__, body, (KeyError, ValueError), argv)


if __name__ == "__main__":
    sys.exit(main())
