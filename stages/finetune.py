"""DVC stage ``finetune``: optional GSRecon / GSVAE fine-tuning on the packed train views -> models/finetune.

Reads ``finetune:`` (its preset for ``models.source`` merged underneath) and ``models:``. Both switches off (the
default): writes a manifest saying the base modules are used. See chibisplat/training/finetune.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from chibisplat.models.sources import ModelSourceError
from chibisplat.params import load_params
from chibisplat.training.finetune import FinetuneParams, NonFiniteLoss, finetune


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    params = load_params(args.params)
    try:
        finetune(FinetuneParams.from_params(params), params.get("models") or {})
    except (NonFiniteLoss, ModelSourceError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"finetune: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
