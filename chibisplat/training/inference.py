"""Text -> 3D Gaussian Splat with a trained GSDiff UNet (DiffSplat reference §4 "Inference", §8).

Text embedding -> CFG-guided multi-view denoising of 4 latents (cameras at azimuth 0/90/180/270, elevation 10,
distance 1.4) -> full GSVAE decoder -> splatter images -> Gaussians -> the 4 views, a standard 3DGS ``.ply`` and
a turntable GIF rendered around the object.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from chibisplat.device import module_device, resolve_device, to_device
from chibisplat.geometry import normalised_intrinsics, opengl_to_opencv_camera, orbit_camera, pixel_K
from chibisplat.models.gsdiff import load_mv_unet
from chibisplat.render.contact_sheet import contact_sheet
from chibisplat.splats.ply import write_ply
from chibisplat.splats.rasterize import rasterize
from chibisplat.splats.splatter import Gaussians, splatter_to_gaussians
from chibisplat.training.config import check_keys, resolved_section

AZIMUTHS = (0.0, 90.0, 180.0, 270.0)


@dataclass(frozen=True)
class GenerateParams:
    prompt: str = "a chibi witch with a big hat"
    unet: str = "models/train/unet"
    out_dir: str = "out/generate"
    steps: int = 20
    guidance: float = 7.5
    sampler: str = "sde-dpmsolver++"  # DiffSplat's default; dpmsolver++ | ddim
    seed: int = 0
    elevation: float = 10.0  # degrees above the object (DiffSplat text-to-3D default)
    distance: float = 1.4
    render_resolution: int = 256
    turntable_frames: int = 36
    turntable_fps: int = 12
    opacity_threshold: float = 0.01  # Gaussians at or below are dropped from renders and the PLY
    rasterizer: str = "auto"
    device: str = "auto"  # auto: CUDA when present, else the CPU (chibisplat/device.py)

    @staticmethod
    def from_params(params: dict, **overrides) -> "GenerateParams":
        d = resolved_section(params, "generate")
        d.update({k: v for k, v in overrides.items() if v is not None})
        check_keys("generate", d, set(GenerateParams.__dataclass_fields__))
        return GenerateParams(**d)


def inference_cameras(elevation: float = 10.0, distance: float = 1.4, azimuths=AZIMUTHS) -> tuple[torch.Tensor, torch.Tensor]:
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
    latents, C2W, fxfycxcy = to_device((latents, C2W[:4], fxfycxcy[:4]), module_device(gsvae))
    splatter = gsvae.decode(latents, use_tiny_decoder=False).float()
    return splatter_to_gaussians(splatter, C2W.float(), fxfycxcy.float(), opacity_threshold=opacity_threshold)


@torch.no_grad()
def render_rgb(gaussians: Gaussians, C2W: torch.Tensor, fxfycxcy: torch.Tensor, resolution: int,
               backend: str = "auto", opacity_threshold: float = 0.0) -> list[np.ndarray]:
    """Render the Gaussians into each camera (on the Gaussians' device): RGB uint8 (R, R, 3) images on white."""
    C2W, fxfycxcy = to_device((C2W, fxfycxcy), gaussians.means.device)
    if opacity_threshold > 0:
        gaussians = gaussians.select(gaussians.opacities > opacity_threshold)
    out = []
    for v in range(C2W.shape[0]):
        K = pixel_K(fxfycxcy[v].float(), resolution, resolution)
        img = rasterize(gaussians, C2W[v].float(), K, resolution, resolution, backend=backend)["image"]
        out.append((img.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8))
    return out


def turntable(gaussians: Gaussians, frames: int, elevation: float, distance: float, resolution: int,
              backend: str = "auto", opacity_threshold: float = 0.0) -> list[np.ndarray]:
    """``frames`` views around the object (azimuth 0..360, fixed elevation and distance)."""
    c2w, intr = inference_cameras(elevation, distance, tuple(360.0 * i / frames for i in range(frames)))
    return render_rgb(gaussians, c2w, intr, resolution, backend, opacity_threshold)


def generate(prompt_embed: torch.Tensor, null_embed: torch.Tensor, unet, stack, scheduler_config: dict,
             resolution: int, params: GenerateParams, out_dir: Path, log=print) -> dict[str, Path]:
    """One prompt -> ``views.png`` (4 views), ``splat.ply``, ``turntable.gif`` in ``out_dir``."""
    import imageio.v2 as imageio

    from chibisplat.training.objective import sample_latents

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    c2w, intr = inference_cameras(params.elevation, params.distance)
    latents = sample_latents(unet, stack, scheduler_config, prompt_embed[None], null_embed, c2w, intr, resolution,
                             params.steps, params.guidance, params.seed, params.sampler)[0]
    gaussians = latents_to_gaussians(stack.gsvae, latents, c2w, intr)
    views = render_rgb(gaussians, c2w, intr, params.render_resolution, params.rasterizer, params.opacity_threshold)
    paths = {"views": out_dir / "views.png", "ply": out_dir / "splat.ply", "turntable": out_dir / "turntable.gif"}
    sheet = contact_sheet(views, [f"az {int(a)}" for a in AZIMUTHS], columns=4, cell=params.render_resolution)
    imageio.imwrite(paths["views"], sheet)
    n = write_ply(paths["ply"], gaussians, opacity_threshold=params.opacity_threshold)
    frames = turntable(gaussians, params.turntable_frames, params.elevation, params.distance,
                       params.render_resolution, params.rasterizer, params.opacity_threshold)
    imageio.mimsave(paths["turntable"], frames, duration=1000 / params.turntable_fps, loop=0)
    log(f"generate: {params.prompt!r}: {paths['views']}, {paths['ply']} ({n} Gaussians), "
        f"{paths['turntable']} ({len(frames)} frames)")
    return paths
