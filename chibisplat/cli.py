"""The ``chibisplat`` command.

    chibisplat generate "a chibi witch with a big hat" --out out/
    chibisplat generate --image drawing.png --out out/          # image-to-3D (the image model)

writes ``views.png`` (4 views at azimuth 0/90/180/270; with --image the prepared input first), ``splat.ply``
(standard 3DGS) and ``turntable.gif`` from the trained UNet (``generate.unet``, default models/train/unet). Defaults
come from params.yaml's ``generate:`` section (its preset for ``models.source``); the options below override them.

``--image``: a front view of the character on any background. Its foreground is cut out with the image's alpha
channel when it has one, else with a border-colour matte (docs/image-to-3d.md §6), recentred with a 20% border on
white and fed to DiffSplat's image-conditioned model (``models.image_conditioned: true``; the UNet must have been
trained with it). The prompt is optional then ("" by default, as DiffSplat).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from chibisplat.config import Config


TINY_NOTE = ("generate: note: models.source is tiny: this output comes from untrained tiny models (random GSRecon/GSVAE, "
             "a tiny UNet trained for minutes on a CPU) and checks the plumbing only; it is not a real 3D character. "
             "Set models.source: pretrained (SD1.5 + the DiffSplat checkpoints) for real results.")


def run_generate(cfg: Config, prompt: str | None, out_dir: Path | None = None, log=print,
                 image: str | Path | None = None, **overrides) -> dict[str, Path]:
    """Encode ``prompt`` with the configured text encoder and generate into ``out_dir``.

    ``cfg``: the typed params (:class:`chibisplat.config.Config` with ``generate``, ``models``, ``embed``);
    ``overrides``: ``generate`` keys given on the command line (None: the params.yaml value).

    ``image``: image-to-3D from that front view (switches ``models.image_conditioned`` on for this call); ``prompt``
    None means ``generate.prompt`` for text and ``""`` with an image. With ``models.image_conditioned: true`` and no
    image the image model runs with its "no image" condition (a zero latent, as DiffSplat's pipeline does).
    """
    import torch

    from chibisplat.dataset.text_encoder import load_text_encoder
    from chibisplat.device import resolve_device, to_device
    from chibisplat.models.sources import load_model_stack
    from chibisplat.training.inference import generate, load_trained_unet
    from chibisplat.training.objective import noise_scheduler

    from chibisplat.models.gsdiff import is_image_conditioned
    from chibisplat.models.sources import check_unet_conditioning
    from chibisplat.training.image_condition import load_condition_image, prediction_type_for

    models = cfg.models
    if image is not None:
        models = dataclasses.replace(models, image_conditioned=True)
    image_conditioned = models.image_conditioned
    if prompt is None and image is not None:
        prompt = ""
    given = {k: v for k, v in dict(overrides, prompt=prompt, image=image).items() if v is not None}
    gp = dataclasses.replace(cfg.generate, **given)
    device = resolve_device(gp.device, "generate.device (params.yaml, or --device)")
    if models.tiny:
        log(TINY_NOTE)
    encoder = load_text_encoder(models, cfg.embed.tiny_cache_dir, cfg.embed.tiny_seed, device)
    prompt_embed, null_embed = (torch.from_numpy(e) for e in encoder.encode([gp.prompt, ""]))
    # GSVAE, scheduler (and the image VAE); the trained UNet is loaded below
    stack = load_model_stack(models, with_unet=False, with_image_vae=image_conditioned)
    to_device(stack.gsvae, device).eval()
    unet = load_trained_unet(gp.unet, device)
    check_unet_conditioning(unet, image_conditioned, gp.unet)
    resolution = gp.resolution  # latents.resolution (chibisplat/config.py derives it)
    condition_image = None
    if image_conditioned and gp.image is not None:
        condition_image, _, method = load_condition_image(Path(gp.image), resolution, gp.border_ratio,
                                                          gp.matte_tolerance)
        log(f"generate: {gp.image}: foreground from its {method}, recentred with border ratio {gp.border_ratio}")
        to_device(stack.image_vae, device).eval()
    scheduler = noise_scheduler(stack, prediction_type_for(is_image_conditioned(unet)))
    return generate(prompt_embed, null_embed, unet, stack, dict(scheduler.config), resolution, gp,
                    Path(out_dir or gp.out_dir), log, condition_image)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chibisplat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="text or image -> 3D Gaussian Splat (views PNG, PLY, turntable GIF)")
    g.add_argument("prompt", nargs="?", default=None,
                   help="text prompt (default: generate.prompt; with --image: empty)")
    g.add_argument("--image", default=None, help="front view to condition on (image-to-3D; any background)")
    g.add_argument("--out", type=Path, default=None, help="output folder (default: generate.out_dir)")
    g.add_argument("--params", type=Path, default=Path("params.yaml"))
    g.add_argument("--unet", default=None, help="trained UNet folder (default: generate.unet)")
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--guidance", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--frames", dest="turntable_frames", type=int, default=None, help="turntable frames")
    g.add_argument("--resolution", dest="render_resolution", type=int, default=None)
    g.add_argument("--device", default=None)
    args = parser.parse_args(argv)

    from chibisplat.config import load_config
    from chibisplat.config_schema import STAGE_SECTIONS

    try:
        cfg = load_config(args.params, sections=STAGE_SECTIONS["generate"])
        run_generate(cfg, args.prompt, args.out, image=args.image, unet=args.unet, steps=args.steps, guidance=args.guidance,
                     seed=args.seed, turntable_frames=args.turntable_frames,
                     render_resolution=args.render_resolution, device=args.device)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"chibisplat generate: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
