"""Text (or image) -> 3D Gaussian Splat with a trained GSDiff UNet (docs/diffsplat-reference.md §4 "Inference", §8;
image-to-3D: docs/image-to-3d.md).

Text embedding -> CFG-guided multi-view denoising of 4 latents (cameras at azimuth 0/90/180/270, elevation 10,
distance 1.4) -> full GSVAE decoder -> splatter images -> Gaussians -> the 4 views, a standard 3DGS ``.ply`` and
a turntable GIF rendered around the object. With the image model a front view conditions the denoising (the
condition camera is view 0: azimuth 0 at ``image_elevation``), with ``image_guidance`` and the prompt ``""`` unless
one is given; ``views.png`` then shows the prepared input image before the 4 generated views.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from chibisplat.config import GenerateParams  # noqa: F401 (generate()'s params)
from chibisplat.config_schema import DEFAULT_IMAGE_FORMATION
from chibisplat.device import module_device, resolve_device, to_device
from chibisplat.geometry import normalised_intrinsics, opengl_to_opencv_camera, orbit_camera, pixel_K
from chibisplat.images import contact_sheet
from chibisplat.models.gsdiff import is_image_conditioned, load_mv_unet
from chibisplat.protocol import (
    CANONICAL_RADIUS, IMAGE_INFERENCE_ELEVATION, INFERENCE_AZIMUTHS, INFERENCE_ELEVATION, NUM_INPUT_VIEWS,
)
from chibisplat.splats.ply import write_ply
from chibisplat.splats.rasterize import rasterize
from chibisplat.splats.splatter import Gaussians, splatter_to_gaussians



def inference_cameras(elevation: float = INFERENCE_ELEVATION, distance: float = CANONICAL_RADIUS,
                      azimuths=INFERENCE_AZIMUTHS) -> tuple[torch.Tensor, torch.Tensor]:
    """DiffSplat's inference cameras: ``orbit_camera(-elevation, azimuth, distance)`` with OpenCV camera axes.

    Returns C2W (V, 4, 4) and fxfycxcy (V, 4).
    """
    az = torch.tensor(azimuths, dtype=torch.float32)
    c2w = orbit_camera(torch.full_like(az, -elevation), az, torch.full_like(az, distance))
    c2w = opengl_to_opencv_camera(c2w).float()
    return c2w, normalised_intrinsics().expand(len(az), 4).clone()


def load_trained_unet(folder: str | Path, device: str = "cpu"):
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no trained UNet (config.json); run the train stage (dvc repro train)")
    return to_device(load_mv_unet(folder), resolve_device(device)).eval()


@torch.no_grad()
def latents_to_gaussians(gsvae, latents: torch.Tensor, C2W: torch.Tensor, fxfycxcy: torch.Tensor,
                         opacity_threshold: float = 0.0) -> Gaussians:
    """Unscaled latents of one object (4, 4, h, h) -> full GSVAE decoder -> Gaussians in the canonical world, on the
    GSVAE's device (rendered there: gsplat on CUDA)."""
    v = NUM_INPUT_VIEWS  # the generated views' cameras unproject the splatter images
    latents, C2W, fxfycxcy = to_device((latents, C2W[:v], fxfycxcy[:v]), module_device(gsvae))
    splatter = gsvae.decode(latents, use_tiny_decoder=False).float()
    return splatter_to_gaussians(splatter, C2W.float(), fxfycxcy.float(), opacity_threshold=opacity_threshold)


@torch.no_grad()
def render_rgb(gaussians: Gaussians, C2W: torch.Tensor, fxfycxcy: torch.Tensor, resolution: int,
               backend: str = "auto", opacity_threshold: float = 0.0,
               image_formation: str = DEFAULT_IMAGE_FORMATION) -> list[np.ndarray]:
    """Render the Gaussians into each camera (on the Gaussians' device): RGB uint8 (R, R, 3) images on white."""
    C2W, fxfycxcy = to_device((C2W, fxfycxcy), gaussians.means.device)
    if opacity_threshold > 0:
        gaussians = gaussians.select(gaussians.opacities > opacity_threshold)
    out = []
    for v in range(C2W.shape[0]):
        K = pixel_K(fxfycxcy[v].float(), resolution, resolution)
        img = rasterize(gaussians, C2W[v].float(), K, resolution, resolution, backend=backend,
                        image_formation=image_formation)["image"]
        out.append((img.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8))
    return out


def turntable(gaussians: Gaussians, frames: int, elevation: float, distance: float, resolution: int,
              backend: str = "auto", opacity_threshold: float = 0.0,
              image_formation: str = DEFAULT_IMAGE_FORMATION) -> list[np.ndarray]:
    """``frames`` views around the object (azimuth 0..360, fixed elevation and distance)."""
    c2w, intr = inference_cameras(elevation, distance, tuple(360.0 * i / frames for i in range(frames)))
    return render_rgb(gaussians, c2w, intr, resolution, backend, opacity_threshold, image_formation)


def generate(prompt_embed: torch.Tensor, null_embed: torch.Tensor, unet, stack, scheduler_config: dict,
             resolution: int, params: GenerateParams, out_dir: Path, log=print,
             condition_image: torch.Tensor | None = None) -> dict[str, Path]:
    """One prompt -> ``views.png`` (4 views), ``splat.ply``, ``turntable.gif`` in ``out_dir``.

    ``condition_image`` (3, R, R) in [0, 1] on white (:func:`chibisplat.training.image_condition.load_condition_image`):
    image-to-3D with the image model (``stack.image_vae`` encodes it; posterior mode as DiffSplat's inference);
    then the elevation is ``params.image_elevation`` and the guidance ``params.image_guidance``.
    """
    import imageio.v2 as imageio

    from chibisplat.training.image_condition import condition_latents, condition_moments, vae_scaling
    from chibisplat.training.objective import sample_latents

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    condition, guidance, elevation = None, params.guidance, params.elevation
    if condition_image is not None:
        if stack.image_vae is None:
            raise ValueError("an input image needs the image model: set models.image_conditioned: true (and train "
                             "with it) or generate from text without --image")
        moments = condition_moments(stack.image_vae, condition_image[None])
        condition = condition_latents(moments, vae_scaling(stack.image_vae))
        guidance, elevation = params.image_guidance, params.image_elevation
    elif is_image_conditioned(unet):  # the image model without an image: the zero latent of its CFG branch (DiffSplat)
        condition = torch.zeros(1, 4, resolution // 8, resolution // 8)
    c2w, intr = inference_cameras(elevation, params.distance)
    latents = sample_latents(unet, stack, scheduler_config, prompt_embed[None], null_embed, c2w, intr, resolution,
                             params.steps, guidance, params.seed, params.sampler, condition)[0]
    gaussians = latents_to_gaussians(stack.gsvae, latents, c2w, intr)
    views = render_rgb(gaussians, c2w, intr, params.render_resolution, params.rasterizer, params.opacity_threshold,
                       params.image_formation)
    paths = {"views": out_dir / "views.png", "ply": out_dir / "splat.ply", "turntable": out_dir / "turntable.gif"}
    labels = [f"az {int(a)}" for a in INFERENCE_AZIMUTHS]
    if condition_image is not None:
        shown = torch.nn.functional.interpolate(condition_image[None].float(), size=(params.render_resolution,) * 2,
                                                mode="bilinear", align_corners=False, antialias=True)[0]
        views = [(shown.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)] + views
        labels = ["input"] + labels
    sheet = contact_sheet(views, labels, columns=len(views), cell=params.render_resolution)
    imageio.imwrite(paths["views"], sheet)
    n = write_ply(paths["ply"], gaussians, opacity_threshold=params.opacity_threshold)
    frames = turntable(gaussians, params.turntable_frames, elevation, params.distance,
                       params.render_resolution, params.rasterizer, params.opacity_threshold, params.image_formation)
    imageio.mimsave(paths["turntable"], frames, duration=1000 / params.turntable_fps, loop=0)
    what = f"image {params.image}" + (f" + {params.prompt!r}" if params.prompt else "") if condition_image is not None \
        else repr(params.prompt)
    log(f"generate: {what}: {paths['views']}, {paths['ply']} ({n} Gaussians), "
        f"{paths['turntable']} ({len(frames)} frames)")
    return paths
