"""Random full-size weights in exactly the published layouts, for running the real (pretrained) path offline.

    python -m chibisplat.models.fixture --out DIR          # ~6 GB of float32 files, about a minute on 2 cores
    python -m chibisplat.models.fixture --out DIR --image  # + the image-conditioned UNet and SD1.5's VAE (~+3.7 GB)

writes::

    DIR/diffsplat/gsrecon_gobj265k_cnp_even4/checkpoints/124320/model.safetensors     GSRecon (41.8M), accelerate layout
    DIR/diffsplat/gsvae_gobj265k_sd/checkpoints/<iter>/model.safetensors            GSVAE (SD1.5 VAE + TAESD, 84M)
    DIR/diffsplat/gsdiff_gobj83k_sd15__render/checkpoints/013020/unet_ema/          config.json as DiffSplat's
        UNetMV2DConditionModel writes it (MV2D block names) + diffusion_pytorch_model.safetensors (conv_in 10, 860M)
    DIR/diffsplat/gsdiff_gobj83k_sd15_image__render/checkpoints/013020/unet_ema/    (--image) the image-conditioned
        UNet: same layout, conv_in 11, view_concat_condition / input_concat_binary_mask true (docs/image-to-3d.md §1)
    DIR/sd15/unet/config.json, DIR/sd15/scheduler/scheduler_config.json            SD1.5's configs
    DIR/sd15/vae/                                (--image) SD1.5's RGB AutoencoderKL (84M): encodes the condition image
    DIR/sd15/text_encoder/                       full-size CLIP ViT-L/14 text encoder (12 layers, hidden 768, 123M)
    DIR/sd15/tokenizer/                          a byte-level CLIPTokenizer built locally (no hub)
    DIR/clip-vit-large-patch14/                  full-size CLIPModel ViT-L/14 (evaluate's CLIP score) + tokenizer

and prints the ``models:`` / ``evaluate.clip`` params that point at it. Everything is read back by the project's
own loaders (``models.source: pretrained`` with ``models.diffsplat.path``, ``models.sd15.path``,
``evaluate.clip.path``): :func:`chibisplat.models.sources.pretrained_model_stack`,
:func:`chibisplat.dataset.text_encoder.load_pretrained`, :class:`chibisplat.training.clip_score.ClipScorer`. The
weights are random (seeded): the fixture proves the code paths, shapes, memory and speed, not image quality.
SD1.5's own VAE and 4-channel UNet weights are not written: no pretrained-path stage reads them (the GSVAE and
the GSDiff UNet come from DiffSplat's checkpoints).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from chibisplat.dataset.schema import PROMPT_DIM, PROMPT_TOKENS
from chibisplat.dataset.text_encoder import BOS, EOS, write_tiny_tokenizer
from chibisplat.models.checkpoints import save_accelerate_checkpoint
from chibisplat.models.gsdiff import (
    DIFFSPLAT_BLOCK_NAMES, SD15_UNET_CONFIG, build_mv_unet, mv_unet_config, mv_unet_in_channels,
)
from chibisplat.models.gsrecon import GSRecon
from chibisplat.models.gsvae import GSAutoencoderKL, sd15_vae
from chibisplat.models.sources import (
    GSDIFF_IMAGE_UNET_SUBDIR, GSDIFF_UNET_SUBDIR, GSRECON_TAG, GSVAE_TAG, SD15_VAE_SUBFOLDER,
)

GSRECON_ITERATION = 124320  # the released GSRecon checkpoint (reference: 30 epochs x 4144 steps)
GSVAE_ITERATION = 124320  # not observed in the release; any <iteration>/ folder is read (the highest)
DIFFSPLAT_DIR, SD15_DIR, CLIP_DIR = "diffsplat", "sd15", "clip-vit-large-patch14"
DIFFSPLAT_UNET_CLASS = "UNetMV2DConditionModel"
# SD1.5's text_encoder/config.json (CLIP ViT-L/14's text tower).
SD15_TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=PROMPT_DIM, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=PROMPT_TOKENS, hidden_act="quick_gelu", projection_dim=768, layer_norm_eps=1e-5,
)
# openai/clip-vit-large-patch14's vision tower.
CLIP_VISION_CONFIG = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
    patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)


def write_diffsplat_unet(unet, folder: Path) -> Path:
    """``unet`` saved as DiffSplat's ``unet_ema`` folder: diffusers weights, config naming its MV2D blocks."""
    folder = Path(folder)
    unet.save_pretrained(str(folder), safe_serialization=True)
    cfg = json.loads((folder / "config.json").read_text())
    published = {ours: theirs for theirs, ours in DIFFSPLAT_BLOCK_NAMES.items()}
    cfg["_class_name"] = DIFFSPLAT_UNET_CLASS
    for key in ("down_block_types", "up_block_types"):
        cfg[key] = [published.get(b, b) for b in cfg[key]]
    cfg["mid_block_type"] = published.get(cfg.get("mid_block_type"), cfg.get("mid_block_type"))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return folder


def image_unet_config(base: dict | None = None) -> dict:
    """The image-conditioned GSDiff UNet's config (conv_in 11, DiffSplat's image flags) from a 4-channel SD config."""
    return mv_unet_config(base, in_channels=mv_unet_in_channels(True), image_conditioned=True)


def write_image_model(root: Path, sd15: Path, unet, image_vae) -> tuple[Path, Path]:
    """The image-to-3D files in their published places: ``unet`` as ``<root>/gsdiff_gobj83k_sd15_image__render/
    checkpoints/013020/unet_ema`` and ``image_vae`` as ``<sd15>/vae`` (diffusers layout)."""
    unet_dir = write_diffsplat_unet(unet, Path(root) / GSDIFF_IMAGE_UNET_SUBDIR)
    vae_dir = Path(sd15) / SD15_VAE_SUBFOLDER
    image_vae.save_pretrained(str(vae_dir), safe_serialization=True)
    return unet_dir, vae_dir


def _token_ids(vocab: dict[str, int]) -> dict:
    return dict(bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS])


def write_clip_model(folder: Path, text: dict, vision: dict, projection_dim: int, seed: int = 0) -> Path:
    """A ``transformers.CLIPModel`` folder (config, weights, locally built tokenizer, preprocessor config)."""
    from transformers import CLIPConfig, CLIPModel
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    folder = Path(folder)
    vocab = write_tiny_tokenizer(folder)
    config = CLIPConfig(text_config=dict(text, **_token_ids(vocab)), vision_config=vision,
                        projection_dim=projection_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.save_pretrained(folder, safe_serialization=True)
    size = vision["image_size"]
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
        "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_normalize": True,
        "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD, "resample": 3,
    }, indent=2) + "\n")
    return folder


def write_sd15(folder: Path, seed: int = 0) -> Path:
    """The SD1.5 files the pretrained path reads: unet/config.json, scheduler/, text_encoder/, tokenizer/."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from chibisplat.training.objective import SD15_SCHEDULER_CONFIG

    folder = Path(folder)
    (folder / "unet").mkdir(parents=True, exist_ok=True)
    unet_cfg = {"_class_name": "UNet2DConditionModel", **SD15_UNET_CONFIG}
    (folder / "unet" / "config.json").write_text(json.dumps(unet_cfg, indent=2) + "\n")
    (folder / "scheduler").mkdir(exist_ok=True)
    sched = {"_class_name": "PNDMScheduler", **SD15_SCHEDULER_CONFIG, "skip_prk_steps": True}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2) + "\n")
    vocab = write_tiny_tokenizer(folder / "tokenizer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG, **_token_ids(vocab)))
    encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    return folder


def write_fixture(out: Path, seed: int = 0, clip: bool = True, log=print, image: bool = False) -> dict:
    """Write every folder of the module docstring under ``out`` (``image``: the image-to-3D ones too); returns the
    params that select them."""
    out = Path(out)
    root = out / DIFFSPLAT_DIR
    times = {}
    with torch.random.fork_rng(devices=[]):
        t = time.perf_counter()
        torch.manual_seed(seed)
        save_accelerate_checkpoint(GSRecon(), root / GSRECON_TAG, GSRECON_ITERATION)
        torch.manual_seed(seed + 1)
        save_accelerate_checkpoint(GSAutoencoderKL(), root / GSVAE_TAG, GSVAE_ITERATION)
        times["gsrecon+gsvae"] = time.perf_counter() - t
        t = time.perf_counter()
        torch.manual_seed(seed + 2)
        write_diffsplat_unet(build_mv_unet(mv_unet_config()), root / GSDIFF_UNET_SUBDIR)
        times["unet"] = time.perf_counter() - t
    t = time.perf_counter()
    write_sd15(out / SD15_DIR, seed + 3)
    times["sd15"] = time.perf_counter() - t
    params = {
        "models": {"source": "pretrained", "sd15": {"path": str(out / SD15_DIR)},
                   "diffsplat": {"path": str(root)}},
    }
    if image:
        t = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 5)
            write_image_model(root, out / SD15_DIR, build_mv_unet(image_unet_config()), sd15_vae())
        times["image model"] = time.perf_counter() - t
        params["models"]["image_conditioned"] = True
    if clip:
        t = time.perf_counter()
        write_clip_model(out / CLIP_DIR, SD15_TEXT_CONFIG, CLIP_VISION_CONFIG, projection_dim=768, seed=seed + 4)
        times["clip"] = time.perf_counter() - t
        params["evaluate"] = {"clip": {"path": str(out / CLIP_DIR)}}
    log("fixture: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()) + f" -> {out}")
    return params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder to write (created)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-clip", dest="clip", action="store_false", help="skip the CLIP ViT-L/14 folder")
    parser.add_argument("--image", action="store_true",
                        help="also the image-conditioned UNet and SD1.5's VAE (image-to-3D; models.image_conditioned)")
    args = parser.parse_args(argv)
    params = write_fixture(args.out, args.seed, args.clip, image=args.image)
    print("params.yaml keys that select it (dvc exp run -S ... or a params file):")
    print(json.dumps(params, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
