"""DVC stage ``generate``: ``generate.prompt`` -> out/generate/{views.png, splat.ply, turntable.gif}; with
``models.image_conditioned: true`` the front view ``generate.image`` instead (image-to-3D, prompt "").

Reads ``generate:`` (preset for ``models.source`` merged underneath), ``models:``, ``embed:`` (text encoder) and
``latents:`` (resolution). The same code as ``chibisplat generate PROMPT --out DIR`` (chibisplat/cli.py).
"""

from __future__ import annotations

import sys

from chibisplat.cli import run_generate
from chibisplat.config import Config
from chibisplat.params import run_stage


def main(argv: list[str] | None = None) -> int:
    def body(cfg: Config) -> None:
        gp = cfg.generate
        if cfg.models.image_conditioned and gp.image is not None:
            run_generate(cfg, None, image=gp.image)
        else:
            run_generate(cfg, gp.prompt)

    return run_stage("generate", __doc__, body, (KeyError, ValueError), argv)


if __name__ == "__main__":
    sys.exit(main())
