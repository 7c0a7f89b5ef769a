"""The finetune stage: optional GSRecon / GSVAE fine-tuning in image space, used downstream via models.finetuned."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from project_config import committed_text, models_params, project_config, project_params, section_params
from synthetic_renders import make_packed

from chibisplat.models.sources import ModelSourceError, load_model_stack
from chibisplat.training import finetune as ft
from chibisplat.config import FinetuneParams
from chibisplat.training.finetune import NonFiniteLoss, finetune, read_manifest
from chibisplat.training.latents import model_identity

REPO = Path(__file__).resolve().parents[1]
QUIET = dict(log=lambda *_: None)


def _packed(root: Path, size: int) -> Path:
    return make_packed(root, n=4, size=size, num_shards=2)


@pytest.fixture(scope="module")
def packed16(tmp_path_factory) -> Path:
    return _packed(tmp_path_factory.mktemp("ft16"), 16)


def _params(packed: Path, out: Path, **kw) -> FinetuneParams:
    base = dict(packed_dir=str(packed), out_dir=str(out / "finetune"), metrics_dir=str(out / "metrics"),
                resolution=16, render_resolution=16, gsrecon_steps=2, gsvae_steps=2, gsvae_tiny_decoder_steps=1,
                gsrecon_lr=1e-3, gsvae_lr=1e-3, lr_scheduler="constant", rasterizer="torch", log_every=1)
    return section_params("finetune", **(base | kw))


def _models(out: Path | None, **kw):
    return models_params(finetuned=out, **kw)


def test_repository_params_parse_and_default_to_off():
    committed = yaml.safe_load(committed_text("params.yaml"))  # the defaults a fresh clone gets
    assert committed["finetune"]["gsrecon"] is False and committed["finetune"]["gsvae"] is False
    assert committed["models"]["finetuned"] == committed["finetune"]["out_dir"]  # where the finetune stage writes
    params = project_params()
    p = project_config(params).finetune
    assert not p.gsrecon and not p.gsvae and not p.enabled
    params["models"]["source"] = "pretrained"
    # The real preset fine-tunes GSRecon at the resolution it then encodes the latents at.
    assert project_config(params).finetune.resolution == params["latents"]["presets"]["pretrained"]["resolution"]
    params["finetune"]["resolution"] = 100
    with pytest.raises(ValueError, match="multiple of 8"):
        project_config(params, validate=True)


def test_off_writes_a_manifest_and_keeps_the_base_models(packed16, tmp_path):
    p = _params(packed16, tmp_path)
    result = finetune(p, _models(None), **QUIET)
    manifest = read_manifest(Path(p.out_dir))
    assert not result.skipped and manifest["gsrecon"] is None and manifest["gsvae"] is None
    assert json.loads((tmp_path / "metrics" / "metrics.json").read_text()) == {"finetune": {"enabled": False}}
    base = load_model_stack(_models(None))
    applied = load_model_stack(_models(Path(p.out_dir)))
    assert model_identity(applied) == model_identity(base)
    assert finetune(p, _models(None), **QUIET).skipped  # nothing to do the second time


def test_finetuned_modules_are_saved_loaded_and_used_downstream(packed16, tmp_path):
    p = _params(packed16, tmp_path, gsrecon=True, gsvae=True)
    result = finetune(p, _models(None), **QUIET)
    out = Path(p.out_dir)
    manifest = read_manifest(out)
    assert manifest["gsrecon"] == "gsrecon" and manifest["gsvae"] == "gsvae"
    assert manifest["steps"] == {"gsrecon": 2, "gsvae": 2, "gsvae_tiny_decoder": 1}
    assert [len(result.losses[k]) for k in ("gsrecon", "gsvae", "gsvae_tiny_decoder")] == [2, 2, 1]
    assert not list(out.parent.glob(".tmp-*")) and not list(out.parent.glob(".old-*"))

    base = load_model_stack(_models(None))
    tuned = load_model_stack(_models(out))
    # The latents cache keys on these weights, so every character is re-encoded with the fine-tuned modules.
    assert model_identity(tuned) != model_identity(base)
    for name in ("gsrecon", "gsvae"):
        a, b = getattr(base, name).state_dict(), getattr(tuned, name).state_dict()
        assert a.keys() == b.keys()
        assert any(not torch.equal(a[k], b[k]) for k in a), f"{name} was not changed by fine-tuning"
    # Stage B trains only the tiny decoder on top of stage A's vae: both differ from the base.
    tiny_keys = [k for k in base.gsvae.state_dict() if k.startswith("tiny_decoder.")]
    assert any(not torch.equal(base.gsvae.state_dict()[k], tuned.gsvae.state_dict()[k]) for k in tiny_keys)
    # The UNet is never touched here.
    assert all(torch.equal(v, tuned.unet.state_dict()[k]) for k, v in base.unet.state_dict().items())
    # dvclive logged every phase.
    tsv = {t.relative_to(tmp_path / "metrics").as_posix() for t in (tmp_path / "metrics").rglob("*.tsv")}
    assert {"plots/metrics/gsrecon/loss.tsv", "plots/metrics/gsvae/latent_mse.tsv",
            "plots/metrics/gsvae_tiny_decoder/render_loss.tsv"} <= tsv, tsv

    # Same settings and data: skipped. Another setting: redone.
    assert finetune(p, _models(None), **QUIET).skipped
    assert not finetune(dataclasses.replace(p, gsvae=False), _models(None), **QUIET).skipped
    assert read_manifest(out)["gsvae"] is None and not (out / "gsvae").exists()


def test_a_finetune_of_other_base_models_is_refused(packed16, tmp_path):
    p = _params(packed16, tmp_path, gsrecon=True, gsvae_steps=0, gsvae_tiny_decoder_steps=0)
    finetune(p, _models(None), **QUIET)
    with pytest.raises(ModelSourceError, match="dvc repro finetune"):
        load_model_stack(_models(Path(p.out_dir), seed=1))
    (Path(p.out_dir) / "gsrecon" / "config.json").unlink()
    with pytest.raises(ModelSourceError, match="missing"):
        load_model_stack(_models(Path(p.out_dir)))


def test_nan_loss_stops_and_keeps_the_previous_result(packed16, tmp_path, monkeypatch):
    p = _params(packed16, tmp_path, gsrecon=True, gsrecon_steps=1, gsvae_steps=0, gsvae_tiny_decoder_steps=0)
    finetune(p, _models(None), **QUIET)

    def files(folder):
        return {f.relative_to(folder): f.read_bytes() for f in Path(folder).rglob("*") if f.is_file()}

    before, before_metrics = files(p.out_dir), files(p.metrics_dir)
    assert Path(p.out_dir, "gsrecon", "config.json").relative_to(p.out_dir) in before and before_metrics

    real = ft.gsrecon_step_loss
    calls = []

    def poisoned(stack, batch, params, lpips):
        out = real(stack, batch, params, lpips)
        calls.append(1)
        if len(calls) == 2:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(ft, "gsrecon_step_loss", poisoned)
    with pytest.raises(NonFiniteLoss, match=r"step 2: the loss is nan .*keeps its previous contents"):
        finetune(dataclasses.replace(p, gsrecon_steps=3), _models(None), **QUIET)
    assert files(p.out_dir) == before and files(p.metrics_dir) == before_metrics  # the last good fine-tune and curves
    assert not list(Path(p.out_dir).parent.glob(".tmp-*")) and not list(Path(p.metrics_dir).parent.glob(".tmp-*"))


def test_refuses_to_run_in_several_processes(packed16, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="one process"):
        finetune(_params(packed16, tmp_path, gsrecon=True), _models(None), **QUIET)
    assert not (tmp_path / "finetune").exists()


def test_stage_reports_missing_packed_data(tmp_path):
    params = project_params()
    params["finetune"].update(gsrecon=True, packed_dir=str(tmp_path / "nothing"), out_dir=str(tmp_path / "ft"),
                              metrics_dir=str(tmp_path / "m"))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    r = subprocess.run([sys.executable, "-m", "stages.finetune", "--params", str(tmp_path / "p.yaml")], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "run the pack stage" in r.stderr, r.stderr
    assert not (tmp_path / "ft").exists()


@pytest.mark.slow
def test_gsrecon_finetune_lowers_the_rendering_loss_and_lr0_does_not(tmp_path):
    """30 steps at 32 px on synthetic chibis: loss 0.29 -> 0.10 at lr 1e-3 (measured); lr 0 stays at ~0.30."""
    packed = _packed(tmp_path / "data", 32)
    drops = {}
    for lr in (1e-3, 0.0):
        p = _params(packed, tmp_path / f"lr{lr}", gsrecon=True, resolution=32, render_resolution=32,
                    gsrecon_steps=30, gsrecon_lr=lr, log_every=10)
        losses = finetune(p, _models(None), **QUIET).losses["gsrecon"]
        drops[lr] = (sum(losses[-3:]) / 3) / (sum(losses[:3]) / 3)
    assert drops[1e-3] < 0.6, drops
    assert drops[0.0] > 0.9, drops
