"""embed: captions -> prompt embeddings (docs/dataset-contract.md §6)."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from project_config import models_params, section_params
from synthetic_renders import make_dataset

from chibisplat.config import EmbedParams
from chibisplat.dataset import schema
from chibisplat.dataset.embeddings import embed, packed_captions, read_embeddings
from chibisplat.dataset.pack import pack
from chibisplat.dataset.text_encoder import TextEncoderMissing, load_text_encoder, load_tiny
from chibisplat.identity import sha256_text

TINY = models_params()


def pretrained(repo: str = "someone/sd15", revision: str | None = None, sd15_path=None):
    """``models:`` with source pretrained and this ``sd15`` snapshot."""
    return models_params(source="pretrained", sd15={"repo": repo, "revision": revision, "path": sd15_path})


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture
def packed(tmp_path):
    renders, assets = make_dataset(tmp_path, n=3, size=16)
    p = section_params("pack", renders_dir=renders, assets_dir=assets, out_dir=tmp_path / "packed", num_shards=2, val_fraction=0.3)
    pack(p, log=lambda *_: None)
    return p


def test_tiny_encoder_is_built_deterministically(tiny_cache, tmp_path):
    a = load_tiny(tiny_cache, seed=0)
    b = load_tiny(tmp_path / "elsewhere", seed=0)  # built from scratch a second time
    assert a.identifier == b.identifier
    assert a.identifier.startswith("tiny-clip-text:seed0:") and len(a.identifier.split(":")[-1]) == 12
    ea, eb = a.encode(["a chibi fox", ""]), b.encode(["a chibi fox", ""])
    assert ea.shape == (2, 77, 768) and ea.dtype == np.float32
    np.testing.assert_array_equal(ea, eb)
    assert not np.allclose(ea[0], ea[1])
    assert load_tiny(tmp_path / "other_seed", seed=1).identifier != a.identifier
    # Long captions are truncated to 77 tokens, not rejected.
    assert a.encode(["chibi " * 200]).shape == (1, 77, 768)


def test_embeddings_file_has_every_caption_and_the_empty_one(packed, tiny_cache, tmp_path):
    params = section_params("embed", packed_dir=packed.out_dir, out=tmp_path / "emb" / "prompt_embeds.parquet", tiny_cache_dir=tiny_cache)
    summary = embed(params, TINY, log=lambda *_: None)
    captions = packed_captions(packed.out_dir)
    assert captions[0] == "" and len(captions) == 4
    assert summary.encoded == 4 and summary.reused == 0
    table = pq.read_table(params.out)
    assert table.schema.names == list(schema.embeddings_schema().names)
    assert table.column("caption").to_pylist() == captions
    assert table.column("caption_sha256").to_pylist() == [sha256_text(c) for c in captions]
    assert set(table.column("text_encoder").to_pylist()) == {summary.text_encoder}
    rows = read_embeddings(params.out)
    direct = load_tiny(tiny_cache).encode(captions)
    for k, c in enumerate(captions):
        np.testing.assert_allclose(rows[sha256_text(c)][1], direct[k], rtol=0, atol=1e-5)


def test_recaptioning_one_character_encodes_one_caption(packed, tiny_cache, tmp_path):
    params = section_params("embed", packed_dir=packed.out_dir, out=tmp_path / "prompt_embeds.parquet", tiny_cache_dir=tiny_cache)
    embed(params, TINY, log=lambda *_: None)
    before = read_embeddings(params.out)
    (packed.assets_dir / "chibi_01.txt").write_text("a chibi wizard with a tall hat")
    pack(packed, log=lambda *_: None)
    summary = embed(params, TINY, log=lambda *_: None)
    assert (summary.encoded, summary.reused, summary.captions) == (1, 3, 4)
    after = read_embeddings(params.out)
    for key in set(before) & set(after):
        np.testing.assert_array_equal(before[key][1], after[key][1])
    assert sha256_text("a chibi wizard with a tall hat") in after
    assert sha256_text("a chibi character number 1") not in after  # stale captions are dropped
    # Another encoder never reuses these rows.
    other = embed(EmbedParams(**{**params.__dict__, "tiny_seed": 1}), TINY, log=lambda *_: None)
    assert other.encoded == 4


def test_embedding_twice_gives_the_same_bytes(packed, tiny_cache, tmp_path):
    a = section_params("embed", packed_dir=packed.out_dir, out=tmp_path / "a.parquet", tiny_cache_dir=tiny_cache)
    b = section_params("embed", packed_dir=packed.out_dir, out=tmp_path / "b.parquet", tiny_cache_dir=tiny_cache)
    embed(a, TINY, log=lambda *_: None)
    embed(b, TINY, log=lambda *_: None)
    assert a.out.read_bytes() == b.out.read_bytes()


def test_missing_pretrained_model_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models = pretrained(repo="someone/sd15", revision="0123456789abcdef0123456789abcdef01234567")
    with pytest.raises(TextEncoderMissing, match="hf download someone/sd15 --revision 0123"):
        load_text_encoder(models, tmp_path)
    with pytest.raises(TextEncoderMissing, match="no text_encoder/ and tokenizer/"):
        load_text_encoder(pretrained(sd15_path=tmp_path / "nowhere"), tmp_path)
    with pytest.raises(TextEncoderMissing, match="pinned commit"):
        load_text_encoder(pretrained(repo="someone/sd15", revision=None), tmp_path)


def test_pretrained_path_loads_a_local_sd15_layout(tiny_cache, tmp_path):
    """A local SD1.5-shaped folder (here: the tiny encoder's files) loads through the pretrained code path."""
    tiny = load_tiny(tiny_cache)
    folder = tmp_path / "sd15"
    shutil.copytree(tiny_cache / "tiny-clip-text-seed0", folder)
    enc = load_text_encoder(pretrained(sd15_path=folder), tmp_path)
    assert enc.identifier.startswith(f"clip-text:{folder}:")
    np.testing.assert_allclose(enc.encode(["a chibi"]), tiny.encode(["a chibi"]), atol=1e-6)


def test_embed_without_packed_data_is_a_clear_error(tmp_path, tiny_cache):
    with pytest.raises(FileNotFoundError, match="run the pack stage"):
        embed(section_params("embed", packed_dir=tmp_path / "none", out=tmp_path / "e.parquet", tiny_cache_dir=tiny_cache), TINY)
