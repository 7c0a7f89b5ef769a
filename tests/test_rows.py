"""The one reader of packed rows (chibisplat/dataset/rows.py): every value as written, views indexable by slot."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chibisplat.dataset import schema
from chibisplat.dataset.rows import SCALAR_COLUMNS, packed_rows, row_groups, shard_rows

VIEWS = 3  # a shard's list columns may hold any number of views; the reader does not care


def written_row(k: int) -> dict:
    """Row ``k`` as the packer writes it, with distinct bytes in every cell."""
    return {
        schema.UID: f"chibi_{k:02d}",
        schema.CAPTION: f"caption {k}",
        schema.SOURCE_SHA256: f"{k:064x}",
        schema.RENDER_CONFIG_SHA256: f"{k + 100:064x}",
        schema.IMAGES: [schema.image_struct(f"png {k} {i}".encode(), f"{i:05d}.png") for i in range(VIEWS)],
        schema.NORMAL_DEPTH: [[schema.image_struct(f"nd {k} {i} {c}".encode(), f"{i:05d}_{c}.png") for c in range(4)]
                              for i in range(VIEWS)],
        schema.CAMERAS: [f'{{"index": {i}, "row": {k}}}' for i in range(VIEWS)],
    }


@pytest.fixture
def shards(tmp_path):
    """Two shards: 3 rows in row groups of 2 + 1, and 1 row."""
    a, b = tmp_path / "train-00000.parquet", tmp_path / "train-00001.parquet"
    pq.write_table(pa.Table.from_pylist([written_row(k) for k in range(3)], schema=schema.packed_schema()), a,
                   row_group_size=2)
    pq.write_table(pa.Table.from_pylist([written_row(3)], schema=schema.packed_schema()), b)
    return [b, a]  # row_groups sorts them


def test_row_groups_in_file_order(shards):
    a, b = sorted(map(str, shards))
    assert row_groups(shards) == [(a, 0), (a, 1), (b, 0)]


def test_rows_hold_every_value_as_written(shards):
    rows = list(packed_rows(row_groups(shards)))
    assert len(rows) == 4
    for k, row in enumerate(rows):
        want = written_row(k)
        assert set(row) == set(schema.PACKED_COLUMNS)
        assert {c: row[c] for c in SCALAR_COLUMNS} == {c: want[c] for c in SCALAR_COLUMNS}
        for views in (row[schema.IMAGES], row[schema.NORMAL_DEPTH], row[schema.CAMERAS]):
            assert len(views) == VIEWS
        for i in (2, 0):  # any slot, in any order
            assert row[schema.IMAGES][i] == f"png {k} {i}".encode()
            assert row[schema.NORMAL_DEPTH][i] == [f"nd {k} {i} {c}".encode() for c in range(4)]
            assert row[schema.CAMERAS][i] == f'{{"index": {i}, "row": {k}}}'


def test_shard_rows_and_column_choice(shards):
    a = sorted(shards)[0]
    assert [r[schema.UID] for r in shard_rows(a)] == ["chibi_00", "chibi_01", "chibi_02"]
    row = next(shard_rows(a, columns=[schema.UID]))
    assert set(row) == {schema.UID, schema.IMAGES, schema.NORMAL_DEPTH, schema.CAMERAS}


def test_older_normal_depth_layout_is_a_clear_error(tmp_path):
    old = pa.schema([*(f for f in schema.packed_schema() if f.name != schema.NORMAL_DEPTH),
                     pa.field(schema.NORMAL_DEPTH, schema.packed_schema().field(schema.IMAGES).type)])
    row = written_row(0) | {schema.NORMAL_DEPTH: [schema.image_struct(b"rgba nd", "00000_nd.png")] * VIEWS}
    path = tmp_path / "train-00000.parquet"
    pq.write_table(pa.Table.from_pylist([row], schema=old), path)
    with pytest.raises(ValueError, match=r"older layout.*dvc repro pack"):
        next(shard_rows(path))
