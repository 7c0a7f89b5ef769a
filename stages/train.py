"""DVC stage ``train``: fine-tune the multi-view UNet on data/latents (GSRecon, GSVAE frozen).

Reads ``train:`` (its preset for ``models.source`` merged underneath) and ``models:``. One process on a CPU;
on GPUs: ``accelerate launch -m stages.train``. See chibisplat/training/train.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from chibisplat.params import load_params
from chibisplat.training.train import NonFiniteLoss, TrainParams, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    params = load_params(args.params)
    try:
        train(TrainParams.from_params(params), params.get("models") or {})
    except (NonFiniteLoss, NotImplementedError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
