"""Optional GSRecon / GSVAE fine-tuning on the packed chibi views (DiffSplat stages 1-2; docs/diffsplat-reference.md §2-§3).

GSDiff trains on cached latents, so GSRecon and GSVAE are frozen while the UNet trains. When the published
reconstructor or autoencoder should adapt to the chibi domain first, this module fine-tunes them **in image
space**, before the latents are computed, with the published objectives:

* **GSRecon** (``finetune.gsrecon: true``): 4 even input views (RGB, normal, coordinate + Plücker) -> splatter
  images -> Gaussians rendered into all 8 views (4 inputs + 4 others), white background;
  ``loss = MSE(image) + MSE(mask vs alpha) + lpips_weight * LPIPS`` (LPIPS only with local weights).
* **GSVAE** (``finetune.gsvae: true``): the (fine-tuned, then frozen) GSRecon's splatter images -> GSVAE encode
  (posterior sample) -> full decoder; ``loss = latent_weight * MSE(splatter, decoded) + render_weight *
  rendering loss of the decoded Gaussians``; no KL term (DiffSplat issues #13/#18). Stage A trains ``vae``
  (encoder + decoder); with ``gsvae_tiny_decoder_steps > 0`` stage B then trains only the tiny decoder (used by
  GSDiff's rendering loss) on latents of the frozen, fine-tuned ``vae``.

Outputs in ``finetune.out_dir`` (default ``models/finetune``), written into a temporary folder and swapped in
when complete: ``manifest.json`` (fingerprint, base models, which modules were fine-tuned, final losses) and
``gsrecon/`` / ``gsvae/`` ``save_pretrained`` folders. ``load_model_stack`` applies them when
``models.finetuned`` names that folder, so the latents, train, evaluate and generate stages (and the CLI) use
the fine-tuned modules, and the latents cache re-encodes because the weights' hash changed. One process (a GPU
or the CPU); the multi-GPU stage is ``train``.

With both switches off (the default) the stage only writes a manifest that says so. An unchanged fingerprint
(settings, base models and the train split's source/render hashes, not its captions) skips the work, so a
re-captioned character does not re-train GSRecon.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from chibisplat.config import FinetuneParams, ModelsParams, plain
from chibisplat.config_schema import DEFAULT_IMAGE_FORMATION
from chibisplat.dataset import schema
from chibisplat.dataset.loader import PackedViewsDataset, ViewConfig
from chibisplat.dataset.pack import packed_files
from chibisplat.device import to_device
from chibisplat.files import install_folder
from chibisplat.identity import sha256_json
from chibisplat.models.sources import finetune_base
from chibisplat.protocol import NUM_INPUT_VIEWS
from chibisplat.training.errors import NonFiniteLoss
from chibisplat.training.latents import gsrecon_splatter

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
# Settings that do not change the result (excluded from the fingerprint).
COSMETIC = ("out_dir", "metrics_dir", "log_every", "packed_dir")


@dataclass
class FinetuneResult:
    skipped: bool
    losses: dict[str, list[float]] = field(default_factory=dict)  # phase -> loss per step
    out_dir: Path | None = None


def train_split_identity(packed_dir: Path) -> list[list[str]]:
    """(uid, source_sha256, render_config_sha256) of every train character: what the fine-tune sees (no captions)."""
    out = []
    for shard in packed_files(packed_dir, "train"):
        t = pq.read_table(shard, columns=[schema.UID, schema.SOURCE_SHA256, schema.RENDER_CONFIG_SHA256])
        out += [list(r) for r in zip(*(t.column(c).to_pylist() for c in t.column_names))]
    return sorted(out)


def fingerprint(params: FinetuneParams, models: ModelsParams, data: list[list[str]]) -> str:
    """Identity of a fine-tune: settings, base models and ``data`` (:func:`train_split_identity`)."""
    if not params.enabled:
        return sha256_json({"format": FORMAT_VERSION, "enabled": False})
    settings = {k: v for k, v in plain(params).items() if k not in COSMETIC}
    return sha256_json({"format": FORMAT_VERSION, "settings": settings, "base": finetune_base(models),
                        "data": data})


def read_manifest(out_dir: Path) -> dict | None:
    path = Path(out_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


# ---------------------------------------------------------------------------------------------------------------
# Data and losses.


def object_batches(params: FinetuneParams):
    """Endless batches of B objects from the train split: 8 views each (4 even inputs + 4 others)."""
    files = packed_files(Path(params.packed_dir), "train")
    if not files:
        raise FileNotFoundError(f"{params.packed_dir}/train: no packed shards; run the pack stage (dvc repro pack)")
    data = PackedViewsDataset(files, None, ViewConfig(resolution=params.resolution), seed=params.seed, repeat=True,
                              shuffle_buffer=8)
    keys = ("image", "mask", "normal", "coord", "C2W", "fxfycxcy")
    batch: list[dict] = []
    for obj in data:
        batch.append(obj)
        if len(batch) == params.batch_size:
            yield {k: torch.stack([o[k] for o in batch]).float() for k in keys} | {"uid": [o["uid"] for o in batch]}
            batch = []


def render_loss(splatter: torch.Tensor, batch: dict, res: int, lpips, lpips_weight: float, backend: str,
                image_formation: str = DEFAULT_IMAGE_FORMATION) -> dict:
    """Render B objects' splatter images into their 8 views at ``res``; the shared rendering loss against the loader's
    views (resized to ``res``), plus the PSNR of the image term for the logs."""
    from chibisplat.training.objective import splatter_render_loss

    gt_rgb, gt_mask = batch["image"], batch["mask"]
    if gt_rgb.shape[-1] != res:
        b, v = gt_rgb.shape[:2]
        resize = lambda x: F.interpolate(x.flatten(0, 1), size=(res, res), mode="bilinear", align_corners=False,
                                         antialias=True).unflatten(0, (b, v))
        gt_rgb, gt_mask = resize(gt_rgb), resize(gt_mask)
    out = splatter_render_loss(splatter, batch["C2W"], batch["fxfycxcy"], gt_rgb, gt_mask, lpips, lpips_weight,
                               backend, image_formation)
    out["psnr"] = -10.0 * torch.log10(out["render_image_mse"].detach().clamp_min(1e-10))
    return out


def gsrecon_step_loss(stack, batch, params: FinetuneParams, lpips) -> dict:
    splatter = gsrecon_splatter(stack.gsrecon, batch)
    out = render_loss(splatter, batch, params.render_resolution, lpips, params.lpips_weight, params.rasterizer,
                      params.image_formation)
    out["loss"] = out["render_loss"]
    return out


def gsvae_step_loss(stack, batch, params: FinetuneParams, lpips, tiny: bool) -> dict:
    """Stage A (``tiny=False``): encode + full decoder; stage B (``tiny=True``): frozen encoder, tiny decoder."""
    with torch.no_grad():
        splatter = gsrecon_splatter(stack.gsrecon, batch)  # (B, 4, 12, R, R), GSRecon frozen
    b = splatter.shape[0]
    flat = splatter.flatten(0, 1)
    if tiny:
        with torch.no_grad():
            latents, kl = stack.gsvae.encode(flat, sample=False)
    else:
        latents, kl = stack.gsvae.encode(flat, sample=True)
    decoded = stack.gsvae.decode(latents, use_tiny_decoder=tiny)
    latent_mse = F.mse_loss(decoded.float(), flat.float())
    out = render_loss(decoded.unflatten(0, (b, NUM_INPUT_VIEWS)), batch, params.render_resolution, lpips,
                      params.lpips_weight, params.rasterizer, params.image_formation)
    out["latent_mse"] = latent_mse
    out["kl"] = kl.detach()  # logged, not optimised (DiffSplat)
    out["loss"] = params.latent_weight * latent_mse + params.render_weight * out["render_loss"]
    return out


# ---------------------------------------------------------------------------------------------------------------
# The loop.


def _fit(phase: str, module, trainable, loss_fn, steps: int, lr: float, params: FinetuneParams, batches, accelerator,
         live, log) -> list[float]:
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(trainable, lr=lr, betas=(params.adam_beta1, params.adam_beta2),
                                  weight_decay=params.adam_weight_decay)
    scheduler = get_scheduler(params.lr_scheduler, optimizer, num_warmup_steps=params.lr_warmup_steps,
                              num_training_steps=steps)
    module, optimizer, scheduler = accelerator.prepare(module, optimizer, scheduler)
    module.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        batch = to_device(next(batches), accelerator.device)  # the one host -> device move
        with accelerator.autocast():
            out = loss_fn(batch)
        loss = out["loss"]
        if not torch.isfinite(loss.detach()):
            raise NonFiniteLoss(
                f"finetune {phase}: step {step}: the loss is {loss.item()} (objects {batch['uid']}); stopped, nothing "
                f"written ({params.out_dir} keeps its previous contents). Lower finetune.{phase.split('_')[0]}_lr or "
                "use mixed_precision: no/bf16, and check those characters' renders."
            )
        accelerator.backward(loss)
        if params.max_grad_norm > 0:
            accelerator.clip_grad_norm_(trainable, params.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if live is not None:
            for k, v in out.items():
                live.log_metric(f"{phase}/{k}", float(v.detach().float().item()))
            live.log_metric(f"{phase}/lr", scheduler.get_last_lr()[0])
            live.next_step()
        if step % params.log_every == 0 or step == steps:
            sps = step / max(time.perf_counter() - t0, 1e-9)
            log(f"finetune: {phase} step {step}/{steps} loss {loss.item():.4f} psnr {out['psnr'].item():.2f} dB "
                f"lr {scheduler.get_last_lr()[0]:.2e} {sps:.2f} steps/s")
    module.eval()
    accelerator.free_memory()
    return losses


def finetune(params: FinetuneParams, models: ModelsParams, log=print) -> FinetuneResult:
    """Fine-tune what ``params`` enables and write ``params.out_dir`` (see the module docstring)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("finetune runs in one process (GSRecon/GSVAE fine-tuning on a few hundred characters fits one "
                         "GPU): run `python -m stages.finetune` (or `dvc repro finetune`), not under accelerate "
                         "launch / torchrun; the train stage is the multi-GPU one")
    out_dir, metrics_dir = Path(params.out_dir), Path(params.metrics_dir)
    data = train_split_identity(Path(params.packed_dir)) if params.enabled else []
    fp = fingerprint(params, models, data)
    old = read_manifest(out_dir)
    if old is not None and old.get("fingerprint") == fp and _complete(out_dir, old):
        log(f"finetune: {out_dir} is up to date (same settings, base models and train renders); nothing to do")
        return FinetuneResult(skipped=True, out_dir=out_dir)

    manifest = {"format": FORMAT_VERSION, "fingerprint": fp, "base": finetune_base(models),
                "gsrecon": None, "gsvae": None, "steps": {}, "final_loss": {}}
    result = FinetuneResult(skipped=False, out_dir=out_dir)
    # Models and metrics are written into temporary folders and swapped in together at the end: a failed or killed
    # run leaves the previous fine-tune and its curves as they were.
    tmp = out_dir.with_name(f".tmp-{out_dir.name}-{os.getpid()}")
    tmp_metrics = metrics_dir.with_name(f".tmp-{metrics_dir.name}-{os.getpid()}")
    for folder in (tmp, tmp_metrics):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    try:
        if params.enabled:
            _run_phases(params, models, len(data), tmp, manifest, result, tmp_metrics, log)
        else:
            log("finetune: finetune.gsrecon and finetune.gsvae are off: GSRecon and GSVAE stay as published (tiny: as "
                "built); writing a manifest that says so")
            (tmp_metrics / "metrics.json").write_text(json.dumps({"finetune": {"enabled": False}}, indent=4) + "\n")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        install_folder(tmp_metrics, metrics_dir, metrics_dir.parent)
        install_folder(tmp, out_dir, out_dir.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(tmp_metrics, ignore_errors=True)
    return result


def _complete(out_dir: Path, manifest: dict) -> bool:
    return all(manifest.get(m) is None or (out_dir / manifest[m] / "config.json").is_file()
               for m in ("gsrecon", "gsvae"))


def _run_phases(params: FinetuneParams, models: ModelsParams, n_train: int, tmp: Path, manifest: dict,
                result: FinetuneResult, metrics_dir: Path, log) -> None:
    from accelerate import Accelerator
    from dvclive import Live

    from chibisplat.models.sources import load_model_stack

    accelerator = Accelerator(mixed_precision=params.mixed_precision)
    device = accelerator.device
    torch.manual_seed(params.seed)
    # the base weights, never a previous fine-tune
    stack = load_model_stack(dataclasses.replace(models, finetuned=None), with_unet=False)
    for module in to_device((stack.gsrecon, stack.gsvae), device):
        module.requires_grad_(False).eval()
    lpips = None
    if params.lpips_weight > 0 and params.lpips_weights:
        from chibisplat.training.lpips import load_lpips

        lpips = load_lpips(params.lpips_weights, device)
    elif params.lpips_weight > 0:
        log("finetune: LPIPS weight 0: no finetune.lpips_weights configured (loss = image MSE + mask MSE)")
    live = None
    if accelerator.is_main_process:
        live = Live(dir=str(metrics_dir), report=None, save_dvc_exp=False, dvcyaml=False)
    batches = object_batches(params)
    log(f"finetune: {n_train} train characters, {params.resolution}px inputs, renders at {params.render_resolution}px, "
        f"batch {params.batch_size}, device {device}")

    def phase(name, module, trainable, loss_fn, steps, lr):
        if params.gradient_checkpointing and hasattr(module, "enable_gradient_checkpointing"):
            module.enable_gradient_checkpointing()
        for p in trainable:
            p.requires_grad_(True)
            p.data = p.data.float()
        log(f"finetune: {name}: {sum(p.numel() for p in trainable):,} trainable parameters, {steps} steps, lr {lr:g}")
        losses = _fit(name, module, trainable, loss_fn, steps, lr, params, batches, accelerator, live, log)
        for p in trainable:
            p.requires_grad_(False)
        result.losses[name] = losses
        manifest["steps"][name] = steps
        k = max(1, len(losses) // 10)
        manifest["final_loss"][name] = {"first10pct": sum(losses[:k]) / k, "last10pct": sum(losses[-k:]) / k}

    if params.gsrecon and params.gsrecon_steps > 0:
        phase("gsrecon", stack.gsrecon, list(stack.gsrecon.parameters()),
              lambda b: gsrecon_step_loss(stack, b, params, lpips), params.gsrecon_steps, params.gsrecon_lr)
        accelerator.unwrap_model(stack.gsrecon).save_pretrained(str(tmp / "gsrecon"))
        manifest["gsrecon"] = "gsrecon"
    if params.gsvae and params.gsvae_steps > 0:
        phase("gsvae", stack.gsvae, list(stack.gsvae.vae.parameters()),
              lambda b: gsvae_step_loss(stack, b, params, lpips, tiny=False), params.gsvae_steps, params.gsvae_lr)
    if params.gsvae and params.gsvae_tiny_decoder_steps > 0:
        phase("gsvae_tiny_decoder", stack.gsvae, list(stack.gsvae.tiny_decoder.parameters()),
              lambda b: gsvae_step_loss(stack, b, params, lpips, tiny=True), params.gsvae_tiny_decoder_steps,
              params.gsvae_lr)
    if params.gsvae and (params.gsvae_steps > 0 or params.gsvae_tiny_decoder_steps > 0):
        accelerator.unwrap_model(stack.gsvae).save_pretrained(str(tmp / "gsvae"))
        manifest["gsvae"] = "gsvae"
    if live is not None:
        live.summary.setdefault("finetune", {}).update(
            {f"{k}_{w}": v[w] for k, v in manifest["final_loss"].items() for w in ("first10pct", "last10pct")})
        live.make_summary()
        live.end()
    accelerator.end_training()


__all__ = ["FinetuneParams", "FinetuneResult", "NonFiniteLoss", "finetune", "read_manifest"]
