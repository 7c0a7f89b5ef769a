"""DVC stage ``embed``: the captions of data/packed -> data/embeddings/prompt_embeds.parquet (77 x 768 each).

Reads ``embed:`` and ``models:`` from params.yaml. See chibisplat/dataset/embeddings.py and the dataset contract,
section 6.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from chibisplat.dataset.embeddings import EmbedParams, embed
from chibisplat.dataset.text_encoder import TextEncoderMissing
from chibisplat.params import load_params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    params = load_params(args.params)
    try:
        embed(EmbedParams.from_dict(params.get("embed") or {}), params.get("models") or {})
    except (TextEncoderMissing, FileNotFoundError) as e:
        print(f"embed: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
