"""`chibisplat generate`: views PNG, a PLY that read_ply reads back, a turntable GIF with N frames."""

from __future__ import annotations

from pathlib import Path

import imageio.v2 as imageio

import torch
import yaml
from project_config import project_params

from chibisplat.cli import main
from chibisplat.splats.ply import read_ply
from chibisplat.training.inference import inference_cameras

REPO = Path(__file__).resolve().parents[1]


def test_inference_cameras_diffsplat_convention():
    c2w, intr = inference_cameras(10.0, 1.4)
    pos = c2w[:, :3, 3]
    assert torch.allclose(pos.norm(dim=-1), torch.full((4,), 1.4), atol=1e-5)
    assert pos[0, 2] > 1.3 and pos[1, 0] > 1.3  # azimuth 0 on +z, 90 on +x
    assert (pos[:, 1] > 0).all()  # elevation 10: above the object (y up)
    assert intr.shape == (4, 4)


def test_generate_cli_writes_ply_and_gif(tmp_path):
    from chibisplat.models.sources import tiny_model_stack

    tiny_model_stack(0).unet.save_pretrained(str(tmp_path / "unet"))
    params = project_params()
    params["embed"]["tiny_cache_dir"] = str(tmp_path / "text_encoder")
    params["latents"]["resolution"] = 64
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "out"
    rc = main(["generate", "a chibi witch with a big hat", "--out", str(out), "--params", str(tmp_path / "params.yaml"),
               "--unet", str(tmp_path / "unet"), "--steps", "2", "--frames", "5", "--resolution", "32"])
    assert rc == 0
    g = read_ply(out / "splat.ply")
    assert len(g) > 0 and g.means.shape[1] == 3 and torch.isfinite(g.means).all()
    frames = imageio.mimread(out / "turntable.gif")
    assert len(frames) == 5 and frames[0].shape[:2] == (32, 32)
    assert imageio.imread(out / "views.png").shape[:2] == (32, 128)


def test_generate_without_trained_unet_is_a_clear_error(tmp_path, capsys):
    rc = main(["generate", "x", "--out", str(tmp_path), "--unet", str(tmp_path / "none")])
    assert rc == 1
    assert "run the train stage" in capsys.readouterr().err
