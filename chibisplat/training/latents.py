"""The latent cache: the frozen half of GSDiff training, done once per character (docs/diffsplat-reference.md §4, §5).

For every character and every fixed "even" input-view set (:data:`chibisplat.protocol.EVEN_VIEW_SETS`: 6 on ring A,
3 on ring B),
GSRecon turns the 4 posed input views into splatter images and the GSVAE encodes them (posterior mean, eval
mode). A training step then runs only the UNet.

One file per character: ``<out_dir>/<split>/<uid>.safetensors`` with, for S view sets at resolution R
(latent size h = R / 8, render-target resolution Rr):

* ``latents`` (S, 4, 4, h, h) float32: GSVAE latents of the 4 input views, **unscaled**;
* ``C2W`` (S, 8, 4, 4), ``fxfycxcy`` (S, 8, 4): canonical cameras (first input view at azimuth 0, distance 1.4)
  of the 4 input views then 4 supervision views (the rendering loss' targets);
* ``view_indices`` (S, 8) int64 slots; ``target_rgba`` (S, 8, 4, Rr, Rr) uint8 (RGB on white + alpha);

and metadata ``uid``, ``caption``, ``caption_sha256`` (the key into prompt_embeds.parquet) and ``cache_key``,
the sha256 of the character's source/render hashes, the model identity and these settings: a character is
re-encoded only when one of them changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from chibisplat.config import LatentParams, ModelsParams
from chibisplat.dataset import schema
from chibisplat.dataset.loader import PromptEmbeddings, ViewConfig, object_views
from chibisplat.dataset.pack import packed_files
from chibisplat.dataset.rows import shard_rows
from chibisplat.device import module_device, resolve_device, to_device
from chibisplat.files import atomic_path
from chibisplat.identity import sha256_json, sha256_text
from chibisplat.models.sources import load_model_stack
from chibisplat.protocol import DUPLICATE_SLOTS, EVEN_VIEW_SETS, NUM_INPUT_VIEWS, NUM_SLOTS, NUM_SUPERVISION_VIEWS
from chibisplat.safetensors_io import safetensors_bytes
from chibisplat.splats.splatter import to_splatter_image
from chibisplat.training.precision import autocast, check_mixed_precision

FORMAT_VERSION = 1


def selected_view_sets(params: LatentParams) -> tuple[int, ...]:
    """Indices into :data:`EVEN_VIEW_SETS` that ``params`` encodes (all of them unless ``latents.view_sets``)."""
    return tuple(range(len(EVEN_VIEW_SETS))) if params.view_sets is None else params.view_sets


def supervision_views(uid: str, set_index: int, inputs: tuple[int, ...]) -> list[int]:
    """4 fixed supervision slots for one (character, view set): like the loader's pick, but seeded by both."""
    excluded = set(inputs) | set(DUPLICATE_SLOTS)
    others = [i for i in range(NUM_SLOTS) if i not in excluded]
    random.Random(f"{uid}:{set_index}").shuffle(others)
    return others[:NUM_SUPERVISION_VIEWS]


def model_identity(stack) -> str:
    """sha256 of GSRecon's and GSVAE's weights (what the latents depend on)."""
    h = hashlib.sha256()
    for name, module in (("gsrecon", stack.gsrecon), ("gsvae", stack.gsvae)):
        h.update(name.encode())
        for key, t in sorted(module.state_dict().items()):
            h.update(key.encode())
            h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()


def gsrecon_splatter(gsrecon, views: dict[str, torch.Tensor], device=None) -> torch.Tensor:
    """GSRecon on the 4 input views (views 0..3) of B objects -> their splatter images (B, 4, 12, R, R).

    ``views``: loader tensors with a leading object axis, ``image``/``normal``/``coord`` (B, V, 3, R, R) in [0, 1],
    ``C2W`` (B, V, 4, 4), ``fxfycxcy`` (B, V, 4); GSRecon sees ``[image, normal, coord]`` (B, 4, 9, R, R).
    """
    v = NUM_INPUT_VIEWS
    images = torch.cat([views["image"][:, :v], views["normal"][:, :v], views["coord"][:, :v]], dim=2)
    images, c2w, fxfycxcy = to_device((images, views["C2W"][:, :v], views["fxfycxcy"][:, :v]),
                                      module_device(gsrecon) if device is None else device)
    return to_splatter_image(gsrecon(images, c2w, fxfycxcy))


def one_object(views: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of one object's views (``object_views``) with a leading object axis of 1."""
    return {k: v[None] for k, v in views.items() if torch.is_tensor(v)}


@torch.no_grad()
def encode_views(stack, views: dict[str, torch.Tensor], device: str = "cpu", mixed_precision: str = "no") -> torch.Tensor:
    """One object's 4 input views (loader tensors, views 0..3) -> unscaled GSVAE latents (4, 4, R/8, R/8), float32.

    Its splatter images (4, 12, R, R) are encoded by the GSVAE's posterior mean (eval mode), as GSDiff trains on;
    ``mixed_precision`` ``bf16``/``fp16`` runs both models under that autocast.
    """
    with autocast(device, mixed_precision):
        splatter = gsrecon_splatter(stack.gsrecon, one_object(views), device)[0]  # (4, 12, R, R)
        latents, _ = stack.gsvae.encode(splatter, sample=False)
    return latents.float().cpu()


def _target_rgba(views: dict[str, torch.Tensor], size: int) -> torch.Tensor:
    rgba = torch.cat([views["image"], views["mask"]], dim=1)  # (V, 4, R, R) in [0, 1]
    if rgba.shape[-1] != size:
        rgba = F.interpolate(rgba, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (rgba.clamp(0, 1) * 255.0).round().to(torch.uint8)


def encode_character(stack, row: dict, params: LatentParams) -> dict[str, torch.Tensor]:
    """All view sets of one packed row -> the tensors of its cache file (module docstring)."""
    uid = row[schema.UID]
    device = resolve_device(params.device, "params.yaml latents.device")
    config = ViewConfig(resolution=params.resolution)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("latents", "C2W", "fxfycxcy", "view_indices", "target_rgba")}
    for s in selected_view_sets(params):
        inputs = EVEN_VIEW_SETS[s]
        indices = list(inputs) + supervision_views(uid, s, inputs)
        try:
            views = object_views(row[schema.IMAGES], row[schema.NORMAL_DEPTH], row[schema.CAMERAS], indices, config)
        except (ValueError, IndexError, KeyError) as e:
            raise ValueError(f"character {uid}: cannot read views {indices}: {e}; re-render and re-pack it") from None
        out["latents"].append(encode_views(stack, views, device, params.mixed_precision))
        out["C2W"].append(views["C2W"])
        out["fxfycxcy"].append(views["fxfycxcy"])
        out["view_indices"].append(views["view_indices"])
        out["target_rgba"].append(_target_rgba(views, params.render_resolution))
    return {k: torch.stack(v).contiguous() for k, v in out.items()}


def cache_key(row: dict, models_id: str, params: LatentParams) -> str:
    return sha256_json({
        "format": FORMAT_VERSION,
        "uid": row[schema.UID],
        "caption_sha256": sha256_text(row[schema.CAPTION]),
        "source_sha256": row[schema.SOURCE_SHA256],
        "render_config_sha256": row[schema.RENDER_CONFIG_SHA256],
        "models": models_id,
        "resolution": params.resolution,
        "render_resolution": params.render_resolution,
        "view_sets": EVEN_VIEW_SETS if params.view_sets is None else [EVEN_VIEW_SETS[s] for s in params.view_sets],
        # only when set, so the keys (and files) of float32 encodings stay what they were
        **({"mixed_precision": params.mixed_precision} if params.mixed_precision != "no" else {}),
    })


def read_metadata(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


@dataclass
class LatentSummary:
    encoded: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    executor: dict = field(default_factory=dict)  # what the executor shipped (chibisplat/executors RunStats)


def build_latents(params: LatentParams, models: ModelsParams, log=print, executor=None) -> LatentSummary:
    """Encode every packed character whose cache key changed; remove files of characters no longer packed.

    ``executor``: where the encoding runs (``chibisplat.executors.ExecutorConfig``, params.yaml ``cluster.latents``);
    None: in this process. Either way this process decides what is stale and writes every file."""
    from chibisplat.executors.latents import latent_encoder

    # latents.device auto: CUDA when present (decided here, where the encoders are placed)
    params = dataclasses.replace(params, device=str(resolve_device(params.device, "params.yaml latents.device")))
    check_mixed_precision("latents.mixed_precision", params.mixed_precision, params.device)
    summary = LatentSummary()
    encoder = None
    embeddings = PromptEmbeddings(params.embeddings)
    stack = None
    models_id = None
    for split in params.splits:
        files = packed_files(params.packed_dir, split)
        split_dir = params.out_dir / split
        split_dir.mkdir(parents=True, exist_ok=True)
        seen: set[str] = set()
        for shard in files:
            for row in shard_rows(shard):
                uid = row[schema.UID]
                seen.add(uid)
                embeddings[row[schema.CAPTION]]  # a missing caption embedding fails here, naming the caption
                if stack is None:
                    stack = load_model_stack(models, with_unet=False)  # GSRecon + GSVAE only
                    to_device((stack.gsrecon, stack.gsvae), params.device)
                    models_id = model_identity(stack)
                    encoder = latent_encoder(executor, lambda r: encode_character(stack, r, params), params, models,
                                             models_id, log)
                key = cache_key(row, models_id, params)
                path = split_dir / f"{uid}.safetensors"
                if path.is_file() and read_metadata(path).get("cache_key") == key:
                    summary.reused.append(uid)
                    continue
                meta = {
                    "format": str(FORMAT_VERSION), "uid": uid, "caption": row[schema.CAPTION],
                    "caption_sha256": sha256_text(row[schema.CAPTION]), "cache_key": key, "models": models_id,
                    "view_sets": json.dumps([EVEN_VIEW_SETS[s] for s in selected_view_sets(params)]),
                }

                def install(tensors, where, path=path, meta=meta, split=split, uid=uid):
                    with atomic_path(path) as tmp:  # a killed run never leaves half a file
                        tmp.write_bytes(safetensors_bytes(tensors, meta))  # sorted metadata: same inputs, same bytes
                        os.chmod(tmp, 0o644)
                    summary.encoded.append(uid)
                    log(f"latents: {split}/{uid}: {tuple(tensors['latents'].shape)} encoded"
                        + (f" on {where}" if where else ""))

                encoder.submit(uid, row, install)
        if encoder is not None:
            encoder.drain()  # every file of this split is written before stale ones are judged
        for stale in sorted(split_dir.glob("*.safetensors")):
            if stale.stem not in seen:
                stale.unlink()
                summary.removed.append(stale.stem)
                log(f"latents: {split}/{stale.stem}: removed (no longer packed)")
    if encoder is not None:
        encoder.close()
        summary.executor = encoder.stats.as_dict()
    log(f"latents: {len(summary.encoded)} encoded, {len(summary.reused)} reused, {len(summary.removed)} removed")
    return summary


@dataclass
class LatentSet:
    """The cache of one split in memory: N = characters x view sets training objects.

    latents (N, 4, 4, h, h) unscaled; C2W (N, 8, 4, 4); fxfycxcy (N, 8, 4); target_rgba (N, 8, 4, Rr, Rr) uint8;
    prompt_embeds (N, 77, 768); null_embed (77, 768); uids / captions per object.
    """

    latents: torch.Tensor
    C2W: torch.Tensor
    fxfycxcy: torch.Tensor
    target_rgba: torch.Tensor
    prompt_embeds: torch.Tensor
    null_embed: torch.Tensor
    uids: list[str]
    captions: list[str]
    resolution: int

    def __len__(self) -> int:
        return self.latents.shape[0]


def load_latent_set(latents_dir: Path, split: str, embeddings_path: Path) -> LatentSet:
    """Read ``<latents_dir>/<split>/*.safetensors`` and join each character's caption embedding."""
    split_dir = Path(latents_dir) / split
    files = sorted(split_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{split_dir}: no latent files; run the latents stage (dvc repro latents)")
    embeddings = PromptEmbeddings(embeddings_path)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("latents", "C2W", "fxfycxcy", "target_rgba", "prompt_embeds")}
    uids, captions = [], []
    for path in files:
        meta = read_metadata(path)
        if meta.get("format") != str(FORMAT_VERSION):
            raise ValueError(f"{path}: latent cache format {meta.get('format')} != {FORMAT_VERSION}; re-run the latents stage")
        with safe_open(str(path), framework="pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}
        try:
            embed = embeddings.by_sha[meta["caption_sha256"]]
        except KeyError:
            raise KeyError(
                f"{path} (character {meta.get('uid')}): prompt_embeds.parquet has no embedding for its caption "
                f"{meta.get('caption')!r}; re-run the embed stage, then the latents stage (dvc repro latents)"
            ) from None
        s = t["latents"].shape[0]
        for k in ("latents", "C2W", "fxfycxcy", "target_rgba"):
            parts[k].append(t[k])
        parts["prompt_embeds"].append(embed[None].expand(s, -1, -1))
        uids += [meta["uid"]] * s
        captions += [meta["caption"]] * s
    cat = {k: torch.cat(v) for k, v in parts.items()}
    resolution = cat["latents"].shape[-1] * 8
    return LatentSet(
        cat["latents"], cat["C2W"], cat["fxfycxcy"], cat["target_rgba"], cat["prompt_embeds"].contiguous(),
        embeddings.null, uids, captions, resolution,
    )
