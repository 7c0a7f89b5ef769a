"""GSRecon: 4 posed views -> per-pixel Gaussians (DiffSplat stage 1; docs/diffsplat-reference.md §2).

A ViT over 8x8 patches of [RGB, normal, coord] (in [0, 1], mapped to [-1, 1]) concatenated with Plücker
rays; the tokens of all views attend jointly (no positional embedding: cameras enter only through the
Plücker rays). Five bias-free linear heads give a splatter image per view.

Module attribute names are the published checkpoint's state-dict keys (docs/diffsplat-reference.md §7), so
``gsrecon_gobj265k_cnp_even4/checkpoints/124320/model.safetensors`` loads strictly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from chibisplat.geometry import plucker_rays

# Head name -> channels; the order here is the forward output order, not the splatter channel order.
HEAD_CHANNELS = {"depth": 1, "rgb": 3, "scale": 3, "rotation": 4, "opacity": 1}
PLUCKER_CHANNELS = 6


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """(N, C, H, W) -> (N, (H/p)*(W/p), p*p*C), channel innermost: ``(p1 p2 c)`` (DiffSplat fix for issue #12)."""
    n, c, h, w = x.shape
    p = patch_size
    x = x.reshape(n, c, h // p, p, w // p, p)  # n c h p1 w p2
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: Tensor, patch_size: int, height: int, width: int) -> Tensor:
    """(N, (H/p)*(W/p), p*p*C) -> (N, C, H, W), inverse of :func:`patchify`."""
    n, _, d = tokens.shape
    p = patch_size
    c = d // (p * p)
    x = tokens.reshape(n, height // p, width // p, p, p, c)  # n h w p1 p2 c
    return x.permute(0, 5, 1, 3, 2, 4).reshape(n, c, height, width)


def swiglu_hidden_dim(dim: int, multiple_of: int) -> int:
    """LLaMA FFN width: ``int(2 * 4 * dim / 3)`` rounded up to ``multiple_of`` (1536 for dim 512, multiple 256)."""
    hidden = int(2 * (4 * dim) / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 like the reference, so fp16 training matches.
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    """Bias-free multi-head self-attention with LayerNorm on q and k before the head split."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.q_norm = nn.LayerNorm(dim)
        self.k_norm = nn.LayerNorm(dim)
        for lin in (self.wq, self.wk, self.wv, self.wo):
            nn.init.xavier_uniform_(lin.weight)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        h = self.num_heads
        q = self.q_norm(self.wq(x)).reshape(b, n, h, d // h).transpose(1, 2)  # (B, heads, N, d_head)
        k = self.k_norm(self.wk(x)).reshape(b, n, h, d // h).transpose(1, 2)
        v = self.wv(x).reshape(b, n, h, d // h).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.wo(out.transpose(1, 2).reshape(b, n, d))


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``, bias-free."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        for lin in (self.w1, self.w2, self.w3):
            nn.init.xavier_uniform_(lin.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LLaMATransformerBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, ffn_hidden_dim: int, norm_eps: float):
        super().__init__()
        self.norm1 = RMSNorm(dim, norm_eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = RMSNorm(dim, norm_eps)
        self.mlp = FeedForward(dim, ffn_hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, num_blocks: int, dim: int, num_heads: int, ffn_hidden_dim: int, norm_eps: float):
        super().__init__()
        self.blocks = nn.ModuleList(
            [LLaMATransformerBlock(dim, num_heads, ffn_hidden_dim, norm_eps) for _ in range(num_blocks)]
        )
        self.gradient_checkpointing = False  # diffusers' enable_gradient_checkpointing() flips this

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = self._gradient_checkpointing_func(block, x)
            else:
                x = block(x)
        return x


class GSRecon(ModelMixin, ConfigMixin):
    """Posed multi-view images -> splatter images.

    Defaults are the published ``gsrecon_gobj265k_cnp_even4`` configuration (41.8M parameters).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        image_channels: int = 9,  # RGB + normal + coord, each 3
        patch_size: int = 8,
        dim: int = 512,
        num_blocks: int = 12,
        num_heads: int = 8,
        ffn_multiple_of: int = 256,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        in_channels = image_channels + PLUCKER_CHANNELS
        p2 = patch_size * patch_size
        self.x_embedder = nn.Linear(in_channels * p2, dim)
        self.transformer = Transformer(num_blocks, dim, num_heads, swiglu_hidden_dim(dim, ffn_multiple_of), norm_eps)
        self.ln_out = nn.LayerNorm(dim)
        self.out_depth = nn.Linear(dim, HEAD_CHANNELS["depth"] * p2, bias=False)
        self.out_rgb = nn.Linear(dim, HEAD_CHANNELS["rgb"] * p2, bias=False)
        self.out_scale = nn.Linear(dim, HEAD_CHANNELS["scale"] * p2, bias=False)
        self.out_rotation = nn.Linear(dim, HEAD_CHANNELS["rotation"] * p2, bias=False)
        self.out_opacity = nn.Linear(dim, HEAD_CHANNELS["opacity"] * p2, bias=False)

        nn.init.xavier_uniform_(self.x_embedder.weight)
        nn.init.zeros_(self.x_embedder.bias)
        # Zero-init depth/scale/opacity: training starts from mid-range depth, scale 0.01 and opacity 0.12.
        nn.init.zeros_(self.out_depth.weight)
        nn.init.xavier_uniform_(self.out_rgb.weight)
        nn.init.zeros_(self.out_scale.weight)
        nn.init.xavier_uniform_(self.out_rotation.weight)
        nn.init.zeros_(self.out_opacity.weight)

    def forward(self, images: Tensor, c2w: Tensor, fxfycxcy: Tensor) -> dict[str, Tensor]:
        """Predict splatter attributes for every input view.

        Args:
            images: (B, V, image_channels, H, W) in [0, 1]: RGB, normal, coord maps on white background.
            c2w: (B, V, 4, 4) cameras (OpenGL world, OpenCV camera axes).
            fxfycxcy: (B, V, 4) normalised intrinsics.

        Returns:
            ``{"depth": (B,V,1,H,W), "rgb": (B,V,3,H,W), "scale": (B,V,3,H,W), "rotation": (B,V,4,H,W),
            "opacity": (B,V,1,H,W)}``; all in [-1, 1] except ``rotation``, which is a unit quaternion.
        """
        b, v, c, h, w = images.shape
        if c != self.config.image_channels:
            raise ValueError(f"GSRecon expects {self.config.image_channels} image channels, got {c}")
        p = self.config.patch_size
        plucker = plucker_rays(h, w, c2w, fxfycxcy).to(images.dtype)  # (B, V, 6, H, W)
        x = torch.cat([images * 2.0 - 1.0, plucker], dim=2).reshape(b * v, c + PLUCKER_CHANNELS, h, w)
        tokens = self.x_embedder(patchify(x, p))  # (B*V, N, D)
        n = tokens.shape[1]
        tokens = self.transformer(tokens.reshape(b, v * n, -1))  # all views attend jointly: (B, V*N, D)
        tokens = self.ln_out(tokens).reshape(b * v, n, -1)

        def head(linear: nn.Linear) -> Tensor:
            return unpatchify(linear(tokens), p, h, w).reshape(b, v, -1, h, w)

        return {
            "depth": torch.sigmoid(head(self.out_depth)) * 2.0 - 1.0,
            "rgb": torch.sigmoid(head(self.out_rgb)) * 2.0 - 1.0,
            "scale": torch.sigmoid(head(self.out_scale)) * 2.0 - 1.0,
            "rotation": F.normalize(head(self.out_rotation), dim=2),
            # The -2 shift starts opacities low (GS-LRM appendix A.4), as in the published model.
            "opacity": torch.sigmoid(head(self.out_opacity) - 2.0) * 2.0 - 1.0,
        }
