"""GSDiff fine-tuning on the latent cache: the multi-view UNet learns, GSRecon and GSVAE stay frozen.

(To adapt GSRecon / GSVAE too, the ``finetune`` stage trains them in image space *before* the latents are
computed: :mod:`chibisplat.training.finetune`.)

Flat like diffusers' ``train_text_to_image.py``: setup, data, loop, save. One process on a CPU; ``accelerate
launch -m stages.train`` runs the same code on several GPUs (each rank draws its own micro-batches).

Reproducibility and resume: every random draw of a micro-batch (which objects, timesteps, noise, CFG drop,
rendering-loss coin) comes from a generator seeded by (seed, step, micro-batch, rank)
(:func:`~chibisplat.training.objective.step_generator`), not from a data-loader state. A checkpoint
(``accelerator.save_state``: optimizer, LR scheduler, EMA, RNG states, ``train_state.json``, and the UNet: all of it in
full mode, the adapter alone in LoRA mode, :mod:`chibisplat.training.checkpointing`) therefore resumes bit-for-bit
where the run stopped; ``train.resume: auto`` picks the newest checkpoint whose fingerprint (all
settings except the step budget and logging/checkpoint cadence) matches, and starts afresh otherwise.

Outputs under ``train.out_dir`` (default ``models/train``):

* ``unet/``: the inference UNet (EMA weights when ``use_ema``; LoRA merged), ``load_mv_unet`` /
  ``UNet2DConditionModel.from_pretrained`` loadable;
* ``unet/lora/pytorch_lora_weights.safetensors`` (``mode: lora``): the adapter alone, for
  ``unet.load_lora_adapter(folder, weight_name="pytorch_lora_weights.safetensors", prefix=None)`` on the base UNet;
* ``checkpoints/checkpoint-<step>/``: resumable states (at most ``checkpoints_total_limit``);

and dvclive metrics (``metrics.json``, ``plots/metrics/*.tsv``) under ``train.metrics_dir``.
"""

from __future__ import annotations

import copy
import csv
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from chibisplat.config import ModelsParams, TrainParams, plain
from chibisplat.device import to_device
from chibisplat.files import install_folder
from chibisplat.identity import sha256_json
from chibisplat.models.sources import load_model_stack
from chibisplat.training.checkpointing import (
    adapter_only_checkpoints, base_weights_sha256, checkpoints, read_state, remove_checkpoints, save_adapter,
    save_checkpoint,
)
from chibisplat.training.errors import NonFiniteLoss
from chibisplat.training.latents import load_latent_set, read_metadata
from chibisplat.training.image_condition import (
    condition_moments, object_condition_slots, packed_condition_images, prediction_type_for, vae_scaling,
)
from chibisplat.training.objective import (
    diffusion_step_inputs, noise_scheduler, rendering_loss, sample_batch, step_generator, unet_prediction,
)
from chibisplat.training.precision import check_mixed_precision

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# Settings that may change between a checkpoint and its resume (they do not change the trajectory).
RESUMABLE_CHANGES = ("max_steps", "checkpointing_steps", "checkpoints_total_limit", "log_every", "resume",
                     "dataloader_workers")
# torch.compile backend of `train.compile: true` (tests swap in a lighter one to check the wiring quickly).
COMPILE_BACKEND = "inductor"


@dataclass
class TrainResult:
    steps: int
    resumed_from: int
    losses: list[float] = field(default_factory=list)  # diffusion loss of the steps run in this call
    final_dir: Path | None = None


def fingerprint(params: TrainParams, models: ModelsParams, latents_dir: Path, base_unet: str | None = None) -> str:
    """Identity of a training trajectory: settings (except :data:`RESUMABLE_CHANGES`), models, latent files, and
    ``base_unet`` (LoRA: the hash of the base UNet weights, which its checkpoints do not hold)."""
    keys = sorted(read_metadata(p)["cache_key"] for p in sorted((latents_dir / "train").glob("*.safetensors")))
    # plain(): the values as params.yaml writes them (paths as text), so a checkpoint's fingerprint stays valid
    settings = {k: v for k, v in plain(params).items() if k not in RESUMABLE_CHANGES + ("metrics_dir", "out_dir")}
    identity = {"train": settings, "models": plain(models), "latents": keys}
    if base_unet is not None:
        identity["base_unet"] = base_unet
    return sha256_json(identity)


def _truncate_live_tsv(metrics_dir: Path, last_step: int) -> None:
    """Drop per-step rows logged after the checkpoint we resume from (a killed run logged them)."""
    for tsv in (metrics_dir / "plots" / "metrics").rglob("*.tsv"):
        with open(tsv, newline="") as f:
            rows = list(csv.reader(f, delimiter="\t"))
        if not rows:
            continue
        step_col = rows[0].index("step") if "step" in rows[0] else 1
        kept = [rows[0]] + [r for r in rows[1:] if int(r[step_col]) <= last_step]
        with open(tsv, "w", newline="") as f:
            csv.writer(f, delimiter="\t", lineterminator="\n").writerows(kept)


def merged_unet(unet, lora: bool):
    """A plain UNet copy with any LoRA adapter fused into the base weights."""
    out = copy.deepcopy(unet)
    out._compiled_call_impl = None  # a copy of a `train.compile` UNet runs eagerly (it is only saved)
    if lora:
        out.fuse_lora()
        out.unload_lora()
    return out


class MicroBatches(torch.utils.data.Dataset):
    """The micro-batches of steps ``start`` .. ``max_steps`` in order: item i is micro-batch ``i % accumulation`` of
    step ``start + i // accumulation`` as ``{"batch", "inputs", "render"}`` (CPU tensors).

    Every item is a function of (seed, step, micro-batch, rank) alone (:func:`step_generator`), so preparing them
    ahead in ``train.dataloader_workers`` processes gives exactly the batches the loop would draw itself.
    """

    def __init__(self, data, scheduler, scaling, params: TrainParams, rank: int, start: int, render_on: bool,
                 condition: torch.Tensor | None = None, condition_scaling: float | None = None):
        self.data, self.scheduler, self.scaling, self.params = data, scheduler, scaling, params
        self.rank, self.start, self.render_on = rank, start, render_on
        self.condition, self.condition_scaling = condition, condition_scaling  # image model (image_condition.py)

    def __len__(self) -> int:
        return max(0, self.params.max_steps - self.start) * self.params.gradient_accumulation_steps

    def __getitem__(self, i: int) -> dict:
        p = self.params
        step, micro = divmod(i, p.gradient_accumulation_steps)
        g = step_generator(p.seed, self.start + step, micro, self.rank)
        batch = sample_batch(self.data, p.batch_size, g, self.condition)
        inputs = diffusion_step_inputs(batch, self.scheduler, self.scaling, self.data.null_embed, p.cfg_dropout,
                                       self.data.resolution, g, self.condition_scaling)
        render = self.render_on and bool(torch.rand(1, generator=g) < p.rendering_loss_prob)
        return {"batch": batch, "inputs": inputs, "render": render}


PREFETCH_FACTOR = 2  # micro-batches each loader worker keeps ready


def micro_batch_loader(dataset: MicroBatches, workers: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    """``dataset`` in order; ``workers`` > 0 prepares items in that many processes, ``PREFETCH_FACTOR`` each ahead of
    the step; ``pin_memory`` page-locks them (CUDA) so the copy to the GPU can overlap the previous step."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin_memory,
        prefetch_factor=PREFETCH_FACTOR if workers else None,
    )


def device_micro_batch(item: dict, device) -> tuple:
    """A :class:`MicroBatches` item on the training device, as ``(batch, inputs, render)``: the loop's one host ->
    device move (batch and UNet inputs together: the rendering loss reads the batch's cameras and targets)."""
    item = to_device(item, device, non_blocking=True)
    return item["batch"], item["inputs"], item["render"]


def training_step(unet, batch, inputs, scheduler, gsvae, lpips, params: TrainParams, render: bool) -> dict:
    """Loss of one micro-batch: diffusion MSE per object (+ the rendering loss on ``render`` micro-batches)."""
    pred = unet_prediction(unet, inputs)
    diffusion = F.mse_loss(pred.float(), inputs["target"].float())
    out = {"diffusion_loss": diffusion, "loss": params.diffusion_weight * diffusion}
    if render:
        r = rendering_loss(pred, inputs, batch, scheduler, gsvae, lpips, params.lpips_weight, params.rasterizer,
                           params.image_formation)
        out.update(r)
        out["loss"] = out["loss"] + params.render_weight * r["render_loss"]
    return out


def train(params: TrainParams, models: ModelsParams, log=print) -> TrainResult:
    """Run (or resume) the fine-tuning described by ``params``; see the module docstring."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from dvclive import Live

    out_dir, metrics_dir, latents_dir = Path(params.out_dir), Path(params.metrics_dir), Path(params.latents_dir)
    ckpt_root = out_dir / "checkpoints"
    check_mixed_precision("train.mixed_precision", params.mixed_precision, "cuda" if torch.cuda.is_available() else None)
    accelerator = Accelerator(
        mixed_precision=params.mixed_precision,
        gradient_accumulation_steps=params.gradient_accumulation_steps,
        log_with=None,
        project_config=ProjectConfiguration(project_dir=str(out_dir)),
    )
    device, rank, main = accelerator.device, accelerator.process_index, accelerator.is_main_process
    if params.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # --- data and models
    data = load_latent_set(latents_dir, "train", Path(params.embeddings))
    stack = load_model_stack(models)
    image_conditioned = models.image_conditioned
    scheduler = noise_scheduler(stack, prediction_type_for(image_conditioned, params.prediction_type))
    condition = condition_scaling = None
    if image_conditioned:  # each object's condition view (input view 0) through SD1.5's VAE, once
        slots = object_condition_slots(latents_dir, "train")
        if len(slots) != len(data):
            raise ValueError(f"{latents_dir}/train changed while reading it ({len(slots)} vs {len(data)} objects); "
                             "run the train stage again")
        images = packed_condition_images(Path(params.packed_dir), "train", slots, data.resolution, log)
        image_vae = to_device(stack.image_vae, device).requires_grad_(False).eval()
        condition, condition_scaling = condition_moments(image_vae, images), vae_scaling(image_vae)
    gsvae = to_device(stack.gsvae, device).requires_grad_(False).eval()
    unet = stack.unet.requires_grad_(False)
    lora = params.mode == "lora"
    base_unet = base_weights_sha256(unet) if lora else None  # LoRA checkpoints hold the adapter only
    torch.manual_seed(params.seed)  # LoRA's gaussian init
    if lora:
        unet.add_adapter(lora_config(params.lora_rank, params.lora_alpha))
    else:
        unet.requires_grad_(True)
    if params.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    trainable = [p for p in unet.parameters() if p.requires_grad]
    for p in trainable:  # train in fp32 under fp16/bf16 autocast (diffusers' cast_training_params)
        p.data = p.data.float()
    if params.compile:  # in place: the same module, parameters and state_dict names (checkpoints, EMA, LoRA fuse)
        unet.compile(backend=COMPILE_BACKEND)
    lpips = None
    render_on = params.rendering_loss_prob > 0 and params.render_weight > 0
    if render_on and params.lpips_weight > 0:
        if params.lpips_weights:
            from chibisplat.training.lpips import load_lpips

            lpips = load_lpips(params.lpips_weights, device)
        elif main:
            log("train: LPIPS weight 0: no train.lpips_weights configured (rendering loss = image MSE + mask MSE)")

    optimizer = torch.optim.AdamW(trainable, lr=params.lr, betas=(params.adam_beta1, params.adam_beta2),
                                  weight_decay=params.adam_weight_decay, eps=params.adam_epsilon,
                                  fused=True if params.fused_adamw else None)
    lr_scheduler = get_scheduler(params.lr_scheduler, optimizer,
                                 num_warmup_steps=params.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=params.max_steps * accelerator.num_processes)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    if lora:
        adapter_only_checkpoints(accelerator, unet)
    ema = None
    if params.use_ema:
        ema = EMAModel(trainable, decay=params.ema_decay, use_ema_warmup=True, inv_gamma=1.0, power=params.ema_power,
                       foreach=params.ema_foreach)
        accelerator.register_for_checkpointing(ema)

    # --- resume
    fp = fingerprint(params, models, latents_dir, base_unet)
    start = 0
    found = checkpoints(ckpt_root) if params.resume == "auto" else []
    states = {c: read_state(c) for c in found}
    usable = [c for c in found if states[c].get("fingerprint") == fp and states[c]["step"] <= params.max_steps]
    if usable:
        accelerator.load_state(str(usable[-1]))
        start = states[usable[-1]]["step"]
        log(f"train: resumed from {usable[-1]} (step {start})")
    elif ckpt_root.exists():
        if found and main:
            log(f"train: {len(found)} checkpoint(s) in {ckpt_root} belong to other settings, data or a longer run; "
                "starting afresh")
        if main:
            remove_checkpoints(ckpt_root)
    if ema is not None:
        to_device(ema, device)
    accelerator.wait_for_everyone()

    live = None
    if main and start >= params.max_steps:
        log(f"train: checkpoint at step {start} already reached train.max_steps; writing the final UNet only "
            f"({metrics_dir} left as it is)")
    elif main:
        if start:
            _truncate_live_tsv(metrics_dir, start)
        live = Live(dir=str(metrics_dir), resume=bool(start), report=None, save_dvc_exp=False, dvcyaml=False)
        log(f"train: {len(data)} objects ({len(set(data.uids))} characters x view sets), mode {params.mode}, "
            f"{sum(p.numel() for p in trainable):,} trainable / {sum(p.numel() for p in unet.parameters()):,} UNet "
            f"parameters, {params.max_steps} steps, batch {params.batch_size} x {accelerator.num_processes} "
            f"process(es) x {params.gradient_accumulation_steps} accumulation, device {device}")

    result = TrainResult(steps=start, resumed_from=start)
    micro_batches = iter(micro_batch_loader(
        MicroBatches(data, scheduler, gsvae.scale_latents, params, rank, start, render_on, condition,
                     condition_scaling),
        params.dataloader_workers, pin_memory=device.type == "cuda"))
    step, t_last, s_last = start, time.perf_counter(), start
    while step < params.max_steps:
        logs: dict[str, float] = {}
        for micro in range(params.gradient_accumulation_steps):
            batch, inputs, render = device_micro_batch(next(micro_batches), device)
            with accelerator.accumulate(unet), accelerator.autocast():
                losses = training_step(unet, batch, inputs, scheduler, gsvae, lpips, params, render)
                loss = losses["loss"]
                if not torch.isfinite(loss.detach()).all():
                    ckpts = checkpoints(ckpt_root)
                    last = ckpts[-1] if ckpts else None
                    raise NonFiniteLoss(
                        f"train: step {step + 1}: the loss is {loss.item()} (diffusion "
                        f"{losses['diffusion_loss'].item()}); training stopped without saving. Last good checkpoint: "
                        f"{last or 'none'} (kept; train.resume: auto resumes from it). Lower train.lr, check the "
                        f"latents in {latents_dir} for NaN/inf, or use mixed_precision: bf16/no."
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients and params.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable, params.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            for k, v in losses.items():
                logs[k] = logs.get(k, 0.0) + v.detach().float().item() / params.gradient_accumulation_steps
        step += 1
        if ema is not None:
            ema.step(trainable)
        result.losses.append(logs["diffusion_loss"])
        if live is not None:
            live.step = step
            live.log_metric("train/loss", logs["loss"])
            live.log_metric("train/diffusion_loss", logs["diffusion_loss"])
            live.log_metric("train/render_loss", logs.get("render_loss", float("nan")) if render_on else 0.0)
            live.log_metric("train/lr", lr_scheduler.get_last_lr()[0])
            live.next_step()
        if main and (step % params.log_every == 0 or step == params.max_steps):
            now = time.perf_counter()
            sps = (step - s_last) / max(now - t_last, 1e-9)
            t_last, s_last = now, step
            extra = f" render {logs['render_loss']:.4f}" if "render_loss" in logs else ""
            log(f"train: step {step}/{params.max_steps} loss {logs['loss']:.4f} (diffusion "
                f"{logs['diffusion_loss']:.4f}{extra}) lr {lr_scheduler.get_last_lr()[0]:.2e} {sps:.2f} steps/s")
        if step % params.checkpointing_steps == 0 or step == params.max_steps:
            save_checkpoint(accelerator, ckpt_root, step, fp, params.checkpoints_total_limit, log)

    accelerator.wait_for_everyone()
    result.steps = step
    if main:
        result.final_dir = _save_final(accelerator.unwrap_model(unet), ema, trainable, lora, out_dir, log)
        if live is not None:
            n = len(result.losses)
            k = max(1, n // 10)
            summary = live.summary.setdefault("train", {})
            if n:
                summary["diffusion_loss_first10pct"] = sum(result.losses[:k]) / k
                summary["diffusion_loss_last10pct"] = sum(result.losses[-k:]) / k
            summary["steps"] = step
            live.make_summary()
            live.end()
    accelerator.end_training()
    return result


def _save_final(unet, ema, trainable, lora: bool, out_dir: Path, log) -> Path:
    """The inference UNet (and LoRA adapter), written beside ``out_dir/unet`` and swapped in with renames only."""
    staged = out_dir / ".tmp-unet"
    shutil.rmtree(staged, ignore_errors=True)  # left by a killed run
    if ema is not None:  # inference uses the EMA weights (DiffSplat's unet_ema)
        ema.store(trainable)
        ema.copy_to(trainable)
    try:
        merged = merged_unet(unet, lora)
        merged.save_pretrained(str(staged))
        if lora:
            save_adapter(unet, staged / "lora")
    finally:
        if ema is not None:
            ema.restore(trainable)
    install_folder(staged, out_dir / "unet", out_dir)
    log(f"train: final UNet in {out_dir / 'unet'}" + (f", LoRA adapter in {out_dir / 'unet' / 'lora'}" if lora else ""))
    return out_dir / "unet"


def lora_config(rank: int, alpha: int):
    """The LoRA adapter ``train.mode: lora`` adds to the UNet: rank ``rank``, scale ``alpha / rank``, on the attention
    projections :data:`LORA_TARGETS`, gaussian-initialised A and zero B (peft ``LoraConfig``; diffusers' recipe)."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=LORA_TARGETS)


def parameter_counts(unet, mode: str, lora_rank: int = 4, lora_alpha: int = 4) -> tuple[int, int]:
    """(trainable, total) parameters of ``unet`` trained with ``mode`` (adds the LoRA adapter in place)."""
    unet.requires_grad_(False)
    if mode == "lora":
        unet.add_adapter(lora_config(lora_rank, lora_alpha))
    else:
        unet.requires_grad_(True)
    params = list(unet.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


__all__ = ["NonFiniteLoss", "TrainParams", "TrainResult", "train", "training_step", "parameter_counts", "lora_config"]
