"""Text-image CLIP score of generated views: what users judge a fine-tune by (issue 9, evaluate).

Definition (the usual CLIPScore, Hessel et al. 2021, with w = 100 as in torchmetrics)::

    CLIPScore(image, caption) = 100 * max(cos(E_I, E_T), 0)

where ``E_I`` is CLIP's projected image embedding (``visual_projection(vision_model(pixels).pooler_output)``) and
``E_T`` the projected text embedding (``text_projection(text_model(tokens).pooler_output)``), both L2-normalised.
A generated object's score is the mean over its rendered views; a model's score the mean over the val prompts.

The model is CLIP ViT-L/14 (``transformers.CLIPModel``), found like SD1.5: ``evaluate.clip.path`` (a local folder
with config.json, the weights, vocab.json + merges.txt and optionally preprocessor_config.json), else the Hugging
Face cache at ``evaluate.clip.repo`` + pinned ``evaluate.clip.revision`` (never downloaded). Absent: the score is
null and evaluate writes a note with the download command. Images are preprocessed as CLIP's image processor does
for square renders: bicubic resize to the model's image size, then normalised with the processor's mean and std
(preprocessor_config.json, else CLIP's published constants).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from chibisplat.config import SnapshotParams
from chibisplat.device import resolve_device, to_device

CLIP_PATTERNS = ["config.json", "model.safetensors", "vocab.json", "merges.txt", "preprocessor_config.json",
                 "tokenizer_config.json", "special_tokens_map.json"]
CLIP_REQUIRED = ["config.json", "vocab.json", "merges.txt"]
SCORE_WEIGHT = 100.0  # CLIPScore's w


class ClipMissing(FileNotFoundError):
    """No CLIP model on this machine (the message names the download command)."""


def clip_folder(spec: SnapshotParams | None) -> Path:
    """The local CLIP folder that ``evaluate.clip`` names (``path``, else the HF cache at ``repo``@``revision``)."""
    from chibisplat.models.hub import ModelSourceError, resolve_snapshot

    if spec is None:
        raise ClipMissing("params.yaml evaluate.clip is null (set it to {repo, revision, path} of CLIP ViT-L/14)")
    repo, revision = spec.repo, spec.revision
    try:
        folder = resolve_snapshot(spec, CLIP_PATTERNS, CLIP_REQUIRED, "evaluate.clip")
    except ModelSourceError as e:
        raise ClipMissing(
            f"no CLIP model: {str(e).splitlines()[0]} Get it on a machine with internet: `hf download "
            f"{repo} --revision {revision} --local-dir models/{repo.split('/')[-1]}`, copy the folder here and set "
            "params.yaml evaluate.clip.path to it (or fill the HF cache with that revision)"
        ) from None
    if not any((folder / n).is_file() for n in ("model.safetensors", "pytorch_model.bin")):
        raise ClipMissing(f"{folder}: no model.safetensors (params.yaml evaluate.clip); the download is incomplete")
    return folder


def _projected(out) -> torch.Tensor:
    """``get_*_features`` output: a tensor (transformers 4) or an output whose pooler_output is projected (5)."""
    return out if torch.is_tensor(out) else out.pooler_output


@dataclass
class ClipScorer:
    model: torch.nn.Module  # transformers.CLIPModel, eval mode
    tokenizer: object  # transformers.CLIPTokenizer
    image_size: int
    mean: torch.Tensor  # (3,)
    std: torch.Tensor  # (3,)
    identity: str

    @staticmethod
    def load(folder: Path, device="cpu") -> "ClipScorer":
        from transformers import CLIPModel, CLIPTokenizer
        from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        folder = Path(folder)
        model = CLIPModel.from_pretrained(folder, local_files_only=True).float().eval()
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        mean, std, size = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, model.config.vision_config.image_size
        pre = folder / "preprocessor_config.json"
        if pre.is_file():
            cfg = json.loads(pre.read_text())
            mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
        model = to_device(model, resolve_device(device))
        return ClipScorer(model, tokenizer, size, torch.tensor(mean, dtype=torch.float32),
                          torch.tensor(std, dtype=torch.float32), f"clip:{folder.name}")

    def pixel_values(self, images: list[np.ndarray]) -> torch.Tensor:
        """RGB uint8 (H, W, 3) square images -> normalised (N, 3, S, S) float32 model inputs."""
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-2:] != (self.image_size, self.image_size):
            if x.shape[-1] != x.shape[-2]:
                raise ValueError(f"CLIP score: renders must be square, got {tuple(x.shape[-2:])}")
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False,
                              antialias=True).clamp(0, 1)
        return (x - self.mean[:, None, None]) / self.std[:, None, None]

    @torch.no_grad()
    def image_embeds(self, images: list[np.ndarray]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        pixels = to_device(self.pixel_values(images), device)
        return F.normalize(_projected(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1).cpu()

    @torch.no_grad()
    def text_embeds(self, texts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        max_len = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(list(texts), padding="max_length", max_length=max_len, truncation=True,
                                return_tensors="pt")
        ids = to_device(tokens.input_ids, device)
        return F.normalize(_projected(self.model.get_text_features(input_ids=ids)).float(), dim=-1).cpu()

    def score(self, images: list[np.ndarray], caption: str) -> float:
        """Mean CLIPScore of ``images`` (views of one object) against ``caption`` (module docstring)."""
        cos = self.image_embeds(images) @ self.text_embeds([caption])[0]
        return float((SCORE_WEIGHT * cos.clamp_min(0)).mean())


__all__ = ["ClipMissing", "ClipScorer", "clip_folder"]
