"""The Parquet layouts of the packed dataset and of the prompt embeddings (docs/dataset-contract.md §5-§6).

This is the one place where column names, their Arrow types and the Hugging Face ``datasets`` features
are defined. The Arrow schema is derived from the features, so the ``huggingface`` schema metadata that lets
``datasets.load_dataset("parquet", ...)`` decode the image columns can never drift from the columns.

``normal_depth`` departs from the contract's "the ``_nd.png`` bytes, unchanged" (docs/dataset-notes.md, "Packed
normal/depth"): PIL, which ``datasets`` decodes images with, reads a 16-bit RGBA PNG as 8-bit RGBA, so the documented
no-project-code load would quantise normals and depth to 8 bits. Each view is therefore stored as 4 single-channel
16-bit PNGs (normal x, y, z, depth/5), which PIL decodes losslessly (mode ``I;16``): the same pixel values as the
render's ``_nd.png``, at about the same size.
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa

from chibisplat.png import decode_png, encode_png

# Packed dataset: one row per character.
UID = "uid"
CAPTION = "caption"
SOURCE_SHA256 = "source_sha256"
RENDER_CONFIG_SHA256 = "render_config_sha256"
IMAGES = "images"  # 40 x HF Image: the {i:05d}.png bytes, unchanged
NORMAL_DEPTH = "normal_depth"  # 40 x 4 HF Image: the {i:05d}_nd.png channels as 16-bit grayscale PNGs
NORMAL_DEPTH_CHANNELS = ("normal_x", "normal_y", "normal_z", "depth")  # the _nd.png's R, G, B, A
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
            NORMAL_DEPTH: List(List(Image(), length=len(NORMAL_DEPTH_CHANNELS))),
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


def normal_depth_structs(nd: np.ndarray, path_stem: str) -> list[dict]:
    """One view's normal/depth (H, W, 4) uint16 (the ``_nd.png`` pixels) -> 4 HF ``Image`` values, one 16-bit
    grayscale PNG per channel (``<path_stem>_<channel>.png``)."""
    if nd.dtype != np.uint16 or nd.ndim != 3 or nd.shape[2] != len(NORMAL_DEPTH_CHANNELS):
        raise ValueError(f"normal/depth must be (H, W, 4) uint16, got {nd.shape} {nd.dtype}")
    return [image_struct(encode_png(np.ascontiguousarray(nd[:, :, c])), f"{path_stem}_{name}.png")
            for c, name in enumerate(NORMAL_DEPTH_CHANNELS)]


def decode_normal_depth(value) -> np.ndarray:
    """One view's packed ``normal_depth`` (4 channel PNGs) or a render's ``_nd.png`` bytes -> (H, W, 4) uint16."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        nd = decode_png(bytes(value))
    else:
        if len(value) != len(NORMAL_DEPTH_CHANNELS):
            raise ValueError(f"normal_depth: expected {len(NORMAL_DEPTH_CHANNELS)} channel PNGs, got {len(value)}")
        nd = np.stack([decode_png(v) for v in value], axis=-1)
    if nd.dtype != np.uint16 or nd.ndim != 3 or nd.shape[2] != len(NORMAL_DEPTH_CHANNELS):
        raise ValueError(f"normal_depth is {nd.shape} {nd.dtype}, expected (H, W, 4) 16-bit")
    return nd
