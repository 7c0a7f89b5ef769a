"""The evaluate stage's library: metrics JSON content and preview PNGs (tiny models, small renders)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from chibisplat.training.evaluate import EvaluateParams, evaluate, psnr, ssim
from test_train import fake_latent_dir

REPO = Path(__file__).resolve().parents[1]


def test_psnr_ssim_basics():
    x = torch.rand(1, 3, 32, 32)
    assert psnr(x, x) == float("inf") and ssim(x, x) == pytest.approx(1.0, abs=1e-6)
    y = (x + 0.1).clamp(0, 1)
    assert 10 < psnr(x, y) < 30 and ssim(x, y) < 1.0


def test_evaluate_writes_metrics_and_previews(tmp_path):
    import pyarrow.parquet as pq
    from synthetic_renders import make_packed

    from chibisplat.dataset.pack import packed_files
    from chibisplat.models.sources import tiny_model_stack

    # A val split of its own (synthetic renders in the contract's format), so the test runs in a fresh clone too.
    packed = make_packed(tmp_path / "data", n=2, size=64, val_fraction=0.99)
    n_val = sum(pq.ParquetFile(f).metadata.num_rows for f in packed_files(packed, "val"))
    assert n_val >= 1
    latents, embeddings = fake_latent_dir(tmp_path)
    tiny_model_stack(0).unet.save_pretrained(str(tmp_path / "unet"))
    params = EvaluateParams(
        packed_dir=str(packed), latents_dir=str(latents), embeddings=str(embeddings),
        unet=str(tmp_path / "unet"), metrics=str(tmp_path / "evaluate.json"), previews_dir=str(tmp_path / "previews"),
        view_sets=(0,), render_resolution=32, steps=2, rasterizer="torch",
    )
    metrics = evaluate(params, {"source": "tiny", "seed": 0}, resolution=64, log=lambda *_: None)
    on_disk = json.loads((tmp_path / "evaluate.json").read_text())
    assert on_disk == metrics
    assert set(on_disk) >= {"recon_psnr", "recon_ssim", "recon_lpips", "recon_views", "val_diffusion_loss", "notes"}
    assert on_disk["recon_lpips"] is None and "LPIPS is null" in on_disk["notes"][0]
    assert on_disk["recon_views"] == 4 * n_val and 0 < on_disk["recon_psnr"] < 60 and -1 <= on_disk["recon_ssim"] <= 1
    assert on_disk["val_diffusion_loss"] > 0
    pngs = sorted(p.name for p in (tmp_path / "previews").glob("*.png"))
    assert any(p.startswith("recon_") for p in pngs) and "generated_char2.png" in pngs


def test_evaluate_view_sets_are_checked():
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["evaluate"]["view_sets"] = [9]
    with pytest.raises(ValueError, match="view_sets"):
        EvaluateParams.from_params(params)
