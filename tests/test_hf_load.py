"""The documented no-project-code load (``datasets.load_dataset("parquet", ...)``) returns the full 16-bit
normal/depth values: equal, pixel for pixel, to the render's ``_nd.png`` decoded with OpenCV."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import cv2
import numpy as np
from project_config import section_params
from synthetic_renders import make_dataset

from chibisplat.dataset.pack import pack


def test_hf_load_returns_the_stored_16_bit_normal_depth(tmp_path):
    renders, assets = make_dataset(tmp_path, 3, size=40)
    out = tmp_path / "packed"
    pack(section_params("pack", renders_dir=renders, assets_dir=assets, out_dir=out, num_shards=1, val_fraction=0.0),
         log=lambda *_: None)
    # The source values need all 16 bits: an 8-bit path (PIL on RGBA16, the old layout) cannot reproduce them.
    nd0 = cv2.imread(str(next(renders.iterdir()) / "00000_nd.png"), cv2.IMREAD_UNCHANGED)
    assert nd0.dtype == np.uint16 and nd0[..., 3].max() > 255 and np.any(nd0 % 257)

    script = textwrap.dedent(
        f"""
        import json, sys
        import numpy as np, cv2, datasets
        ds = datasets.load_dataset("parquet", data_files={{"train": {str(out / "train" / "*.parquet")!r}}},
                                   split="train", cache_dir={str(tmp_path / "hf")!r})
        assert not any(m.startswith("chibisplat") for m in sys.modules)
        checked, alpha_max = 0, 0
        for row in ds:
            folder = {str(renders)!r} + "/" + row["uid"]
            for i, view in enumerate(row["normal_depth"]):
                got = np.stack([np.asarray(im) for im in view], axis=-1)  # normal x, y, z, depth/5
                want = cv2.imread(f"{{folder}}/{{i:05d}}_nd.png", cv2.IMREAD_UNCHANGED)[:, :, [2, 1, 0, 3]]
                assert got.dtype == np.uint16, got.dtype
                assert np.array_equal(got, want), (row["uid"], i, int(np.abs(got.astype(int) - want).max()))
                alpha_max = max(alpha_max, int(got[..., 3].max()))
                checked += 1
        print(json.dumps({{"views": checked, "alpha_max": alpha_max}}))
        """
    )
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["views"] == 3 * 40
    want_max = max(int(cv2.imread(str(p), cv2.IMREAD_UNCHANGED)[..., 3].max()) for p in renders.rglob("*_nd.png"))
    assert result["alpha_max"] == want_max > 255


def test_project_readers_get_the_same_normal_depth_from_the_shards(tmp_path):
    """The packed rows (the one reader the loader, the latents stage and evaluation share) decode to the render's
    _nd.png values, view by view, and give the same training tensors as the render folder itself."""
    import torch

    from chibisplat.dataset import schema
    from chibisplat.dataset.loader import ViewConfig, object_views
    from chibisplat.dataset.pack import packed_files
    from chibisplat.dataset.rows import packed_rows, row_groups

    renders, assets = make_dataset(tmp_path, 2, size=24)
    out = tmp_path / "packed"
    pack(section_params("pack", renders_dir=renders, assets_dir=assets, out_dir=out, num_shards=1, val_fraction=0.0),
         log=lambda *_: None)
    files = packed_files(out, "train")
    rows = list(packed_rows(row_groups(files)))
    assert [r[schema.UID] for r in rows] == ["chibi_00", "chibi_01"]
    indices = [0, 6, 12, 18, 25, 27, 31, 39]
    for row in rows:
        folder = renders / row[schema.UID]
        for i in (0, 17, 39):
            want = cv2.imread(str(folder / f"{i:05d}_nd.png"), cv2.IMREAD_UNCHANGED)[:, :, [2, 1, 0, 3]]
            assert np.array_equal(schema.decode_normal_depth(row[schema.NORMAL_DEPTH][i]), want), (row[schema.UID], i)
        from_files = object_views([(folder / f"{i:05d}.png").read_bytes() for i in range(40)],
                                  [(folder / f"{i:05d}_nd.png").read_bytes() for i in range(40)],
                                  [(folder / f"{i:05d}.json").read_text() for i in range(40)], indices,
                                  ViewConfig(resolution=24))
        from_shard = object_views(row[schema.IMAGES], row[schema.NORMAL_DEPTH], row[schema.CAMERAS], indices,
                                  ViewConfig(resolution=24))
        for key in ("image", "mask", "normal", "coord", "C2W"):
            assert torch.equal(from_files[key], from_shard[key]), key
