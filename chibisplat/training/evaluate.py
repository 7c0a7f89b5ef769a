"""Evaluation on the val split (docs/diffsplat-reference.md §8 "Metrics", "Previews").

* GSRecon reconstruction: for each val character and view set, the 4 even input views -> GSRecon Gaussians ->
  renders of 4 held-out slots, compared with the ground truth: PSNR, SSIM (skimage's defaults: 7x7 uniform
  window, sample covariance, data range 1) and LPIPS-VGG (only with local weights, else null with a note).
* The trained UNet's diffusion loss on the val latents (fixed timesteps and noise: comparable across runs).
* Generation: each val caption rendered by the base UNet (the published DiffSplat one on ``models.source:
  pretrained``; the seed-built one on ``tiny``) and by the fine-tuned one with the same seeds -> GSVAE ->
  Gaussians -> 4 views; a side-by-side sheet per character (``generated_<uid>.png``: base above, fine-tuned
  below) plus a reconstruction sheet (ground truth above GSRecon's renders), and the text-image CLIP score of
  both (:mod:`chibisplat.training.clip_score`; null with a note when no CLIP model is configured), so
  ``dvc exp show`` ranks experiments by ``clip_score``.
* Image-to-3D (``models.image_conditioned: true``; docs/image-to-3d.md): the previews are conditioned on each val
  character's front view (input view 0 of view set ``evaluate.view_sets[0]``: set 0 starts at slot 0, azimuth 0)
  and generated at that set's own 4 cameras with ``evaluate.image_guidance``, so they can be compared with the
  character's true views: ``image_cond_psnr`` (fine-tuned) and ``image_cond_psnr_base`` in the metrics; the sheet
  shows the ground truth row above the generated ones.

Everything runs on ``evaluate.device`` (``auto``: CUDA when present); batches move with
:func:`chibisplat.device.to_device` only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from chibisplat.config import EvaluateParams, ModelsParams, SnapshotParams
from chibisplat.dataset import schema
from chibisplat.dataset.loader import ViewConfig, object_views
from chibisplat.dataset.pack import packed_files
from chibisplat.dataset.rows import shard_rows
from chibisplat.device import module_device, resolve_device, to_device
from chibisplat.images import contact_sheet
from chibisplat.protocol import (
    CANONICAL_RADIUS, EVEN_VIEW_SETS, INFERENCE_AZIMUTHS, INFERENCE_ELEVATION, NUM_INPUT_VIEWS, NUM_SUPERVISION_VIEWS,
)
from chibisplat.training.inference import (
    inference_cameras, latents_to_gaussians, load_trained_unet, render_rgb,
)
from chibisplat.training.latents import (
    gsrecon_splatter, load_latent_set, one_object, supervision_views,
)
from chibisplat.training.image_condition import (
    condition_latents, condition_moments, object_condition_slots, packed_condition_images, prediction_type_for,
    vae_scaling,
)
from chibisplat.training.objective import (
    diffusion_step_inputs, noise_scheduler, sample_batch, sample_latents, step_generator, unet_prediction,
)
from chibisplat.splats.splatter import splatter_to_gaussians


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Images (.., 3, H, W) in [0, 1]."""
    mse = F.mse_loss(x, y).item()
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 7) -> float:
    """Mean SSIM of (N, C, H, W) images in [0, 1] (skimage ``structural_similarity`` defaults, channels averaged)."""
    k1, k2, np_ = 0.01, 0.03, window * window
    pool = lambda t: F.avg_pool2d(t, window, stride=1)  # valid window = skimage's border crop
    cov_norm = np_ / (np_ - 1)
    ux, uy = pool(x), pool(y)
    vx = cov_norm * (pool(x * x) - ux * ux)
    vy = cov_norm * (pool(y * y) - uy * uy)
    vxy = cov_norm * (pool(x * y) - ux * uy)
    c1, c2 = k1 ** 2, k2 ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean().item()


@torch.no_grad()
def reconstruction_metrics(stack, params: EvaluateParams, resolution: int, lpips, log=print) -> tuple[dict, dict]:
    """GSRecon on the val characters' even input views, rendered into held-out slots; also returns sheets."""
    files = packed_files(Path(params.packed_dir), "val")
    if not files:
        raise FileNotFoundError(f"{params.packed_dir}/val: no packed val shards; run the pack stage (dvc repro pack)")
    config = ViewConfig(resolution=resolution)
    res = params.render_resolution
    scores = {"psnr": [], "ssim": [], "lpips": []}
    sheets = {}
    for shard in files:
        for row in shard_rows(shard):
            uid = row[schema.UID]
            for s in params.view_sets:
                inputs = EVEN_VIEW_SETS[s]
                indices = list(inputs) + supervision_views(uid, s, inputs)
                v = object_views(row[schema.IMAGES], row[schema.NORMAL_DEPTH], row[schema.CAMERAS], indices, config)
                splatter = gsrecon_splatter(stack.gsrecon, one_object(v))[0].float()  # on GSRecon's device
                c2w, intr = to_device((v["C2W"], v["fxfycxcy"]), splatter.device)
                g = splatter_to_gaussians(splatter, c2w[:NUM_INPUT_VIEWS], intr[:NUM_INPUT_VIEWS])
                held = slice(NUM_INPUT_VIEWS, None)  # the supervision views
                pred = render_rgb(g, c2w[held], intr[held], res, params.rasterizer, params.opacity_threshold,
                                  params.image_formation)
                pred_t = torch.from_numpy(np.stack(pred)).permute(0, 3, 1, 2).float() / 255.0
                gt = v["image"][held]
                if gt.shape[-1] != res:
                    gt = F.interpolate(gt, size=(res, res), mode="bilinear", align_corners=False, antialias=True)
                gt = (gt.clamp(0, 1) * 255).round() / 255.0  # 8-bit, as the metrics are computed on uint8 images
                for k in range(gt.shape[0]):
                    scores["psnr"].append(psnr(pred_t[k:k + 1], gt[k:k + 1]))
                    scores["ssim"].append(ssim(pred_t[k:k + 1], gt[k:k + 1]))
                    if lpips is not None:
                        pair = to_device((pred_t[k:k + 1], gt[k:k + 1]), module_device(lpips))
                        scores["lpips"].append(lpips(*pair).item())
                if s == params.view_sets[0]:
                    gt_u8 = [(g_.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for g_ in gt]
                    labels = [f"gt {i}" for i in indices[held]] + [f"recon {i}" for i in indices[held]]
                    sheets[uid] = contact_sheet(gt_u8 + pred, labels, columns=NUM_SUPERVISION_VIEWS, cell=res)
            log(f"evaluate: reconstruction {uid}: {len(params.view_sets)} view set(s) x "
                f"{NUM_SUPERVISION_VIEWS} held-out views")
    mean = lambda xs: float(np.mean(xs)) if xs else None
    return {k: mean(v) for k, v in scores.items()} | {"num_views": len(scores["psnr"])}, sheets


def val_conditions(stack, params: EvaluateParams, resolution: int, log=print) -> torch.Tensor | None:
    """The image model's condition moments of every val object (input view 0 through SD1.5's VAE); None for text."""
    if stack.image_vae is None:
        return None
    slots = object_condition_slots(Path(params.latents_dir), "val")
    images = packed_condition_images(Path(params.packed_dir), "val", slots, resolution, log)
    return condition_moments(stack.image_vae, images)


@torch.no_grad()
def val_diffusion_loss(unet, stack, params: EvaluateParams, scheduler, num_batches: int | None = None,
                       condition: torch.Tensor | None = None) -> float:
    """Mean MSE (of the scheduler's prediction type) of the UNet on val latents with fixed draws (no CFG drop), on the
    UNet's device; ``condition``: the val objects' condition moments (image model)."""
    data = load_latent_set(Path(params.latents_dir), "val", Path(params.embeddings))
    num_batches = num_batches or params.val_batches
    device = module_device(unet)
    scaling = None if condition is None else vae_scaling(stack.image_vae)
    total = 0.0
    for i in range(num_batches):
        g = step_generator(params.seed, i, 0, 0)
        batch = sample_batch(data, 1, g, condition)
        inputs = diffusion_step_inputs(batch, scheduler, stack.gsvae.scale_latents, data.null_embed, 0.0,
                                       data.resolution, g, scaling)
        inputs = to_device(inputs, device)  # the one host -> device move (draws made on the CPU, as in train)
        pred = unet_prediction(unet, inputs)
        total += F.mse_loss(pred.float(), inputs["target"].float()).item()
    return total / num_batches


GENERATORS = ("base", "finetuned")  # rows of the side-by-side sheet: the base UNet above the fine-tuned one


@torch.no_grad()
def generation_previews(unets: dict, stack, params: EvaluateParams, scheduler, resolution: int, clip=None,
                        log=print, condition: torch.Tensor | None = None,
                        ) -> tuple[dict[str, np.ndarray], dict[str, list[float]], dict[str, list[float]]]:
    """Each val caption through every UNet of ``unets`` (``{"base": ..., "finetuned": ...}``) with the same seed.

    Returns one sheet per character (a row of 4 views per UNet) and, with a :class:`ClipScorer`, the CLIP score
    of each character's views per UNet (``{name: [score per character]}``; empty lists without one), and the PSNR
    of the image model's views against the character's true views (``{name: [...]}``, empty for text).

    ``condition`` (the val objects' condition moments, image model): each character is generated from its front
    view (the object of view set ``view_sets[0]``) at that object's 4 cameras (module docstring).
    """
    data = load_latent_set(Path(params.latents_dir), "val", Path(params.embeddings))
    c2w, intr = inference_cameras(params.elevation, params.distance)
    sheets, scores = {}, {name: [] for name in unets}
    psnrs = {name: [] for name in unets}
    seen = {}
    front_slot = EVEN_VIEW_SETS[params.view_sets[0]][0]
    slots = object_condition_slots(Path(params.latents_dir), "val") if condition is not None else []
    for i, uid in enumerate(data.uids):
        if uid not in seen or (slots and slots[i][1] == front_slot and slots[seen[uid]][1] != front_slot):
            seen[uid] = i
    res = params.render_resolution
    for uid, i in seen.items():
        views, labels = [], []
        cond, guidance, cams, gt = None, params.guidance, (c2w, intr), None
        if condition is not None:
            cond = condition_latents(condition[i:i + 1], vae_scaling(stack.image_vae))
            guidance, cams = params.image_guidance, (data.C2W[i, :NUM_INPUT_VIEWS], data.fxfycxcy[i, :NUM_INPUT_VIEWS])
            gt = data.target_rgba[i, :NUM_INPUT_VIEWS, :3].float() / 255.0
            gt = F.interpolate(gt, size=(res, res), mode="bilinear", align_corners=False, antialias=True)
            gt = (gt.clamp(0, 1) * 255).round() / 255.0
            views += [(v.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for v in gt]
            labels += ["input (gt 0)"] + [f"gt {k}" for k in range(1, NUM_INPUT_VIEWS)]
        for name, unet in unets.items():
            latents = sample_latents(unet, stack, dict(scheduler.config), data.prompt_embeds[i:i + 1], data.null_embed,
                                     cams[0], cams[1], resolution, params.steps, guidance, params.seed,
                                     params.sampler, cond)[0]
            g = latents_to_gaussians(stack.gsvae, latents, *cams)
            rendered = render_rgb(g, *cams, res, params.rasterizer, params.opacity_threshold, params.image_formation)
            if clip is not None:
                scores[name].append(clip.score(rendered, data.captions[i]))
            if gt is not None:
                psnrs[name].append(psnr(torch.from_numpy(np.stack(rendered)).permute(0, 3, 1, 2).float() / 255.0, gt))
            views += rendered
            labels += [f"{name} view {k}" if cond is not None else f"{name} az {int(a)}"
                       for k, a in enumerate(INFERENCE_AZIMUTHS)]
        sheets[uid] = contact_sheet(views, labels, columns=NUM_INPUT_VIEWS, cell=res)
        extra = [f"{n} CLIP {s[-1]:.2f}" for n, s in scores.items() if s]
        extra += [f"{n} PSNR {s[-1]:.2f} dB" for n, s in psnrs.items() if s]
        what = f"front view slot {slots[i][1]} + {data.captions[i]!r}" if cond is not None else repr(data.captions[i])
        log(f"evaluate: generation preview {uid}: {what}" + (f" ({', '.join(extra)})" if extra else ""))
    return sheets, scores, psnrs


def load_clip(spec: SnapshotParams | None, device) -> tuple[object | None, str | None]:
    """(:class:`ClipScorer`, None), or (None, a note saying why the CLIP score is null and how to get the model)."""
    from chibisplat.training.clip_score import ClipMissing, ClipScorer, clip_folder

    try:
        folder = clip_folder(spec)
    except ClipMissing as e:
        return None, f"CLIP score is null: {e}"
    return ClipScorer.load(folder, device), None


def evaluate(params: EvaluateParams, models: ModelsParams, resolution: int, log=print) -> dict:
    """Write ``params.metrics`` (JSON) and the preview PNGs; returns the metrics."""
    import imageio.v2 as imageio

    from chibisplat.models.sources import load_model_stack

    device = resolve_device(params.device, "params.yaml evaluate.device")
    from chibisplat.models.sources import check_unet_conditioning

    stack = load_model_stack(models)
    for module in to_device((stack.gsrecon, stack.gsvae, stack.unet, stack.image_vae), device):
        if module is not None:
            module.eval()
    image_conditioned = models.image_conditioned
    unet = load_trained_unet(params.unet, device)
    check_unet_conditioning(unet, image_conditioned, params.unet)
    scheduler = noise_scheduler(stack, prediction_type_for(image_conditioned))
    notes = []
    lpips = None
    if params.lpips_weights:
        from chibisplat.training.lpips import load_lpips

        lpips = load_lpips(params.lpips_weights, device)
    else:
        notes.append("LPIPS is null: no local weights (evaluate.lpips_weights); see chibisplat/training/lpips.py")
    clip, clip_note = load_clip(params.clip, device)
    if clip_note:
        notes.append(clip_note)
    recon, recon_sheets = reconstruction_metrics(stack, params, resolution, lpips, log)
    condition = val_conditions(stack, params, resolution, log)
    val_loss = val_diffusion_loss(unet, stack, params, scheduler, condition=condition)
    gen_sheets, clip_scores, cond_psnr = generation_previews(dict(zip(GENERATORS, (stack.unet, unet))), stack, params,
                                                             scheduler, resolution, clip, log, condition)
    mean = lambda xs: float(np.mean(xs)) if xs else None
    previews = Path(params.previews_dir)
    if previews.exists():
        for old in previews.glob("*.png"):
            old.unlink()
    previews.mkdir(parents=True, exist_ok=True)
    for uid, sheet in recon_sheets.items():
        imageio.imwrite(previews / f"recon_{uid}.png", sheet)
    for uid, sheet in gen_sheets.items():
        imageio.imwrite(previews / f"generated_{uid}.png", sheet)
    metrics = {
        "recon_psnr": recon["psnr"], "recon_ssim": recon["ssim"], "recon_lpips": recon["lpips"],
        "recon_views": recon["num_views"], "val_diffusion_loss": val_loss,
        "clip_score": mean(clip_scores["finetuned"]), "clip_score_base": mean(clip_scores["base"]),
        "clip_model": clip.identity if clip is not None else None,
        **({"image_cond_psnr": mean(cond_psnr["finetuned"]), "image_cond_psnr_base": mean(cond_psnr["base"])}
           if image_conditioned else {}),
        "val_characters": len(gen_sheets), "previews": len(recon_sheets) + len(gen_sheets), "notes": notes,
    }
    Path(params.metrics).parent.mkdir(parents=True, exist_ok=True)
    Path(params.metrics).write_text(json.dumps(metrics, indent=2) + "\n")
    for n in notes:
        log(f"evaluate: note: {n}")
    clip_text = (f", CLIP score fine-tuned {metrics['clip_score']:.2f} vs base {metrics['clip_score_base']:.2f}"
                 if clip is not None else "")
    log(f"evaluate: recon PSNR {recon['psnr']:.2f} SSIM {recon['ssim']:.3f} LPIPS {recon['lpips']}, "
        f"val diffusion loss {val_loss:.4f}{clip_text} on {device} -> {params.metrics}, {previews}")
    return metrics
