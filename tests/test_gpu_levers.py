"""The GPU speed levers (issue 9), checked by value on the CPU: each one either leaves the numbers unchanged
(batched cameras, loader workers, foreach EMA, fused AdamW, compile) or changes them within a stated tolerance
(bf16 autocast), and the switches reach the real train() / latents code. GPU timings: benchmarks/bench_gpu_pipeline.py.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from project_config import project_config, project_params, section_params
from safetensors.torch import load_file

from chibisplat import cameras
from chibisplat.geometry import pixel_K
from chibisplat.splats import rasterize as rz
from chibisplat.splats.splatter import Gaussians
from test_train import fake_latent_dir, make_params, run_train


def random_gaussians(n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return Gaussians(
        means=(torch.rand(n, 3, generator=g, dtype=dtype) - 0.5) * 0.8,
        quats=torch.randn(n, 4, generator=g, dtype=dtype),
        scales=torch.rand(n, 3, generator=g, dtype=dtype) * 0.05 + 0.01,
        opacities=torch.rand(n, generator=g, dtype=dtype) * 0.9 + 0.05,
        colors=torch.rand(n, 3, generator=g, dtype=dtype),
    )


def slot_cameras(slots, res, dtype=torch.float32):
    c2w = torch.stack([torch.tensor(cameras.slot_c2w(cameras.camera_slots()[s]), dtype=dtype) for s in slots])
    K = torch.tensor(cameras.intrinsics(res, res), dtype=dtype).expand(len(slots), 3, 3).clone()
    K[:, 0, 2] += torch.arange(len(slots), dtype=dtype)  # distinct principal points: a swapped K shows
    return c2w, K


@pytest.fixture
def batched_gsplat_stand_in(monkeypatch):
    """A stand-in `gsplat` with gsplat's documented batched-camera contract (tests/gsplat_stand_in.py): each camera
    is drawn with our own projection and compositing; the calls are recorded."""
    from gsplat_stand_in import install

    return install(monkeypatch)


@pytest.mark.parametrize("backend", ["torch", "gsplat"])
def test_batched_views_equal_one_view_at_a_time(backend, request):
    """rasterize_views (one call for C cameras) == rasterize per camera, against the torch rasterizer's own pixels."""
    calls = request.getfixturevalue("batched_gsplat_stand_in") if backend == "gsplat" else None
    g = random_gaussians(150, dtype=torch.float64)
    c2ws, Ks = slot_cameras([0, 7, 13, 30, 36], 24, torch.float64)
    views = rz.rasterize_views(g, c2ws, Ks, 24, 20, backend=backend, image_formation="3dgs")
    assert views["image"].shape == (5, 3, 20, 24)
    for c in range(5):
        ref = rz.rasterize_torch(g, c2ws[c], Ks[c], 24, 20, image_formation="3dgs")  # white background: our own code
        for key in ("image", "alpha", "depth"):
            assert (views[key][c] - ref[key]).abs().max() < 1e-6, (backend, c, key)
    assert (views["image"][0] - views["image"][1]).abs().max() > 0.05  # the views really differ
    if calls is not None:
        assert [c["viewmats"].shape[0] for c in calls] == [5]  # ONE gsplat call for the 5 cameras ("3dgs")


@pytest.mark.parametrize("backend", ["torch", "gsplat"])
def test_render_objects_per_object_equals_per_view(backend, request):
    """The rendering loss' renders: one rasterizer call per object (its 8 cameras batched) == one per view, forward
    and gradient (float32, 1e-6)."""
    from chibisplat.training.inference import inference_cameras
    from chibisplat.training.objective import render_objects

    calls = request.getfixturevalue("batched_gsplat_stand_in") if backend == "gsplat" else None
    c2w, intr = inference_cameras(20.0, 1.4, tuple(range(0, 360, 45)))  # 8 cameras
    C2W = torch.stack([c2w, c2w.flip(0)])  # 2 objects, different camera orders
    fxfycxcy = torch.stack([intr, intr * torch.tensor([1.0, 1.0, 1.02, 0.98])])
    splatter = (torch.rand(2, 4, 12, 6, 6, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 0.6
    res = 16
    out = {}
    for batched in (True, False):
        s = splatter.clone().requires_grad_(True)
        image, alpha = render_objects(s, C2W, fxfycxcy, res, backend=backend, batch_views=batched)
        weights = torch.rand(image.shape, generator=torch.Generator().manual_seed(1))
        ((image * weights).sum() + alpha.sum()).backward()
        out[batched] = (image.detach(), alpha.detach(), s.grad)
        if calls is not None:
            # "diffsplat" (the default): one gsplat call per camera (per-camera compensated opacities)
            assert [c["viewmats"].shape[0] for c in calls] == [1] * 16
            calls.clear()
    assert out[True][0].shape == (2, 8, 3, res, res)
    for a, b in zip(out[True], out[False]):
        assert (a - b).abs().max() < 1e-6
    assert out[True][2].abs().max() > 0  # the gradient reaches the splatter images
    # the per-view reference pixels themselves (independent of render_objects): object 1, view 5
    from chibisplat.splats.splatter import splatter_to_gaussians

    g = splatter_to_gaussians(splatter[1], C2W[1, :4], fxfycxcy[1, :4])
    ref = rz.rasterize_torch(g, C2W[1, 5], pixel_K(fxfycxcy[1, 5], res, res), res, res)
    assert (out[True][0][1, 5] - ref["image"]).abs().max() < 1e-6


def test_rendering_stays_float32_under_bf16_autocast():
    """DiffSplat rasterises in float32: the rendering loss' renders and GSRecon's Plücker rays are the float32 ones
    even inside the training step's bf16 autocast (before: bf16 matmuls, and GSRecon crashed in torch.cross)."""
    from chibisplat.geometry import plucker_rays
    from chibisplat.training.inference import inference_cameras
    from chibisplat.training.objective import render_objects

    c2w, intr = inference_cameras(20.0, 1.4, tuple(range(0, 360, 45)))
    splatter = (torch.rand(1, 4, 12, 6, 6, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 0.6
    ref = render_objects(splatter, c2w[None], intr[None], 16, backend="torch")
    rays = plucker_rays(8, 8, c2w, intr)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = render_objects(splatter, c2w[None], intr[None], 16, backend="torch")
        got_rays = plucker_rays(8, 8, c2w, intr)
    for a, b in zip(ref, got):
        assert b.dtype == torch.float32 and (a - b).abs().max() < 1e-6
    assert got_rays.dtype == torch.float32 and torch.equal(got_rays, rays)


def test_views_shape_errors_name_the_arguments(batched_gsplat_stand_in):
    g = random_gaussians(4)
    c2ws, Ks = slot_cameras([0, 1], 8)
    with pytest.raises(ValueError, match=r"c2ws must be \(C, 4, 4\) and Ks \(C, 3, 3\)"):
        rz.rasterize_views(g, c2ws, Ks[:1], 8, 8, backend="gsplat")


def test_ema_foreach_equals_the_per_tensor_loop():
    from diffusers.training_utils import EMAModel

    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((64, 32), (32,), (3, 3, 8, 8))]
    frozen = torch.nn.Parameter(torch.randn(5, generator=g), requires_grad=False)
    emas = {f: EMAModel(params + [frozen], decay=0.99, use_ema_warmup=True, inv_gamma=1.0, power=0.75, foreach=f)
            for f in (False, True)}
    for step in range(20):
        with torch.no_grad():
            for p in params + [frozen]:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        for ema in emas.values():
            ema.step(params + [frozen])
    for a, b in zip(emas[False].shadow_params, emas[True].shadow_params):
        assert (a - b).abs().max() <= 1e-7 * max(1.0, a.abs().max().item())
    assert torch.equal(emas[True].shadow_params[-1], frozen.detach())  # frozen tensors are copied, not averaged


def test_ema_recursion_by_hand():
    """foreach EMA follows s <- s - (1 - d_k)(s - p) with d_k = min(decay, 1 - (1 + k)^-power), k = step - 1."""
    from diffusers.training_utils import EMAModel

    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    ema = EMAModel([p], decay=0.99, use_ema_warmup=True, inv_gamma=1.0, power=0.75, foreach=True)
    s = torch.tensor([1.0, -2.0], dtype=torch.float64)
    for k, value in enumerate([3.0, 0.5, -1.0], start=1):
        with torch.no_grad():
            p.fill_(value)
        ema.step([p])
        step = k - 1  # diffusers: decay uses optimization_step - update_after_step - 1
        d = 0.0 if step <= 0 else min(0.99, 1 - (1 + step) ** -0.75)
        s = s - (1 - d) * (s - value)
        assert torch.allclose(ema.shadow_params[0].double(), s, atol=1e-6), (k, ema.shadow_params[0], s)


def _final_unet(root):
    return load_file(str(root / "models" / "unet" / "diffusion_pytorch_model.safetensors"))


def test_fused_adamw_equals_the_plain_one():
    """Same gradients in, same weights out: 6 AdamW steps on the tiny UNet's parameters, fused vs default, 1e-6."""
    from chibisplat.models.sources import tiny_model_stack

    out = {}
    start = [p.detach().clone() for p in tiny_model_stack(0).unet.parameters()]
    for fused in (None, True):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01, fused=fused)
        g = torch.Generator().manual_seed(1)
        for _ in range(6):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g) * 1e-3
            opt.step()
        out[fused] = [p.detach().clone() for p in params]
    assert max((a - b).abs().max().item() for a, b in zip(out[None], out[True])) <= 1e-6
    assert max((a - b).abs().max().item() for a, b in zip(out[None], start)) > 1e-3  # 6 steps of ~lr each


def test_fused_adamw_and_foreach_ema_train_like_the_plain_ones(tmp_path):
    """The real train(): one step with fused AdamW + foreach EMA gives the plain run's loss and (EMA) weights to 1e-6.
    (Over more steps two runs drift apart as any two float orders do, because 1-ulp weight differences change the next
    gradients: 5.3e-5 after 2 steps at lr 1e-3 here; each step itself agrees, as the tests above show.)"""
    latents, embeddings = fake_latent_dir(tmp_path)
    kw = dict(max_steps=1, checkpointing_steps=1, lr_warmup_steps=0)
    plain = run_train(make_params(tmp_path / "a", latents, embeddings, **kw))
    fast = run_train(make_params(tmp_path / "b", latents, embeddings, fused_adamw=True, ema_foreach=True, **kw))
    assert fast.losses == pytest.approx(plain.losses, rel=1e-6)
    a, b = _final_unet(tmp_path / "a"), _final_unet(tmp_path / "b")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, worst
    # the run really moved the weights (so "equal" is not "both untouched")
    from chibisplat.models.sources import tiny_model_stack

    base = tiny_model_stack(0).unet.state_dict()
    assert max((a[k] - base[k]).abs().max().item() for k in a) > 1e-4


def test_the_switches_reach_the_optimizer_ema_and_loader(tmp_path, monkeypatch):
    """train.fused_adamw / ema_foreach / dataloader_workers arrive where they act (values above prove they are safe)."""
    from diffusers.training_utils import EMAModel

    from chibisplat.training import train as train_mod

    made = {"adamw": [], "ema": [], "workers": []}
    real_adamw, real_loader = torch.optim.AdamW, train_mod.micro_batch_loader

    def adamw(*args, **kwargs):
        made["adamw"].append(kwargs.get("fused"))
        return real_adamw(*args, **kwargs)

    class Ema(EMAModel):
        def __init__(self, *args, **kwargs):
            made["ema"].append(kwargs.get("foreach"))
            super().__init__(*args, **kwargs)

    def loader(dataset, workers, pin_memory):
        made["workers"].append((workers, pin_memory))
        return real_loader(dataset, workers, pin_memory)

    monkeypatch.setattr(train_mod.torch.optim, "AdamW", adamw)
    monkeypatch.setattr("diffusers.training_utils.EMAModel", Ema)
    monkeypatch.setattr(train_mod, "micro_batch_loader", loader)
    latents, embeddings = fake_latent_dir(tmp_path)
    run_train(make_params(tmp_path / "a", latents, embeddings, max_steps=1, checkpointing_steps=1, fused_adamw=True,
                          ema_foreach=True, dataloader_workers=1))
    run_train(make_params(tmp_path / "b", latents, embeddings, max_steps=1, checkpointing_steps=1))
    assert made == {"adamw": [True, None], "ema": [True, False], "workers": [(1, False), (0, False)]}


def test_loader_workers_give_the_same_run(tmp_path):
    """Micro-batches prepared in 2 worker processes == prepared in the loop: same losses, bit-identical weights."""
    latents, embeddings = fake_latent_dir(tmp_path)
    # 2 micro-batches, the 1st with the rendering loss (its coin is part of each prepared item)
    kw = dict(max_steps=1, checkpointing_steps=1, gradient_accumulation_steps=2, rendering_loss_prob=0.5)
    inline = run_train(make_params(tmp_path / "a", latents, embeddings, **kw))
    workers = run_train(make_params(tmp_path / "b", latents, embeddings, dataloader_workers=2, **kw))
    assert workers.losses == inline.losses
    a, b = _final_unet(tmp_path / "a"), _final_unet(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_micro_batches_are_the_loops_draws(tmp_path):
    """MicroBatches item i is step start + i // accumulation, micro-batch i % accumulation of step_generator."""
    from chibisplat.models.sources import tiny_model_stack
    from chibisplat.training.latents import load_latent_set
    from chibisplat.training.objective import diffusion_step_inputs, noise_scheduler, sample_batch, step_generator
    from chibisplat.training.train import MicroBatches, micro_batch_loader

    latents, embeddings = fake_latent_dir(tmp_path)
    data = load_latent_set(latents, "train", embeddings)
    stack = tiny_model_stack(0)
    sched = noise_scheduler(stack)
    p = section_params("train", max_steps=7, gradient_accumulation_steps=3, batch_size=2, rendering_loss_prob=0.5)
    ds = MicroBatches(data, sched, stack.gsvae.scale_latents, p, rank=1, start=5, render_on=True)
    assert len(ds) == (7 - 5) * 3
    items = list(micro_batch_loader(ds, workers=2, pin_memory=False))
    assert len(items) == 6
    for i, item in enumerate(items):
        g = step_generator(p.seed, 5 + i // 3, i % 3, 1)
        batch = sample_batch(data, 2, g)
        inputs = diffusion_step_inputs(batch, sched, stack.gsvae.scale_latents, data.null_embed, p.cfg_dropout,
                                       data.resolution, g)
        render = bool(torch.rand(1, generator=g) < 0.5)
        assert torch.equal(item["batch"].index, batch.index) and item["render"] == render
        assert all(torch.equal(item["inputs"][k], inputs[k]) for k in inputs)


def test_bf16_autocast_step_is_close_to_float32(tmp_path):
    """train.mixed_precision: bf16 through accelerate on the CPU: finite losses within 2% of float32's (bf16 keeps
    8 bits of mantissa; weights and optimizer stay float32), and not bit-identical (autocast is really on)."""
    from accelerate.state import AcceleratorState

    latents, embeddings = fake_latent_dir(tmp_path)
    kw = dict(max_steps=2, checkpointing_steps=2, use_ema=False)
    fp32 = run_train(make_params(tmp_path / "a", latents, embeddings, **kw))
    AcceleratorState._reset_state()  # accelerate fixes mixed precision once per process; a stage runs train() once
    try:
        bf16 = run_train(make_params(tmp_path / "b", latents, embeddings, mixed_precision="bf16", **kw))
    finally:
        AcceleratorState._reset_state()
    assert all(torch.isfinite(torch.tensor(bf16.losses)))
    assert bf16.losses == pytest.approx(fp32.losses, rel=2e-2)
    assert bf16.losses != fp32.losses
    weights = _final_unet(tmp_path / "b")
    assert all(t.dtype == torch.float32 for t in weights.values())


def test_mixed_precision_values_are_checked():
    import chibisplat.training.precision  # noqa: F401 (the schema checks the modes it defines once it is loaded)

    # One message per bad key, from the schema (chibisplat/config_schema.py), naming the allowed values.
    params = project_params()
    params["train"]["mixed_precision"] = "bfloat16"
    with pytest.raises(ValueError, match=r"train.mixed_precision = 'bfloat16' is not allowed .*; "
                                         r"allowed: one of 'no', 'fp16', 'bf16'"):
        project_config(params, ("train", "models"), validate=True)
    params["latents"]["mixed_precision"] = "half"
    with pytest.raises(ValueError, match="latents.mixed_precision = 'half' is not allowed.*; allowed: one of"):
        project_config(params, ("latents", "models"), validate=True)
    params["train"]["mixed_precision"] = "bf16"
    params["train"]["dataloader_workers"] = -1
    with pytest.raises(ValueError, match=r"train.dataloader_workers = -1 is out of range; allowed: an integer >= 0"):
        project_config(params, ("train", "models"), validate=True)
    params["latents"].update(mixed_precision="bf16", device="auto")
    assert project_config(params, ("latents", "models"), validate=True).latents.mixed_precision == "bf16"


def test_bf16_on_a_gpu_without_bfloat16_says_use_fp16(monkeypatch):
    from chibisplat.training.precision import check_mixed_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    for device in ("cuda", "cuda:0", "auto"):
        with pytest.raises(ValueError, match="Tesla V100 has none: set latents.mixed_precision: fp16"):
            check_mixed_precision("latents.mixed_precision", "bf16", device)
    assert check_mixed_precision("latents.mixed_precision", "bf16", "cpu") == "bf16"  # CPU autocast has bf16
    assert check_mixed_precision("latents.mixed_precision", "fp16", "cuda") == "fp16"


def test_latents_encode_in_bf16_close_to_float32(tmp_path):
    """latents.mixed_precision: bf16 encodes under autocast; stored latents are float32, within bf16's rounding of
    the float32 encoding, and the cache key changes only when the setting is not "no"."""
    from synthetic_renders import make_packed

    from chibisplat.dataset.pack import packed_files
    from chibisplat.models.sources import tiny_model_stack
    from chibisplat.dataset.rows import shard_rows
    from chibisplat.training.latents import cache_key, encode_character

    row = next(shard_rows(packed_files(make_packed(tmp_path, n=1, size=64), "train")[0]))
    stack = tiny_model_stack(0)
    one_per_ring = dict(resolution=64, render_resolution=32, view_sets=(0, 6), device="cpu")  # fast
    p32 = section_params("latents", **one_per_ring)
    p16 = section_params("latents", **one_per_ring, mixed_precision="bf16")
    a, b = encode_character(stack, row, p32)["latents"], encode_character(stack, row, p16)["latents"]
    assert b.dtype == torch.float32
    rel = ((a - b).norm() / a.norm()).item()
    assert 0 < rel < 3e-2, rel
    assert cache_key(row, "m", p16) != cache_key(row, "m", p32)
    assert cache_key(row, "m", p32) == cache_key(row, "m", section_params("latents", **one_per_ring,
                                                                         mixed_precision="no"))


def _compiled_vs_eager(tmp_path, monkeypatch, backend: str):
    from chibisplat.training import train as train_mod

    monkeypatch.setattr(train_mod, "COMPILE_BACKEND", backend)
    torch._dynamo.reset()
    latents, embeddings = fake_latent_dir(tmp_path)
    kw = dict(max_steps=3, checkpointing_steps=3)
    eager = run_train(make_params(tmp_path / "a", latents, embeddings, **kw))
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = run_train(make_params(tmp_path / "b", latents, embeddings, compile=True, **kw))
    assert counters["stats"]["unique_graphs"] > 0  # dynamo really captured the UNet
    # Step 1 sees the same weights and batch: only the kernels' float order differs. Later steps start from weights
    # that differ by float rounding and drift apart (inductor on this CPU: 0.17% at step 3).
    assert compiled.losses[0] == pytest.approx(eager.losses[0], rel=1e-5)
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-2)
    a, b = _final_unet(tmp_path / "a"), _final_unet(tmp_path / "b")
    assert a.keys() == b.keys() and not any("_orig_mod" in k for k in b)  # the uncompiled names
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-3, worst
    ckpt = next((tmp_path / "b" / "models" / "checkpoints").glob("checkpoint-*"))
    saved = load_file(str(next(ckpt.glob("model*.safetensors"))))
    assert not any("_orig_mod" in k for k in saved) and saved.keys() == a.keys()
    # a compiled run resumes from its checkpoint like an eager one: one more step, then the final UNet
    more = run_train(make_params(tmp_path / "b", latents, embeddings, compile=True, max_steps=4, checkpointing_steps=3))
    assert more.resumed_from == 3 and len(more.losses) == 1


def test_compile_keeps_losses_names_and_resume(tmp_path, monkeypatch):
    """train.compile: true (aot_eager backend here: the wiring, quickly) trains like eager and saves plain names."""
    _compiled_vs_eager(tmp_path, monkeypatch, "aot_eager")


@pytest.mark.slow
def test_compile_with_inductor_on_the_cpu(tmp_path, monkeypatch):
    """The real backend (inductor, C++ kernels on the CPU; ~4 min here): trains like eager, plain weight names."""
    _compiled_vs_eager(tmp_path, monkeypatch, "inductor")
