"""LPIPS (VGG16 variant, Zhang et al. 2018) in plain PyTorch, weights from a local file.

The ``lpips`` and ``torchvision`` packages are avoided on purpose (they pull multi-GB CUDA wheels into a
CPU environment); the network here is the same: VGG16 ``features`` up to relu5_3, the five taps relu1_2,
relu2_2, relu3_3, relu4_3, relu5_3, unit-normalised along channels, squared differences weighted by the
learned 1x1 "lin" heads, averaged over pixels and summed over taps.

Weight file (``.safetensors``, or a ``.pth``/``.pt`` state dict), keys:

* ``features.<i>.weight`` / ``features.<i>.bias``: torchvision's ``vgg16().features`` indices
  (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28);
* ``lins.<k>.weight`` (1, C_k, 1, 1), k = 0..4; the ``lpips`` package's ``lin<k>.model.1.weight`` names are
  accepted too.

Build it once on a machine with internet, e.g.::

    vgg = torchvision.models.vgg16(weights="IMAGENET1K_V1").features.state_dict()
    lin = torch.load("lpips/weights/v0.1/vgg.pth")          # from the lpips package
    state = {f"features.{k}": v for k, v in vgg.items()} | lin
    safetensors.torch.save_file(state, "models/lpips_vgg16.safetensors")
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

# VGG16 configuration "D": output channels, "M" = max-pool (torchvision indices follow from this list).
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Index of the ReLU after which each LPIPS tap is taken, in torchvision's ``features`` numbering.
TAP_RELU_INDICES = (3, 8, 15, 22, 29)
TAP_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS' ScalingLayer: inputs in [-1, 1] are shifted and scaled to ImageNet statistics.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class LPIPS(nn.Module):
    """``forward(x, y)`` with images (N, 3, H, W) in [0, 1] -> distance (N,) (0 for identical images)."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU(inplace=False)]
                c_in = v
        self.features = nn.Sequential(*layers[: TAP_RELU_INDICES[-1] + 1])
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in TAP_CHANNELS)
        self.register_buffer("shift", torch.tensor(SHIFT).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).reshape(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def _taps(self, x: Tensor) -> list[Tensor]:
        x = ((x * 2.0 - 1.0) - self.shift) / self.scale
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAP_RELU_INDICES:
                taps.append(x)
        return taps

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        total = 0.0
        for lin, fx, fy in zip(self.lins, self._taps(x), self._taps(y)):
            fx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fy = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((fx - fy) ** 2).mean(dim=(2, 3))
        return total.reshape(-1)


def _rename(key: str) -> str:
    if key.startswith("lin") and ".model.1." in key:  # lpips package: lin0.model.1.weight
        return f"lins.{key[3]}.weight"
    if key.startswith("net.") or key.startswith("module."):
        return key.split(".", 1)[1]
    return key


def load_lpips(path: str | Path, device: str | torch.device = "cpu") -> LPIPS:
    """LPIPS with the weights of ``path`` (module docstring); a clear error if the file is missing or wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"LPIPS weights {path} not found (params.yaml train.lpips_weights / evaluate.lpips_weights); "
            "build the file as described in chibisplat/training/lpips.py or set the key to null"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = {_rename(k): v for k, v in state.items()}
    model = LPIPS()
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(f"{path}: not LPIPS-VGG16 weights, missing {missing[:6]} ({len(missing)} keys); see chibisplat/training/lpips.py")
    model.load_state_dict({k: state[k] for k in own}, strict=True)
    from chibisplat.device import to_device

    return to_device(model, device)
