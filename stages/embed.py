"""DVC stage ``embed``: the captions of data/packed -> data/embeddings/prompt_embeds.parquet (77 x 768 each).

Reads ``embed:`` and ``models:`` from params.yaml. See chibisplat/dataset/embeddings.py and
docs/dataset-contract.md §6.
"""

from __future__ import annotations

import sys

from chibisplat.config import Config
from chibisplat.dataset.embeddings import embed
from chibisplat.models.hub import ModelSourceError
from chibisplat.params import run_stage


def main(argv: list[str] | None = None) -> int:
    def body(cfg: Config) -> None:
        embed(cfg.embed, cfg.models)

    return run_stage("embed", __doc__, body, (ModelSourceError,), argv)


if __name__ == "__main__":
    sys.exit(main())
