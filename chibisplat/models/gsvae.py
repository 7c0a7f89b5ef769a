"""GSVAE: splatter images (12 channels) <-> Stable Diffusion latents (DiffSplat stage 2; docs/diffsplat-reference.md §3).

``vae`` is the SD1.5 KL autoencoder with its first and last convolutions widened from 3 to 12 channels;
``tiny_decoder`` is a TAESD decoder with a 12-channel output, used only for cheap rendering losses.
Attribute names match the published ``gsvae_gobj265k_sd`` state dict (``vae.*``, ``tiny_decoder.layers.*``).
Channel order of the splatter image: :data:`chibisplat.splats.splatter.SPLATTER_CHANNELS`.
"""

from __future__ import annotations

from diffusers import AutoencoderKL, AutoencoderTiny
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderTiny
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor

from chibisplat.splats.splatter import SPLATTER_NUM_CHANNELS

# The SD1.5 VAE (stable-diffusion-v1-5 vae/config.json).
SD15_VAE_BLOCK_OUT_CHANNELS = (128, 256, 512, 512)
SD15_SCALING_FACTOR = 0.18215
# madebyollin/taesd decoder.
TAESD_DECODER_BLOCK_OUT_CHANNELS = (64, 64, 64, 64)
TAESD_NUM_DECODER_BLOCKS = (3, 3, 3, 1)
RGB_CHANNELS = 3


class GSAutoencoderKL(ModelMixin, ConfigMixin):
    """KL autoencoder for splatter images; the full-size defaults are the published SD1.5 GSVAE."""

    # The SD VAE's encoder/decoder and the TAESD decoder checkpoint their blocks (finetune's pretrained preset).
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        block_out_channels: tuple[int, ...] = SD15_VAE_BLOCK_OUT_CHANNELS,
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        latent_channels: int = 4,
        tiny_decoder_block_out_channels: tuple[int, ...] = TAESD_DECODER_BLOCK_OUT_CHANNELS,
        tiny_num_decoder_blocks: tuple[int, ...] = TAESD_NUM_DECODER_BLOCKS,
        scaling_factor: float = SD15_SCALING_FACTOR,
        shift_factor: float = 0.0,
    ):
        super().__init__()
        n = len(block_out_channels)
        self.vae = AutoencoderKL(
            in_channels=SPLATTER_NUM_CHANNELS,
            out_channels=SPLATTER_NUM_CHANNELS,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            act_fn="silu",
            latent_channels=latent_channels,
            norm_num_groups=norm_num_groups,
            scaling_factor=scaling_factor,
        )
        # Same construction as AutoencoderTiny's decoder (the published keys are tiny_decoder.layers.*).
        self.tiny_decoder = DecoderTiny(
            in_channels=latent_channels,
            out_channels=SPLATTER_NUM_CHANNELS,
            num_blocks=tuple(tiny_num_decoder_blocks),
            block_out_channels=tuple(tiny_decoder_block_out_channels),
            upsampling_scaling_factor=2,
            act_fn="relu",
            upsample_fn="nearest",
        )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    @classmethod
    def from_rgb_autoencoders(cls, vae: AutoencoderKL, taesd: AutoencoderTiny, **config) -> "GSAutoencoderKL":
        """Initialise from a 3-channel SD VAE and TAESD as DiffSplat does (docs/diffsplat-reference.md §3).

        The 12-channel input conv repeats the RGB weights 4 times along input channels (no rescaling); the
        12-channel output convs repeat weights and biases 4 times along output channels. All other weights
        are copied unchanged.
        """
        model = cls(
            block_out_channels=tuple(vae.config.block_out_channels),
            layers_per_block=vae.config.layers_per_block,
            norm_num_groups=vae.config.norm_num_groups,
            latent_channels=vae.config.latent_channels,
            tiny_decoder_block_out_channels=tuple(taesd.config.decoder_block_out_channels),
            tiny_num_decoder_blocks=tuple(taesd.config.num_decoder_blocks),
            scaling_factor=vae.config.scaling_factor,
            shift_factor=vae.config.shift_factor or 0.0,
            **config,
        )
        repeats = SPLATTER_NUM_CHANNELS // RGB_CHANNELS
        vae_state = dict(vae.state_dict())
        vae_state["encoder.conv_in.weight"] = vae_state["encoder.conv_in.weight"].repeat(1, repeats, 1, 1)
        vae_state["decoder.conv_out.weight"] = vae_state["decoder.conv_out.weight"].repeat(repeats, 1, 1, 1)
        vae_state["decoder.conv_out.bias"] = vae_state["decoder.conv_out.bias"].repeat(repeats)
        model.vae.load_state_dict(vae_state, strict=True)
        tiny_state = dict(taesd.decoder.state_dict())
        last = f"layers.{len(model.tiny_decoder.layers) - 1}"
        tiny_state[f"{last}.weight"] = tiny_state[f"{last}.weight"].repeat(repeats, 1, 1, 1)
        tiny_state[f"{last}.bias"] = tiny_state[f"{last}.bias"].repeat(repeats)
        model.tiny_decoder.load_state_dict(tiny_state, strict=True)
        return model

    def encode(self, splatter: Tensor, sample: bool | None = None) -> tuple[Tensor, Tensor]:
        """Splatter images -> unscaled latents.

        Args:
            splatter: (N, 12, H, W) in [-1, 1] (N = B*V).
            sample: draw from the posterior (default: in train mode) or take its mean (default in eval mode;
                GSDiff trains on posterior means).

        Returns:
            latents (N, 4, H/8, W/8) **without** the scaling factor (the diffusion stage applies it), and
            the mean KL divergence (logged by DiffSplat, never part of its loss).
        """
        dist = self.vae.encode(splatter).latent_dist
        draw = self.training if sample is None else sample
        latents = dist.sample() if draw else dist.mode()
        return latents, dist.kl().mean()

    def decode(self, latents: Tensor, use_tiny_decoder: bool = False) -> Tensor:
        """Unscaled latents (N, 4, h, w) -> splatter images (N, 12, 8h, 8w) clamped to [-1, 1].

        The tiny path reproduces DiffSplat's quirks (docs/diffsplat-reference.md §11.6): the latents are first multiplied by
        the scaling factor (TAESD expects scaled latents) and still pass through the KL-VAE's
        ``post_quant_conv`` before the tiny decoder.
        """
        if not use_tiny_decoder:
            return self.vae.decode(latents).sample.clamp(-1.0, 1.0)
        z = self.config.scaling_factor * (latents - self.config.shift_factor)
        if self.vae.post_quant_conv is not None:
            z = self.vae.post_quant_conv(z)
        return self.tiny_decoder(z).clamp(-1.0, 1.0)

    def scale_latents(self, latents: Tensor) -> Tensor:
        """GSVAE latents -> diffusion latents: ``scaling_factor * (z - shift_factor)``."""
        return self.config.scaling_factor * (latents - self.config.shift_factor)

    def unscale_latents(self, latents: Tensor) -> Tensor:
        """Diffusion latents -> GSVAE latents (inverse of :meth:`scale_latents`)."""
        return latents / self.config.scaling_factor + self.config.shift_factor


def sd15_vae(**overrides) -> AutoencoderKL:
    """A 3-channel AutoencoderKL with the SD1.5 architecture (random weights; sizes overridable)."""
    config = dict(
        in_channels=RGB_CHANNELS,
        out_channels=RGB_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=SD15_VAE_BLOCK_OUT_CHANNELS,
        layers_per_block=2,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=SD15_SCALING_FACTOR,
    )
    config.update(overrides)
    n = len(config["block_out_channels"])
    config["down_block_types"] = ("DownEncoderBlock2D",) * n
    config["up_block_types"] = ("UpDecoderBlock2D",) * n
    return AutoencoderKL(**config)


def taesd(**overrides) -> AutoencoderTiny:
    """A 3-channel AutoencoderTiny with the TAESD architecture (random weights; sizes overridable)."""
    return AutoencoderTiny(**overrides)
