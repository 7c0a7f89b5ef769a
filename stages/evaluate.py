"""DVC stage ``evaluate``: val split -> metrics/evaluate.json (GSRecon PSNR/SSIM/LPIPS, val diffusion loss) and
preview PNGs in metrics/evaluate/previews (reconstructions, generations from the val captions).

Reads ``evaluate:`` (preset for ``models.source`` merged underneath), ``models:`` and ``latents:`` (resolution).
See chibisplat/training/evaluate.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from chibisplat.params import load_params
from chibisplat.training.evaluate import EvaluateParams, evaluate
from chibisplat.training.latents import LatentParams


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        evaluate(EvaluateParams.from_params(params), params.get("models") or {}, LatentParams.from_params(params).resolution)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
