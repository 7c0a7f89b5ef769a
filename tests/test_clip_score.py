"""The CLIP score against a computation by hand from the CLIP model's own towers and projections."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chibisplat.training.clip_score import ClipScorer

# CLIP's published image normalisation (openai/CLIP clip.py _transform), typed here as the independent reference.
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])
SIZE = 32


def tiny_clip_folder(folder: Path) -> Path:
    """A tiny ``CLIPModel`` (the same classes as ViT-L/14) with a locally built tokenizer, saved to ``folder``."""
    from chibisplat.dataset.text_encoder import tiny_vocab
    from chibisplat.models.fixture import write_clip_model

    if (folder / "config.json").is_file():
        return folder
    text = dict(vocab_size=len(tiny_vocab()), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=SIZE,
                  patch_size=8, hidden_act="quick_gelu")
    return write_clip_model(folder, text, vision, projection_dim=16, seed=0)


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    return ClipScorer.load(tiny_clip_folder(tmp_path_factory.mktemp("clip")), "cpu")


@torch.no_grad()
def hand_scores(s: ClipScorer, images: list[np.ndarray], caption: str) -> tuple[list[float], list[float]]:
    """100 * max(cos(E_I, E_T), 0) per image, from the vision/text towers and projections directly."""
    m = s.model
    pixels = (torch.from_numpy(np.stack(images)).float().permute(0, 3, 1, 2) / 255.0 - MEAN[:, None, None]) / STD[:, None, None]
    img = m.visual_projection(m.vision_model(pixel_values=pixels).pooler_output)
    ids = s.tokenizer([caption], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    txt = m.text_projection(m.text_model(input_ids=ids).pooler_output)[0]
    cos = (img @ txt) / (img.norm(dim=-1) * txt.norm())
    return [100.0 * max(c, 0.0) for c in cos.tolist()], cos.tolist()


def test_clip_score_is_clipscore_by_hand(scorer):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(6)]
    raw = []
    for caption in ("a chibi witch with a big hat", "a red cube", "zz"):
        expected, cos = hand_scores(scorer, images, caption)
        raw += cos
        got = [scorer.score([im], caption) for im in images]
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-5)
        assert scorer.score(images, caption) == pytest.approx(float(np.mean(expected)), rel=1e-5, abs=1e-5)
    assert min(raw) < 0 < max(raw)  # both sides of the clip at 0 were exercised


def test_clip_score_resizes_renders_to_the_model_size(scorer):
    # A uniform image stays uniform under any resize: the 64 px render must score as the 32 px one.
    small = np.full((SIZE, SIZE, 3), (200, 40, 90), np.uint8)
    large = np.full((2 * SIZE, 2 * SIZE, 3), (200, 40, 90), np.uint8)
    assert scorer.score([large], "a cat") == pytest.approx(hand_scores(scorer, [small], "a cat")[0][0], abs=1e-4)


def test_missing_clip_is_a_null_score_with_a_note(tmp_path):
    from chibisplat.training.evaluate import load_clip

    from project_config import section_params

    clip, note = load_clip(section_params("evaluate", clip={"path": tmp_path / "nope"}).clip, "cpu")
    assert clip is None and "CLIP score is null" in note and "evaluate.clip.path" in note and "hf download" in note
