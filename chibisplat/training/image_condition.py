"""Image conditioning of DiffSplat's image-to-3D model (docs/image-to-3d.md).

* which view conditions (input view 0 of each object; §2) and its pixels: read from the packed renders;
* how it is encoded: SD1.5's RGB VAE, ``0.18215 * encode(2 * rgb - 1)``; a posterior sample per training step, the
  posterior mode at inference (§1, §4);
* CFG dropout of text and image from one uniform draw per object (§5);
* preparing a user's drawing: foreground cut-out (alpha channel, else a border-colour matte), recentring with a 0.2
  border, composited on white (§6).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor

from chibisplat.dataset import schema
from chibisplat.dataset.loader import ViewConfig, object_views
from chibisplat.dataset.pack import packed_files
from chibisplat.dataset.rows import shard_rows
from chibisplat.device import module_device, to_device

TEXT_PREDICTION_TYPE = "epsilon"
IMAGE_PREDICTION_TYPE = "v_prediction"  # DiffSplat trains and samples its image model with v-prediction (§4)
BORDER_RATIO = 0.2  # DiffSplat's rembg_and_center default: the object fills 80% of the longer side
MATTE_TOLERANCE = 0.1  # border-colour matte: max channel difference (of full scale) still counted as background
ENCODE_BATCH = 16  # condition images encoded per VAE call at the start of training


def prediction_type_for(image_conditioned: bool, explicit: str | None = None) -> str:
    """The model's prediction type: ``explicit`` when set, else DiffSplat's (v for the image model, else epsilon)."""
    if explicit is not None:
        return explicit
    return IMAGE_PREDICTION_TYPE if image_conditioned else TEXT_PREDICTION_TYPE


def cfg_drops(p: Tensor, cfg_dropout: float) -> tuple[Tensor, Tensor]:
    """(text dropped, image dropped) per object from one uniform draw ``p`` each (DiffSplat, §5).

    ``cfg_dropout`` is the rate of each condition (DiffSplat's ``2 * cfg_dropout_prob``): text when
    ``p < cfg_dropout``, image when ``cfg_dropout / 2 <= p < 3 * cfg_dropout / 2``; both in between.
    """
    half = cfg_dropout / 2
    return p < cfg_dropout, (p >= half) & (p < 3 * half)


# ---------------------------------------------------------------------------------------------------------------
# Encoding with SD1.5's RGB VAE.


@torch.no_grad()
def condition_moments(image_vae, images: Tensor, batch: int = ENCODE_BATCH) -> Tensor:
    """RGB images (N, 3, R, R) in [0, 1] (on white) -> posterior mean and std (N, 8, R/8, R/8), float32 on the CPU,
    unscaled. Encoded on the VAE's device, ``batch`` at a time."""
    out = []
    device = module_device(image_vae)
    for i in range(0, images.shape[0], batch):
        x = to_device(images[i:i + batch].float(), device) * 2.0 - 1.0
        dist = image_vae.encode(x.to(next(image_vae.parameters()).dtype)).latent_dist
        out.append(torch.cat([dist.mean, dist.std], dim=1).float().cpu())
    return torch.cat(out)


def condition_latents(moments: Tensor, scaling_factor: float, eps: Tensor | None = None) -> Tensor:
    """Scaled condition latents (B, 4, h, w) from posterior moments (B, 8, h, w): the mode (``eps`` None,
    inference) or the sample ``mean + std * eps`` (training)."""
    mean, std = moments.chunk(2, dim=1)
    z = mean if eps is None else mean + std * eps.to(mean.dtype)
    return scaling_factor * z


def vae_scaling(image_vae) -> float:
    return float(image_vae.config.scaling_factor)


# ---------------------------------------------------------------------------------------------------------------
# Which view conditions each training object, and its pixels.


def object_condition_slots(latents_dir: Path, split: str) -> list[tuple[str, int]]:
    """(uid, slot of input view 0) of every object of ``load_latent_set(latents_dir, split)``, in its order (files
    sorted by name, view sets in file order)."""
    out = []
    for path in sorted((Path(latents_dir) / split).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            uid = (f.metadata() or {}).get("uid", path.stem)
            slots = f.get_tensor("view_indices")[:, 0].tolist()
        out += [(uid, int(s)) for s in slots]
    return out


def packed_condition_images(packed_dir: Path, split: str, wanted: list[tuple[str, int]], resolution: int,
                            log=print) -> Tensor:
    """The condition view of each ``(uid, slot)`` from the packed renders: RGB on white at ``resolution``
    (N, 3, R, R) in [0, 1], as the loader prepares views (DiffSplat's condition image, §2)."""
    needed: dict[str, set[int]] = {}
    for uid, slot in wanted:
        needed.setdefault(uid, set()).add(slot)
    found: dict[tuple[str, int], Tensor] = {}
    config = ViewConfig(num_views=1, num_input_views=1, resolution=resolution)
    for shard in packed_files(Path(packed_dir), split):
        for row in shard_rows(shard):
            uid = row[schema.UID]
            for slot in sorted(needed.get(uid, ())):
                v = object_views(row[schema.IMAGES], row[schema.NORMAL_DEPTH], row[schema.CAMERAS], [slot], config)
                found[(uid, slot)] = v["image"][0]
    missing = sorted({u for u, s in wanted if (u, s) not in found})
    if missing:
        raise FileNotFoundError(
            f"{packed_dir}/{split}: no packed views for character(s) {missing[:5]} of the latent cache; the latents "
            "and packed data are out of step: run `dvc repro latents` (or the pack stage)")
    log(f"image condition: {len(found)} condition views of {len(needed)} character(s) read from {packed_dir}/{split}")
    return torch.stack([found[k] for k in wanted])


# ---------------------------------------------------------------------------------------------------------------
# A user's image: foreground, recentring, white background (§6).


def _reach_border(candidate: Tensor) -> Tensor:
    """Pixels of ``candidate`` (H, W) bool connected (8-neighbourhood) to the image border through candidates."""
    reach = torch.zeros_like(candidate)
    for edge in ((0, slice(None)), (-1, slice(None)), (slice(None), 0), (slice(None), -1)):
        reach[edge] = candidate[edge]
    cand = candidate.float()[None, None]
    cur = reach.float()[None, None]
    while True:
        nxt = F.max_pool2d(cur, 3, stride=1, padding=1) * cand
        if torch.equal(nxt, cur):
            return cur[0, 0] > 0
        cur = nxt


def foreground_alpha(rgba: np.ndarray, tolerance: float = MATTE_TOLERANCE) -> tuple[np.ndarray, str]:
    """Foreground alpha (H, W) float in [0, 1] of an (H, W, 3|4) uint8 image, and how it was found.

    The image's alpha channel when it has one that is not fully opaque; else a border-colour matte: background is
    what is within ``tolerance`` (max channel difference, fraction of 255) of the median border colour and connected
    to the border (docs/image-to-3d.md §6).
    """
    if rgba.shape[-1] == 4 and (rgba[..., 3] < 255).any():
        return rgba[..., 3].astype(np.float32) / 255.0, "alpha channel"
    rgb = rgba[..., :3].astype(np.float32) / 255.0
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    colour = np.median(border, axis=0)
    close = np.abs(rgb - colour).max(axis=-1) <= tolerance
    background = _reach_border(torch.from_numpy(close)).numpy()
    method = f"border-colour matte (background {np.round(colour * 255).astype(int).tolist()}, tolerance {tolerance:g})"
    return (~background).astype(np.float32), method


def _resize(x: Tensor, h: int, w: int) -> Tensor:
    """(C, H, W) -> (C, h, w): area averaging when shrinking, bilinear when enlarging (cv2 INTER_AREA's behaviour)."""
    if (h, w) == tuple(x.shape[-2:]):
        return x
    mode = "area" if h <= x.shape[-2] and w <= x.shape[-1] else "bilinear"
    kw = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(x[None], size=(h, w), mode=mode, **kw)[0]


def prepare_condition_image(image: np.ndarray, size: int, border_ratio: float = BORDER_RATIO,
                            tolerance: float = MATTE_TOLERANCE) -> tuple[Tensor, Tensor, str]:
    """A front view (H, W, 3|4) uint8 on any background -> DiffSplat's condition image.

    Resize so the longer side is ``size``, cut the foreground (:func:`foreground_alpha`), scale its bounding box so its
    longer side is ``int(size * (1 - border_ratio))``, centre it on a ``size`` square and composite on white
    (``extensions/rembg_and_center.py`` + ``infer_gsdiff_sd.py``). Returns RGB (3, size, size) and alpha
    (1, size, size) in [0, 1], and the cut-out method.
    """
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise ValueError(f"expected an RGB or RGBA image, got an array of shape {image.shape}")
    alpha, method = foreground_alpha(image, tolerance)
    rgba = torch.cat([torch.from_numpy(image[..., :3].astype(np.float32) / 255.0), torch.from_numpy(alpha)[..., None]],
                     dim=-1).permute(2, 0, 1)  # (4, H, W)
    h, w = rgba.shape[-2:]
    s = size / max(h, w)
    rgba = _resize(rgba, int(h * s), int(w * s))
    mask = rgba[3] > 0
    if not mask.any():
        raise ValueError(f"no foreground found ({method}); pass a PNG whose alpha channel marks the character")
    ys, xs = torch.nonzero(mask, as_tuple=True)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())
    crop = rgba[:, y0:y1 + 1, x0:x1 + 1]
    bh, bw = crop.shape[-2:]
    target = int(size * (1 - border_ratio))
    k = target / max(bh, bw)
    nh, nw = max(1, int(bh * k)), max(1, int(bw * k))
    out = torch.zeros(4, size, size)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[:, top:top + nh, left:left + nw] = _resize(crop, nh, nw)
    a = out[3:4].clamp(0, 1)
    rgb = out[:3].clamp(0, 1) * a + (1.0 - a)
    return rgb, a, method


def load_condition_image(path: Path, size: int, border_ratio: float = BORDER_RATIO,
                         tolerance: float = MATTE_TOLERANCE) -> tuple[Tensor, Tensor, str]:
    """:func:`prepare_condition_image` of an image file (PNG, JPEG, WebP...); a clear error when it is unreadable."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image (generate --image / generate.image)")
    try:
        with Image.open(path) as im:
            im = im.convert("RGBA") if ("A" in im.getbands() or "transparency" in im.info) else im.convert("RGB")
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: not a readable image ({e}); pass a PNG, JPEG or WebP front view") from None
    return prepare_condition_image(arr, size, border_ratio, tolerance)
