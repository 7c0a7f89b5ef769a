"""Pack rendered characters into Parquet shards (docs/dataset-contract.md §5).

``<renders>/<uid>/`` (40 x ``{i:05d}.png``, ``{i:05d}_nd.png``, ``{i:05d}.json`` + ``meta.json``) becomes one row of
``<packed>/<split>/shard-XXXXX.parquet``. The split and the shard of a character are pure functions of its uid, rows
are sorted by uid and every writer setting is fixed, so packing the same renders twice gives byte-identical files and
changing one character changes exactly one shard. Shards whose inputs did not change are not rewritten at all
(``<packed>/manifest.json`` remembers what each shard was built from), so their bytes and mtimes stay untouched.

The RGBA PNG and camera JSON bytes are stored unchanged; each 16-bit normal/depth PNG is stored as its 4 channels,
16-bit grayscale PNGs with the same pixel values (``schema.normal_depth_structs``; why: docs/dataset-notes.md). Before a
shard is written every character in it is validated: 40 views, each camera JSON matching its slot and size, decodable
PNGs of the right size and bit depth.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from chibisplat import cameras
from chibisplat.config import PackParams
from chibisplat.config_schema import SPLITS
from chibisplat.dataset import schema
from chibisplat.dataset.captions import CaptionBook, CaptionError
from chibisplat.identity import sha256_json
from chibisplat.files import atomic_path, write_atomic
from chibisplat.png import COMPRESSION, decode_png
from chibisplat.protocol import NUM_SLOTS

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 2  # 2: normal_depth as 4 x 16-bit grayscale PNGs per view
SHARD_PATTERN = re.compile(r"^shard-(\d{5})\.parquet$")
_VIEW_FILE = re.compile(r"^(\d{5})(_nd)?\.(png|json)$")
META_FIELDS = ("uid", "source", "source_sha256", "render_config_sha256")


class PackError(ValueError):
    """A character's render folder breaks the contract; the message names the folder and what to do."""


# ---------------------------------------------------------------------------------------------------------------
# Split and shard: pure functions of the uid.


def _uid_hash(uid: str) -> bytes:
    return hashlib.sha256(uid.encode("utf-8")).digest()


def split_of(uid: str, val_fraction: float) -> str:
    """``val`` for a stable ``val_fraction`` of uids (first 8 bytes of sha256(uid) as a fraction), else ``train``."""
    u = int.from_bytes(_uid_hash(uid)[:8], "big") / 2.0**64
    return "val" if u < val_fraction else "train"


def shard_of(uid: str, num_shards: int) -> int:
    """Shard index from bytes 8..16 of sha256(uid), independent of the split draw."""
    return int.from_bytes(_uid_hash(uid)[8:16], "big") % num_shards


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


# ---------------------------------------------------------------------------------------------------------------
# Reading and validating one character.


def view_files(i: int) -> tuple[str, str, str]:
    return f"{i:05d}.png", f"{i:05d}_nd.png", f"{i:05d}.json"


def _fail(folder: Path, uid: str, what: str) -> PackError:
    return PackError(
        f"{folder} (character {uid}): {what}. Re-render this character (dvc repro render) or remove its folder."
    )


@dataclass
class CharacterInputs:
    """What a packed row is made of, without the pixels: enough to know whether its shard must change."""

    uid: str
    folder: Path
    meta: dict
    caption: str
    caption_origin: str
    files_sha256: list[str]  # sha256 of the 120 view files, in (png, nd, json) x 40 order

    def digest(self) -> dict:
        return {
            "uid": self.uid,
            "caption": self.caption,
            "source_sha256": self.meta["source_sha256"],
            "render_config_sha256": self.meta["render_config_sha256"],
            "files": self.files_sha256,
        }


def read_meta(folder: Path) -> dict:
    uid = folder.name
    path = folder / "meta.json"
    if not path.is_file():
        raise _fail(folder, uid, "meta.json is missing (an interrupted render?)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(folder, uid, f"meta.json is not valid JSON ({e})") from None
    missing = [k for k in META_FIELDS if not meta.get(k)]
    if missing:
        raise _fail(folder, uid, f"meta.json lacks {missing}")
    if meta["uid"] != uid:
        raise _fail(folder, uid, f"meta.json says uid {meta['uid']!r} but the folder is named {uid!r}")
    return meta


def check_view_files(folder: Path, uid: str) -> None:
    """All 40 x 3 view files exist and there is no view file beyond slot 39."""
    present = {p.name for p in folder.iterdir()}
    missing = [n for i in range(NUM_SLOTS) for n in view_files(i) if n not in present]
    extra = sorted(n for n in present if (m := _VIEW_FILE.match(n)) and int(m.group(1)) >= NUM_SLOTS)
    if missing:
        views = sorted({int(n[:5]) for n in missing})
        raise _fail(
            folder,
            uid,
            f"expected {NUM_SLOTS} views, {len(missing)} files are missing "
            f"(views {views[:10]}{'...' if len(views) > 10 else ''}, e.g. {missing[0]})",
        )
    if extra:
        raise _fail(folder, uid, f"unexpected view files beyond slot {NUM_SLOTS - 1}: {extra[:5]}")


def read_inputs(folder: Path, captions: CaptionBook) -> CharacterInputs:
    folder = Path(folder)
    meta = read_meta(folder)
    uid = meta["uid"]
    check_view_files(folder, uid)
    try:
        caption = captions.caption_for(uid, meta["source"])
    except CaptionError as e:
        raise PackError(f"{folder} (character {uid}): {e}") from None
    hashes = []
    for i in range(NUM_SLOTS):
        for name in view_files(i):
            hashes.append(hashlib.sha256((folder / name).read_bytes()).hexdigest())
    return CharacterInputs(uid, folder, meta, caption.text, caption.origin, hashes)


def validate_view(folder: Path, uid: str, i: int, rgba: bytes, nd: bytes, cam_text: str, size: tuple[int, int] | None):
    """Checks one view; returns its (width, height)."""
    png_name, nd_name, json_name = view_files(i)
    try:
        cam = json.loads(cam_text)
    except json.JSONDecodeError as e:
        raise _fail(folder, uid, f"{json_name} is not valid JSON ({e})") from None
    if cam.get("index") != i:
        raise _fail(folder, uid, f"{json_name} has index {cam.get('index')!r}, expected {i}")
    if cam.get("convention") != cameras.CONVENTION:
        raise _fail(folder, uid, f"{json_name} has convention {cam.get('convention')!r}, expected {cameras.CONVENTION!r}")
    for key, shape in (("c2w", (4, 4)), ("K", (3, 3))):
        if np.asarray(cam.get(key, []), dtype=np.float64).shape != shape:
            raise _fail(folder, uid, f"{json_name} field {key!r} is not a {shape[0]}x{shape[1]} matrix")
    w, h = cam.get("width"), cam.get("height")
    if size is not None and (w, h) != size:
        raise _fail(folder, uid, f"{json_name} is {w}x{h} but view 00000 is {size[0]}x{size[1]}; all views share one size")
    for name, data, dtype in ((png_name, rgba, np.uint8), (nd_name, nd, np.uint16)):
        try:
            img = decode_png(data)
        except ValueError:
            raise _fail(folder, uid, f"{name} is not a decodable PNG") from None
        if img.shape != (h, w, 4) or img.dtype != dtype:
            bits = 8 * np.dtype(dtype).itemsize
            raise _fail(
                folder,
                uid,
                f"{name} is {img.shape[1] if img.ndim > 1 else '?'}x{img.shape[0]} with "
                f"{img.shape[2] if img.ndim == 3 else 1} channels of {8 * img.dtype.itemsize} bits; "
                f"expected {w}x{h} RGBA, {bits} bits ({json_name})",
            )
    return w, h


def _validate(inputs: CharacterInputs) -> None:
    character_row(inputs, validate=True, encode=False)


def character_row(inputs: CharacterInputs, validate: bool = True, encode: bool = True) -> dict:
    """Reads (and validates) one character; returns its packed row. ``encode=False`` (a validation pass) skips
    re-encoding the normal/depth channels: the row's ``normal_depth`` is then empty."""
    folder, uid = inputs.folder, inputs.uid
    images, normal_depth, cams = [], [], []
    size = None
    hashes = iter(inputs.files_sha256)
    for i in range(NUM_SLOTS):
        png_name, nd_name, json_name = view_files(i)
        rgba, nd, cam_bytes = (folder / png_name).read_bytes(), (folder / nd_name).read_bytes(), (folder / json_name).read_bytes()
        for data, name in ((rgba, png_name), (nd, nd_name), (cam_bytes, json_name)):
            if hashlib.sha256(data).hexdigest() != next(hashes):
                raise _fail(folder, uid, f"{name} changed while packing; run pack again when the render stage is done")
        try:
            cam_text = cam_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise _fail(folder, uid, f"{json_name} is not UTF-8 text") from None
        if validate:
            size = validate_view(folder, uid, i, rgba, nd, cam_text, size)
        images.append(schema.image_struct(rgba, f"{uid}/{png_name}"))
        if encode:
            try:
                normal_depth.append(schema.normal_depth_structs(decode_png(nd), f"{uid}/{nd_name[:-4]}"))
            except ValueError:
                raise _fail(folder, uid, f"{nd_name} is not a 16-bit RGBA PNG") from None
        cams.append(cam_text)
    return {
        schema.UID: uid,
        schema.CAPTION: inputs.caption,
        schema.SOURCE_SHA256: inputs.meta["source_sha256"],
        schema.RENDER_CONFIG_SHA256: inputs.meta["render_config_sha256"],
        schema.IMAGES: images,
        schema.NORMAL_DEPTH: normal_depth,
        schema.CAMERAS: cams,
    }


# ---------------------------------------------------------------------------------------------------------------
# Writing shards.


@functools.cache
def _writer_options() -> dict:
    """Fixed Parquet writer settings: PNG bytes uncompressed and without statistics, text columns zstd."""
    buf = pa.BufferOutputStream()
    pq.write_table(schema.packed_schema().empty_table(), buf)
    leaves = pq.ParquetFile(pa.BufferReader(buf.getvalue())).schema
    paths = [leaves.column(i).path for i in range(len(leaves))]
    image_leaf = tuple(f"{c}." for c in schema.IMAGE_COLUMNS)
    return {
        "compression": {p: ("none" if p.startswith(image_leaf) else "zstd") for p in paths},
        "compression_level": None,
        "use_dictionary": False,
        "write_statistics": [schema.UID, schema.SOURCE_SHA256, schema.RENDER_CONFIG_SHA256],
        "data_page_size": 1 << 20,
        "version": "2.6",
    }


def writer_fingerprint(rows_per_group: int) -> dict:
    """Everything besides the rows that decides a shard's bytes."""
    return {
        "format": MANIFEST_FORMAT,
        "pyarrow": pa.__version__,
        "schema": schema.packed_schema().to_string(show_schema_metadata=True),
        "writer": _writer_options(),
        "rows_per_group": rows_per_group,
        "png_encoder": {"opencv": cv2.__version__, "compression": COMPRESSION},  # re-encodes normal_depth
    }


def write_shard(rows_inputs: list[CharacterInputs], path: Path, rows_per_group: int) -> None:
    """Writes one (validated) shard through a temporary file, one row group at a time (bounded memory)."""
    # keep_identical: when the same bytes are already there, the old file and its mtime stay
    with atomic_path(path, fsync=True, keep_identical=True) as tmp, \
            pq.ParquetWriter(tmp, schema.packed_schema(), **_writer_options()) as writer, \
            ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # PNG coding releases the GIL
        for start in range(0, len(rows_inputs), rows_per_group):
            rows = list(pool.map(functools.partial(character_row, validate=False),
                                 rows_inputs[start : start + rows_per_group]))
            writer.write_table(pa.Table.from_pylist(rows, schema=schema.packed_schema()), row_group_size=rows_per_group)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# The stage.


@dataclass
class PackSummary:
    characters: int = 0
    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def render_folders(renders_dir: Path) -> list[Path]:
    """Character folders, sorted by uid (hidden folders, such as Blender's ``.blender`` scratch, are skipped)."""
    if not renders_dir.is_dir():
        raise PackError(f"{renders_dir}: the renders folder does not exist; run the render stage first (dvc repro render)")
    return sorted(p for p in renders_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _load_manifest(out_dir: Path) -> dict:
    path = out_dir / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def pack(params: PackParams, log=print) -> PackSummary:
    """Packs ``params.renders_dir`` into ``params.out_dir``; see the module docstring."""
    summary = PackSummary()
    book = CaptionBook(params.assets_dir, params.default_caption)
    chars = [read_inputs(folder, book) for folder in render_folders(params.renders_dir)]
    if not chars:
        raise PackError(f"{params.renders_dir}: no rendered characters found; run the render stage first")
    summary.characters = len(chars)
    unused = book.unused_keys()
    if unused:
        summary.warnings.append(f"{book.table_path}: captions for unknown characters {unused} (typo or removed asset?)")

    plan: dict[str, dict[int, list[CharacterInputs]]] = {s: {} for s in SPLITS}
    for c in chars:  # already sorted by uid
        split = split_of(c.uid, params.val_fraction)
        plan[split].setdefault(shard_of(c.uid, params.shards_in(split)), []).append(c)

    old = _load_manifest(params.out_dir)
    old_shards = {s["file"]: s for split in old.get("splits", {}).values() for s in split.get("shards", [])}
    fingerprint = writer_fingerprint(params.rows_per_group)
    manifest = {"format": MANIFEST_FORMAT, "writer": fingerprint, "splits": {}}
    keep: set[Path] = set()
    todo = []
    for split in SPLITS:
        for index in sorted(plan[split]):
            members = plan[split][index]
            rel = f"{split}/{shard_name(index)}"
            path = params.out_dir / rel
            inputs_sha256 = sha256_json({"writer": fingerprint, "rows": [c.digest() for c in members]})
            prev = old_shards.get(rel)
            unchanged = (
                prev is not None
                and prev.get("inputs_sha256") == inputs_sha256
                and path.is_file()
                and _sha256_file(path) == prev.get("sha256")
            )
            todo.append((split, rel, path, members, inputs_sha256, unchanged))

    # Validate every character of every shard to be written before writing any: a bad render leaves the
    # packed folder as it was.
    to_validate = [c for _, _, _, members, _, unchanged in todo if not unchanged for c in members]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # PNG decoding releases the GIL
        for _ in pool.map(_validate, to_validate):
            pass

    for split, rel, path, members, inputs_sha256, unchanged in todo:
        prev = old_shards.get(rel)
        if unchanged:
            summary.unchanged.append(rel)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_shard(members, path, params.rows_per_group)
            summary.written.append(rel)
            log(f"pack: wrote {rel} ({len(members)} characters)")
        keep.add(path)
        split_meta = manifest["splits"].setdefault(
            split, {"characters": 0, "num_shards": params.shards_in(split), "shards": []}
        )
        split_meta["characters"] += len(members)
        split_meta["shards"].append(
            {
                "file": rel,
                "rows": len(members),
                "uids": [c.uid for c in members],
                "inputs_sha256": inputs_sha256,
                "sha256": prev["sha256"] if unchanged else _sha256_file(path),
                "bytes": path.stat().st_size,
            }
        )

    # Shards that no character maps to any more (removed characters, changed num_shards or val_fraction).
    for split_dir in (params.out_dir / s for s in SPLITS):
        if not split_dir.is_dir():
            continue
        for p in sorted(split_dir.iterdir()):
            if SHARD_PATTERN.match(p.name) and p not in keep:
                p.unlink()
                summary.removed.append(f"{split_dir.name}/{p.name}")
                log(f"pack: removed {split_dir.name}/{p.name} (no characters map to it)")
        if not any(split_dir.iterdir()):
            split_dir.rmdir()

    manifest["captions"] = dict(sorted(Counter(c.caption_origin for c in chars).items()))
    manifest["warnings"] = summary.warnings
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    man_path = params.out_dir / MANIFEST
    if not man_path.is_file() or man_path.read_text(encoding="utf-8") != text:
        params.out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(man_path, text, fsync=True)
    for w in summary.warnings:
        log(f"pack: warning: {w}")
    return summary


def packed_files(packed_dir: Path, split: str | None = None) -> list[Path]:
    """The shard files of one split (or all splits), sorted."""
    splits = [split] if split else list(SPLITS)
    return sorted(p for s in splits for p in (Path(packed_dir) / s).glob("shard-*.parquet"))


__all__ = [
    "PackError",
    "PackParams",
    "PackSummary",
    "SPLITS",
    "character_row",
    "pack",
    "packed_files",
    "shard_of",
    "split_of",
]
