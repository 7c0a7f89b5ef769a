"""The SD1.5 CLIP text encoder that turns captions into prompt embeddings (77 x 768).

Two sources (params.yaml ``models.source``):

* ``pretrained``: the ``text_encoder/`` and ``tokenizer/`` of a Stable Diffusion 1.5 folder: ``models.sd15.path``
  when set, else the Hugging Face cache at ``models.sd15.repo`` + pinned ``models.sd15.revision``
  (chibisplat/models/hub.py ``sd15_folder``, shared with the model stack). Never downloads.
* ``tiny``: the offline default. A 2-layer ``CLIPTextModel`` (hidden size 768, so embeddings keep SD1.5's shape)
  with seeded weights and a byte-level ``CLIPTokenizer``, both built locally and deterministically and saved in the
  same folder layout. Its identifier (``tiny-clip-text:seed0:<weights sha256[:12]>``) is stored next to every
  embedding, so a tiny embedding can never be mistaken for a real one.

The identifier (:attr:`TextEncoder.identifier`) includes a hash of the weights and tokenizer files, so embeddings
are reused only when they came from the very same encoder.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from chibisplat.config import ModelsParams
from chibisplat.dataset.schema import PROMPT_DIM, PROMPT_TOKENS
from chibisplat.device import module_device, resolve_device, to_device
from chibisplat.files import install_folder_once
from chibisplat.identity import sha256_files, sha256_state
from chibisplat.models.hub import ModelSourceError, sd15_folder

TINY_PREFIX = "tiny-clip-text"
TINY_LAYERS = 2
TINY_HEADS = 12  # 768 / 12 = 64 per head, as in CLIP ViT-L/14
TINY_INTERMEDIATE = 512
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_TOKENIZER_FILES = ("vocab.json", "merges.txt")


# The configured text encoder is not on this machine (the message says how to get it): the one error of every model
# source (chibisplat/models/hub.py), under the name the embed stage knows.
TextEncoderMissing = ModelSourceError
TEXT_ENCODER_REQUIRED = ("text_encoder/", "tokenizer/")  # what the embed stage needs of the SD1.5 folder


@dataclass
class TextEncoder:
    tokenizer: object  # transformers.CLIPTokenizer
    model: torch.nn.Module  # transformers.CLIPTextModel, eval mode
    identifier: str  # stored in the embeddings' ``text_encoder`` column

    @torch.no_grad()
    def encode(self, captions: list[str], batch_size: int = 16) -> np.ndarray:
        """Captions -> (N, 77, 768) float32: last hidden state, padded and truncated to 77 tokens (DiffSplat)."""
        out = []
        device = module_device(self.model)
        for start in range(0, len(captions), batch_size):
            tokens = self.tokenizer(
                list(captions[start : start + batch_size]),
                padding="max_length",
                max_length=PROMPT_TOKENS,
                truncation=True,
                return_tensors="pt",
            )
            hidden = self.model(to_device(tokens.input_ids, device)).last_hidden_state
            out.append(hidden.float().cpu().numpy())
        emb = np.concatenate(out) if out else np.zeros((0, PROMPT_TOKENS, PROMPT_DIM), np.float32)
        assert emb.shape[1:] == (PROMPT_TOKENS, PROMPT_DIM), emb.shape
        return emb


# ---------------------------------------------------------------------------------------------------------------
# Tiny, built locally.


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins that byte-level BPE uses for bytes 0..255 (GPT-2 / CLIP convention):
    printable Latin-1 bytes stand for themselves, the others are shifted to code points from 256 upwards."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def tiny_vocab() -> dict[str, int]:
    """Every byte as a word-inner and a word-final (``</w>``) token, then the two special tokens: 514 ids."""
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}


def write_tiny_tokenizer(tok_dir: Path) -> dict[str, int]:
    """A valid byte-level ``CLIPTokenizer`` folder built offline: ``vocab.json`` (:func:`tiny_vocab`) and a
    ``merges.txt`` without merges (one token per byte). Also used by the full-size fixture (models/fixture.py)."""
    vocab = tiny_vocab()
    tok_dir = Path(tok_dir)
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, sort_keys=True), encoding="utf-8")
    (tok_dir / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return vocab


def build_tiny(folder: Path, seed: int = 0) -> None:
    """Writes ``<folder>/tokenizer/{vocab.json,merges.txt}`` and ``<folder>/text_encoder/`` (seeded weights)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = write_tiny_tokenizer(folder / "tokenizer")
    enc_dir = folder / "text_encoder"
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=PROMPT_DIM,
        intermediate_size=TINY_INTERMEDIATE,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=TINY_HEADS,
        max_position_embeddings=PROMPT_TOKENS,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(config)
    model.save_pretrained(enc_dir, safe_serialization=True)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_tiny(cache_dir: Path, seed: int = 0, device: str = "cpu") -> TextEncoder:
    folder = Path(cache_dir) / f"{TINY_PREFIX}-seed{seed}"
    if not folder.is_dir():
        # Built beside the final folder and renamed into place, so a reader never sees half of it.
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=_mkdir(folder.parent)))
        build_tiny(staging, seed)
        install_folder_once(staging, folder)  # another process may have got there first: its copy is identical
    tokenizer, model = _load_folder(folder, device)
    tok_sha = sha256_files([folder / "tokenizer" / n for n in _TOKENIZER_FILES])
    weights = hashlib.sha256((sha256_state(model.state_dict()) + tok_sha).encode()).hexdigest()
    return TextEncoder(tokenizer, model, f"{TINY_PREFIX}:seed{seed}:{weights[:12]}")


# ---------------------------------------------------------------------------------------------------------------
# Pretrained SD1.5.


def load_pretrained(folder: Path, label: str, device: str = "cpu") -> TextEncoder:
    folder = Path(folder)
    weights = next((folder / "text_encoder" / n for n in _WEIGHT_FILES if (folder / "text_encoder" / n).is_file()), None)
    if weights is None:
        raise ModelSourceError(f"{folder / 'text_encoder'}: no {' or '.join(_WEIGHT_FILES)}; the download is incomplete")
    files = [weights, folder / "text_encoder" / "config.json"] + [folder / "tokenizer" / n for n in _TOKENIZER_FILES]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ModelSourceError(f"{folder}: missing {missing}; the download is incomplete")
    tokenizer, model = _load_folder(folder, device)
    return TextEncoder(tokenizer, model, f"clip-text:{label}:{sha256_files(files)[:12]}")


def _load_folder(folder: Path, device: str):
    from transformers import CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
    model = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True)
    # float32 whatever the stored dtype: DiffSplat's embeddings are float32, and CPUs are slow at float16.
    return tokenizer, to_device(model.float(), resolve_device(device)).eval()


def load_text_encoder(models: ModelsParams, cache_dir: Path, tiny_seed: int = 0, device: str = "cpu") -> TextEncoder:
    """The text encoder that params.yaml ``models:`` selects (``source: tiny | pretrained``)."""
    if models.tiny:
        return load_tiny(cache_dir, tiny_seed, device)
    folder = sd15_folder(models, TEXT_ENCODER_REQUIRED)
    return load_pretrained(folder, models.sd15.label, device)
