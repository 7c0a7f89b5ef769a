"""GSRecon: published key layout, shapes, initial values and checkpoint round trips."""

import pytest
import torch
from accelerate import init_empty_weights

from chibisplat.geometry import normalised_intrinsics, opengl_to_opencv_camera, orbit_camera
from chibisplat.models.checkpoints import load_accelerate_checkpoint, save_accelerate_checkpoint
from chibisplat.models.gsrecon import GSRecon, patchify, unpatchify
from chibisplat.models.sources import TINY_GSRECON

BLOCK_KEYS = [
    "norm1.weight", "attn.wq.weight", "attn.wk.weight", "attn.wv.weight", "attn.wo.weight",
    "attn.q_norm.weight", "attn.q_norm.bias", "attn.k_norm.weight", "attn.k_norm.bias",
    "norm2.weight", "mlp.w1.weight", "mlp.w2.weight", "mlp.w3.weight",
]
TOP_KEYS = [
    "x_embedder.weight", "x_embedder.bias", "ln_out.weight", "ln_out.bias",
    "out_depth.weight", "out_rgb.weight", "out_scale.weight", "out_rotation.weight", "out_opacity.weight",
]
FULL_SHAPES = {
    "x_embedder.weight": (512, 960), "transformer.blocks.11.mlp.w1.weight": (1536, 512),
    "transformer.blocks.0.mlp.w2.weight": (512, 1536), "transformer.blocks.5.attn.q_norm.weight": (512,),
    "out_depth.weight": (64, 512), "out_rgb.weight": (192, 512), "out_scale.weight": (192, 512),
    "out_rotation.weight": (256, 512), "out_opacity.weight": (64, 512),
}


def tiny_inputs(b=1, v=4, res=32):
    c2w = opengl_to_opencv_camera(orbit_camera(torch.full((v,), -10.0), torch.arange(v) * 90.0, 1.4))
    return torch.rand(b, v, 9, res, res), c2w.expand(b, v, 4, 4), normalised_intrinsics().expand(b, v, 4)


def test_full_size_keys_shapes_and_parameter_count():
    with init_empty_weights():
        model = GSRecon()
    state = model.state_dict()
    expected = set(TOP_KEYS) | {f"transformer.blocks.{i}.{k}" for i in range(12) for k in BLOCK_KEYS}
    assert set(state) == expected
    for k, shape in FULL_SHAPES.items():
        assert tuple(state[k].shape) == shape, k
    assert sum(p.numel() for p in model.parameters()) == 41_817_600


def test_patchify_is_p1_p2_c():
    x = torch.randn(2, 3, 16, 24)
    tokens = patchify(x, 8)
    assert tokens.shape == (2, 6, 192)
    # token (row 1, col 2), within-patch (p1=3, p2=5), channel 1
    assert tokens[1, 1 * 3 + 2, (3 * 8 + 5) * 3 + 1] == x[1, 1, 8 + 3, 16 + 5]
    assert torch.equal(unpatchify(tokens, 8, 16, 24), x)


def test_tiny_forward_shapes_ranges_and_zero_init():
    torch.manual_seed(0)
    model = GSRecon(**TINY_GSRECON).eval()
    with torch.no_grad():
        out = model(*tiny_inputs(b=2))
    expected = {"depth": 1, "rgb": 3, "scale": 3, "rotation": 4, "opacity": 1}
    assert {k: v.shape for k, v in out.items()} == {k: (2, 4, c, 32, 32) for k, c in expected.items()}
    # Zero-initialised heads: depth 0, scale 0 (-> 0.01025 physical), opacity sigmoid(-2)*2-1.
    assert torch.allclose(out["depth"], torch.zeros(()), atol=1e-6)
    assert torch.allclose(out["scale"], torch.zeros(()), atol=1e-6)
    assert torch.allclose(out["opacity"], torch.sigmoid(torch.tensor(-2.0)) * 2 - 1, atol=1e-6)
    assert torch.allclose(out["rotation"].norm(dim=2), torch.ones(()), atol=1e-5)
    assert out["rgb"].abs().max() <= 1


def test_views_attend_jointly():
    torch.manual_seed(0)
    model = GSRecon(**TINY_GSRECON).eval()
    torch.nn.init.normal_(model.out_depth.weight)
    images, c2w, f = tiny_inputs()
    with torch.no_grad():
        a = model(images, c2w, f)["depth"]
        images2 = images.clone()
        images2[:, 3] = 1 - images2[:, 3]
        b = model(images2, c2w, f)["depth"]
    assert not torch.allclose(a[:, 0], b[:, 0])


def test_save_pretrained_round_trip(tmp_path):
    torch.manual_seed(1)
    model = GSRecon(**TINY_GSRECON)
    model.save_pretrained(tmp_path / "gsrecon")
    assert (tmp_path / "gsrecon" / "config.json").is_file()
    loaded = GSRecon.from_pretrained(tmp_path / "gsrecon")
    assert loaded.config.dim == 64
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


def test_published_accelerate_layout_round_trip(tmp_path):
    torch.manual_seed(2)
    model = GSRecon(**TINY_GSRECON)
    tag = tmp_path / "gsrecon_gobj265k_cnp_even4"
    save_accelerate_checkpoint(model, tag, 124320)
    save_accelerate_checkpoint(GSRecon(**TINY_GSRECON), tag, 1000)
    assert (tag / "checkpoints" / "124320" / "model.safetensors").is_file()
    loaded = GSRecon(**TINY_GSRECON)
    path = load_accelerate_checkpoint(loaded, tag)  # latest iteration
    assert path.parent.name == "124320"
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="missing|shape"):
        load_accelerate_checkpoint(GSRecon(**dict(TINY_GSRECON, num_blocks=3)), tag)
