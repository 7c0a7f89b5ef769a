"""GSDiff's objective for SD1.5 text conditioning (docs/diffsplat-reference.md §4) and its sampler; with a condition image
(``models.image_conditioned``) the image model's (docs/image-to-3d.md §3-§5).

Shapes: B objects x V = 4 views; latents are a batch of views ``(B*V, 4, h, w)``; one timestep per object,
repeated over its views; text embeddings (77, 768) repeated per view. The image model sees 1 + V views per object
(the condition view first) and only the V generated views' outputs are used.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
from torch import Tensor

from chibisplat.config_schema import DEFAULT_IMAGE_FORMATION, PREDICTION_TYPES, SAMPLERS
from chibisplat.device import module_device, to_device
from chibisplat.geometry import pixel_K
from chibisplat.models.gsdiff import generated_views, mv_unet_input, plucker_condition, with_condition_view
from chibisplat.protocol import NUM_INPUT_VIEWS
from chibisplat.training.image_condition import cfg_drops, condition_latents
from chibisplat.splats.rasterize import rasterize, rasterize_views
from chibisplat.splats.splatter import splatter_to_gaussians

# stable-diffusion-v1-5 scheduler/scheduler_config.json.
SD15_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon", trained_betas=None,
)


def noise_scheduler(stack, prediction_type: str = "epsilon") -> DDPMScheduler:
    """SD1.5's DDPM scheduler: from the SD1.5 folder (pretrained) or its config (tiny)."""
    if stack.sd15_path is not None:
        scheduler = DDPMScheduler.from_pretrained(Path(stack.sd15_path), subfolder="scheduler")
    else:
        scheduler = DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    scheduler.register_to_config(prediction_type=prediction_type)
    return scheduler


def step_generator(seed: int, step: int, micro: int = 0, rank: int = 0) -> torch.Generator:
    """The RNG of one micro-batch: a function of (seed, step, micro-batch, rank) only, so a resumed run replays
    exactly the batches, timesteps, noise and CFG drops of an uninterrupted one."""
    g = torch.Generator()
    g.manual_seed(((seed * 1_000_003 + step) * 1_009 + micro) * 101 + rank)
    return g


@dataclass
class Batch:
    """One micro-batch of B objects from a :class:`~chibisplat.training.latents.LatentSet`."""

    latents: Tensor  # (B, 4, 4, h, w) unscaled
    C2W: Tensor  # (B, 8, 4, 4)
    fxfycxcy: Tensor  # (B, 8, 4)
    target_rgba: Tensor  # (B, 8, 4, Rr, Rr) uint8
    prompt_embeds: Tensor  # (B, 77, 768)
    index: Tensor  # (B,) objects of the set
    # image model only: posterior mean and std of each object's condition image under SD1.5's VAE (B, 8, h, w)
    condition: Tensor | None = None

    def pin_memory(self) -> "Batch":
        """Page-locked copies (``DataLoader(pin_memory=True)`` calls this), so host-to-GPU copies can overlap."""
        return Batch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).pin_memory()
                        for f in fields(self)})


def sample_batch(data, batch_size: int, g: torch.Generator, condition: Tensor | None = None) -> Batch:
    """B objects of ``data`` drawn from ``g``; ``condition`` (N, 8, h, w): the set's condition moments (image model)."""
    n = len(data)
    index = torch.randperm(n, generator=g)[:batch_size] if batch_size <= n else torch.randint(n, (batch_size,), generator=g)
    return Batch(data.latents[index], data.C2W[index], data.fxfycxcy[index], data.target_rgba[index],
                 data.prompt_embeds[index], index, None if condition is None else condition[index])


def diffusion_step_inputs(batch: Batch, scheduler: DDPMScheduler, scaling, null_embed: Tensor, cfg_dropout: float,
                          resolution: int, g: torch.Generator,
                          condition_scaling: float | None = None) -> dict[str, Tensor]:
    """Noise, timesteps and UNet inputs of one micro-batch (all random draws from ``g``, on the CPU, then on the
    batch's device, so a step draws the same numbers on every device).

    Returns ``x0`` and ``noise`` (B*V, 4, h, w), ``noisy``, ``timesteps`` (B*V,), ``unet_input`` (B*V, 10, h, w),
    ``unet_timesteps`` (B*V,), ``encoder_hidden_states`` (B*V, 77, 768), ``target`` (B*V, 4, h, w).

    With ``batch.condition`` (the image model; docs/image-to-3d.md §3-§5): one more draw per object decides the CFG
    drops of text and image together (:func:`cfg_drops`), the condition latent is a posterior sample
    (``condition_scaling`` x (mean + std x eps), zeros when dropped), and ``unet_input`` (B*(V+1), 11, h, w),
    ``unet_timesteps`` and ``encoder_hidden_states`` have the condition view first in each object; also returned:
    ``condition`` (B, 4, h, w) as fed and ``image_dropped`` (B,).
    """
    b = batch.latents.shape[0]
    x0 = scaling(batch.latents).reshape(b * NUM_INPUT_VIEWS, *batch.latents.shape[2:])
    image = batch.condition is not None
    draws = (
        torch.randn(x0.shape, generator=g),
        torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=g),
        torch.rand(b, generator=g),
    )
    if image:
        if condition_scaling is None:
            raise ValueError("an image-conditioned batch needs condition_scaling (SD1.5 VAE scaling factor)")
        draws += (torch.randn((b, batch.condition.shape[1] // 2, *batch.condition.shape[2:]), generator=g),)
    noise, t, p, *eps = to_device(draws, x0.device)
    null_embed = to_device(null_embed, x0.device)
    drop, image_drop = cfg_drops(p, cfg_dropout) if image else (p < cfg_dropout, None)  # text -> null embedding
    timesteps = t.repeat_interleave(NUM_INPUT_VIEWS)
    noisy = scheduler.add_noise(x0, noise, timesteps)
    text = torch.where(drop[:, None, None], null_embed[None], batch.prompt_embeds)
    cams = batch.C2W[:, :NUM_INPUT_VIEWS].reshape(-1, 4, 4)
    intr = batch.fxfycxcy[:, :NUM_INPUT_VIEWS].reshape(-1, 4)
    plucker = plucker_condition(cams, intr, resolution, x0.shape[-1])
    if image:
        cond = condition_latents(batch.condition.float(), condition_scaling, eps[0])
        cond = cond * (~image_drop).to(cond.dtype)[:, None, None, None]  # dropped image -> zero latent (DiffSplat)
        views = NUM_INPUT_VIEWS + 1
        extra = {"condition": cond, "image_dropped": image_drop,
                 "unet_input": with_condition_view(noisy, plucker, cond, NUM_INPUT_VIEWS),
                 "unet_timesteps": t.repeat_interleave(views),
                 "encoder_hidden_states": text.repeat_interleave(views, dim=0)}
    else:
        extra = {"unet_input": mv_unet_input(noisy, plucker), "unet_timesteps": timesteps,
                 "encoder_hidden_states": text.repeat_interleave(NUM_INPUT_VIEWS, dim=0)}
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(x0, noise, timesteps)
    else:
        raise ValueError(f"prediction type {scheduler.config.prediction_type!r} is not supported "
                         f"({' | '.join(PREDICTION_TYPES)})")
    return {"x0": x0, "noise": noise, "noisy": noisy, "timesteps": timesteps, "target": target, **extra}


def unet_prediction(unet, inputs: dict[str, Tensor]) -> Tensor:
    """The UNet's prediction for the V generated views of :func:`diffusion_step_inputs` (B*V, 4, h, w): the
    condition view's output (image model) is dropped."""
    views_per_object = inputs["unet_input"].shape[0] // (inputs["noisy"].shape[0] // NUM_INPUT_VIEWS)
    out = unet(inputs["unet_input"], inputs["unet_timesteps"], inputs["encoder_hidden_states"],
               cross_attention_kwargs={"num_views": views_per_object}).sample
    return out if views_per_object == NUM_INPUT_VIEWS else generated_views(out, NUM_INPUT_VIEWS)


def predict_x0(pred: Tensor, noisy: Tensor, timesteps: Tensor, scheduler: DDPMScheduler) -> Tensor:
    """x0 from the model output with the DDPM formulas (epsilon or v), shapes (N, 4, h, w)."""
    a = to_device(scheduler.alphas_cumprod, noisy.device).to(noisy.dtype)[timesteps].reshape(-1, 1, 1, 1)
    if scheduler.config.prediction_type == "epsilon":
        return (noisy - (1 - a).sqrt() * pred) / a.sqrt()
    return a.sqrt() * noisy - (1 - a).sqrt() * pred


def render_objects(splatter: Tensor, C2W: Tensor, fxfycxcy: Tensor, resolution: int, backend: str = "auto",
                   opacity_threshold: float = 0.0, batch_views: bool = True,
                   image_formation: str = DEFAULT_IMAGE_FORMATION) -> tuple[Tensor, Tensor]:
    """Splatter images of B objects (B, 4, 12, H, W) rendered into their cameras (B, Vr, 4, 4).

    The first 4 cameras unproject the splatter images (input views). Returns image (B, Vr, 3, R, R) and
    alpha (B, Vr, 1, R, R), rasterised in float32 (as DiffSplat forces). ``batch_views``: all Vr views of an
    object in one rasterizer call (gsplat batches the cameras; same pixels as one call per view, which
    ``batch_views=False`` keeps for comparison: benchmarks/bench_gpu_pipeline.py).
    """
    with torch.autocast(splatter.device.type, enabled=False):  # float32 under the step's fp16/bf16 autocast too
        return _render_objects(splatter, C2W, fxfycxcy, resolution, backend, opacity_threshold, batch_views,
                               image_formation)


def _render_objects(splatter, C2W, fxfycxcy, resolution, backend, opacity_threshold, batch_views, image_formation):
    images, alphas = [], []
    for b in range(splatter.shape[0]):
        v = NUM_INPUT_VIEWS  # the input views' cameras unproject the splatter images
        g = splatter_to_gaussians(splatter[b].float(), C2W[b, :v].float(), fxfycxcy[b, :v].float(),
                                  opacity_threshold=opacity_threshold)
        Ks = pixel_K(fxfycxcy[b].float(), resolution, resolution)  # (Vr, 3, 3)
        if batch_views:
            out = rasterize_views(g, C2W[b].float(), Ks, resolution, resolution, backend=backend,
                                  image_formation=image_formation)
            images.append(out["image"])
            alphas.append(out["alpha"])
            continue
        img, alp = [], []
        for v in range(C2W.shape[1]):
            out = rasterize(g, C2W[b, v].float(), Ks[v], resolution, resolution, backend=backend,
                            image_formation=image_formation)
            img.append(out["image"])
            alp.append(out["alpha"])
        images.append(torch.stack(img))
        alphas.append(torch.stack(alp))
    return torch.stack(images), torch.stack(alphas)


def splatter_render_loss(splatter: Tensor, C2W: Tensor, fxfycxcy: Tensor, gt_rgb: Tensor, gt_mask: Tensor, lpips,
                         lpips_weight: float, backend: str = "auto",
                         image_formation: str = DEFAULT_IMAGE_FORMATION) -> dict[str, Tensor]:
    """Splatter images of B objects (B, 4, 12, H, W) rendered into their views at the targets' resolution and
    compared with them (``gt_rgb`` (B, Vr, 3, R, R) on white, ``gt_mask`` (B, Vr, 1, R, R), in [0, 1]):
    ``MSE(image) + MSE(mask vs alpha) + lpips_weight * LPIPS`` (DiffSplat's GSRecon/GSVAE/GSDiff rendering loss)."""
    res = gt_rgb.shape[-1]
    image, alpha = render_objects(splatter, C2W, fxfycxcy, res, backend, image_formation=image_formation)
    image_mse = F.mse_loss(image, gt_rgb)
    mask_mse = F.mse_loss(alpha, gt_mask)
    loss = image_mse + mask_mse
    lp = torch.zeros((), device=image.device)
    if lpips is not None and lpips_weight > 0:
        lp = lpips(image.reshape(-1, 3, res, res), gt_rgb.reshape(-1, 3, res, res)).mean()
        loss = loss + lpips_weight * lp
    return {"render_loss": loss, "render_image_mse": image_mse, "render_mask_mse": mask_mse, "render_lpips": lp}


def rendering_loss(pred: Tensor, inputs: dict, batch: Batch, scheduler, gsvae, lpips, lpips_weight: float,
                   backend: str = "auto", image_formation: str = DEFAULT_IMAGE_FORMATION) -> dict[str, Tensor]:
    """DiffSplat's rendering loss: x0 -> tiny decoder -> Gaussians -> 8 views; MSE(image) + MSE(mask) + LPIPS.

    Gradients flow through the frozen tiny decoder and the rasterizer into the UNet.
    """
    b = batch.latents.shape[0]
    x0 = predict_x0(pred.float(), inputs["noisy"].float(), inputs["timesteps"], scheduler)
    splatter = gsvae.decode(gsvae.unscale_latents(x0), use_tiny_decoder=True)  # (B*V, 12, H, W)
    splatter = splatter.reshape(b, NUM_INPUT_VIEWS, *splatter.shape[1:])
    target = batch.target_rgba.float() / 255.0  # (B, 8, 4, Rr, Rr)
    return splatter_render_loss(splatter, batch.C2W, batch.fxfycxcy, target[:, :, :3], target[:, :, 3:], lpips,
                                lpips_weight, backend, image_formation)


@torch.no_grad()
def sample_latents(unet, stack, scheduler_config: dict, prompt_embeds: Tensor, null_embed: Tensor, C2W: Tensor,
                   fxfycxcy: Tensor, resolution: int, steps: int, guidance: float, seed: int,
                   sampler: str = "dpmsolver++", condition: Tensor | None = None) -> Tensor:
    """Text (and an image) -> unscaled GSVAE latents of 4 views, for B prompts: (B, 4, 4, h, h).

    ``prompt_embeds`` (B, 77, 768); cameras (4, 4, 4) / (4, 4) shared by all prompts. Classifier-free
    guidance with the null embedding; DPM-Solver++ (SDE, as DiffSplat's default ``sde-dpmsolver++``) or DDIM,
    trailing timestep spacing; the prediction type is ``scheduler_config``'s.

    ``condition`` (B, 4, h, h): scaled SD1.5-VAE latents of the condition images (image model; docs/image-to-3d.md
    §3, §5): the condition view goes first in each object with camera 0's Plücker rays and mask 0; the
    unconditional branch has both the image (zero latent) and the text (null embedding) removed.
    """
    device = module_device(unet)
    dtype = next(unet.parameters()).dtype
    b = prompt_embeds.shape[0]
    h = resolution // 8
    config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    if sampler in ("dpmsolver++", "sde-dpmsolver++"):
        scheduler = DPMSolverMultistepScheduler.from_config(config, algorithm_type=sampler, timestep_spacing="trailing")
    elif sampler == "ddim":
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(config, timestep_spacing="trailing")
    else:
        raise ValueError(f"unknown sampler {sampler!r}; use {', '.join(SAMPLERS)}")
    scheduler.set_timesteps(steps, device=device)
    g = torch.Generator().manual_seed(seed)  # draws on the CPU: the same initial noise on every device
    x = torch.randn((b * NUM_INPUT_VIEWS, 4, h, h), generator=g) * scheduler.init_noise_sigma
    text = torch.cat([null_embed[None].expand(b, -1, -1), prompt_embeds]).repeat_interleave(NUM_INPUT_VIEWS, dim=0)
    x, text, C2W, fxfycxcy = to_device((x, text, C2W, fxfycxcy), device)
    plucker = plucker_condition(C2W.float(), fxfycxcy.float(), resolution, h).repeat(b, 1, 1, 1)
    text = text.to(dtype)
    views = NUM_INPUT_VIEWS
    if condition is not None:
        condition = to_device(condition.float(), device)
        both = torch.cat([torch.zeros_like(condition), condition])  # unconditional branch: no image
        views = NUM_INPUT_VIEWS + 1
        text = text.reshape(2 * b, NUM_INPUT_VIEWS, *text.shape[1:])
        text = torch.cat([text[:, :1], text], dim=1).flatten(0, 1)
    for t in scheduler.timesteps:
        xin = scheduler.scale_model_input(torch.cat([x, x]), t)
        if condition is None:
            inp = mv_unet_input(xin, torch.cat([plucker, plucker])).to(dtype)
        else:
            inp = with_condition_view(xin, torch.cat([plucker, plucker]), both, NUM_INPUT_VIEWS).to(dtype)
        out = unet(inp, t, text, cross_attention_kwargs={"num_views": views}).sample.float()
        if condition is not None:
            out = generated_views(out, NUM_INPUT_VIEWS)
        uncond, cond = out.chunk(2)
        pred = uncond + guidance * (cond - uncond)
        x = scheduler.step(pred, t, x, generator=g).prev_sample if sampler != "ddim" else scheduler.step(pred, t, x).prev_sample
    return stack.gsvae.unscale_latents(x.float().cpu()).reshape(b, NUM_INPUT_VIEWS, 4, h, h)
