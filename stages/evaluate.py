"""DVC stage ``evaluate``: val split -> metrics/evaluate.json (GSRecon PSNR/SSIM/LPIPS, val diffusion loss) and
preview PNGs in metrics/evaluate/previews (reconstructions, generations from the val captions; with
``models.image_conditioned: true`` from the val characters' front views, scored against their true views).

Reads ``evaluate:`` (preset for ``models.source`` merged underneath), ``models:`` and ``latents:`` (resolution).
See chibisplat/training/evaluate.py.
"""

from __future__ import annotations

import sys

from chibisplat.params import run_stage
from chibisplat.training.evaluate import EvaluateParams, evaluate
from chibisplat.training.latents import LatentParams


def main(argv: list[str] | None = None) -> int:
    def body(p: dict) -> None:
        evaluate(EvaluateParams.from_params(p), p.get("models") or {}, LatentParams.from_params(p).resolution)

    return run_stage("evaluate", __doc__, body, (KeyError, ValueError), argv)


if __name__ == "__main__":
    sys.exit(main())
