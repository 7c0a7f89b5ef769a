"""The Parquet layouts of the packed dataset and of the prompt embeddings (dataset contract, sections 5-6).

This is the one place where column names, their Arrow types and the Hugging Face ``datasets`` features
are defined. The Arrow schema is derived from the features, so the ``huggingface`` schema metadata that lets
``datasets.load_dataset("parquet", ...)`` decode the image columns can never drift from the columns.
"""

from __future__ import annotations

import functools

import pyarrow as pa

# Packed dataset: one row per character.
UID = "uid"
CAPTION = "caption"
SOURCE_SHA256 = "source_sha256"
RENDER_CONFIG_SHA256 = "render_config_sha256"
IMAGES = "images"  # 40 x HF Image: the {i:05d}.png bytes, unchanged
NORMAL_DEPTH = "normal_depth"  # 40 x HF Image: the {i:05d}_nd.png bytes, unchanged
CAMERAS = "cameras"  # 40 x the {i:05d}.json text, unchanged
PACKED_COLUMNS = (UID, CAPTION, SOURCE_SHA256, RENDER_CONFIG_SHA256, IMAGES, NORMAL_DEPTH, CAMERAS)
IMAGE_COLUMNS = (IMAGES, NORMAL_DEPTH)  # already-compressed PNG bytes: stored without Parquet compression

# Prompt embeddings: one row per distinct caption, plus the empty caption "".
EMBED_CAPTION = "caption"
EMBED_CAPTION_SHA256 = "caption_sha256"
EMBED_TEXT_ENCODER = "text_encoder"
EMBED_EMBEDDING = "embedding"
PROMPT_TOKENS = 77  # SD1.5 CLIP context length
PROMPT_DIM = 768  # SD1.5 CLIP ViT-L/14 text width


@functools.cache
def packed_features():
    """HF features of a packed shard (``datasets`` is imported lazily: only writers need it)."""
    from datasets import Features, Image, List, Value

    return Features(
        {
            UID: Value("string"),
            CAPTION: Value("string"),
            SOURCE_SHA256: Value("string"),
            RENDER_CONFIG_SHA256: Value("string"),
            IMAGES: List(Image()),
            NORMAL_DEPTH: List(Image()),
            CAMERAS: List(Value("string")),
        }
    )


@functools.cache
def packed_schema() -> pa.Schema:
    """Arrow schema of a packed shard, with the HF features in its ``huggingface`` metadata."""
    schema = packed_features().arrow_schema
    assert tuple(schema.names) == PACKED_COLUMNS
    return schema


@functools.cache
def embeddings_features():
    from datasets import Features, List, Value

    return Features(
        {
            EMBED_CAPTION: Value("string"),
            EMBED_CAPTION_SHA256: Value("string"),
            EMBED_TEXT_ENCODER: Value("string"),
            # (77, 768) float32: the text encoder's last hidden state, as DiffSplat's .npy files.
            EMBED_EMBEDDING: List(List(Value("float32"), length=PROMPT_DIM), length=PROMPT_TOKENS),
        }
    )


@functools.cache
def embeddings_schema() -> pa.Schema:
    return embeddings_features().arrow_schema


def image_struct(data: bytes, path: str) -> dict:
    """One HF ``Image`` value: encoded bytes plus a file name (datasets decodes the bytes, never the path)."""
    return {"bytes": data, "path": path}
