"""DVC stage ``generate``: ``generate.prompt`` -> out/generate/{views.png, splat.ply, turntable.gif}.

Reads ``generate:`` (preset for ``models.source`` merged underneath), ``models:``, ``embed:`` (text encoder) and
``latents:`` (resolution). The same code as ``chibisplat generate PROMPT --out DIR`` (chibisplat/cli.py).
"""

from __future__ import annotations

import sys

from chibisplat.cli import run_generate
from chibisplat.params import run_stage
from chibisplat.training.inference import GenerateParams


def main(argv: list[str] | None = None) -> int:
    def body(p: dict) -> None:
        run_generate(p, GenerateParams.from_params(p).prompt)

    return run_stage("generate", __doc__, body, (KeyError, ValueError), argv)


if __name__ == "__main__":
    sys.exit(main())
