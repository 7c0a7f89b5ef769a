"""Training side: latent cache, objective, LoRA vs full, LPIPS, loss drop, resume after SIGKILL, NaN stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from project_config import parse_params, project_params

from chibisplat.protocol import EVEN_VIEW_SETS
from chibisplat.training.lpips import LPIPS, load_lpips

REPO = Path(__file__).resolve().parents[1]


def fake_latent_dir(root: Path, n_chars: int = 3, size: int = 8, render_res: int = 16) -> tuple[Path, Path]:
    """A latent cache + prompt embeddings in the real file formats, with learnable structure (tiny, fast)."""
    import numpy as np
    from safetensors.torch import save_file

    from chibisplat.dataset.embeddings import embeddings_table
    from chibisplat.identity import sha256_text
    from chibisplat.training.latents import FORMAT_VERSION
    import pyarrow.parquet as pq

    g = torch.Generator().manual_seed(0)
    captions = [f"a chibi character number {i}" for i in range(n_chars)]
    emb = torch.randn(n_chars + 1, 77, 768, generator=g).numpy().astype(np.float32)
    embeddings = root / "prompt_embeds.parquet"
    pq.write_table(embeddings_table([""] + captions, emb, "test-encoder"), embeddings)
    from chibisplat.training.inference import inference_cameras

    c2w, intr = inference_cameras(20.0, 1.4, tuple(range(0, 360, 45)))
    for split in ("train", "val"):
        (root / "latents" / split).mkdir(parents=True, exist_ok=True)
    for i, caption in enumerate(captions):
        split = "val" if i == n_chars - 1 else "train"
        s = len(EVEN_VIEW_SETS)
        base = torch.randn(1, 4, 4, size, size, generator=g) * 4.0  # latents of a character: a fixed pattern
        tensors = {
            "latents": (base + 0.1 * torch.randn(s, 4, 4, size, size, generator=g)).contiguous(),
            "C2W": c2w[None].expand(s, -1, -1, -1).contiguous(),
            "fxfycxcy": intr[None].expand(s, -1, -1).contiguous(),
            "view_indices": torch.arange(8)[None].expand(s, -1).contiguous(),
            "target_rgba": torch.full((s, 8, 4, render_res, render_res), 255, dtype=torch.uint8),
        }
        meta = {"format": str(FORMAT_VERSION), "uid": f"char{i}", "caption": caption,
                "caption_sha256": sha256_text(caption), "cache_key": f"key{i}", "models": "test"}
        save_file(tensors, str(root / "latents" / split / f"char{i}.safetensors"), metadata=meta)
    return root / "latents", embeddings


def make_params(root: Path, latents: Path, embeddings: Path, **train) -> dict:
    params = project_params()
    params["train"].update(
        latents_dir=str(latents), embeddings=str(embeddings), out_dir=str(root / "models"),
        metrics_dir=str(root / "metrics"), log_every=5,
    )
    params["train"].update(train)
    return params


def test_even_view_sets_are_published_ones():
    assert len(EVEN_VIEW_SETS) == 9
    assert EVEN_VIEW_SETS[0] == (0, 6, 12, 18) and EVEN_VIEW_SETS[5] == (5, 11, 17, 23)
    assert EVEN_VIEW_SETS[6] == (27, 30, 33, 36) and EVEN_VIEW_SETS[8] == (29, 32, 35, 38)


def test_presets_follow_models_source_and_explicit_keys_win():
    from project_config import project_config

    # Declared in params.yaml (committed as null = the preset's value), so `dvc exp run -S train.lr=...` finds the key.
    assert "lr" in parse_params(REPO / "params.yaml")["train"]
    params = project_params()
    assert params["train"]["lr"] is None and params["models"]["source"] == "tiny"
    tiny = project_config(params).train
    assert tiny.lr == params["train"]["presets"]["tiny"]["lr"]
    params["models"]["source"] = "pretrained"
    pre = project_config(params).train
    assert (tiny.mode, pre.mode) == ("full", "lora") and pre.mixed_precision == "bf16" and pre.batch_size == 8
    assert not pre.gradient_checkpointing and pre.fused_adamw and pre.ema_foreach and pre.lr == 1e-4  # GPU levers
    params["train"]["lr"] = 3e-4
    assert project_config(params).train.lr == 3e-4
    assert project_config(params).latents.resolution == 256


def test_old_finetune_switches_in_train_point_to_the_finetune_stage():
    from project_config import project_config

    params = project_params()
    params["train"]["finetune_gsvae"] = True
    with pytest.raises(KeyError, match="finetune.gsrecon / finetune.gsvae"):
        project_config(params, validate=True)


def test_latent_cache_shapes_from_packed_rows(tmp_path):
    """Real GSRecon + GSVAE on one synthetic packed character: 9 view sets, (4, 4, R/8, R/8) latents."""
    from synthetic_renders import make_packed

    from chibisplat.dataset.pack import packed_files
    from chibisplat.models.sources import tiny_model_stack
    from chibisplat.dataset.rows import shard_rows
    from project_config import section_params

    from chibisplat.training.latents import encode_character

    files = packed_files(make_packed(tmp_path, n=1, size=64), "train")
    row = next(shard_rows(files[0]))
    out = encode_character(tiny_model_stack(0), row, section_params("latents", resolution=64, render_resolution=32, device="cpu"))
    assert out["latents"].shape == (9, 4, 4, 8, 8) and out["latents"].dtype == torch.float32
    assert out["C2W"].shape == (9, 8, 4, 4) and out["fxfycxcy"].shape == (9, 8, 4)
    assert out["target_rgba"].shape == (9, 8, 4, 32, 32) and out["target_rgba"].dtype == torch.uint8
    assert out["view_indices"][:, :4].tolist() == [list(s) for s in EVEN_VIEW_SETS]
    # canonical frame: the first input view sits at distance 1.4
    assert torch.allclose(out["C2W"][:, 0, :3, 3].norm(dim=-1), torch.full((9,), 1.4), atol=1e-4)
    assert torch.isfinite(out["latents"]).all()


def test_missing_caption_embedding_names_the_character(tmp_path):
    from chibisplat.training.latents import load_latent_set

    latents, embeddings = fake_latent_dir(tmp_path)
    import pyarrow.parquet as pq
    from chibisplat.dataset.embeddings import embeddings_table
    import numpy as np

    pq.write_table(embeddings_table([""], np.zeros((1, 77, 768), np.float32), "x"), embeddings)
    with pytest.raises(KeyError, match="char0.*re-run the embed stage"):
        load_latent_set(latents, "train", embeddings)
    with pytest.raises(FileNotFoundError, match="run the latents stage"):
        load_latent_set(tmp_path / "nowhere", "train", embeddings)


def test_lora_vs_full_parameter_counts():
    from chibisplat.models.sources import tiny_model_stack
    from chibisplat.training.train import parameter_counts

    lora_trainable, lora_total = parameter_counts(tiny_model_stack(0).unet, "lora", 4, 4)
    full_trainable, full_total = parameter_counts(tiny_model_stack(0).unet, "full")
    assert full_trainable == full_total
    assert 0 < lora_trainable < full_trainable / 10
    assert lora_total == full_total + lora_trainable


def random_lpips_file(path: Path) -> Path:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = LPIPS()
    for lin in model.lins:
        lin.weight.data.abs_()  # LPIPS' lin heads are non-negative
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_lpips_random_local_weights(tmp_path):
    lp = load_lpips(random_lpips_file(tmp_path / "lpips.safetensors"))
    x = torch.rand(2, 3, 64, 64)
    y = torch.rand(2, 3, 64, 64)
    d = lp(x, y)
    assert d.shape == (2,)
    assert torch.allclose(lp(x, x), torch.zeros(2), atol=1e-6)
    assert (d > 0).all()
    with pytest.raises(FileNotFoundError, match="lpips_weights"):
        load_lpips(tmp_path / "missing.pth")


def test_objective_one_timestep_per_object_and_cfg_dropout(tmp_path):
    from chibisplat.models.sources import tiny_model_stack
    from chibisplat.training.latents import load_latent_set
    from chibisplat.training.objective import diffusion_step_inputs, noise_scheduler, sample_batch, step_generator

    latents, embeddings = fake_latent_dir(tmp_path)
    data = load_latent_set(latents, "train", embeddings)
    stack = tiny_model_stack(0)
    sched = noise_scheduler(stack)
    assert sched.config.num_train_timesteps == 1000 and sched.config.beta_schedule == "scaled_linear"
    assert sched.config.prediction_type == "epsilon"
    g = step_generator(0, 3)
    batch = sample_batch(data, 2, g)
    inp = diffusion_step_inputs(batch, sched, stack.gsvae.scale_latents, data.null_embed, 1.0, 64, g)
    t = inp["timesteps"].reshape(2, 4)
    assert (t == t[:, :1]).all()
    assert inp["unet_input"].shape == (8, 10, 8, 8)
    assert torch.equal(inp["encoder_hidden_states"], data.null_embed[None].expand(8, -1, -1))  # p = 1: all dropped
    g2 = step_generator(0, 3)
    batch2 = sample_batch(data, 2, g2)
    inp2 = diffusion_step_inputs(batch2, sched, stack.gsvae.scale_latents, data.null_embed, 1.0, 64, g2)
    assert torch.equal(inp["noise"], inp2["noise"])  # (seed, step) fixes every draw


def test_rendering_loss_backpropagates_with_lpips(tmp_path):
    """One step with the rendering loss (tiny decoder + torch rasterizer + LPIPS) gives finite UNet gradients."""
    from chibisplat.models.sources import tiny_model_stack
    from chibisplat.training.latents import load_latent_set
    from chibisplat.training.objective import diffusion_step_inputs, noise_scheduler, sample_batch, step_generator
    from project_config import section_params

    from chibisplat.training.train import training_step

    latents, embeddings = fake_latent_dir(tmp_path, render_res=16)
    data = load_latent_set(latents, "train", embeddings)
    stack = tiny_model_stack(0)
    sched = noise_scheduler(stack)
    g = step_generator(0, 0)
    batch = sample_batch(data, 1, g)
    inputs = diffusion_step_inputs(batch, sched, stack.gsvae.scale_latents, data.null_embed, 0.1, 64, g)
    unet = stack.unet.train()
    lp = load_lpips(random_lpips_file(tmp_path / "lpips.safetensors"))
    out = training_step(unet, batch, inputs, sched, stack.gsvae.requires_grad_(False), lp,
                        section_params("train", rasterizer="torch"), render=True)
    assert set(out) >= {"loss", "diffusion_loss", "render_loss", "render_lpips"}
    out["loss"].backward()
    grads = [p.grad for p in unet.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def run_train(params: dict, **kw):
    from project_config import project_config

    from chibisplat.training.train import train

    cfg = project_config(params)
    return train(cfg.train, cfg.models, log=lambda *_: None, **kw)


def test_tiny_training_loss_drops_and_frozen_does_not(tmp_path):
    latents, embeddings = fake_latent_dir(tmp_path)
    steps = 40
    trained = run_train(make_params(tmp_path / "a", latents, embeddings, max_steps=steps, checkpointing_steps=steps))
    frozen = run_train(make_params(tmp_path / "b", latents, embeddings, max_steps=steps, checkpointing_steps=steps, lr=0.0))
    k = steps // 10
    first, last = sum(trained.losses[:k]) / k, sum(trained.losses[-k:]) / k
    f_first, f_last = sum(frozen.losses[:k]) / k, sum(frozen.losses[-k:]) / k
    assert last < 0.6 * first, (first, last)
    assert f_last > 0.75 * f_first, (f_first, f_last)
    metrics = json.loads((tmp_path / "a" / "metrics" / "metrics.json").read_text())
    assert metrics["train"]["steps"] == steps and metrics["train"]["diffusion_loss_last10pct"] < metrics["train"]["diffusion_loss_first10pct"]
    assert (tmp_path / "a" / "metrics" / "plots" / "metrics" / "train" / "diffusion_loss.tsv").is_file()
    from chibisplat.models.gsdiff import load_mv_unet

    load_mv_unet(tmp_path / "a" / "models" / "unet")
    # Re-running a finished run (e.g. `dvc repro` after a code-only change) resumes at max_steps: no step, the same
    # metrics file, the same UNet weights.
    before = {p: p.read_bytes() for p in (tmp_path / "a" / "metrics").rglob("*") if p.is_file()}
    weights = (tmp_path / "a" / "models" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    again = run_train(make_params(tmp_path / "a", latents, embeddings, max_steps=steps, checkpointing_steps=steps))
    assert again.resumed_from == steps and again.losses == []
    assert {p: p.read_bytes() for p in (tmp_path / "a" / "metrics").rglob("*") if p.is_file()} == before
    assert (tmp_path / "a" / "models" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == weights


def test_micro_batches_are_a_function_of_rank_step_and_micro_batch(tmp_path):
    """What each training process draws (train.MicroBatches): rank r's micro-batch m of step s is the draw of
    step_generator(seed, s, m, r); ranks draw different noise and objects; a run resumed at step s draws exactly
    the uninterrupted run's micro-batches from step s on."""
    from types import SimpleNamespace

    from chibisplat.training.latents import load_latent_set
    from chibisplat.training.objective import noise_scheduler, sample_batch, step_generator
    from project_config import section_params

    from chibisplat.training.train import MicroBatches

    latents, embeddings = fake_latent_dir(tmp_path)
    data = load_latent_set(latents, "train", embeddings)
    sched = noise_scheduler(SimpleNamespace(sd15_path=None))
    p = section_params("train", seed=7, max_steps=5, batch_size=2, gradient_accumulation_steps=2, cfg_dropout=0.0)
    ident = lambda z: z
    ranks = [MicroBatches(data, sched, ident, p, rank, 0, False) for rank in (0, 1)]
    resumed = MicroBatches(data, sched, ident, p, 1, 3, False)
    assert len(ranks[0]) == 10 and len(resumed) == 4
    items = [[r[i] for i in range(10)] for r in ranks]
    order = [(s, m) for s in range(5) for m in range(2)]
    for rank in (0, 1):
        for i, (s, m) in enumerate(order):
            want = sample_batch(data, 2, step_generator(7, s, m, rank)).index
            assert torch.equal(items[rank][i]["batch"].index, want), (rank, s, m)
    for i in range(10):  # every micro-batch: the ranks' noise differs
        assert not torch.equal(items[0][i]["inputs"]["noise"], items[1][i]["inputs"]["noise"]), order[i]
    assert sum(torch.equal(a["batch"].index, b["batch"].index) for a, b in zip(*items)) <= 2
    assert not torch.equal(items[0][0]["inputs"]["noise"], items[0][1]["inputs"]["noise"])  # micro-batches of a step
    for i in range(4):  # resumed at step 3 = items 6.. of the uninterrupted rank-1 run
        assert torch.equal(resumed[i]["inputs"]["noise"], items[1][6 + i]["inputs"]["noise"])
        assert torch.equal(resumed[i]["batch"].index, items[1][6 + i]["batch"].index)


class _Killed(Exception):
    pass


def _unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "models" / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_resume_is_bit_exact_in_process(tmp_path, monkeypatch, mode):
    """Interrupted inside step 3 (after the step-2 checkpoint), then resumed: the same per-step losses and the same
    final (EMA, LoRA-merged) weights as an uninterrupted run, bit for bit (torch.equal), as the README claims. A LoRA
    checkpoint holds the adapter alone (the base UNet is rebuilt from models:), a full one every weight."""
    from chibisplat.training import train as train_mod

    latents, embeddings = fake_latent_dir(tmp_path)
    settings = dict(max_steps=4, checkpointing_steps=2, mode=mode, lr=1e-3, use_ema=True, ema_decay=0.9)
    ref = run_train(make_params(tmp_path / "ref", latents, embeddings, **settings))

    real, calls = train_mod.training_step, {"n": 0}

    def killed_in_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise _Killed()
        return real(*args, **kwargs)

    params = make_params(tmp_path / "cut", latents, embeddings, **settings)
    monkeypatch.setattr(train_mod, "training_step", killed_in_step_3)
    with pytest.raises(_Killed):
        run_train(params)
    monkeypatch.setattr(train_mod, "training_step", real)
    resumed = run_train(params)
    assert resumed.resumed_from == 2 and resumed.losses == ref.losses[2:]
    a, b = _unet_weights(tmp_path / "ref"), _unet_weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    if mode == "lora":  # the adapter output too
        from safetensors.torch import load_file

        adapters = [load_file(str(r / "models" / "unet" / "lora" / "pytorch_lora_weights.safetensors"))
                    for r in (tmp_path / "ref", tmp_path / "cut")]
        assert adapters[0].keys() == adapters[1].keys() and adapters[0]
        assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
    # ... and the run really trained: the final weights are not the initial ones.
    from chibisplat.models.sources import tiny_model_stack

    init = tiny_model_stack(0).unet.state_dict()
    assert any(not torch.equal(init[k], a[k]) for k in a)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from chibisplat.training import train as train_mod
    from chibisplat.training.train import NonFiniteLoss

    latents, embeddings = fake_latent_dir(tmp_path)
    real = train_mod.training_step
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        if calls["n"] == 7:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(train_mod, "training_step", poisoned)
    params = make_params(tmp_path, latents, embeddings, max_steps=10, checkpointing_steps=5)
    with pytest.raises(NonFiniteLoss, match=r"step 7: the loss is nan.*checkpoint-000005"):
        run_train(params)
    ckpts = sorted(p.name for p in (tmp_path / "models" / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-000005"]
    assert not (tmp_path / "models" / "unet").exists()


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
    """Kill a real training subprocess (SIGKILL) after its first checkpoint, resume, compare final weights."""
    from safetensors.torch import load_file

    latents, embeddings = fake_latent_dir(tmp_path)
    steps, every = 24, 8

    def write_params(name: str) -> Path:
        params = make_params(tmp_path / name, latents, embeddings, max_steps=steps, checkpointing_steps=every,
                             mode="lora", lr=1e-3, use_ema=True, ema_decay=0.99)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(params))
        return path

    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = lambda p: [sys.executable, "-m", "stages.train", "--params", str(p)]
    ref = write_params("ref")
    subprocess.run(cmd(ref), cwd=REPO, env=env, check=True, capture_output=True)

    killed = write_params("killed")
    proc = subprocess.Popen(cmd(killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_root = tmp_path / "killed" / "models" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpt_root / "checkpoint-000008" / "train_state.json").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "models" / "unet").exists(), "the run finished before it was killed"
    done = subprocess.run(cmd(killed), cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stdout
    a = load_file(str(tmp_path / "ref" / "models" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "models" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ after the resume, e.g. {different[:3]}"
    rows = (tmp_path / "killed" / "metrics" / "plots" / "metrics" / "train" / "diffusion_loss.tsv").read_text().splitlines()
    assert len(rows) == steps + 1  # header + one row per step, none duplicated by the kill


@pytest.mark.slow
def test_two_processes_train_with_ddp_on_cpu(tmp_path):
    """The multi-process path of `accelerate launch` (DDP over gloo on CPU, launched by torchrun): two ranks draw
    different micro-batches, end with identical weights, checkpoint with both ranks' RNG states, and rank 0 writes one
    loadable UNet. (tests/ddp_probe.py records each rank's draws and final weights around the unchanged stage.)"""
    from chibisplat.models.gsdiff import load_mv_unet

    latents, embeddings = fake_latent_dir(tmp_path)
    steps = 6
    params = make_params(tmp_path / "run", latents, embeddings, max_steps=steps, checkpointing_steps=3, mode="lora",
                         lr=1e-2, batch_size=2)
    if "dataloader_workers" in params["train"]:
        params["train"]["dataloader_workers"] = 0  # draws in the rank's own process, where the probe records them
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    probe = tmp_path / "probe"
    probe.mkdir()
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PROBE_OUT": str(probe)}
    r = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port()),
                        str(REPO / "tests" / "ddp_probe.py"), "--params", str(tmp_path / "params.yaml")], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    drawn = [json.loads((probe / f"drawn_rank{k}.json").read_text()) for k in range(2)]
    assert len(drawn[0]) == len(drawn[1]) == steps
    # Different micro-batches: at most one step may coincide by chance (2 of 18 objects per draw).
    assert sum(a == b for a, b in zip(*drawn)) <= 1, drawn
    weights = [torch.load(probe / f"weights_rank{k}.pt") for k in range(2)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), "ranks ended with different weights"
    lora = [k for k in weights[0] if "lora_B" in k]  # LoRA's B starts at zero: non-zero = the ranks trained
    assert lora and any(weights[0][k].abs().sum() > 0 for k in lora)
    assert "x 2 process(es)" in r.stdout, r.stdout
    assert r.stdout.count("train: final UNet") == 1  # rank 0 only
    ckpts = sorted((tmp_path / "run" / "models" / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["checkpoint-000003", "checkpoint-000006"]
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in ckpts[-1].iterdir()}
    load_mv_unet(tmp_path / "run" / "models" / "unet")
    assert (tmp_path / "run" / "models" / "unet" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
