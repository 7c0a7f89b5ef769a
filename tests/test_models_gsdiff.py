"""GSDiff: SD1.5 UNet keys, widened conv_in, multi-view self-attention, DiffSplat folder layout."""

import json

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel

from chibisplat.geometry import normalised_intrinsics, opengl_to_opencv_camera, orbit_camera
from chibisplat.models.gsdiff import (
    SD15_UNET_CONFIG,
    MultiViewSelfAttnProcessor,
    load_mv_unet,
    mv_unet_config,
    build_mv_unet,
    mv_unet_input,
    plucker_condition,
    widen_conv_in,
)
from chibisplat.models.sources import TINY_UNET


def tiny_unet4(seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(**dict(TINY_UNET, sample_size=8))


def test_full_size_keys_equal_sd15_and_conv_in_is_10_channels():
    with init_empty_weights():
        mv = build_mv_unet(mv_unet_config())
        sd = UNet2DConditionModel(**SD15_UNET_CONFIG)
    mv_state, sd_state = mv.state_dict(), sd.state_dict()
    assert set(mv_state) == set(sd_state) and len(mv_state) == 686
    assert tuple(mv_state["conv_in.weight"].shape) == (320, 10, 3, 3)
    assert all(mv_state[k].shape == sd_state[k].shape for k in sd_state if k != "conv_in.weight")
    assert sum(p.numel() for p in sd.parameters()) == 859_520_964
    assert sum(p.numel() for p in mv.parameters()) == 859_520_964 + 320 * 6 * 9
    assert mv.config.input_concat_plucker and not mv.config.input_concat_binary_mask
    n_attn1 = sum(isinstance(p, MultiViewSelfAttnProcessor) for p in mv.attn_processors.values())
    assert n_attn1 == 16  # every BasicTransformerBlock of SD1.5 (6 down + 1 mid + 9 up)


def test_widened_unet_starts_as_the_4_channel_unet():
    unet4 = tiny_unet4().eval()
    mv = widen_conv_in(unet4, 10, sample_size=8).eval()
    assert torch.equal(mv.conv_in.weight[:, 4:], torch.zeros_like(mv.conv_in.weight[:, 4:]))
    latents, text = torch.randn(4, 4, 8, 8), torch.randn(4, 77, 768)
    t = torch.tensor([500] * 4)
    with torch.no_grad():
        ref = unet4(latents, t, text).sample
        out = mv(torch.cat([latents, torch.randn(4, 6, 8, 8)], 1), t, text, cross_attention_kwargs={"num_views": 1}).sample
    assert torch.allclose(ref, out, atol=1e-5)  # one view per object = SD's own attention


def test_views_of_one_object_attend_to_each_other_only():
    mv = widen_conv_in(tiny_unet4(), 10, sample_size=8).eval()
    x, text, t = torch.randn(8, 10, 8, 8), torch.randn(8, 77, 768), torch.tensor([10] * 8)
    x2 = x.clone()
    x2[1] += 1.0  # perturb view 1 of object 0
    with torch.no_grad():
        a = mv(x, t, text, cross_attention_kwargs={"num_views": 4}).sample
        b = mv(x2, t, text, cross_attention_kwargs={"num_views": 4}).sample
    assert not torch.allclose(a[0], b[0])  # view 0 of the same object sees it
    assert torch.allclose(a[4:], b[4:], atol=1e-6)  # the other object does not


def test_plucker_condition_and_input_layout():
    c2w = opengl_to_opencv_camera(orbit_camera(torch.full((4,), -10.0), torch.arange(4) * 90.0, 1.4))
    p = plucker_condition(c2w, normalised_intrinsics().expand(4, 4), 256, 32)
    assert p.shape == (4, 6, 32, 32)
    x = mv_unet_input(torch.zeros(4, 4, 32, 32), p, generated_mask=torch.tensor([0, 1, 1, 1]))
    assert x.shape == (4, 11, 32, 32) and torch.equal(x[:, 4:10], p)
    assert x[0, 10].max() == 0 and x[1, 10].min() == 1


def test_diffsplat_unet_ema_folder_loads_strictly(tmp_path):
    mv = widen_conv_in(tiny_unet4(5), 10, sample_size=32)
    folder = tmp_path / "gsdiff_gobj83k_sd15__render" / "checkpoints" / "013020" / "unet_ema"
    mv.save_pretrained(folder)
    # Rewrite config.json as DiffSplat's UNetMV2DConditionModel writes it.
    cfg = json.loads((folder / "config.json").read_text())
    cfg["_class_name"] = "UNetMV2DConditionModel"
    cfg["down_block_types"] = ["CrossAttnDownBlockMV2D", "DownBlock2D"]
    cfg["up_block_types"] = ["UpBlock2D", "CrossAttnUpBlockMV2D"]
    cfg["mid_block_type"] = "UNetMidBlockMV2DCrossAttn"
    (folder / "config.json").write_text(json.dumps(cfg))
    loaded = load_mv_unet(folder)
    assert loaded.config.in_channels == 10 and loaded.config.input_concat_plucker
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in mv.state_dict().items())
    assert any(isinstance(p, MultiViewSelfAttnProcessor) for p in loaded.attn_processors.values())


def _diffsplat_folder(tmp_path, seed=5):
    """A tiny GSDiff UNet saved as DiffSplat's unet_ema (config naming the MV2D blocks)."""
    mv = widen_conv_in(tiny_unet4(seed), 10, sample_size=32)
    folder = tmp_path / "unet_ema"
    mv.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["down_block_types"] = ["CrossAttnDownBlockMV2D", "DownBlock2D"]
    cfg["up_block_types"] = ["UpBlock2D", "CrossAttnUpBlockMV2D"]
    (folder / "config.json").write_text(json.dumps(cfg))
    return mv, folder


@pytest.mark.parametrize("defect", ["missing", "extra", "mis-shaped"])
def test_unet_folder_with_a_wrong_key_is_refused_by_name(tmp_path, defect):
    from safetensors.torch import load_file, save_file

    _, folder = _diffsplat_folder(tmp_path)
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    if defect == "missing":
        del state[key]
    elif defect == "extra":
        key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_z.weight"
        state[key] = torch.zeros(3)
    else:
        state[key] = torch.zeros(7, 7)
    save_file(state, str(weights))
    with pytest.raises(ValueError) as e:
        load_mv_unet(folder)
    assert key in str(e.value) and str(folder) in str(e.value)
    expected = {"missing": "missing [", "extra": "unexpected [", "mis-shaped": "shape mismatches ["}[defect]
    assert f"{expected}{key}" in str(e.value)


def test_sharded_unet_folder_loads_every_shard(tmp_path):
    """diffusers' sharded layout (index.json -> several files): the weights of all shards, exactly."""
    from safetensors.torch import load_file, save_file

    mv, folder = _diffsplat_folder(tmp_path, seed=9)
    single = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(str(single))
    single.unlink()
    keys = sorted(state)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, str(folder / name))
        weight_map.update({k: name for k in part})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    loaded = load_mv_unet(folder)
    own = mv.state_dict()
    assert set(loaded.state_dict()) == set(own)
    assert all(torch.equal(v, own[k]) for k, v in loaded.state_dict().items())
    # A shard named by the index but absent is an error, not a silently partial model.
    (folder / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(Exception, match="00002-of-00002|No such file"):
        load_mv_unet(folder)
