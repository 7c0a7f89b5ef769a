"""Prompt embeddings of every caption of the packed dataset (docs/dataset-contract.md §6).

``<embeddings>/prompt_embeds.parquet`` has one row per distinct caption plus one for the empty caption "" (the
null prompt of classifier-free guidance), sorted by caption. Rows are keyed by ``caption_sha256`` and the
``text_encoder`` identifier: re-embedding keeps every row of the existing file whose caption and encoder did not
change, so re-captioning one character encodes one caption.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from chibisplat.config import EmbedParams, ModelsParams
from chibisplat.dataset import schema
from chibisplat.dataset.pack import packed_files
from chibisplat.files import atomic_path
from chibisplat.identity import sha256_text

NULL_CAPTION = ""


@dataclass
class EmbedSummary:
    captions: int
    encoded: int
    reused: int
    text_encoder: str


def packed_captions(packed_dir: Path) -> list[str]:
    """Every distinct caption of every split, plus "", sorted."""
    files = packed_files(packed_dir)
    if not files:
        raise FileNotFoundError(f"{packed_dir}: no packed shards; run the pack stage first (dvc repro pack)")
    captions = {NULL_CAPTION}
    for f in files:
        captions.update(pq.read_table(f, columns=[schema.CAPTION]).column(0).to_pylist())
    return sorted(captions)


def read_embeddings(path: Path, text_encoder: str | None = None) -> dict[str, tuple[str, np.ndarray]]:
    """``caption_sha256 -> (caption, (77, 768) float32)``; only rows of ``text_encoder`` when given."""
    table = pq.read_table(path)
    missing = set(schema.embeddings_schema().names) - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: not a prompt-embeddings file (columns {sorted(missing)} missing); run the embed stage")
    keys = table.column(schema.EMBED_CAPTION_SHA256).to_pylist()
    captions = table.column(schema.EMBED_CAPTION).to_pylist()
    encoders = table.column(schema.EMBED_TEXT_ENCODER).to_pylist()
    flat = table.column(schema.EMBED_EMBEDDING).combine_chunks().flatten().flatten()
    emb = flat.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    emb = emb.reshape(len(keys), schema.PROMPT_TOKENS, schema.PROMPT_DIM)
    return {k: (c, emb[i]) for i, (k, c, e) in enumerate(zip(keys, captions, encoders)) if text_encoder in (None, e)}


def embeddings_table(captions: list[str], embeddings: np.ndarray, text_encoder: str) -> pa.Table:
    n = len(captions)
    flat = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1))
    inner = pa.FixedSizeListArray.from_arrays(flat, schema.PROMPT_DIM)
    outer = pa.FixedSizeListArray.from_arrays(inner, schema.PROMPT_TOKENS)
    return pa.Table.from_arrays(
        [
            pa.array(captions, pa.string()),
            pa.array([sha256_text(c) for c in captions], pa.string()),
            pa.array([text_encoder] * n, pa.string()),
            outer,
        ],
        schema=schema.embeddings_schema(),
    )


def embed(params: EmbedParams, models: ModelsParams, log=print) -> EmbedSummary:
    """Writes ``params.out`` for the captions of ``params.packed_dir``, reusing unchanged rows."""
    from chibisplat.dataset.text_encoder import load_text_encoder
    from chibisplat.device import resolve_device

    captions = packed_captions(params.packed_dir)
    device = resolve_device(params.device, "params.yaml embed.device")
    encoder = load_text_encoder(models, params.tiny_cache_dir, params.tiny_seed, device)
    old = {}
    if params.out.is_file():
        try:
            old = read_embeddings(params.out, encoder.identifier)
        except (ValueError, pa.ArrowInvalid) as e:
            log(f"embed: ignoring the existing {params.out} ({e})")
    todo = [c for c in captions if sha256_text(c) not in old]
    fresh = dict(zip(todo, encoder.encode(todo, params.batch_size))) if todo else {}
    emb = np.stack([fresh[c] if c in fresh else old[sha256_text(c)][1] for c in captions])
    table = embeddings_table(captions, emb, encoder.identifier)
    params.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(params.out) as tmp:
        pq.write_table(table, tmp, compression="zstd", use_dictionary=[schema.EMBED_TEXT_ENCODER], version="2.6")
    log(f"embed: {len(captions)} captions ({len(todo)} encoded, {len(captions) - len(todo)} reused) with {encoder.identifier}")
    return EmbedSummary(len(captions), len(todo), len(captions) - len(todo), encoder.identifier)
