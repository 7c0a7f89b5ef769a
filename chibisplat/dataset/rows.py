"""Reading packed rows: the one reader of the packed shards' characters (docs/dataset-contract.md §5).

A row is a dict keyed by the schema's column names: the requested scalar columns as Python values, and the three
per-view columns (``images``, ``normal_depth``, ``cameras``) as views indexable by slot that stay in Arrow until a
slot is picked (a training step decodes 8 of the 40 views, so only those are copied out). The training loader, the
latent cache, evaluation and the image model's condition views all read rows through :func:`packed_rows`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from chibisplat.dataset import schema

VIEW_COLUMNS = (schema.IMAGES, schema.NORMAL_DEPTH, schema.CAMERAS)
SCALAR_COLUMNS = tuple(c for c in schema.PACKED_COLUMNS if c not in VIEW_COLUMNS)  # uid, caption, the two hashes


class ListViews:
    """The values of one row's list column (``images``: PNG bytes, ``cameras``: JSON text), copied out of Arrow one
    view at a time."""

    def __init__(self, values):
        self.values = values

    def __getitem__(self, i: int):
        return self.values[i].as_py()

    def __len__(self) -> int:
        return len(self.values)


class NormalDepthViews:
    """The views of one row's ``normal_depth``, each copied out of Arrow as its 4 channel PNGs when picked."""

    def __init__(self, cell):
        self.values = cell.values  # FixedSizeListArray: one entry of 4 Image structs per view
        if not pa.types.is_fixed_size_list(self.values.type):
            raise ValueError("packed with an older layout (normal_depth as RGBA PNGs); re-run the pack stage "
                             "(dvc repro pack)")

    def __getitem__(self, i: int) -> list[bytes]:
        return self.values[i].values.field("bytes").to_pylist()

    def __len__(self) -> int:
        return len(self.values)


def row_groups(files: Iterable[Path]) -> list[tuple[str, int]]:
    """Every (file, row group) of the shards, in file order."""
    return [(str(f), g) for f in sorted(map(Path, files)) for g in range(pq.ParquetFile(f).metadata.num_row_groups)]


def packed_rows(units: Iterable[tuple[str | Path, int]], columns: Sequence[str] = SCALAR_COLUMNS) -> Iterator[dict]:
    """The rows of the given (shard, row group) units, in order.

    Args:
        units: (shard file, row group index) pairs, e.g. from :func:`row_groups`.
        columns: scalar columns to return as Python values (all of them unless given).

    Yields:
        ``{column: value}`` plus ``images`` and ``cameras`` (:class:`ListViews`) and ``normal_depth``
        (:class:`NormalDepthViews`), each indexable by slot.
    """
    columns = list(dict.fromkeys(columns))
    for path, group in units:
        table = pq.ParquetFile(path).read_row_group(group, columns=columns + list(VIEW_COLUMNS)).combine_chunks()
        values = {c: table.column(c).to_pylist() for c in columns}
        images, nds, cams = (table.column(c).chunk(0) for c in VIEW_COLUMNS)
        for k in range(table.num_rows):
            row = {c: values[c][k] for c in columns}
            row[schema.IMAGES] = ListViews(images[k].values.field("bytes"))
            row[schema.NORMAL_DEPTH] = NormalDepthViews(nds[k])
            row[schema.CAMERAS] = ListViews(cams[k].values)
            yield row


def shard_rows(path: str | Path, columns: Sequence[str] = SCALAR_COLUMNS) -> Iterator[dict]:
    """Every row of one shard (:func:`packed_rows` over all its row groups)."""
    yield from packed_rows(row_groups([path]), columns)
