"""The real path end to end: full-size random weights in the published layouts, ``models.source: pretrained``,
every stage's own ``main`` (each in its own process, as DVC runs them), one train and one val character.

    make gpu-smoke                                 # on a CUDA machine: installs what is missing from .gpu-wheels/
    .venv/bin/python benchmarks/gpu_smoke.py       # the same; on a machine without CUDA it says it skipped (exit 0)
    .venv/bin/python benchmarks/gpu_smoke.py --device cpu --work /tmp/smoke    # the CPU run (tests/test_real_path.py)

Steps: the fixture (``python -m chibisplat.models.fixture``: GSRecon, GSVAE, the conv_in-10 GSDiff UNet, SD1.5's
text encoder + tokenizer, CLIP ViT-L/14), two synthetic characters rendered like the render stage at 256 px
(tests/synthetic_renders.py) and packed by the real pack stage, then ``stages.{embed, finetune, latents, train,
evaluate, generate}`` with a params file that keeps the published presets and shrinks only what sets the amount of
work (one view set, 1 train step of batch 1 with the rendering loss, 1 sampling step, small previews; finetune 1
step per phase at 64 px).
Prints a table: stage, wall seconds, the process' CPU seconds (user + system: what a busy machine does not
inflate), peak GPU GiB (``torch.cuda.max_memory_allocated``), peak host RSS GiB.

On the GPU machine (torch + CUDA, accelerate, peft, transformers, pyarrow already there) the packages listed in
``benchmarks/gpu_wheels.txt`` that are not installed are installed with ``pip install --no-index --no-deps`` from
the wheel folder (``make gpu-wheels`` fills ``.gpu-wheels/`` here: Python 3.12 manylinux wheels). gsplat JIT-compiles
its CUDA kernels on first use; where that fails the smoke run says so and uses the PyTorch rasterizer.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEEL_LIST = REPO / "benchmarks" / "gpu_wheels.txt"
STAGES = ("embed", "finetune", "latents", "train", "evaluate", "generate")
CHARACTERS = 2  # one train, one val
RESOLUTION = 256  # the published GSRecon input size (latents.resolution of the pretrained preset)


def wheel_requirements() -> list[str]:
    lines = (ln.split("#")[0].strip() for ln in WHEEL_LIST.read_text().splitlines())
    return [ln for ln in lines if ln]


def missing_distributions() -> list[str]:
    import importlib.metadata as md

    out = []
    for req in wheel_requirements():
        name = req.split("==")[0]
        try:
            md.version(name)
        except md.PackageNotFoundError:
            out.append(req)
    return out


def install_missing(wheels: Path, log=print) -> None:
    missing = missing_distributions()
    if not missing:
        return
    if not wheels.is_dir():
        raise SystemExit(f"gpu-smoke: missing packages {missing} and no wheel folder {wheels}; run `make gpu-wheels` on "
                         "a machine with PyPI access and carry .gpu-wheels/ here")
    log(f"gpu-smoke: installing {len(missing)} missing package(s) from {wheels}: {' '.join(missing)}")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--find-links",
                    str(wheels), *missing], check=True)
    importlib.invalidate_caches()


def gsplat_works() -> tuple[bool, str]:
    """Whether gsplat imports and rasterises on CUDA here (its kernels compile on first use)."""
    try:
        import torch

        from chibisplat.splats.rasterize import rasterize
        from chibisplat.splats.splatter import Gaussians

        dev = torch.device("cuda")
        g = Gaussians(torch.zeros(1, 3, device=dev) + torch.tensor([0.0, 0.0, 2.0], device=dev),
                      torch.tensor([[1.0, 0, 0, 0]], device=dev), torch.full((1, 3), 0.1, device=dev),
                      torch.ones(1, device=dev), torch.ones(1, 3, device=dev))
        K = torch.tensor([[16.0, 0, 8], [0, 16.0, 8], [0, 0, 1]], device=dev)
        rasterize(g, torch.eye(4, device=dev), K, 16, 16, backend="gsplat")
        return True, "gsplat"
    except Exception as e:  # import error, missing nvcc, compile failure: all mean "use the torch rasterizer"
        return False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


# ---------------------------------------------------------------------------------------------------------------
# Data and parameters.


def prepare_data(root: Path, size: int = RESOLUTION) -> dict:
    """Two synthetic characters rendered like the render stage, captioned; returns the pack params (one is val)."""
    sys.path.insert(0, str(REPO / "tests"))
    from synthetic_renders import make_dataset

    from chibisplat.dataset.pack import split_of

    renders, assets = make_dataset(root, CHARACTERS, size=size)
    uids = sorted(p.name for p in renders.iterdir() if p.is_dir())
    # the first val_fraction (a multiple of 1/64) that puts exactly one of the two characters in val
    val_fraction = next(f / 64 for f in range(1, 64) if sum(split_of(u, f / 64) == "val" for u in uids) == 1)
    return {"renders_dir": str(renders), "assets_dir": str(assets), "out_dir": str(root / "packed"),
            "num_shards": 1, "val_num_shards": 1, "val_fraction": val_fraction, "rows_per_group": 1}


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def smoke_params(base: dict, fixture: dict, pack: dict, work: Path, device: str, rasterizer: str) -> dict:
    """params.yaml with the fixture's models, the work folder's paths and the smallest amount of work that still
    runs every code path (rendering loss in train, finetune of both modules, both UNets + CLIP in evaluate)."""
    cpu = device == "cpu"
    w = lambda *p: str(work.joinpath(*p))
    override = {
        "pack": pack,
        "embed": {"packed_dir": pack["out_dir"], "out": w("embeddings", "prompt_embeds.parquet"), "device": device,
                  "tiny_cache_dir": w("cache", "text_encoder")},
        "models": deep_merge(fixture["models"], {"finetuned": w("finetune")}),
        "finetune": {"gsrecon": True, "gsvae": True, "packed_dir": pack["out_dir"], "out_dir": w("finetune"),
                     "metrics_dir": w("metrics", "finetune"), "resolution": 64, "render_resolution": 64,
                     "batch_size": 1, "gsrecon_steps": 1, "gsvae_steps": 1, "gsvae_tiny_decoder_steps": 1,
                     "lr_warmup_steps": 0, "log_every": 1, "rasterizer": rasterizer,
                     **({"mixed_precision": "no"} if cpu else {})},
        "latents": {"packed_dir": pack["out_dir"], "embeddings": w("embeddings", "prompt_embeds.parquet"),
                    "out_dir": w("latents"), "device": device, "view_sets": [0], "render_resolution": 64,
                    **({"mixed_precision": "no"} if cpu else {})},
        "train": {"latents_dir": w("latents"), "embeddings": w("embeddings", "prompt_embeds.parquet"),
                  "out_dir": w("train"), "metrics_dir": w("metrics", "train"), "max_steps": 1, "batch_size": 1,
                  "gradient_accumulation_steps": 1, "lr_warmup_steps": 0, "checkpointing_steps": 1, "log_every": 1,
                  "rendering_loss_prob": 1.0, "rasterizer": rasterizer,
                  **({"mixed_precision": "no", "dataloader_workers": 0} if cpu else {})},
        "evaluate": deep_merge(fixture.get("evaluate", {}), {
            "packed_dir": pack["out_dir"], "latents_dir": w("latents"),
            "embeddings": w("embeddings", "prompt_embeds.parquet"), "unet": w("train", "unet"),
            "metrics": w("metrics", "evaluate.json"), "previews_dir": w("metrics", "evaluate", "previews"),
            "view_sets": [0], "steps": 1, "render_resolution": 64, "val_batches": 1, "device": device,
            "rasterizer": rasterizer}),
        "generate": {"unet": w("train", "unet"), "out_dir": w("generate"), "steps": 1, "render_resolution": 64,
                     "turntable_frames": 2, "device": device, "rasterizer": rasterizer},
    }
    return deep_merge(base, override)


# ---------------------------------------------------------------------------------------------------------------
# Running the stages.


def run_one_stage(name: str, params: Path, report: Path) -> int:
    """In a child process: ``stages.<name>.main(["--params", params])``, then seconds and peak memory to ``report``."""
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    module = importlib.import_module(f"stages.{name}")
    t = time.perf_counter()
    rc = module.main(["--params", str(params)])
    seconds = time.perf_counter() - t
    peak_gpu = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report.write_text(json.dumps({"stage": name, "rc": rc, "seconds": seconds, "peak_gpu_gib": peak_gpu,
                                  "peak_rss_gib": usage.ru_maxrss / 2**20,  # KiB -> GiB (Linux)
                                  "cpu_seconds": usage.ru_utime + usage.ru_stime}))
    return rc


def run_stages(params: Path, work: Path, stages=STAGES, log=print) -> list[dict]:
    """Every stage in its own process (as DVC runs them); stops at the first failure (its output is shown)."""
    rows = []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    for name in stages:
        report = work / f"report-{name}.json"
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--stage", name, "--params", str(params),
                               "--report", str(report)], cwd=REPO, env=env, capture_output=True, text=True)
        out = (proc.stdout + proc.stderr).strip()
        (work / f"log-{name}.txt").write_text(out + "\n")
        if proc.returncode != 0 or not report.is_file():
            raise RuntimeError(f"gpu-smoke: stage {name} failed (exit {proc.returncode}); its output:\n{out[-6000:]}")
        rows.append(json.loads(report.read_text()))
        log(f"gpu-smoke: {name}: {rows[-1]['seconds']:.1f} s")
    return rows


def table(rows: list[dict], title: str) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.2f}"
    lines = [title, "", "| stage | seconds | process CPU s | peak GPU GiB | peak RSS GiB |", "|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['seconds']:.1f} | {fmt(r.get('cpu_seconds'))} | {fmt(r['peak_gpu_gib'])} | "
              f"{fmt(r['peak_rss_gib'])} |" for r in rows]
    return "\n".join(lines)


def smoke(work: Path, device: str, log=print) -> tuple[list[dict], dict]:
    """Fixture, data, params file, then every stage; returns the table rows and the params used."""
    import yaml

    from chibisplat.config import load_config
    from chibisplat.dataset.pack import pack
    from chibisplat.models.fixture import write_fixture
    from chibisplat.params import load_params

    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    fixture = write_fixture(work / "fixture", log=log)
    fixture_s = time.perf_counter() - t
    t = time.perf_counter()
    pack_params = prepare_data(work / "data")
    pack(dataclasses.replace(load_config(REPO / "params.yaml", sections=("pack",)).pack, **pack_params),
         log=lambda *_: None)
    data_s = time.perf_counter() - t
    rasterizer = "torch"
    if device.startswith("cuda"):
        ok, why = gsplat_works()
        rasterizer = "gsplat" if ok else "torch"
        if not ok:
            log(f"gpu-smoke: gsplat does not run here ({why}); using the PyTorch rasterizer on the GPU")
    params = smoke_params(load_params(REPO / "params.yaml"), fixture, pack_params, work, device, rasterizer)
    params_path = work / "params.yaml"
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    rows = [{"stage": "fixture (write ~6 GB)", "seconds": fixture_s, "peak_gpu_gib": None, "peak_rss_gib": None},
            {"stage": "data (2 characters, 256 px, pack)", "seconds": data_s, "peak_gpu_gib": None,
             "peak_rss_gib": None}]
    rows += run_stages(params_path, work, log=log)
    return rows, params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default; skipped without CUDA) or cpu")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    parser.add_argument("--wheels", type=Path, default=REPO / ".gpu-wheels")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--params", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    if args.stage:
        return run_one_stage(args.stage, args.params, args.report)

    try:
        import torch
    except ImportError:
        print(f"gpu-smoke: skipped: {sys.executable} has no torch (nothing was run); run it with the Python that has "
              "torch + CUDA")
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu-smoke: skipped: torch {torch.__version__} sees no CUDA GPU on this machine (nothing was run). "
              "Run `make gpu-smoke` on a CUDA machine, or `--device cpu` for the same pipeline on the CPU.")
        return 0
    if args.device.startswith("cuda"):
        install_missing(args.wheels)
    import shutil
    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="chibisplat-smoke-"))
    try:
        rows, _ = smoke(work, args.device)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    print(table(rows, f"gpu-smoke: models.source pretrained (random full-size weights), device {args.device}: {device}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
