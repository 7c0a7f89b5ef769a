"""DVC stage ``pack``: data/renders (+ captions in data/assets) -> data/packed/<split>/shard-XXXXX.parquet.

Reads ``pack:`` from params.yaml. See chibisplat/dataset/pack.py and the dataset contract, section 5.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from chibisplat.dataset.captions import CaptionError
from chibisplat.dataset.pack import PackError, PackParams, pack
from chibisplat.params import section


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    params = PackParams.from_dict(section("pack", args.params))
    try:
        summary = pack(params)
    except (PackError, CaptionError) as e:
        print(f"pack: error: {e}", file=sys.stderr)
        return 1
    print(
        f"pack: {summary.characters} characters; {len(summary.written)} shards written, "
        f"{len(summary.unchanged)} unchanged, {len(summary.removed)} removed -> {params.out_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
