"""DVC stage ``embed``: the captions of data/packed -> data/embeddings/prompt_embeds.parquet (77 x 768 each).

Reads ``embed:`` and ``models:`` from params.yaml. See chibisplat/dataset/embeddings.py and the dataset contract,
section 6.
"""

from __future__ import annotations

import sys

from chibisplat.dataset.embeddings import EmbedParams, embed
from chibisplat.dataset.text_encoder import TextEncoderMissing
from chibisplat.params import run_stage


def main(argv: list[str] | None = None) -> int:
    def body(p: dict) -> None:
        embed(EmbedParams.from_dict(p.get("embed") or {}), p.get("models") or {})

    return run_stage("embed", __doc__, body, (TextEncoderMissing,), argv)


if __name__ == "__main__":
    sys.exit(main())
