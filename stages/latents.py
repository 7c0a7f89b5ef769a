"""DVC stage ``latents``: packed characters -> GSRecon -> GSVAE latents, data/latents/<split>/<uid>.safetensors.

Reads ``latents:`` and ``models:`` from params.yaml (never ``train:``, so training changes do not re-encode).
See chibisplat/training/latents.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from chibisplat.params import load_params
from chibisplat.training.latents import LatentParams, build_latents


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    params = load_params(args.params)
    try:
        build_latents(LatentParams.from_params(params), params.get("models") or {})
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"latents: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
