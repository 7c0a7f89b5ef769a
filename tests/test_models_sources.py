"""Model sources (tiny / pretrained) and the tiny end-to-end pipeline."""

import dataclasses

import pytest
import torch
from diffusers import DDPMScheduler
from project_config import models_params

from chibisplat.geometry import normalised_intrinsics, opengl_to_opencv_camera, orbit_camera, pixel_K
from chibisplat.models.gsdiff import mv_unet_input, plucker_condition
from chibisplat.models.sources import ModelSourceError, load_model_stack, tiny_model_stack
from chibisplat.splats.rasterize import rasterize
from chibisplat.splats.splatter import splatter_to_gaussians, to_splatter_image


def test_tiny_stack_is_deterministic():
    a, b = tiny_model_stack(seed=3), tiny_model_stack(seed=3)
    for m in ("gsrecon", "gsvae", "unet"):
        sa, sb = getattr(a, m).state_dict(), getattr(b, m).state_dict()
        assert all(torch.equal(v, sb[k]) for k, v in sa.items()), m
    assert a.unet.config.cross_attention_dim == 768 and a.unet.config.in_channels == 10


def test_pretrained_missing_says_how_to_fetch(tmp_path):
    cfg = models_params(source="pretrained",
                        diffsplat={"repo": "chenguolin/DiffSplat", "revision": "main", "path": str(tmp_path / "nope")})
    with pytest.raises(ModelSourceError, match="huggingface-cli download chenguolin/DiffSplat") as e:
        load_model_stack(cfg)
    assert "snapshot_download" in str(e.value) and "gsrecon_gobj265k_cnp_even4" in str(e.value)
    (tmp_path / "empty").mkdir()
    cfg = dataclasses.replace(cfg, diffsplat=dataclasses.replace(cfg.diffsplat, path=tmp_path / "empty"))
    with pytest.raises(ModelSourceError, match="lacks"):
        load_model_stack(cfg)
    with pytest.raises(ValueError, match="models.source"):
        load_model_stack(models_params(source="huge"))


def test_tiny_end_to_end_views_to_render():
    stack = tiny_model_stack(seed=0)
    B, V, res = 1, 4, 64
    latent = res // stack.gsvae.downsample_factor
    c2w = opengl_to_opencv_camera(orbit_camera(torch.full((V,), -20.0), torch.arange(V) * 90.0, 1.4))[None]
    fxfycxcy = normalised_intrinsics().expand(B, V, 4)
    views = torch.rand(B, V, 9, res, res)
    with torch.no_grad():
        attrs = stack.gsrecon(views, c2w, fxfycxcy)
        splatter = to_splatter_image(attrs).reshape(B * V, 12, res, res)  # views -> splatter images
        assert splatter.shape == (4, 12, 64, 64)
        z, _ = stack.gsvae.encode(splatter)  # splatter -> latents
        assert z.shape == (4, 4, latent, latent)
        z = stack.gsvae.scale_latents(z)
        sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        t = torch.tensor([999])
        noisy = sched.add_noise(z, torch.randn_like(z), t)
        plucker = plucker_condition(c2w.reshape(-1, 4, 4), fxfycxcy.reshape(-1, 4), res, latent)
        x = mv_unet_input(noisy, plucker)
        assert x.shape == (4, 10, latent, latent)
        eps = stack.unet(x, t.expand(B * V), torch.randn(B * V, 77, 768), cross_attention_kwargs={"num_views": V}).sample
        assert eps.shape == (4, 4, latent, latent)  # MV UNet step
        z0 = sched.step(eps, t, noisy).pred_original_sample
        decoded = stack.gsvae.decode(stack.gsvae.unscale_latents(z0), use_tiny_decoder=True)
        assert decoded.shape == (4, 12, res, res)  # latents -> splatter images
        g = splatter_to_gaussians(decoded, c2w[0], fxfycxcy[0])
        assert g.means.shape == (V * res * res, 3)  # splatter -> Gaussians
        K = pixel_K(fxfycxcy[0, 0], 32, 32)
        out = rasterize(g, c2w[0, 1], K, 32, 32)  # Gaussians -> image
    assert out["image"].shape == (3, 32, 32) and out["alpha"].shape == (1, 32, 32)
    assert torch.isfinite(out["image"]).all()


def test_pretrained_source_loads_a_complete_published_layout(tmp_path, monkeypatch):
    """`models.source: pretrained` on folders laid out as the Hub publishes them (DiffSplat's three checkpoints,
    SD1.5's unet/scheduler configs), filled with tiny weights: every model is loaded strictly, bit for bit, from
    the path it belongs to. (The full-size classes are swapped for their tiny configuration; the layout, file names,
    latest-iteration choice and strict loading are the product's.)"""
    import json

    from chibisplat.models import sources
    from chibisplat.models.checkpoints import save_accelerate_checkpoint
    from chibisplat.models.gsrecon import GSRecon
    from chibisplat.models.gsvae import GSAutoencoderKL
    from chibisplat.training.objective import SD15_SCHEDULER_CONFIG, noise_scheduler

    published = tiny_model_stack(seed=11)
    root, sd15 = tmp_path / "diffsplat", tmp_path / "sd15"
    save_accelerate_checkpoint(tiny_model_stack(seed=12).gsrecon, root / sources.GSRECON_TAG, 1000)  # older
    save_accelerate_checkpoint(published.gsrecon, root / sources.GSRECON_TAG, 124320)
    save_accelerate_checkpoint(published.gsvae, root / sources.GSVAE_TAG, 2000)
    published.unet.save_pretrained(root / sources.GSDIFF_UNET_SUBDIR)
    cfg_path = root / sources.GSDIFF_UNET_SUBDIR / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(_class_name="UNetMV2DConditionModel", down_block_types=["CrossAttnDownBlockMV2D", "DownBlock2D"],
               up_block_types=["UpBlock2D", "CrossAttnUpBlockMV2D"], mid_block_type="UNetMidBlockMV2DCrossAttn")
    cfg_path.write_text(json.dumps(cfg))
    (sd15 / "unet").mkdir(parents=True)
    (sd15 / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG).save_pretrained(sd15 / "scheduler")

    tiny_vae_config = {k: v for k, v in published.gsvae.config.items() if not k.startswith("_")}
    monkeypatch.setattr(sources, "GSRecon", lambda: GSRecon(**sources.TINY_GSRECON))
    monkeypatch.setattr(sources, "GSAutoencoderKL", lambda: GSAutoencoderKL(**tiny_vae_config))
    stack = load_model_stack(models_params(source="pretrained", diffsplat={"path": root}, sd15={"path": sd15}))
    assert stack.source == "pretrained" and stack.sd15_path == sd15
    for name in ("gsrecon", "gsvae", "unet"):
        want, got = getattr(published, name).state_dict(), getattr(stack, name).state_dict()
        assert set(got) == set(want), name
        assert all(torch.equal(got[k], v) for k, v in want.items()), name
    assert stack.unet.config.in_channels == 10 and not stack.gsrecon.training
    sched = noise_scheduler(stack)
    assert torch.equal(sched.alphas_cumprod, DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG).alphas_cumprod)
