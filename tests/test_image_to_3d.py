"""Image-to-3D with DiffSplat's image-conditioned SD1.5 model (docs/image-to-3d.md): the published layout loads
strictly, the UNet input / CFG / dropout are DiffSplat's, a tiny image-conditioned fine-tune learns, and
`chibisplat generate --image` cuts out and recentres a drawing and writes views, a PLY and a turntable."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
import yaml
from project_config import models_params, project_config, project_params, section_params

from chibisplat.models.sources import tiny_model_stack
from chibisplat.training.image_condition import (
    IMAGE_PREDICTION_TYPE, cfg_drops, foreground_alpha, prepare_condition_image, prediction_type_for,
)

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# The published layout: gsdiff_gobj83k_sd15_image__render/checkpoints/013020/unet_ema + SD1.5's vae/.


def _published_image_layout(tmp_path: Path, stack) -> tuple[Path, Path]:
    from diffusers import DDPMScheduler

    from chibisplat.models import sources
    from chibisplat.models.checkpoints import save_accelerate_checkpoint
    from chibisplat.models.fixture import write_image_model
    from chibisplat.training.objective import SD15_SCHEDULER_CONFIG

    root, sd15 = tmp_path / "diffsplat", tmp_path / "sd15"
    save_accelerate_checkpoint(stack.gsrecon, root / sources.GSRECON_TAG, 124320)
    save_accelerate_checkpoint(stack.gsvae, root / sources.GSVAE_TAG, 124320)
    write_image_model(root, sd15, stack.unet, stack.image_vae)
    (sd15 / "unet").mkdir(parents=True)
    (sd15 / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG).save_pretrained(sd15 / "scheduler")
    return root, sd15


def _load_pretrained(monkeypatch, root, sd15, published, image_conditioned=True):
    from chibisplat.models import sources
    from chibisplat.models.gsrecon import GSRecon
    from chibisplat.models.gsvae import GSAutoencoderKL

    tiny_vae_config = {k: v for k, v in published.gsvae.config.items() if not k.startswith("_")}
    monkeypatch.setattr(sources, "GSRecon", lambda: GSRecon(**sources.TINY_GSRECON))
    monkeypatch.setattr(sources, "GSAutoencoderKL", lambda: GSAutoencoderKL(**tiny_vae_config))
    return sources.load_model_stack(models_params(source="pretrained", image_conditioned=image_conditioned,
                                                  diffsplat={"path": root}, sd15={"path": sd15}))


def test_published_image_layout_loads_strictly_and_fails_on_a_wrong_key_or_shape(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from chibisplat.models import sources

    published = tiny_model_stack(seed=21, image_conditioned=True)
    text = tiny_model_stack(seed=21)  # (built before the loaders' classes are swapped for tiny ones below)
    root, sd15 = _published_image_layout(tmp_path, published)
    unet_dir = root / "gsdiff_gobj83k_sd15_image__render" / "checkpoints" / "013020" / "unet_ema"
    cfg = json.loads((unet_dir / "config.json").read_text())
    # DiffSplat's config as published: its class and MV2D block names, the image flags
    assert cfg["_class_name"] == "UNetMV2DConditionModel" and "CrossAttnDownBlockMV2D" in cfg["down_block_types"]
    assert cfg["in_channels"] == 11 and cfg["view_concat_condition"] and cfg["input_concat_binary_mask"]
    assert (sd15 / "vae" / "config.json").is_file()

    stack = _load_pretrained(monkeypatch, root, sd15, published)
    for name in ("gsrecon", "gsvae", "unet", "image_vae"):
        want, got = getattr(published, name).state_dict(), getattr(stack, name).state_dict()
        assert set(got) == set(want), name
        assert all(torch.equal(got[k], v) for k, v in want.items()), name
    assert stack.unet.config.in_channels == 11 and stack.unet.conv_in.weight.shape[1] == 11

    weights = unet_dir / "diffusion_pytorch_model.safetensors"
    good = load_file(str(weights))
    renamed = dict(good)
    renamed["conv_in.weight_renamed"] = renamed.pop("conv_in.weight")
    save_file(renamed, str(weights))
    with pytest.raises(ValueError, match=r"missing \[conv_in.weight\].*unexpected \[conv_in.weight_renamed\]"):
        _load_pretrained(monkeypatch, root, sd15, published)
    narrow = dict(good)
    narrow["conv_in.weight"] = good["conv_in.weight"][:, :10].contiguous()  # the text model's conv_in 10
    save_file(narrow, str(weights))
    with pytest.raises(ValueError, match=r"conv_in.weight: file \(32, 10, 3, 3\) vs model \(32, 11, 3, 3\)"):
        _load_pretrained(monkeypatch, root, sd15, published)
    save_file(good, str(weights))
    # the text model where the image model is asked for: a clear error naming the key
    from chibisplat.models.fixture import write_diffsplat_unet

    write_diffsplat_unet(text.unet, root / sources.GSDIFF_IMAGE_UNET_SUBDIR)
    with pytest.raises(sources.ModelSourceError, match="models.image_conditioned"):
        _load_pretrained(monkeypatch, root, sd15, published)
    (sd15 / "vae" / "config.json").unlink()
    with pytest.raises(sources.ModelSourceError, match="vae/config.json"):
        _load_pretrained(monkeypatch, root, sd15, published)


# ---------------------------------------------------------------------------------------------------------------
# Conditioning, by hand.


def test_cfg_dropout_is_diffsplats_one_draw_rule():
    # DiffSplat (cfg_dropout_prob 0.05): text dropped when p < 0.10, image when 0.05 <= p < 0.15
    p = torch.tensor([0.0, 0.049, 0.05, 0.099, 0.10, 0.149, 0.15, 0.7])
    text, image = cfg_drops(p, 0.1)
    assert text.tolist() == [True, True, True, True, False, False, False, False]
    assert image.tolist() == [False, False, True, True, True, True, False, False]
    assert prediction_type_for(True) == IMAGE_PREDICTION_TYPE == "v_prediction"
    assert prediction_type_for(False) == "epsilon" and prediction_type_for(True, "epsilon") == "epsilon"


def _image_batch(stack, b=3, size=8, seed=0):
    from chibisplat.training.inference import inference_cameras
    from chibisplat.training.objective import Batch

    g = torch.Generator().manual_seed(seed)
    c2w, intr = inference_cameras(20.0, 1.4, tuple(range(0, 360, 45)))
    images = torch.rand(b, 3, size * 8, size * 8, generator=g)
    dist = stack.image_vae.encode(images * 2 - 1).latent_dist
    moments = torch.cat([dist.mean, dist.std], dim=1).detach()
    batch = Batch(torch.randn(b, 4, 4, size, size, generator=g), c2w[None].expand(b, -1, -1, -1),
                  intr[None].expand(b, -1, -1), torch.zeros(b, 8, 4, 4, 4, dtype=torch.uint8),
                  torch.randn(b, 77, 768, generator=g), torch.arange(b), moments)
    return batch, dist


def test_training_inputs_put_the_condition_view_first_with_mask_zero():
    from chibisplat.training.objective import diffusion_step_inputs, noise_scheduler, step_generator

    stack = tiny_model_stack(0, image_conditioned=True)
    batch, dist = _image_batch(stack)
    sched = noise_scheduler(stack, "v_prediction")
    null = torch.zeros(77, 768)
    inp = diffusion_step_inputs(batch, sched, stack.gsvae.scale_latents, null, 0.0, 64, step_generator(0, 7), 0.18215)
    x = inp["unet_input"].reshape(3, 5, 11, 8, 8)
    assert torch.equal(x[:, 0, 10], torch.zeros(3, 8, 8))  # DiffSplat's mask: 0 on the condition view
    assert torch.equal(x[:, 1:, 10], torch.ones(3, 4, 8, 8))  # 1 on the generated views
    assert torch.equal(x[:, 0, 4:10], x[:, 1, 4:10])  # the condition view is view 0's camera
    assert not torch.equal(x[:, 1, 4:10], x[:, 2, 4:10])
    assert torch.equal(x[:, 1:, :4].reshape(12, 4, 8, 8), inp["noisy"])
    # the condition latent is a posterior sample of SD1.5's VAE, scaled by 0.18215 (DiffSplat's training)
    g = step_generator(0, 7)
    torch.randn(12, 4, 8, 8, generator=g), torch.randint(0, 1000, (3,), generator=g), torch.rand(3, generator=g)
    eps = torch.randn(3, 4, 8, 8, generator=g)
    want = 0.18215 * (dist.mean + dist.std * eps)
    assert torch.allclose(x[:, 0, :4], want, atol=1e-6)
    t = inp["unet_timesteps"].reshape(3, 5)
    assert (t == t[:, :1]).all() and torch.equal(t[:, 0], inp["timesteps"].reshape(3, 4)[:, 0])
    assert inp["encoder_hidden_states"].shape == (15, 77, 768)
    # v-prediction target: sqrt(a) * noise - sqrt(1 - a) * x0
    a = sched.alphas_cumprod[inp["timesteps"]].reshape(-1, 1, 1, 1)
    assert torch.allclose(inp["target"], a.sqrt() * inp["noise"] - (1 - a).sqrt() * inp["x0"], atol=1e-5)
    # every object dropped (p < 1.5): image latent zero, text null
    drop = diffusion_step_inputs(batch, sched, stack.gsvae.scale_latents, null, 1.0, 64, step_generator(0, 7), 0.18215)
    d = drop["unet_input"].reshape(3, 5, 11, 8, 8)
    p = torch.rand(3, generator=_after_two(step_generator(0, 7)))
    text, image = cfg_drops(p, 1.0)
    for k in range(3):
        assert torch.equal(d[k, 0, :4], torch.zeros(4, 8, 8)) == bool(image[k])
        assert torch.equal(drop["encoder_hidden_states"][5 * k], null) == bool(text[k])


def _after_two(g):
    torch.randn(12, 4, 8, 8, generator=g), torch.randint(0, 1000, (3,), generator=g)
    return g


class Recorder(torch.nn.Module):
    """Wraps a UNet and keeps its inputs."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.calls = unet, []

    @property
    def config(self):
        return self.unet.config

    def forward(self, x, t, text, cross_attention_kwargs=None):
        self.calls.append((x.clone(), text.clone(), cross_attention_kwargs))
        return self.unet(x, t, text, cross_attention_kwargs=cross_attention_kwargs)


def test_sampler_cfg_removes_image_and_text_in_the_unconditional_branch():
    from chibisplat.training.inference import inference_cameras
    from chibisplat.training.objective import noise_scheduler, sample_latents

    stack = tiny_model_stack(0, image_conditioned=True)
    rec = Recorder(stack.unet)
    c2w, intr = inference_cameras(20.0, 1.4)
    cond = torch.randn(1, 4, 8, 8)
    prompt, null = torch.randn(1, 77, 768), torch.randn(77, 768)
    config = dict(noise_scheduler(stack, "v_prediction").config)
    sample_latents(rec, stack, config, prompt, null, c2w, intr, 64, 2, 2.0, 0, "ddim", cond)
    x, text, kw = rec.calls[0]
    assert kw == {"num_views": 5} and x.shape == (10, 11, 8, 8)
    x = x.reshape(2, 5, 11, 8, 8)  # [unconditional, conditional] x [condition view, 4 views]
    assert torch.equal(x[0, 0, :4], torch.zeros(4, 8, 8)) and torch.equal(x[1, 0, :4], cond[0])
    assert (x[:, 0, 10] == 0).all() and (x[:, 1:, 10] == 1).all()
    assert torch.equal(text[:5], null[None].expand(5, -1, -1)) and torch.equal(text[5:], prompt.expand(5, -1, -1))


# ---------------------------------------------------------------------------------------------------------------
# Preparing a user's drawing.


def _drawing(h=256, w=128, bg=(200, 230, 250)):
    img = np.empty((h, w, 3), np.uint8)
    img[:] = bg
    img[40:140, 48:96] = (200, 40, 40)  # the character: a 100 x 48 block
    img[80:100, 64:80] = bg  # a background-coloured patch inside it (not connected to the border)
    return img


def test_border_matte_keeps_enclosed_background_colour_and_alpha_wins():
    img = _drawing()
    alpha, method = foreground_alpha(img)
    assert "border-colour matte" in method
    want = np.zeros((256, 128), np.float32)
    want[40:140, 48:96] = 1  # the enclosed patch stays foreground
    assert np.array_equal(alpha, want)
    rgba = np.dstack([img, np.full((256, 128), 255, np.uint8)])
    rgba[:10, :10, 3] = 0  # an alpha channel that says something else: it is used as it is
    alpha2, method2 = foreground_alpha(rgba)
    assert method2 == "alpha channel" and alpha2[:10, :10].max() == 0 and alpha2[10:, 10:].min() == 1


def test_prepare_recentres_with_diffsplats_border_by_hand():
    # 256 x 128 -> longer side 64: scale 1/4, the block rows 40..140, cols 48..96 -> rows 10..35, cols 12..24 (25 x 12)
    # bbox longer side -> int(64 * 0.8) = 51: scale 51/25, block 51 x int(12 * 2.04) = 24,
    # top (64 - 51) // 2 = 6, left (64 - 24) // 2 = 20
    rgb, alpha, _ = prepare_condition_image(_drawing(), 64)
    want = torch.zeros(64, 64)
    want[6:57, 20:44] = 1
    assert torch.allclose(alpha[0], want, atol=1e-6)
    assert torch.equal(rgb[:, 0, 0], torch.ones(3))  # white background (DiffSplat composites on white)
    assert torch.allclose(rgb[:, 10, 22], torch.tensor([200, 40, 40]) / 255.0, atol=1e-6)
    with pytest.raises(ValueError, match="no foreground"):
        prepare_condition_image(np.full((32, 32, 3), 7, np.uint8), 16)


# ---------------------------------------------------------------------------------------------------------------
# End to end: a tiny image-conditioned fine-tune and `generate --image`.


@pytest.fixture(scope="module")
def tiny_image_data(tmp_path_factory):
    """Synthetic characters packed, embedded (seeded random embeddings) and encoded by the tiny stack at 32 px."""
    import pyarrow.parquet as pq
    from synthetic_renders import make_packed

    from chibisplat.dataset.embeddings import embeddings_table
    from chibisplat.training.latents import build_latents

    root = tmp_path_factory.mktemp("image_data")
    packed = make_packed(root, n=5, size=64, val_fraction=0.5)  # chibi_04 in val (uid hash), the others in train
    captions = [f"a chibi character number {k}" for k in range(5)]
    emb = torch.randn(6, 77, 768, generator=torch.Generator().manual_seed(0)).numpy().astype(np.float32)
    embeddings = root / "prompt_embeds.parquet"
    pq.write_table(embeddings_table([""] + captions, emb, "test-encoder"), embeddings)
    params = section_params("latents", packed_dir=packed, embeddings=embeddings, out_dir=root / "latents",
                            resolution=32, render_resolution=32, device="cpu")
    build_latents(params, models_params(image_conditioned=True), log=lambda *_: None)
    return root, packed, root / "latents", embeddings


def _params(root: Path, packed: Path, latents: Path, embeddings: Path, **train) -> dict:
    params = project_params()
    params["models"].update(image_conditioned=True, finetuned=None)
    params["train"].update(latents_dir=str(latents), embeddings=str(embeddings), packed_dir=str(packed),
                           out_dir=str(root / "models"), metrics_dir=str(root / "metrics"), log_every=5, **train)
    return params


def test_tiny_image_conditioned_fine_tune_loss_drops(tiny_image_data, tmp_path):
    from chibisplat.training.image_condition import object_condition_slots, packed_condition_images
    from chibisplat.protocol import EVEN_VIEW_SETS
    from chibisplat.training.latents import load_latent_set
    from chibisplat.training.train import train

    _, packed, latents, embeddings = tiny_image_data
    data = load_latent_set(latents, "train", embeddings)
    slots = object_condition_slots(latents, "train")
    assert len(slots) == len(data) and [s for _, s in slots[:9]] == [v[0] for v in EVEN_VIEW_SETS]
    images = packed_condition_images(packed, "train", slots, 32, log=lambda *_: None)
    assert images.shape == (len(data), 3, 32, 32) and images[:, :, 0, 0].min() == 1.0  # RGB on white
    steps = 40
    logs = []
    params = _params(tmp_path / "a", packed, latents, embeddings, max_steps=steps, checkpointing_steps=steps)
    cfg = project_config(params)
    result = train(cfg.train, cfg.models, log=logs.append)
    assert any("condition views" in line for line in logs)
    # the same run with lr 0 draws the same batches, timesteps, noise and CFG drops: a like-for-like baseline
    frozen_params = _params(tmp_path / "b", packed, latents, embeddings, max_steps=steps, checkpointing_steps=steps,
                            lr=0.0)
    frozen_cfg = project_config(frozen_params)
    frozen = train(frozen_cfg.train, frozen_cfg.models, log=lambda *_: None)
    k = steps // 10
    first, last = sum(result.losses[:k]) / k, sum(result.losses[-k:]) / k
    f_last = sum(frozen.losses[-k:]) / k
    print(f"image-conditioned fine-tune: loss {first:.4f} -> {last:.4f}; frozen UNet on the same draws {f_last:.4f}")
    assert last < 0.8 * first and last < 0.6 * f_last, (first, last, f_last)
    from chibisplat.models.gsdiff import is_image_conditioned, load_mv_unet

    unet = load_mv_unet(tmp_path / "a" / "models" / "unet")
    assert is_image_conditioned(unet) and unet.config.in_channels == 11


def test_generate_from_an_image_writes_views_ply_turntable(tiny_image_data, tmp_path):
    from chibisplat.cli import main
    from chibisplat.splats.ply import read_ply

    stack = tiny_model_stack(0, image_conditioned=True)
    stack.unet.save_pretrained(str(tmp_path / "unet"))
    params = project_params()
    params["embed"]["tiny_cache_dir"] = str(tmp_path / "text_encoder")
    params["latents"]["resolution"] = 32
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    drawing = tmp_path / "drawing.png"
    imageio.imwrite(drawing, _drawing())
    common = ["--params", str(tmp_path / "params.yaml"), "--unet", str(tmp_path / "unet"), "--steps", "2",
              "--frames", "3", "--resolution", "32"]
    assert main(["generate", "--image", str(drawing), "--out", str(tmp_path / "a")] + common) == 0
    views = imageio.imread(tmp_path / "a" / "views.png")
    assert views.shape[:2] == (32, 160)  # the prepared input, then the 4 generated views
    want, _, _ = prepare_condition_image(_drawing(), 32)
    shown = (want.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    # (the top rows carry the cell's label)
    assert np.abs(views[16:, :32, :3].astype(int) - shown[16:].astype(int)).max() <= 1
    assert (shown[16:] != 255).any()  # the character is in the compared part
    g = read_ply(tmp_path / "a" / "splat.ply")
    assert len(g) > 0 and torch.isfinite(g.means).all()
    assert len(imageio.mimread(tmp_path / "a" / "turntable.gif")) == 3
    # the image conditions the result: another drawing, other splats; the same drawing, the same splats
    other = _drawing(bg=(20, 20, 20))
    other[40:140, 50:100] = (40, 200, 90)
    imageio.imwrite(tmp_path / "other.png", other)
    assert main(["generate", "--image", str(tmp_path / "other.png"), "--out", str(tmp_path / "b")] + common) == 0
    assert main(["generate", "--image", str(drawing), "--out", str(tmp_path / "c")] + common) == 0
    assert (tmp_path / "a" / "splat.ply").read_bytes() == (tmp_path / "c" / "splat.ply").read_bytes()
    assert (tmp_path / "a" / "splat.ply").read_bytes() != (tmp_path / "b" / "splat.ply").read_bytes()


def test_generate_image_with_a_text_unet_is_a_clear_error(tmp_path, capsys):
    from chibisplat.cli import main

    tiny_model_stack(0).unet.save_pretrained(str(tmp_path / "unet"))
    params = project_params()
    params["embed"]["tiny_cache_dir"] = str(tmp_path / "text_encoder")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    imageio.imwrite(tmp_path / "d.png", _drawing())
    rc = main(["generate", "--image", str(tmp_path / "d.png"), "--out", str(tmp_path / "o"), "--params",
               str(tmp_path / "params.yaml"), "--unet", str(tmp_path / "unet")])
    assert rc == 1
    assert "text-conditioned (conv_in 10)" in capsys.readouterr().err


def test_evaluate_image_model_previews_from_the_val_front_view(tiny_image_data, tmp_path):
    from safetensors import safe_open

    from chibisplat.training.evaluate import evaluate

    _, packed, latents, embeddings = tiny_image_data
    models = models_params(image_conditioned=True)
    tiny_model_stack(0, image_conditioned=True).unet.save_pretrained(str(tmp_path / "unet"))  # = the base UNet
    params = section_params(
        "evaluate", packed_dir=str(packed), latents_dir=str(latents), embeddings=str(embeddings),
        unet=str(tmp_path / "unet"), metrics=str(tmp_path / "evaluate.json"), previews_dir=str(tmp_path / "previews"),
        view_sets=(0,), render_resolution=32, steps=2, rasterizer="torch", val_batches=2,
    )
    logs = []
    metrics = evaluate(params, models, resolution=32, log=logs.append)
    assert any("front view slot 0" in line for line in logs)  # conditioned on view set 0's first slot: the front
    assert 0 < metrics["image_cond_psnr"] < 60 and metrics["image_cond_psnr"] == metrics["image_cond_psnr_base"]
    assert metrics["val_diffusion_loss"] > 0
    sheet = imageio.imread(tmp_path / "previews" / "generated_chibi_04.png")
    assert sheet.shape[:2] == (3 * 32, 4 * 32)  # ground truth, base, fine-tuned
    with safe_open(str(latents / "val" / "chibi_04.safetensors"), framework="pt") as f:
        gt = f.get_tensor("target_rgba")[0, :4, :3]  # view set 0's 4 input views, RGB on white
    want = np.concatenate([v.permute(1, 2, 0).numpy() for v in gt], axis=1)
    assert np.abs(sheet[18:32, :, :3].astype(int) - want[18:32].astype(int)).max() <= 1  # below the labels
    assert (want[18:32] < 250).any()  # the character is in the compared band
