"""DVC stage ``generate``: ``generate.prompt`` -> out/generate/{views.png, splat.ply, turntable.gif}.

Reads ``generate:`` (preset for ``models.source`` merged underneath), ``models:``, ``embed:`` (text encoder) and
``latents:`` (resolution). The same code as ``chibisplat generate PROMPT --out DIR`` (chibisplat/cli.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from chibisplat.cli import run_generate
from chibisplat.params import load_params
from chibisplat.training.inference import GenerateParams


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        run_generate(params, GenerateParams.from_params(params).prompt)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"generate: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
