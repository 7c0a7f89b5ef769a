"""pack: renders -> Parquet shards (docs/dataset-contract.md §5)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path


import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from project_config import section_params
from synthetic_renders import make_dataset, render_character, tinted, CHIBI

from chibisplat.config import PackParams
from chibisplat.dataset import schema
from chibisplat.dataset.captions import CaptionBook, CaptionError
from chibisplat.dataset.pack import PackError, pack, packed_files, shard_of, split_of


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """Six 24x24 characters with sidecar captions, built once and copied by each test."""
    return make_dataset(tmp_path_factory.mktemp("template"), n=6, size=24)[0].parent


@pytest.fixture
def data(template, tmp_path):
    shutil.copytree(template, tmp_path / "d")
    root = tmp_path / "d"
    return root


def params(root: Path, **kw) -> PackParams:
    base = dict(
        renders_dir=root / "renders", assets_dir=root / "assets", out_dir=root / "packed",
        num_shards=4, val_num_shards=1, val_fraction=0.25, rows_per_group=2,
    )
    return section_params("pack", **{**base, **kw})


def tree(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_split_and_shard_are_pure_functions_of_the_uid():
    uids = [f"char_{k}" for k in range(4000)]
    assert [split_of(u, 0.1) for u in uids] == [split_of(u, 0.1) for u in uids]
    val = sum(split_of(u, 0.1) == "val" for u in uids) / len(uids)
    assert 0.08 < val < 0.12
    assert all(split_of(u, 0.0) == "train" for u in uids)
    shards = [shard_of(u, 8) for u in uids]
    assert set(shards) == set(range(8))
    assert shards == [shard_of(u, 8) for u in uids]


def test_rows_hold_the_render_bytes_and_normal_depth_pixels(data):
    p = params(data)
    summary = pack(p, log=lambda *_: None)
    assert summary.characters == 6 and not summary.unchanged
    files = packed_files(p.out_dir)
    seen = []
    for f in files:
        pf = pq.ParquetFile(f)
        assert f.parent.name in ("train", "val")
        assert pf.schema_arrow.metadata[b"huggingface"]  # HF features ride along
        assert all(pf.metadata.row_group(g).num_rows <= p.rows_per_group for g in range(pf.metadata.num_row_groups))
        rg = pf.metadata.row_group(0)
        for c in range(rg.num_columns):
            col = rg.column(c)
            if col.path_in_schema.startswith(schema.IMAGE_COLUMNS):
                assert col.compression == "UNCOMPRESSED", col.path_in_schema
        table = pf.read()
        uids = table.column(schema.UID).to_pylist()
        assert uids == sorted(uids)
        for row in table.to_pylist():
            folder = data / "renders" / row["uid"]
            assert len(row["images"]) == len(row["normal_depth"]) == len(row["cameras"]) == 40
            assert row["images"][7]["bytes"] == (folder / "00007.png").read_bytes()
            # normal_depth: the _nd.png's 4 channels as 16-bit grayscale PNGs, the same pixel values (decoded with
            # OpenCV here, independently of the project's readers)
            nd = cv2.imread(str(folder / "00039_nd.png"), cv2.IMREAD_UNCHANGED)  # BGRA uint16
            assert len(row["normal_depth"][39]) == 4
            for c, bgra in enumerate((2, 1, 0, 3)):
                ch = cv2.imdecode(np.frombuffer(row["normal_depth"][39][c]["bytes"], np.uint8), cv2.IMREAD_UNCHANGED)
                assert ch.dtype == np.uint16 and np.array_equal(ch, nd[:, :, bgra]), c
            assert row["cameras"][25] == (folder / "00025.json").read_text()
            meta = json.loads((folder / "meta.json").read_text())
            assert row["source_sha256"] == meta["source_sha256"]
            assert row["caption"] == (data / "assets" / f"{row['uid']}.txt").read_text().strip()
            assert split_of(row["uid"], p.val_fraction) == f.parent.name
            seen.append(row["uid"])
    assert sorted(seen) == [f"chibi_{k:02d}" for k in range(6)]
    manifest = json.loads((p.out_dir / "manifest.json").read_text())
    assert sum(s["characters"] for s in manifest["splits"].values()) == 6


def test_hf_datasets_decodes_the_shards_without_project_code(data, tmp_path):
    p = params(data)
    pack(p, log=lambda *_: None)
    script = textwrap.dedent(
        f"""
        import json, sys
        assert not any(m.startswith("chibisplat") for m in sys.modules)
        import datasets
        ds = datasets.load_dataset("parquet", data_files={{"train": {str(p.out_dir / "train" / "*.parquet")!r}}},
                                   split="train", cache_dir={str(tmp_path / "hf")!r})
        row = ds[0]
        assert len(row["images"]) == 40 and len(row["normal_depth"]) == 40, len(row["images"])
        assert row["images"][0].size == (24, 24) and row["images"][0].mode == "RGBA", row["images"][0]
        assert all(len(view) == 4 and view[3].mode == "I;16" for view in row["normal_depth"])
        assert json.loads(row["cameras"][13])["index"] == 13
        assert not any(m.startswith("chibisplat") for m in sys.modules)  # (an editable-install finder may exist)
        print("ok", ds.num_rows)
        """
    )
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok")


def test_repacking_gives_byte_identical_files_and_touches_nothing(data, tmp_path):
    p = params(data)
    pack(p, log=lambda *_: None)
    first = tree(p.out_dir)
    again = pack(p, log=lambda *_: None)
    assert again.written == [] and again.removed == []
    assert tree(p.out_dir) == first  # same bytes, same mtimes
    fresh = pack(params(data, out_dir=tmp_path / "fresh"), log=lambda *_: None)
    assert len(fresh.written) == len(packed_files(p.out_dir))
    assert {k: v[0] for k, v in tree(tmp_path / "fresh").items()} == {k: v[0] for k, v in first.items()}


def test_one_changed_character_rewrites_exactly_its_shard(data):
    p = params(data)
    pack(p, log=lambda *_: None)
    before = tree(p.out_dir)
    render_character(data / "renders", "chibi_03", source="chibi_03.fbx", size=24, spheres=tinted(CHIBI, 11))
    summary = pack(p, log=lambda *_: None)
    split = split_of("chibi_03", p.val_fraction)
    expected = f"{split}/shard-{shard_of('chibi_03', p.shards_in(split)):05d}.parquet"
    assert summary.written == [expected]
    after = tree(p.out_dir)
    assert set(after) == set(before)
    changed = {k for k in after if after[k] != before[k]}
    assert changed == {expected, "manifest.json"}

    # Re-captioning is a change too, and again only one shard moves.
    (data / "assets" / "chibi_01.txt").write_text("a different caption")
    summary = pack(p, log=lambda *_: None)
    split = split_of("chibi_01", p.val_fraction)
    assert summary.written == [f"{split}/shard-{shard_of('chibi_01', p.shards_in(split)):05d}.parquet"]


def test_removed_characters_leave_no_empty_shard(data):
    p = params(data, num_shards=8)
    pack(p, log=lambda *_: None)
    manifest = json.loads((p.out_dir / "manifest.json").read_text())
    lonely = next(s for s in manifest["splits"]["train"]["shards"] if s["rows"] == 1)
    shutil.rmtree(data / "renders" / lonely["uids"][0])
    summary = pack(p, log=lambda *_: None)
    assert summary.removed == [lonely["file"]]
    assert not (p.out_dir / lonely["file"]).exists()


def _break(root: Path, how: str):
    folder = root / "renders" / "chibi_02"
    if how == "39 views":
        for name in ("00039.png", "00039_nd.png", "00039.json"):
            (folder / name).unlink()
    elif how == "corrupt png":
        data = (folder / "00011.png").read_bytes()
        (folder / "00011.png").write_bytes(data[: len(data) // 2])
    elif how == "wrong json index":
        cam = json.loads((folder / "00005.json").read_text())
        cam["index"] = 6
        (folder / "00005.json").write_text(json.dumps(cam))
    elif how == "wrong json size":
        cam = json.loads((folder / "00005.json").read_text())
        cam["width"] = 32
        (folder / "00005.json").write_text(json.dumps(cam))
    elif how == "8-bit normal_depth":
        from chibisplat.png import decode_png, encode_png

        nd = decode_png((folder / "00003_nd.png").read_bytes())
        (folder / "00003_nd.png").write_bytes(encode_png((nd >> 8).astype("uint8")))
    elif how == "missing caption":
        (root / "assets" / "chibi_02.txt").unlink()
    elif how == "uid mismatch":
        meta = json.loads((folder / "meta.json").read_text())
        meta["uid"] = "someone_else"
        (folder / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "how, message",
    [
        ("39 views", "expected 40 views"),
        ("corrupt png", "00011.png is not a decodable PNG"),
        ("wrong json index", "00005.json has index 6, expected 5"),
        ("wrong json size", "00005.json is 32x24"),
        ("8-bit normal_depth", "00003_nd.png"),
        ("missing caption", "chibi_02.fbx (uid chibi_02) has no caption"),
        ("uid mismatch", "meta.json says uid"),
    ],
)
def test_bad_inputs_name_the_character_and_write_nothing(data, how, message):
    _break(data, how)
    with pytest.raises(PackError) as err:
        pack(params(data), log=lambda *_: None)
    text = str(err.value)
    assert "chibi_02" in text and message in text, text
    assert not (data / "packed").exists()


def test_caption_sources(tmp_path):
    assets = tmp_path / "assets"
    (assets / "heroes").mkdir(parents=True)
    (assets / "heroes" / "Mika Chan.txt").write_text("  mika,\n a chibi  girl \n")
    (assets / "captions.yaml").write_text("villains_rex: a chibi dinosaur\nvillains/Bob.vrm: a chibi robot\ntypo_uid: x\n")
    book = CaptionBook(assets)
    assert book.caption_for("heroes_mika_chan", "heroes/Mika Chan.fbx").text == "mika, a chibi girl"
    assert book.caption_for("villains_rex", "villains/Rex.fbx").text == "a chibi dinosaur"
    assert book.caption_for("villains_bob", "villains/Bob.vrm").origin == "captions.yaml"
    assert book.unused_keys() == ["typo_uid"]
    with pytest.raises(CaptionError, match="no caption.*captions.yaml.*default_caption"):
        book.caption_for("nobody", "nobody.fbx")
    default = CaptionBook(assets, "a chibi anime character, {name}")
    assert default.caption_for("heroes_kai_2", "heroes/Kai 2.glb").text == "a chibi anime character, heroes kai 2"
    (assets / "captions.yaml").write_text("heroes_mika_chan: someone else\n")
    with pytest.raises(CaptionError, match="different captions"):
        CaptionBook(assets).caption_for("heroes_mika_chan", "heroes/Mika Chan.fbx")


def test_stage_script_reads_params(data, tmp_path):
    (tmp_path / "params.yaml").write_text(
        "pack:\n"
        f"  renders_dir: {data / 'renders'}\n  assets_dir: {data / 'assets'}\n  out_dir: {data / 'packed'}\n"
        "  num_shards: 2\n  val_num_shards: 1\n  val_fraction: 0.0\n  rows_per_group: 4\n  default_caption: null\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "stages.pack", "--params", str(tmp_path / "params.yaml")],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 0, out.stderr
    assert "6 characters" in out.stdout
    assert len(packed_files(data / "packed", "train")) == 2 and not (data / "packed" / "val").exists()


@pytest.mark.slow
def test_blender_rendered_character_passes_validation(rendered_character_128, tmp_path):
    """The lead's real Blender render (tests/conftest.py ``rendered_character_128``) packs cleanly."""
    folder = Path(rendered_character_128)
    shutil.copytree(folder, tmp_path / "renders" / folder.name)
    p = section_params(
        "pack",
        renders_dir=tmp_path / "renders", assets_dir=tmp_path / "assets", out_dir=tmp_path / "packed",
        num_shards=1, val_fraction=0.0, default_caption="a chibi anime character, {name}",
    )
    summary = pack(p, log=lambda *_: None)
    assert summary.characters == 1 and len(summary.written) == 1
    row = pq.read_table(packed_files(p.out_dir)[0]).to_pylist()[0]
    assert row["uid"] == folder.name and row["caption"].startswith("a chibi anime character, ")
    assert row["images"][0]["bytes"] == (folder / "00000.png").read_bytes()
    # A real render's 16-bit normal/depth: every channel's values kept (depth uses far more than 8 bits).
    nd = cv2.imread(str(folder / "00000_nd.png"), cv2.IMREAD_UNCHANGED)[:, :, [2, 1, 0, 3]]
    packed = schema.decode_normal_depth([c["bytes"] for c in row["normal_depth"][0]])
    assert np.array_equal(packed, nd) and nd[..., 3].max() > 255
