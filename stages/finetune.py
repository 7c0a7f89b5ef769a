"""DVC stage ``finetune``: optional GSRecon / GSVAE fine-tuning on the packed train views -> models/finetune.

Reads ``finetune:`` (its preset for ``models.source`` merged underneath) and ``models:``. Both switches off (the
default): writes a manifest saying the base modules are used. See chibisplat/training/finetune.py.
"""

from __future__ import annotations

import sys

from chibisplat.config import Config
from chibisplat.models.hub import ModelSourceError
from chibisplat.params import run_stage
from chibisplat.training.errors import NonFiniteLoss
from chibisplat.training.finetune import finetune


def main(argv: list[str] | None = None) -> int:
    def body(cfg: Config) -> None:
        finetune(cfg.finetune, cfg.models)

    return run_stage("finetune", __doc__, body, (NonFiniteLoss, ModelSourceError, ValueError), argv)


if __name__ == "__main__":
    sys.exit(main())
