"""Where the model stack comes from: ``pretrained`` (SD1.5 + the published DiffSplat checkpoints) or ``tiny``.

Both modes build the same classes (:class:`GSRecon`, :class:`GSAutoencoderKL`, the multi-view
``UNet2DConditionModel``) and keep the prompt embedding at 77 x 768, so every code path downstream is the
same; ``tiny`` only shrinks the widths and initialises deterministically from a seed, for tests and
CPU-only machines. Configuration is params.yaml's ``models:`` section::

    models:
      source: tiny | pretrained
      seed: 0
      sd15:      {repo: stable-diffusion-v1-5/stable-diffusion-v1-5, revision: <commit>, path: null}
      diffsplat: {repo: chenguolin/DiffSplat, revision: <commit>, path: models/diffsplat}

Nothing is downloaded here (the machines that train have no internet): ``path`` is a local folder, or the
file is looked up in the Hugging Face cache at the pinned revision with ``local_files_only``
(chibisplat/models/hub.py, which the text encoder shares). ``models:`` arrives typed
(:class:`chibisplat.config.ModelsParams`); ``models.tiny`` is the one tiny/pretrained switch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from chibisplat.config import ModelsParams, plain
from chibisplat.models.checkpoints import empty_model, load_accelerate_checkpoint, load_state_dict_strict
from chibisplat.models.gsdiff import (
    SD15_UNET_CONFIG, read_diffusers_weights, build_mv_unet, load_mv_unet, mv_unet_config, mv_unet_in_channels,
    widen_conv_in,
)
from chibisplat.models.gsrecon import GSRecon
from chibisplat.models.gsvae import GSAutoencoderKL, sd15_vae, taesd
from chibisplat.models.hub import (  # noqa: F401 (SD15_*, ModelSourceError: imported from here too)
    SD15_SUBFOLDERS, SD15_VAE_SUBFOLDER, ModelSourceError, resolve_snapshot, sd15_folder,
)

GSRECON_TAG = "gsrecon_gobj265k_cnp_even4"
GSVAE_TAG = "gsvae_gobj265k_sd"
GSDIFF_UNET_SUBDIR = "gsdiff_gobj83k_sd15__render/checkpoints/013020/unet_ema"
# The image-conditioned SD1.5 model (conv_in 11 = latent 4 + Plücker 6 + binary mask 1; docs/image-to-3d.md §1).
GSDIFF_IMAGE_UNET_SUBDIR = "gsdiff_gobj83k_sd15_image__render/checkpoints/013020/unet_ema"

# Tiny widths: every module keeps its published structure (patchify, VAE downsampling x8, TAESD x8
# upsampling, cross-attention to 77 x 768 prompts); only channel widths and depths shrink.
TINY_GSRECON = dict(dim=64, num_blocks=2, num_heads=4, ffn_multiple_of=32)
# Four blocks, not two: the VAE must downsample by 8 like SD's, so 256 px views give 32 x 32 latents.
TINY_VAE = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1)
TINY_TAESD = dict(
    encoder_block_out_channels=(16, 16, 16, 16), num_encoder_blocks=(1, 1, 1, 1),
    decoder_block_out_channels=(16, 16, 16, 16), num_decoder_blocks=(1, 1, 1, 1),
)
TINY_UNET = dict(
    SD15_UNET_CONFIG,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
)


@dataclass
class ModelStack:
    source: str
    gsrecon: GSRecon
    gsvae: GSAutoencoderKL
    unet: UNet2DConditionModel | None  # None: loaded with_unet=False
    sd15_path: Path | None  # scheduler / tokenizer / text encoder folder (pretrained only)
    # SD1.5's RGB VAE, which encodes the condition image (models.image_conditioned only; docs/image-to-3d.md §1)
    image_vae: AutoencoderKL | None = None


def gsdiff_unet_subdir(image_conditioned: bool) -> str:
    """The published UNet folder of the text (conv_in 10) or the image-conditioned (conv_in 11) model."""
    return GSDIFF_IMAGE_UNET_SUBDIR if image_conditioned else GSDIFF_UNET_SUBDIR


def diffsplat_folder(models: ModelsParams) -> Path:
    """The folder holding the three published DiffSplat SD1.5 checkpoints (the UNet of ``models.image_conditioned``)."""
    unet_dir = gsdiff_unet_subdir(models.image_conditioned)
    patterns = [f"{GSRECON_TAG}/*", f"{GSVAE_TAG}/*", f"{unet_dir}/*"]
    required = [f"{GSRECON_TAG}/checkpoints", f"{GSVAE_TAG}/checkpoints", f"{unet_dir}/config.json"]
    return resolve_snapshot(models.diffsplat, patterns, required, "models.diffsplat")


def sd15_stack_folder(models: ModelsParams) -> Path:
    """The SD1.5 folder with what the model stack reads (the scheduler; the image model's VAE)."""
    required = ["unet/config.json", "scheduler/scheduler_config.json"]
    if models.image_conditioned:
        required.append(f"{SD15_VAE_SUBFOLDER}/config.json")
    return sd15_folder(models, required)


def load_image_vae(folder: Path) -> AutoencoderKL:
    """Strictly load SD1.5's RGB ``AutoencoderKL`` from a diffusers ``vae/`` folder (config.json + weights)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelSourceError(f"{config_path} is missing: image-to-3D encodes the condition image with SD1.5's VAE "
                               f"(models.sd15 must include its {SD15_VAE_SUBFOLDER}/ folder)")
    config = AutoencoderKL.extract_init_dict(json.loads(config_path.read_text()))[0]
    vae = empty_model(lambda: AutoencoderKL(**config))
    load_state_dict_strict(vae, read_diffusers_weights(folder), str(folder), assign=True)
    return vae.eval()


def tiny_model_stack(seed: int = 0, image_conditioned: bool = False) -> ModelStack:
    """The stack at tiny widths, identical for the same seed (CPU, float32).

    ``image_conditioned``: conv_in 11 and a seeded tiny RGB VAE (its own seed stream, drawn after the text stack's
    modules, so GSRecon, GSVAE and the UNet's other weights are those of the text stack).
    """
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        gsrecon = GSRecon(**TINY_GSRECON)
        gsvae = GSAutoencoderKL.from_rgb_autoencoders(sd15_vae(**TINY_VAE), taesd(**TINY_TAESD))
        unet4 = UNet2DConditionModel(**TINY_UNET)
        unet = widen_conv_in(unet4, mv_unet_in_channels(image_conditioned), sample_size=32,
                             image_conditioned=image_conditioned)
        image_vae = sd15_vae(**TINY_VAE).eval() if image_conditioned else None
    finally:
        torch.random.set_rng_state(gen_state)
    return ModelStack("tiny", gsrecon.eval(), gsvae.eval(), unet.eval(), None, image_vae)


def pretrained_model_stack(models: ModelsParams, with_unet: bool = True,
                           with_image_vae: bool | None = None) -> ModelStack:
    """The published DiffSplat SD1.5 stack, strictly loaded: the text-conditioned UNet (conv_in 10), or with
    ``models.image_conditioned`` the image-conditioned one (conv_in 11) plus SD1.5's RGB VAE for the condition image.
    ``with_unet=False`` leaves ``unet`` None (the finetune and latents stages use only GSRecon and the GSVAE), and
    ``image_vae`` too unless ``with_image_vae`` (default: ``with_unet``)."""
    image_conditioned = models.image_conditioned
    root = diffsplat_folder(models)
    sd15 = sd15_stack_folder(models)
    gsrecon = empty_model(GSRecon)
    load_accelerate_checkpoint(gsrecon, root / GSRECON_TAG, assign=True)
    gsvae = empty_model(GSAutoencoderKL)
    load_accelerate_checkpoint(gsvae, root / GSVAE_TAG, assign=True)
    unet = image_vae = None
    if with_unet:
        unet = load_mv_unet(root / gsdiff_unet_subdir(image_conditioned))
        check_unet_conditioning(unet, image_conditioned, root / gsdiff_unet_subdir(image_conditioned))
    if image_conditioned and (with_unet if with_image_vae is None else with_image_vae):
        image_vae = load_image_vae(sd15 / SD15_VAE_SUBFOLDER)
    return ModelStack("pretrained", gsrecon.eval(), gsvae.eval(), unet, sd15, image_vae)


def check_unet_conditioning(unet: UNet2DConditionModel, image_conditioned: bool, source) -> None:
    """A UNet whose conditioning (text vs image: conv_in 10 vs 11, ``view_concat_condition``) is not the one
    ``models.image_conditioned`` asks for is an error naming the folder and the key."""
    want = mv_unet_in_channels(image_conditioned)
    have = unet.config.in_channels
    flag = bool(getattr(unet.config, "view_concat_condition", False))
    if have != want or flag != image_conditioned:
        kind = lambda image: "image-conditioned (conv_in 11)" if image else "text-conditioned (conv_in 10)"
        raise ModelSourceError(
            f"{source}: the UNet is {kind(flag)} (conv_in {have}, view_concat_condition {flag}) but params.yaml "
            f"models.image_conditioned: {str(image_conditioned).lower()} asks for a {kind(image_conditioned)} one; "
            "set models.image_conditioned to match, or point at a UNet trained with it (dvc repro train)")


def load_model_stack(models: ModelsParams, with_unet: bool = True, with_image_vae: bool | None = None) -> ModelStack:
    """Build the stack params.yaml's ``models:`` section asks for.

    ``models.finetuned`` (e.g. ``models/finetune``, the finetune stage's output): its fine-tuned GSRecon and/or
    GSVAE replace the base ones when its manifest lists them; ``null`` or a missing folder keeps the base.
    """
    if models.tiny:
        stack = tiny_model_stack(models.seed, models.image_conditioned)
    else:
        stack = pretrained_model_stack(models, with_unet, with_image_vae)
    if models.finetuned:
        apply_finetuned(stack, models.finetuned, models)
    return stack


FINETUNE_BASE_KEYS = ("source", "seed", "image_conditioned", "sd15", "diffsplat")


def finetune_base(models: ModelsParams) -> dict:
    """The ``models:`` keys that decide the GSRecon/GSVAE weights a fine-tune starts from (recorded in its manifest,
    as params.yaml writes them)."""
    values = plain(models)
    return {k: values[k] for k in FINETUNE_BASE_KEYS}


def apply_finetuned(stack: ModelStack, folder: Path, models: ModelsParams) -> list[str]:
    """Swap in the fine-tuned modules listed by ``folder/manifest.json``; returns their names."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        return []
    manifest = json.loads(manifest_path.read_text())
    wanted = finetune_base(models)
    swapped = [m for m in ("gsrecon", "gsvae") if manifest.get(m)]
    if swapped and manifest.get("base") != wanted:
        raise ModelSourceError(
            f"{folder}: GSRecon/GSVAE were fine-tuned from other base models ({manifest.get('base')}) than params.yaml "
            f"models: asks for ({wanted}); re-run the finetune stage (dvc repro finetune) or set models.finetuned: null"
        )
    for name in swapped:
        path = folder / manifest[name]
        cls = GSRecon if name == "gsrecon" else GSAutoencoderKL
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{path}: fine-tuned {name} listed in {manifest_path} is missing; re-run "
                                   "`dvc repro finetune` (or `dvc pull models/finetune`)")
        setattr(stack, name, cls.from_pretrained(str(path)).eval())
    return swapped


def build_full_size_empty(image_conditioned: bool = False) -> dict:
    """Full-size modules on the meta device (no memory): GSRecon, GSVAE and the conv_in-10 UNet (conv_in 11 and
    SD1.5's RGB VAE with ``image_conditioned``)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        out = {"gsrecon": GSRecon(), "gsvae": GSAutoencoderKL(),
               "unet": build_mv_unet(mv_unet_config(in_channels=mv_unet_in_channels(image_conditioned),
                                                    image_conditioned=image_conditioned))}
        if image_conditioned:
            out["image_vae"] = sd15_vae()
        return out
