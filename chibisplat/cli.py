"""The ``chibisplat`` command.

    chibisplat generate "a chibi witch with a big hat" --out out/

writes ``views.png`` (4 views at azimuth 0/90/180/270), ``splat.ply`` (standard 3DGS) and ``turntable.gif``
from the trained UNet (``generate.unet``, default models/train/unet). Defaults come from params.yaml's
``generate:`` section (its preset for ``models.source``); the options below override them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


TINY_NOTE = ("generate: note: models.source is tiny: this output comes from untrained tiny models (random GSRecon/GSVAE, "
             "a tiny UNet trained for minutes on a CPU) and checks the plumbing only; it is not a real 3D character. "
             "Set models.source: pretrained (SD1.5 + the DiffSplat checkpoints) for real results.")


def run_generate(params: dict, prompt: str, out_dir: Path | None = None, log=print, **overrides) -> dict[str, Path]:
    """Encode ``prompt`` with the configured text encoder and generate into ``out_dir``."""
    import torch

    from chibisplat.dataset.text_encoder import load_text_encoder
    from chibisplat.device import resolve_device, to_device
    from chibisplat.models.sources import load_model_stack
    from chibisplat.training.inference import GenerateParams, generate, load_trained_unet
    from chibisplat.training.latents import LatentParams
    from chibisplat.training.objective import noise_scheduler

    gp = GenerateParams.from_params(params, prompt=prompt, **overrides)
    device = resolve_device(gp.device, "generate.device (params.yaml, or --device)")
    models = params.get("models") or {}
    embed = params.get("embed") or {}
    if models.get("source", "tiny") == "tiny":
        log(TINY_NOTE)
    encoder = load_text_encoder(models, Path(embed.get("tiny_cache_dir", "data/.cache/text_encoder")),
                                int(embed.get("tiny_seed", 0)), device)
    prompt_embed, null_embed = (torch.from_numpy(e) for e in encoder.encode([gp.prompt, ""]))
    stack = load_model_stack(models, with_unet=False)  # GSVAE + scheduler; the trained UNet is loaded below
    to_device(stack.gsvae, device).eval()
    unet = load_trained_unet(gp.unet, device)
    resolution = LatentParams.from_params(params).resolution
    return generate(prompt_embed, null_embed, unet, stack, dict(noise_scheduler(stack).config), resolution, gp,
                    Path(out_dir or gp.out_dir), log)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chibisplat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="text -> 3D Gaussian Splat (views PNG, PLY, turntable GIF)")
    g.add_argument("prompt")
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

    from chibisplat.params import load_params

    try:
        params = load_params(args.params)
        run_generate(params, args.prompt, args.out, unet=args.unet, steps=args.steps, guidance=args.guidance,
                     seed=args.seed, turntable_frames=args.turntable_frames,
                     render_resolution=args.render_resolution, device=args.device)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"chibisplat generate: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
