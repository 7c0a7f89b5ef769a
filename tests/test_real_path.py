"""The real path on the CPU: random full-size weights in the published layouts (chibisplat/models/fixture.py),
``models.source: pretrained``, every stage's own ``main`` in its own process (benchmarks/gpu_smoke.py, the same
code as ``make gpu-smoke`` on a GPU except the device). One train and one val character at 256 px, one view set,
1 LoRA step with the rendering loss, 1 sampling step; the stage times are printed (pytest -s) and asserted
stages ran with the real models (SD1.5-size text encoder, full GSRecon/GSVAE/UNet, CLIP ViT-L/14)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def test_gsvae_gradient_checkpointing_gives_the_same_gradients():
    """finetune's pretrained preset checkpoints the GSVAE (it raised before: 'does not support gradient checkpointing')."""
    from chibisplat.models.sources import tiny_model_stack

    torch.manual_seed(0)
    x = torch.rand(2, 12, 32, 32) * 2 - 1
    grads = []
    for ckpt in (False, True):
        vae = tiny_model_stack(0).gsvae.train()
        if ckpt:
            vae.enable_gradient_checkpointing()
        z, _ = vae.encode(x, sample=False)
        (vae.decode(z).square().mean() + vae.decode(z, use_tiny_decoder=True).square().mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in vae.parameters() if p.grad is not None]))
    assert grads[0].numel() > 1000 and torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_pretrained_loads_build_no_random_weights_first(tmp_path, monkeypatch):
    """The published UNet is filled from its file without initialising 860M parameters first (minutes on a CPU)."""
    from chibisplat.models.fixture import write_diffsplat_unet
    from chibisplat.models.gsdiff import load_mv_unet
    from chibisplat.models.sources import tiny_model_stack

    unet = tiny_model_stack(0).unet
    folder = write_diffsplat_unet(unet, tmp_path / "unet_ema")
    init = torch.nn.init.kaiming_uniform_
    devices = []
    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", lambda t, *a, **k: devices.append(t.device.type) or init(t, *a, **k))
    loaded = load_mv_unet(folder)
    assert devices and set(devices) == {"meta"}  # initialisers only ever saw memoryless tensors
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in unet.state_dict().items())
    assert json.loads((folder / "config.json").read_text())["_class_name"] == "UNetMV2DConditionModel"


@pytest.mark.slow
def test_real_path_end_to_end_on_the_cpu(tmp_path):
    from gpu_smoke import smoke, table
    from safetensors import safe_open

    from chibisplat.dataset.embeddings import read_embeddings

    rows, params = smoke(tmp_path, "cpu", log=print)
    print(table(rows, "real path on the CPU (tests/test_real_path.py)"))
    assert [r["stage"] for r in rows[2:]] == ["embed", "finetune", "latents", "train", "evaluate", "generate"]
    w = lambda *p: tmp_path.joinpath(*p)
    # embed: the full-size SD1.5 text encoder of the fixture, not the tiny one
    emb = read_embeddings(Path(params["embed"]["out"]))
    assert len(emb) == 3 and all(e.shape == (77, 768) and np.isfinite(e).all() for _, e in emb.values())
    # finetune: both modules, loaded back by latents through models.finetuned
    manifest = json.loads(w("finetune", "manifest.json").read_text())
    assert manifest["gsrecon"] == "gsrecon" and manifest["gsvae"] == "gsvae"
    # latents: one view set, 32x32 latents of the full GSVAE, for the train and the val character
    files = sorted(w("latents").rglob("*.safetensors"))
    assert [f.parent.name for f in files] == ["train", "val"]
    with safe_open(str(files[0]), "pt") as f:
        lat = f.get_tensor("latents")
    assert lat.shape == (1, 4, 4, 32, 32) and torch.isfinite(lat).all()
    # train: LoRA on the full UNet, the rendering loss ran, the final UNet and the adapter are written
    live = json.loads(w("metrics", "train", "metrics.json").read_text())
    assert live["train"]["steps"] == 1 and live["train"]["render_loss"] > 0
    assert w("train", "unet", "config.json").is_file() and any(w("train", "unet", "lora").glob("*.safetensors"))
    # evaluate: both UNets scored by the full-size CLIP, side-by-side preview of the val character
    metrics = json.loads(w("metrics", "evaluate.json").read_text())
    assert 0 <= metrics["clip_score"] <= 100 and 0 <= metrics["clip_score_base"] <= 100
    assert metrics["clip_model"] == "clip:clip-vit-large-patch14" and metrics["val_characters"] == 1
    assert np.isfinite(metrics["val_diffusion_loss"]) and np.isfinite(metrics["recon_psnr"])
    import imageio.v2 as imageio

    sheet = imageio.imread(next(w("metrics", "evaluate", "previews").glob("generated_*.png")))
    assert sheet.shape[:2] == (2 * 64, 4 * 64)  # base row above the fine-tuned row, 4 views each
    # generate
    assert all(w("generate", n).is_file() for n in ("views.png", "splat.ply", "turntable.gif"))
