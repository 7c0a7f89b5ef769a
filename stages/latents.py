"""DVC stage ``latents``: packed characters -> GSRecon -> GSVAE latents, data/latents/<split>/<uid>.safetensors.

Reads ``latents:`` and ``models:`` from params.yaml (never ``train:``, so training changes do not re-encode).
See chibisplat/training/latents.py.
"""

from __future__ import annotations

import sys

from chibisplat.config import Config
from chibisplat.executors import ExecutorError, executor_config
from chibisplat.params import run_stage
from chibisplat.training.latents import build_latents


def main(argv: list[str] | None = None) -> int:
    def body(cfg: Config) -> None:
        # cluster.latents: where the characters are encoded (never what; not tracked by DVC, chibisplat/executors)
        build_latents(cfg.latents, cfg.models, executor=executor_config(cfg.raw, "latents"))

    return run_stage("latents", __doc__, body, (KeyError, ValueError, ExecutorError), argv)


if __name__ == "__main__":
    sys.exit(main())
