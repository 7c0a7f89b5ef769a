"""GSDiff: the SD1.5 UNet made multi-view (DiffSplat stage 3; docs/diffsplat-reference.md §4).

The network is a plain diffusers ``UNet2DConditionModel`` (so its state-dict keys are exactly SD1.5's)
with two changes:

* ``conv_in`` takes 10 channels ``[latent(4), plucker(6)]`` (11 with the image-conditioned variant's
  binary mask); the new input channels start at zero so the widened UNet first behaves like SD1.5.
* every self-attention (``attn1``) attends over the tokens of all views of one object:
  ``(b v) n d -> b (v n) d``; cross-attention to the text stays per view. ``num_views`` travels in
  ``cross_attention_kwargs={"num_views": V}``. No parameters are added.

Latents are a batch of views ``(B*V, 4, 32, 32)``; the Plücker rays of each view are computed at the image
resolution with DiffSplat's pixel mapping and resized to the latent size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from safetensors.torch import load_file
from torch import Tensor

from chibisplat.geometry import plucker_rays
from chibisplat.models.checkpoints import empty_model, load_state_dict_strict

LATENT_CHANNELS = 4
PLUCKER_CHANNELS = 6
MASK_CHANNELS = 1
# The image-conditioned variant's binary mask channel (docs/image-to-3d.md §3): 0 on the condition view, 1 on the
# views being generated.
CONDITION_VIEW_MASK = 0.0
GENERATED_VIEW_MASK = 1.0
SD15_PROMPT_TOKENS = 77
SD15_PROMPT_DIM = 768

# stable-diffusion-v1-5 unet/config.json (architecture fields).
SD15_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=SD15_PROMPT_DIM,
    norm_num_groups=32,
    act_fn="silu",
    center_input_sample=False,
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
)
# DiffSplat's config.json names its multi-view blocks differently; the modules and keys are the same.
DIFFSPLAT_BLOCK_NAMES = {
    "CrossAttnDownBlockMV2D": "CrossAttnDownBlock2D",
    "UNetMidBlockMV2DCrossAttn": "UNetMidBlock2DCrossAttn",
    "CrossAttnUpBlockMV2D": "CrossAttnUpBlock2D",
}
# Config fields DiffSplat registers on its UNet (kept so our folders carry the same information).
DIFFSPLAT_CONFIG_EXTRAS = ("view_concat_condition", "input_concat_plucker", "input_concat_binary_mask")


class MultiViewSelfAttnProcessor:
    """Self-attention across the V views of each object: tokens ``(B*V, N, D)`` attend as ``(B, V*N, D)``.

    Reshaping the hidden states before SD's projections is the same as DiffSplat's reshaping of q, k and v
    (the projections act per token).
    """

    def __init__(self):
        self.inner = AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        num_views: int = 1,
    ) -> Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("the multi-view processor is for unmasked self-attention (attn1) only")
        bv, n, d = hidden_states.shape
        if bv % num_views:
            raise ValueError(f"batch of {bv} views is not a multiple of num_views={num_views}")
        joint = hidden_states.reshape(bv // num_views, num_views * n, d)
        out = self.inner(attn, joint, temb=temb)
        return out.reshape(bv, n, d)


class PerViewAttnProcessor:
    """SD's cross-attention, per view; accepts ``num_views`` so the UNet can pass it to every block."""

    def __init__(self):
        self.inner = AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        num_views: int = 1,
    ) -> Tensor:
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def set_multiview_attention(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """Install :class:`MultiViewSelfAttnProcessor` on every ``attn1`` and per-view attention elsewhere."""
    processors = {
        name: MultiViewSelfAttnProcessor() if name.endswith("attn1.processor") else PerViewAttnProcessor()
        for name in unet.attn_processors
    }
    unet.set_attn_processor(processors)
    return unet


def mv_unet_in_channels(image_conditioned: bool = False) -> int:
    """conv_in width: latent + Plücker (10), + the binary mask for the image-conditioned model (11)."""
    return LATENT_CHANNELS + PLUCKER_CHANNELS + (MASK_CHANNELS if image_conditioned else 0)


def is_image_conditioned(unet) -> bool:
    """Whether ``unet`` is DiffSplat's image-conditioned variant (condition view concatenated, binary mask input)."""
    return bool(getattr(unet.config, "view_concat_condition", False))


def mv_unet_config(base: dict | None = None, in_channels: int = 10, sample_size: int = 32, image_conditioned: bool = False) -> dict:
    """UNet config for GSDiff from a 4-channel SD config (SD1.5 by default), DiffSplat's extras included."""
    config = dict(SD15_UNET_CONFIG if base is None else base)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config.update(in_channels=in_channels, sample_size=sample_size)
    config.update(view_concat_condition=image_conditioned, input_concat_plucker=True, input_concat_binary_mask=image_conditioned)
    return config


def build_mv_unet(config: dict) -> UNet2DConditionModel:
    """A multi-view UNet (random weights) from a config such as :func:`mv_unet_config`."""
    arch = {k: v for k, v in config.items() if k not in DIFFSPLAT_CONFIG_EXTRAS}
    unet = UNet2DConditionModel(**arch)
    unet.register_to_config(**{k: config.get(k, False) for k in DIFFSPLAT_CONFIG_EXTRAS})
    return set_multiview_attention(unet)


def widen_conv_in(unet: UNet2DConditionModel, in_channels: int = 10, sample_size: int = 32, image_conditioned: bool = False) -> UNet2DConditionModel:
    """SD UNet with 4 input channels -> multi-view UNet with ``in_channels``.

    conv_in's weights for the 4 latent channels are copied and the new channels are zero (DiffSplat
    ``zero_init_conv_in``), so at step 0 the Plücker rays do not perturb SD's prediction; the bias and all
    other weights are copied unchanged.
    """
    old_in = unet.config.in_channels
    if in_channels < old_in:
        raise ValueError(f"cannot widen conv_in from {old_in} to {in_channels} channels")
    config = mv_unet_config(dict(unet.config), in_channels, sample_size, image_conditioned)
    config = {k: v for k, v in config.items() if k in _unet_init_args() or k in DIFFSPLAT_CONFIG_EXTRAS}
    mv = build_mv_unet(config)
    if unet.dtype != mv.dtype:
        mv = mv.to(unet.dtype)
    state = dict(unet.state_dict())
    w = state["conv_in.weight"]
    wide = torch.zeros(w.shape[0], in_channels, *w.shape[2:], dtype=w.dtype)
    wide[:, :old_in] = w
    state["conv_in.weight"] = wide
    load_state_dict_strict(mv, state, "widened SD UNet")
    return mv


def _unet_init_args() -> set[str]:
    import inspect

    return set(inspect.signature(UNet2DConditionModel.__init__).parameters) - {"self"}


def load_mv_unet(folder: Path) -> UNet2DConditionModel:
    """Strictly load a GSDiff UNet folder: DiffSplat's ``unet_ema`` (config.json naming ``*MV2D*`` blocks,
    single or sharded ``diffusion_pytorch_model*.safetensors``) or one written by ``save_pretrained``."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing; expected a diffusers UNet folder")
    raw = json.loads(config_path.read_text())
    allowed = _unet_init_args() | set(DIFFSPLAT_CONFIG_EXTRAS)
    config = {k: v for k, v in raw.items() if k in allowed}
    for key in ("down_block_types", "up_block_types"):
        config[key] = tuple(DIFFSPLAT_BLOCK_NAMES.get(b, b) for b in config[key])
    if "mid_block_type" in config and config["mid_block_type"] is not None:
        config["mid_block_type"] = DIFFSPLAT_BLOCK_NAMES.get(config["mid_block_type"], config["mid_block_type"])
    unet = empty_model(lambda: build_mv_unet(config))  # no random init of 860M parameters before the load
    load_state_dict_strict(unet, read_diffusers_weights(folder), str(folder), assign=True)
    return unet.eval()


def read_diffusers_weights(folder: Path) -> dict[str, Tensor]:
    single = folder / "diffusion_pytorch_model.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, Tensor] = {}
        for shard in shards:
            state.update(load_file(str(folder / shard)))
        return state
    raise FileNotFoundError(f"{folder} has no diffusion_pytorch_model.safetensors (or sharded index)")


def plucker_condition(c2w: Tensor, fxfycxcy: Tensor, image_size: int, latent_size: int) -> Tensor:
    """Plücker rays at the image resolution, bilinearly resized to the latent grid.

    Args:
        c2w: (N, 4, 4) view cameras (OpenGL world, OpenCV camera axes), N = B*V.
        fxfycxcy: (N, 4) normalised intrinsics.

    Returns:
        (N, 6, latent_size, latent_size).
    """
    rays = plucker_rays(image_size, image_size, c2w, fxfycxcy)  # (N, 6, H, W)
    return F.interpolate(rays, size=(latent_size, latent_size), mode="bilinear", align_corners=False)


def with_condition_view(noisy: Tensor, plucker: Tensor, condition: Tensor, num_views: int) -> Tensor:
    """The image-conditioned UNet input of B objects (docs/image-to-3d.md §3): per object the condition view first,
    then its ``num_views`` generated views; ``(B*(1+V), 11, h, w)``.

    ``noisy`` (B*V, 4, h, w) noisy latents; ``plucker`` (B*V, 6, h, w) of the generated views (the condition view gets
    a copy of view 0's: it is the same camera); ``condition`` (B, 4, h, w) the scaled image latent (zeros when dropped).
    Mask channel: :data:`CONDITION_VIEW_MASK` on the condition view, :data:`GENERATED_VIEW_MASK` on the others.
    """
    b = condition.shape[0]
    lat = torch.cat([condition[:, None].to(noisy.dtype), noisy.reshape(b, num_views, *noisy.shape[1:])], dim=1)
    pl = plucker.reshape(b, num_views, *plucker.shape[1:])
    pl = torch.cat([pl[:, :1], pl], dim=1)
    mask = torch.full((b, 1 + num_views), GENERATED_VIEW_MASK, dtype=noisy.dtype, device=noisy.device)
    mask[:, 0] = CONDITION_VIEW_MASK
    return mv_unet_input(lat.flatten(0, 1), pl.flatten(0, 1), mask.flatten())


def generated_views(out: Tensor, num_views: int) -> Tensor:
    """UNet output ``(B*(1+V), ...)`` of :func:`with_condition_view` inputs -> the V generated views ``(B*V, ...)``
    (the condition view's output is discarded, as DiffSplat does)."""
    return out.reshape(-1, 1 + num_views, *out.shape[1:])[:, 1:].flatten(0, 1)


def mv_unet_input(latents: Tensor, plucker: Tensor, generated_mask: Tensor | None = None) -> Tensor:
    """Concatenate the UNet input ``[latent(4), plucker(6)(, mask(1))]`` along channels: (N, 10|11, h, w).

    ``generated_mask`` (N,) is 1 for generated views and 0 for a prepended condition view (image-conditioned
    variant only).
    """
    parts = [latents, plucker.to(latents.dtype)]
    if generated_mask is not None:
        n, _, h, w = latents.shape
        parts.append(generated_mask.to(latents.dtype).reshape(n, 1, 1, 1).expand(n, MASK_CHANNELS, h, w))
    return torch.cat(parts, dim=1)
