"""Device handling by construction (issue 9): one helper moves models and batches, and every stage's code runs with
its models on an accelerator without mixing devices.

There is no GPU here, so the accelerator is simulated (tests/device_guard.py): under ``FakeAccelerator`` the device
``meta`` plays CUDA with real CPU arithmetic, and any operation that mixes it with a host tensor fails the way CUDA
does ("Expected all tensors to be on the same device"). The stage functions then run end to end with
``device: meta`` (train: accelerate's device). This catches the two CUDA crashes seen on the H100: train's
rendering loss got the batch's C2W / fxfycxcy on the host while the decoded splatter was on the GPU, and evaluate's
val loss fed host inputs into the GPU UNet (tests below put both bugs back and watch the guard fail).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from project_config import models_params

from chibisplat.device import resolve_device, to_device
from device_guard import DeviceMix, FakeAccelerator, tagged

REPO = Path(__file__).resolve().parents[1]
# Where batches and models may only move through chibisplat/device.py.
SCANNED = sorted(
    [*REPO.glob("stages/*.py"), *REPO.glob("chibisplat/training/*.py"), *REPO.glob("chibisplat/models/*.py"),
     REPO / "chibisplat/cli.py", REPO / "chibisplat/dataset/embeddings.py", REPO / "chibisplat/dataset/text_encoder.py"]
)
# A move: .cuda(...), .to(<anything naming a device>), .to("cuda"/"cpu"/...), non_blocking copies.
STRAY_MOVE = re.compile(r"\.cuda\(|\.to\(.*device|\.to\(\s*[\"'](?:cuda|cpu|mps|meta)|\.to\(.*non_blocking")


def stray_moves(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if STRAY_MOVE.search(ln) and not ln.strip().startswith("#")]


def test_stray_move_pattern_matches_the_moves_it_must_forbid():
    bad = ["inputs = {k: v.to(device) for k, v in inputs.items()}", "x = x.cuda()", "y = t.to('cuda')",
           "a = alphas.to(noisy.device, noisy.dtype)", "lp = m(p.to(next(m.parameters()).device))",
           "b = batch.to(dev, non_blocking=True)"]
    ok = ["x = x.to(torch.uint8)", "m = to_device(model, device)", "z = torch.zeros(3, device=x.device)",
          "inp = mv_unet_input(a, b).to(dtype)"]
    assert [stray_moves(s) for s in bad] == [[s] for s in bad]
    assert [stray_moves(s) for s in ok] == [[] for _ in ok]


def test_stage_and_training_code_moves_tensors_only_through_the_helper():
    assert len(SCANNED) > 15
    found = {str(p.relative_to(REPO)): stray_moves(p.read_text()) for p in SCANNED}
    assert {k: v for k, v in found.items() if v} == {}, (
        "move batches and models with chibisplat.device.to_device (one place), not .to(device)/.cuda()")


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")
    with pytest.raises(ValueError, match=r"params.yaml latents.device = 'cuda' .*no CUDA GPU.*auto"):
        resolve_device("cuda", "params.yaml latents.device")
    with pytest.raises(ValueError, match="not a device"):
        resolve_device("gpu0", "params.yaml embed.device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match="only 1 CUDA device"):
        resolve_device("cuda:1")


def test_to_device_moves_everything_nested_once():
    @dataclass
    class B:
        x: torch.Tensor
        name: str

    module = torch.nn.Linear(2, 2)
    obj = {"a": [torch.zeros(2), (torch.ones(1), "keep")], "b": B(torch.zeros(3), "n"), "m": module, "k": 3}
    out = to_device(obj, "meta")
    assert out["a"][0].device.type == "meta" and out["a"][1][0].device.type == "meta" and out["a"][1][1] == "keep"
    assert isinstance(out["b"], B) and out["b"].x.device.type == "meta" and out["b"].name == "n"
    assert out["m"] is module and module.weight.device.type == "meta" and out["k"] == 3
    assert obj["b"].x.device.type == "cpu"  # a new dataclass instance; the input is not modified


def test_guard_fails_on_mixes_like_cuda():
    with FakeAccelerator():
        a, b = torch.ones(3).to("meta"), torch.ones(3)
        assert tagged(a) and a.device.type == "meta" and not tagged(b)
        with pytest.raises(DeviceMix):
            a + b
        assert tagged(a + torch.tensor(2.0))  # a host scalar is fine, as on CUDA
        assert tagged(torch.zeros(2, device=a.device)) and tagged(a[torch.tensor([0, 2])])  # host indices are fine
        assert not tagged(a.cpu()) and tagged(a)
        with pytest.raises(DeviceMix):
            a.numpy()


@pytest.fixture
def accelerate_on_meta(monkeypatch):
    """accelerate's Accelerator reports the simulated accelerator as its device (train and finetune use it)."""
    import accelerate

    monkeypatch.setattr(accelerate.Accelerator, "device", property(lambda self: torch.device("meta")))


def _train_params(tmp_path, **kw):
    from test_train import fake_latent_dir

    from project_config import section_params

    latents, embeddings = fake_latent_dir(tmp_path, n_chars=2, size=4, render_res=8)
    return section_params("train", latents_dir=str(latents), embeddings=str(embeddings), out_dir=str(tmp_path / "out"),
                          metrics_dir=str(tmp_path / "metrics"), max_steps=1, batch_size=1, mode="lora",
                          rendering_loss_prob=1.0, rasterizer="torch", checkpointing_steps=1, use_ema=True,
                          lr=1.0e-4, lr_warmup_steps=0, ema_decay=0.9999, log_every=10, **kw)


def test_train_stage_runs_on_an_accelerator_without_mixing(tmp_path, accelerate_on_meta):
    from chibisplat.training.train import train

    params = _train_params(tmp_path)
    logs = []
    with FakeAccelerator() as guard:
        result = train(params, models_params(), log=logs.append)
    assert result.steps == 1 and guard.ops > 1000
    assert any("render" in line and "step 1/1" in line for line in logs)  # the rendering loss ran on the device
    assert any("device meta" in line for line in logs)


def test_guard_catches_the_c2w_crash_of_the_first_gpu_run(tmp_path, accelerate_on_meta, monkeypatch):
    """The loop as it was: only the UNet inputs moved, the batch (cameras, targets) stayed on the host."""
    from chibisplat.training import train as train_module

    def inputs_only(item, device):
        return item["batch"], to_device(item["inputs"], device), item["render"]

    monkeypatch.setattr(train_module, "device_micro_batch", inputs_only)
    with FakeAccelerator(), pytest.raises(DeviceMix) as e:
        train_module.train(_train_params(tmp_path), models_params(), log=lambda *_: None)
    assert any("splatter_to_gaussians" in str(f.name) for f in e.traceback)


def _eval_setup(tmp_path, **kw):
    from synthetic_renders import make_packed
    from test_train import fake_latent_dir

    from chibisplat.models.sources import tiny_model_stack
    from project_config import section_params

    packed = make_packed(tmp_path / "data", n=2, size=32, val_fraction=0.99)
    latents, embeddings = fake_latent_dir(tmp_path, n_chars=2, size=4, render_res=8)
    tiny_model_stack(0).unet.save_pretrained(str(tmp_path / "unet"))
    return section_params(
        "evaluate", packed_dir=str(packed), latents_dir=str(latents), embeddings=str(embeddings), unet=str(tmp_path / "unet"),
        metrics=str(tmp_path / "evaluate.json"), previews_dir=str(tmp_path / "previews"), view_sets=(0,),
        render_resolution=16, steps=1, rasterizer="torch", device="meta", val_batches=1, **kw)


def test_evaluate_stage_runs_on_an_accelerator_without_mixing(tmp_path):
    from test_clip_score import tiny_clip_folder

    from chibisplat.training.evaluate import evaluate

    params = _eval_setup(tmp_path, clip={"path": str(tiny_clip_folder(tmp_path / "clip"))})
    with FakeAccelerator() as guard:
        metrics = evaluate(params, models_params(), resolution=32, log=lambda *_: None)
    assert guard.ops > 1000 and metrics["val_diffusion_loss"] > 0
    assert metrics["clip_score"] is not None and metrics["clip_score_base"] is not None


def test_guard_catches_the_val_loss_crash(tmp_path, monkeypatch):
    """evaluate's val loss as it was: host inputs into the UNet on the accelerator."""
    from chibisplat.training import evaluate as ev

    monkeypatch.setattr(ev, "to_device", lambda obj, device, non_blocking=False: obj
                        if isinstance(obj, dict) and "unet_input" in obj else to_device(obj, device))
    with FakeAccelerator(), pytest.raises(DeviceMix, match="accelerator"):
        ev.evaluate(_eval_setup(tmp_path), models_params(), resolution=32, log=lambda *_: None)


def test_generate_cli_runs_on_an_accelerator_without_mixing(tmp_path):
    from project_config import project_config, project_params

    from chibisplat.cli import TINY_NOTE, run_generate
    from chibisplat.models.sources import tiny_model_stack

    tiny_model_stack(0).unet.save_pretrained(str(tmp_path / "unet"))
    params = project_params()  # the tests' baseline, not this checkout's experiments (tests/project_config.py)
    params["embed"]["tiny_cache_dir"] = str(tmp_path / "text_encoder")
    params["latents"]["resolution"] = 32
    logs = []
    with FakeAccelerator() as guard:
        paths = run_generate(project_config(params), "a chibi", tmp_path / "out", log=logs.append, unet=str(tmp_path / "unet"),
                             steps=1, turntable_frames=2, render_resolution=16, device="meta")
    assert guard.ops > 1000 and paths["ply"].is_file() and TINY_NOTE in logs


@pytest.mark.slow
def test_embed_latents_finetune_run_on_an_accelerator_without_mixing(tmp_path, accelerate_on_meta):
    from synthetic_renders import make_packed

    from project_config import section_params

    from chibisplat.dataset.embeddings import embed
    from chibisplat.training.finetune import finetune
    from chibisplat.training.latents import build_latents

    packed = make_packed(tmp_path / "data", n=2, size=32, val_fraction=0.5)
    models = models_params()
    with FakeAccelerator() as guard:
        embed(section_params("embed", packed_dir=packed, out=tmp_path / "emb.parquet", device="meta",
                          tiny_cache_dir=tmp_path / "te"), models, log=lambda *_: None)
        finetune(section_params("finetune", gsrecon_lr=4.0e-5, gsvae_lr=4.0e-5, gsrecon=True, gsvae=True, packed_dir=str(packed), out_dir=str(tmp_path / "ft"),
                                metrics_dir=str(tmp_path / "ftm"), resolution=32, render_resolution=16,
                                gsrecon_steps=1, gsvae_steps=1, gsvae_tiny_decoder_steps=1, rasterizer="torch",
                                lr_scheduler="constant"), models, log=lambda *_: None)
        summary = build_latents(section_params("latents", packed_dir=packed, embeddings=tmp_path / "emb.parquet",
                                             out_dir=tmp_path / "lat", resolution=32, render_resolution=16,
                                             device="meta", view_sets=(0,)),
                                dataclasses.replace(models, finetuned=tmp_path / "ft"), log=lambda *_: None)
    assert len(summary.encoded) == 2 and guard.ops > 1000
