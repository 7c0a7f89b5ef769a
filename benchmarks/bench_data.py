"""Data-path benchmark: pack, loader and embed throughput on synthetic characters (no Blender needed).

    python benchmarks/bench_data.py [--characters 16] [--size 128] [--resolution 128]

Prints a table comparing
* pack (validate + write Parquet) against a plain copy of the same render files;
* the training loader reading Parquet row groups against reading the same views' PNG files from folders
  (same decode and camera conversion, one process = one DataLoader worker);
* the tiny text encoder's time per caption.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/synthetic_renders.py

import torch  # noqa: E402
from synthetic_renders import make_dataset  # noqa: E402

from chibisplat.config import PackParams, load_config  # noqa: E402
from chibisplat.dataset.embeddings import embed  # noqa: E402
from chibisplat.dataset.loader import PackedViewsDataset, ViewConfig, object_views, pick_views  # noqa: E402
from chibisplat.dataset.pack import CaptionBook, character_row, pack, packed_files, read_inputs  # noqa: E402
from chibisplat.dataset.text_encoder import load_tiny  # noqa: E402

# params.yaml's values for whatever a benchmark does not set itself (chibisplat/config.py)
CONFIG = load_config(Path(__file__).resolve().parents[1] / "params.yaml", sections=("pack", "embed", "models"))


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def render_bytes(renders: Path) -> int:
    return sum(p.stat().st_size for p in renders.rglob("*") if p.is_file() and p.name != "contact_sheet.png")


def bench_pack(root: Path, renders: Path, assets: Path) -> list[tuple[str, str]]:
    mb = render_bytes(renders) / 1e6
    files = [p for p in renders.rglob("*") if p.is_file() and p.name != "contact_sheet.png"]

    def copy():
        dst = root / "copy"
        for p in files:
            target = dst / p.relative_to(renders)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, target)

    t_copy, _ = timed(copy)
    params = dataclasses.replace(CONFIG.pack, renders_dir=renders, assets_dir=assets, out_dir=root / "packed", num_shards=4,
                                 val_fraction=0.0)
    t_pack, _ = timed(lambda: pack(params, log=lambda *_: None))
    t_again, _ = timed(lambda: pack(params, log=lambda *_: None))
    book = CaptionBook(assets)
    inputs = [read_inputs(f, book) for f in sorted(renders.iterdir())]
    t_validate, _ = timed(lambda: [character_row(c, validate=True) for c in inputs])
    t_read, _ = timed(lambda: [character_row(c, validate=False) for c in inputs])
    packed_mb = sum(p.stat().st_size for p in packed_files(params.out_dir)) / 1e6
    return [
        ("render files (PNG + JSON)", f"{mb:.1f} MB in {len(files)} files"),
        ("plain file copy", f"{mb / t_copy:.0f} MB/s"),
        ("pack (hash + validate + write)", f"{mb / t_pack:.1f} MB/s ({t_pack:.2f} s; Parquet {packed_mb:.1f} MB)"),
        ("  of which: read + hash bytes", f"{mb / t_read:.0f} MB/s"),
        ("  of which: validate (decode 80 PNGs/char)", f"{mb / t_validate:.1f} MB/s"),
        ("pack again, nothing changed", f"{t_again:.2f} s (hashes inputs, rewrites nothing)"),
    ], params


def bench_loader(renders: Path, params: PackParams, emb: Path, resolution: int, epochs: int = 3):
    config = ViewConfig(resolution=resolution)
    ds = PackedViewsDataset(packed_files(params.out_dir), emb, config, shuffle_buffer=8, seed=0)
    ds.embeddings  # load once, outside the timing (as a long-running worker would)
    n = 0

    def run_parquet():
        nonlocal n
        for e in range(epochs):
            ds.set_epoch(e)
            for obj in ds:
                n += 1

    folders = sorted(renders.iterdir())
    m = 0

    def run_folders():
        nonlocal m
        rng = random.Random(0)
        for _ in range(epochs):
            order = list(folders)
            rng.shuffle(order)
            for f in order:
                idx = pick_views(rng, config)
                images = {i: (f / f"{i:05d}.png").read_bytes() for i in idx}
                nd = {i: (f / f"{i:05d}_nd.png").read_bytes() for i in idx}
                cams = {i: (f / f"{i:05d}.json").read_text() for i in idx}
                object_views(images, nd, cams, idx, config)
                m += 1

    # Alternate the two readers and keep each one's best run: the machine may be shared.
    t_pq = t_dir = float("inf")
    for _ in range(2):
        n = m = 0
        t_pq = min(t_pq, timed(run_parquet)[0])
        t_dir = min(t_dir, timed(run_folders)[0])
    v = config.num_views
    return [
        (f"loader, Parquet row groups ({resolution}px)", f"{n / t_pq:.1f} objects/s, {n * v / t_pq:.0f} views/s per worker"),
        (f"loader, PNG folders ({resolution}px)", f"{m / t_dir:.1f} objects/s, {m * v / t_dir:.0f} views/s per worker"),
    ]


def bench_embed(root: Path, params: PackParams):
    t_build, enc = timed(lambda: load_tiny(root / "tiny"))
    captions = [f"a chibi character number {k} with a {c} hat" for k, c in enumerate(["red", "blue", "green", "tall"] * 16)]
    t_enc, _ = timed(lambda: enc.encode(captions, batch_size=16))
    e = dataclasses.replace(CONFIG.embed, packed_dir=params.out_dir, out=root / "prompt_embeds.parquet",
                            tiny_cache_dir=root / "tiny")
    models = dataclasses.replace(CONFIG.models, source="tiny", finetuned=None)
    t_stage, summary = timed(lambda: embed(e, models, log=lambda *_: None))
    t_again, _ = timed(lambda: embed(e, models, log=lambda *_: None))
    return [
        ("tiny text encoder: build + load", f"{t_build:.2f} s"),
        ("tiny text encoder: encode", f"{1000 * t_enc / len(captions):.1f} ms/caption (batch 16)"),
        ("embed stage, all new", f"{t_stage:.2f} s for {summary.captions} captions"),
        ("embed stage, nothing changed", f"{t_again:.2f} s (reuses every row)"),
    ], e.out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--characters", type=int, default=16)
    parser.add_argument("--size", type=int, default=128, help="render size of the synthetic characters")
    parser.add_argument("--resolution", type=int, default=128, help="loader output resolution")
    args = parser.parse_args()
    torch.set_num_threads(1)  # what a DataLoader worker gets; also keeps timings honest on a shared machine
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t_make, (renders, assets) = timed(lambda: make_dataset(root, n=args.characters, size=args.size))
        rows, params = bench_pack(root, renders, assets)
        embed_rows, emb = bench_embed(root, params)
        rows += bench_loader(renders, params, emb, args.resolution)
        rows += embed_rows
    print(f"\n{args.characters} synthetic characters, {args.size}x{args.size}, 40 views "
          f"(made in {t_make:.1f} s)\n")
    width = max(len(a) for a, _ in rows)
    print(f"| {'what':<{width}} | result |\n|{'-' * (width + 2)}|--------|")
    for a, b in rows:
        print(f"| {a:<{width}} | {b} |")


if __name__ == "__main__":
    main()
