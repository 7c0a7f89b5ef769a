"""DVC stage ``pack``: data/renders (+ captions in data/assets) -> data/packed/<split>/shard-XXXXX.parquet.

Reads ``pack:`` from params.yaml. See chibisplat/dataset/pack.py and docs/dataset-contract.md §5.
"""

from __future__ import annotations

import sys

from chibisplat.config import Config
from chibisplat.dataset.captions import CaptionError
from chibisplat.dataset.pack import PackError, pack
from chibisplat.params import run_stage


def main(argv: list[str] | None = None) -> int:
    def body(cfg: Config) -> None:
        params = cfg.pack
        summary = pack(params)
        print(
            f"pack: {summary.characters} characters; {len(summary.written)} shards written, "
            f"{len(summary.unchanged)} unchanged, {len(summary.removed)} removed -> {params.out_dir}"
        )

    return run_stage("pack", __doc__, body, (PackError, CaptionError), argv)


if __name__ == "__main__":
    sys.exit(main())
