"""GSVAE: published key layout, DiffSplat's tiled initialisation, encode/decode paths and round trips."""

import pytest
import torch
from accelerate import init_empty_weights

from chibisplat.models.checkpoints import load_accelerate_checkpoint, save_accelerate_checkpoint
from chibisplat.models.gsvae import GSAutoencoderKL, sd15_vae, taesd
from chibisplat.models.sources import TINY_TAESD, TINY_VAE
from chibisplat.splats.splatter import SPLATTER_CHANNELS, from_splatter_image, to_splatter_image

FULL_SHAPES = {
    "vae.encoder.conv_in.weight": (128, 12, 3, 3),
    "vae.encoder.conv_in.bias": (128,),
    "vae.decoder.conv_out.weight": (12, 128, 3, 3),
    "vae.decoder.conv_out.bias": (12,),
    "vae.quant_conv.weight": (8, 8, 1, 1),
    "vae.post_quant_conv.weight": (4, 4, 1, 1),
    "vae.encoder.down_blocks.3.resnets.1.conv2.weight": (512, 512, 3, 3),
    "vae.decoder.mid_block.attentions.0.to_q.weight": (512, 512),
    "tiny_decoder.layers.0.weight": (64, 4, 3, 3),
    "tiny_decoder.layers.18.weight": (12, 64, 3, 3),
    "tiny_decoder.layers.18.bias": (12,),
}


def tiny_rgb_parts(seed=0):
    torch.manual_seed(seed)
    return sd15_vae(**TINY_VAE), taesd(**TINY_TAESD)


def test_full_size_keys_and_parameter_counts():
    with init_empty_weights():
        model = GSAutoencoderKL()
    state = model.state_dict()
    assert {k.split(".")[0] for k in state} == {"vae", "tiny_decoder"}
    assert all(k.startswith("tiny_decoder.layers.") for k in state if k.startswith("tiny_decoder"))
    for k, shape in FULL_SHAPES.items():
        assert tuple(state[k].shape) == shape, k
    assert len(state) == 315
    assert sum(p.numel() for p in model.vae.parameters()) == 83_674_608
    assert sum(p.numel() for p in model.tiny_decoder.parameters()) == 1_227_724
    # Same keys as SD1.5's VAE under "vae." (only conv_in / conv_out widen).
    with init_empty_weights():
        sd_keys = set(sd15_vae().state_dict())
    assert {k[4:] for k in state if k.startswith("vae.")} == sd_keys


def test_channel_order_is_defined_once():
    assert [n for n, _ in SPLATTER_CHANNELS] == ["rgb", "scale", "rotation", "opacity", "depth"]
    x = torch.randn(2, 12, 4, 4)
    parts = from_splatter_image(x)
    assert torch.equal(parts["rotation"], x[:, 6:10]) and torch.equal(parts["depth"], x[:, 11:12])
    assert torch.equal(to_splatter_image(parts), x)


def test_tiled_initialisation_from_rgb_autoencoders():
    vae, tae = tiny_rgb_parts()
    model = GSAutoencoderKL.from_rgb_autoencoders(vae, tae)
    w = vae.encoder.conv_in.weight
    assert torch.equal(model.vae.encoder.conv_in.weight, torch.cat([w] * 4, dim=1))
    assert torch.equal(model.vae.encoder.conv_in.bias, vae.encoder.conv_in.bias)
    assert torch.equal(model.vae.decoder.conv_out.weight, torch.cat([vae.decoder.conv_out.weight] * 4, dim=0))
    assert torch.equal(model.vae.decoder.conv_out.bias, torch.cat([vae.decoder.conv_out.bias] * 4))
    last = model.tiny_decoder.layers[-1]
    assert torch.equal(last.weight, torch.cat([tae.decoder.layers[-1].weight] * 4, dim=0))
    assert torch.equal(model.vae.decoder.mid_block.resnets[0].conv1.weight, vae.decoder.mid_block.resnets[0].conv1.weight)


def test_encode_decode_and_tiny_decoder_quirks():
    model = GSAutoencoderKL.from_rgb_autoencoders(*tiny_rgb_parts()).eval()
    x = torch.rand(3, 12, 64, 64) * 2 - 1
    with torch.no_grad():
        z, kl = model.encode(x)
        z_again, _ = model.encode(x)
        assert torch.equal(z, z_again)  # eval: posterior mean
        assert z.shape == (3, 4, 8, 8) and kl.ndim == 0
        full = model.decode(z)
        tiny = model.decode(z, use_tiny_decoder=True)
        # DiffSplat: scale the latents, keep the KL-VAE post_quant_conv, then the tiny decoder.
        manual = model.tiny_decoder(model.vae.post_quant_conv(z * model.config.scaling_factor)).clamp(-1, 1)
    assert full.shape == tiny.shape == (3, 12, 64, 64)
    assert full.abs().max() <= 1 and tiny.abs().max() <= 1
    assert torch.allclose(tiny, manual)
    assert torch.allclose(model.unscale_latents(model.scale_latents(z)), z, atol=1e-6)
    model.train()
    z1, _ = model.encode(x)
    z2, _ = model.encode(x)
    assert not torch.equal(z1, z2)  # train: posterior sample


def test_round_trips(tmp_path):
    model = GSAutoencoderKL.from_rgb_autoencoders(*tiny_rgb_parts(3))
    model.save_pretrained(tmp_path / "gsvae")
    loaded = GSAutoencoderKL.from_pretrained(tmp_path / "gsvae")
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    save_accelerate_checkpoint(model, tmp_path / "gsvae_gobj265k_sd", 50)
    fresh = GSAutoencoderKL(**{k: v for k, v in model.config.items() if not k.startswith("_")})
    load_accelerate_checkpoint(fresh, tmp_path / "gsvae_gobj265k_sd", 50)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("defect", ["missing", "extra", "mis-shaped"])
def test_gsvae_checkpoint_with_a_wrong_key_is_refused_by_name(tmp_path, defect):
    from safetensors.torch import load_file, save_file

    model = GSAutoencoderKL.from_rgb_autoencoders(*tiny_rgb_parts(4))
    path = save_accelerate_checkpoint(model, tmp_path / "gsvae_gobj265k_sd", 7)
    state = load_file(str(path))
    key = "vae.decoder.conv_out.weight"
    if defect == "missing":
        del state[key]
    elif defect == "extra":
        key = "tiny_decoder.layers.99.weight"
        state[key] = torch.zeros(2)
    else:
        state[key] = state[key][:3].contiguous()  # an RGB conv_out where the GSVAE has 12 channels
    save_file(state, str(path))
    fresh = GSAutoencoderKL(**{k: v for k, v in model.config.items() if not k.startswith("_")})
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError) as e:
        load_accelerate_checkpoint(fresh, tmp_path / "gsvae_gobj265k_sd")
    expected = {"missing": "missing [", "extra": "unexpected [", "mis-shaped": "shape mismatches ["}[defect]
    assert f"{expected}{key}" in str(e.value) and str(path) in str(e.value)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in before.items())  # nothing half-loaded
