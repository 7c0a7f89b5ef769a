"""The evaluate stage's library: metrics JSON content and preview PNGs (tiny models, small renders)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from project_config import models_params, section_params
from test_train import fake_latent_dir

from chibisplat.training.evaluate import evaluate, psnr, ssim

REPO = Path(__file__).resolve().parents[1]


def test_psnr_ssim_basics():
    x = torch.rand(1, 3, 32, 32)
    assert psnr(x, x) == float("inf") and ssim(x, x) == pytest.approx(1.0, abs=1e-6)


def ssim_by_hand(x: np.ndarray, y: np.ndarray, win: int = 7) -> float:
    """skimage ``structural_similarity(data_range=1)`` defaults, window by window in float64: a 7x7 uniform window,
    sample (N - 1) covariances, K1 = 0.01, K2 = 0.03, mean over the windows that fit inside the image and over
    channels (and images)."""
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    vals = []
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            for i in range(x.shape[2] - win + 1):
                for j in range(x.shape[3] - win + 1):
                    a = x[n, c, i:i + win, j:j + win].ravel()
                    b = y[n, c, i:i + win, j:j + win].ravel()
                    ma, mb = a.mean(), b.mean()
                    va, vb = a.var(ddof=1), b.var(ddof=1)
                    cov = ((a - ma) * (b - mb)).sum() / (a.size - 1)
                    vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma * ma + mb * mb + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_psnr_ssim_values_by_hand():
    # Constant images: MSE 0.01 -> 20 dB exactly; SSIM = (2*0.5*0.6 + C1) / (0.5^2 + 0.6^2 + C1) (no variance).
    x = torch.full((1, 3, 9, 10), 0.5, dtype=torch.float64)
    assert psnr(x, x + 0.1) == pytest.approx(20.0, abs=1e-12)
    assert ssim(x, x + 0.1) == pytest.approx((0.6 + 1e-4) / (0.61 + 1e-4), abs=1e-12)
    # Fixed non-trivial images, non-square, 2 images x 3 channels: the mean over every valid 7x7 window.
    g = np.random.default_rng(5)
    a = g.random((2, 3, 11, 9))
    b = np.clip(a + 0.2 * g.standard_normal(a.shape) + np.linspace(-0.1, 0.1, 9), 0, 1)
    mse = np.mean((a - b) ** 2)
    assert psnr(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(10 * np.log10(1 / mse), abs=1e-10)
    expected = ssim_by_hand(a, b)
    assert 0.2 < expected < 0.9  # a case where the window statistics matter
    assert ssim(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected, abs=1e-10)
    # float32 images (what evaluate passes) agree to float32 precision.
    assert ssim(torch.from_numpy(a).float(), torch.from_numpy(b).float()) == pytest.approx(expected, abs=2e-5)


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
    params = section_params(
        "evaluate", packed_dir=str(packed), latents_dir=str(latents), embeddings=str(embeddings),
        unet=str(tmp_path / "unet"), metrics=str(tmp_path / "evaluate.json"), previews_dir=str(tmp_path / "previews"),
        view_sets=(0,), render_resolution=32, steps=2, rasterizer="torch",
    )
    metrics = evaluate(params, models_params(), resolution=64, log=lambda *_: None)
    on_disk = json.loads((tmp_path / "evaluate.json").read_text())
    assert on_disk == metrics
    assert set(on_disk) >= {"recon_psnr", "recon_ssim", "recon_lpips", "recon_views", "val_diffusion_loss", "notes"}
    assert on_disk["recon_lpips"] is None and "LPIPS is null" in on_disk["notes"][0]
    assert on_disk["recon_views"] == 4 * n_val and 0 < on_disk["recon_psnr"] < 60 and -1 <= on_disk["recon_ssim"] <= 1
    assert on_disk["val_diffusion_loss"] > 0
    pngs = sorted(p.name for p in (tmp_path / "previews").glob("*.png"))
    assert any(p.startswith("recon_") for p in pngs) and "generated_char2.png" in pngs


def test_evaluate_view_sets_are_checked():
    from project_config import project_config, project_params

    params = project_params()
    params["evaluate"]["view_sets"] = [9]
    with pytest.raises(ValueError, match="view_sets"):
        project_config(params, validate=True)
