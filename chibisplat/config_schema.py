"""What params.yaml may hold: per section, per key, the type, range, choices and whether null is allowed.

:func:`validate_params` runs before any stage does any work (``chibisplat.params.load_params``, which every stage
main, the render stage and ``chibisplat generate`` go through). It reports every invalid value at once, each
naming the key and what is allowed; an unknown key names the nearest valid one. A bad value therefore never
touches an existing output.

Sections with ``presets: {tiny, pretrained}`` are checked twice over: every preset on its own (so switching
``models.source`` cannot surprise), and the section's explicit keys, where ``null`` means "the value of the preset
that ``models.source`` selects" (``chibisplat.config.resolved_section``) and is an error for a key that
preset does not define.

Each stage checks the sections it reads (:data:`STAGE_SECTIONS`, equal to its ``params:`` in dvc.yaml), so
its success depends only on what DVC tracks for it; a section name that is not known is an error for every stage.
The ``render`` section is checked by ``chibisplat.render.options.validate_render_params`` (its home, next to the
light-rig and camera facts it needs). Facts that live in modules which import torch (the number of even view sets,
the mixed-precision modes) are :class:`Ref` s, read when that module is loaded, which
every stage that uses those keys does; ``validate_params(..., full=True)`` reads them all (the tests do).

Adding a key: add a :class:`Key` below and a field to its section's dataclass in ``chibisplat/config.py`` (the
typed layer built from this file; ``fields_of``). A key that a section's dataclass has but this schema does not
list yet is accepted with the type of the dataclass field, and ``tests/test_params_validation.py``
fails until it gets its entry here.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import re
import string
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

MODEL_SOURCES = ("tiny", "pretrained")
PRESETS_KEY = "presets"
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "piecewise_constant")  # diffusers.optimization.SchedulerType
# The allowed values below are the home of these facts: the code that consumes them imports them from here.
RASTERIZERS = ("auto", "torch", "gsplat")  # chibisplat/splats/rasterize.py (auto: gsplat for CUDA tensors)
# How Gaussians become pixels (chibisplat/splats/rasterize.py FORMATIONS, docs/image-formation.md): "diffsplat" is
# RaDe-GS at kernel_size 0 as DiffSplat renders (raw quaternions, no dilation, compensated opacity), "3dgs" graphdeco's.
IMAGE_FORMATIONS = ("diffsplat", "3dgs")
DEFAULT_IMAGE_FORMATION = "diffsplat"  # DiffSplat's checkpoints were trained with it
SAMPLERS = ("sde-dpmsolver++", "dpmsolver++", "ddim")  # chibisplat/training/objective.py sample_latents
PREDICTION_TYPES = ("epsilon", "v_prediction")  # chibisplat/training/objective.py diffusion_inputs
CAPTION_FIELDS = ("name", "uid")  # pack.default_caption placeholders (chibisplat/dataset/captions.py)
EXECUTORS = ("local", "ray")  # cluster.<stage>.executor (chibisplat/executors)
SPLITS = ("train", "val")  # the dataset splits (chibisplat/dataset/pack.py split_of; latents.splits)
# The sections each stage reads (its `params:` in dvc.yaml; tests/test_params_validation.py keeps them equal). A stage
# validates exactly these, so its success depends only on what DVC tracks for it.
STAGE_SECTIONS = {
    "render": ("render",),
    "pack": ("pack",),
    "embed": ("embed", "models"),
    "finetune": ("finetune", "models"),
    "latents": ("latents", "models"),
    "train": ("train", "models"),
    "evaluate": ("evaluate", "latents", "models"),
    "generate": ("generate", "latents", "models", "embed"),
}


class ConfigError(ValueError):
    """params.yaml holds an invalid value or an unknown key; the message names each key and what is allowed."""


@dataclass(frozen=True)
class Ref:
    """A fact that lives in another module (``module.attr``), read when needed.

    ``heavy`` modules (they import torch) are only read when already loaded by the running process, or when
    :func:`validate_params` is called with ``full=True``.
    """

    module: str
    attr: str
    heavy: bool = False

    def get(self, full: bool = False):
        if self.heavy and not full and self.module not in sys.modules:
            return None
        return getattr(importlib.import_module(self.module), self.attr)


@dataclass(frozen=True)
class Key:
    """One parameter. ``kind``: int | float | bool | str | path | list | mapping | any."""

    kind: str
    min: float | None = None
    max: float | None = None
    min_open: bool = False  # min < value instead of min <= value
    max_open: bool = False
    choices: tuple | Ref | None = None
    pattern: str | None = None  # str: a full-match regex, described by ``doc``
    multiple_of: int | None = None
    nullable: bool = False
    item: "Key | None" = None  # list: every element
    max_len_ref: Ref | None = None  # list of ints: each in [0, len(ref)) (indices into that sequence)
    distinct: bool = False  # list: no repeated element
    min_len: int = 0
    keys: dict[str, "Key"] | None = None  # mapping: its keys (all optional)
    check: Ref | Callable[[Any], str | None] | None = None  # extra rule: returns a message or raises ValueError
    doc: str = ""  # what the value means, in messages


@dataclass(frozen=True)
class Section:
    keys: dict[str, Key] = field(default_factory=dict)
    presets: bool = False  # may hold presets: {tiny: {...}, pretrained: {...}}
    fields_of: Ref | None = None  # the parameter dataclass built from this section
    validator: Ref | None = None  # a function that checks the whole section instead (raises ValueError)


def _int(lo=None, hi=None, **kw) -> Key:
    return Key("int", lo, hi, **kw)


def _float(lo=None, hi=None, **kw) -> Key:
    return Key("float", lo, hi, **kw)


BOOL = Key("bool")
PATH = Key("path")
OPT_PATH = Key("path", nullable=True)
SEED = _int(0, 2**32 - 1)
STEPS = _int(0)
POSITIVE = _int(1)
LR = _float(0.0, 1.0, min_open=True)
BETA = _float(0.0, 1.0, max_open=True)
WEIGHT = _float(0.0)
PROB = _float(0.0, 1.0)
IMAGE_FORMATION = Key("str", choices=IMAGE_FORMATIONS, doc="how Gaussians become pixels: docs/image-formation.md")
LATENT_RESOLUTION = _int(16, 4096, multiple_of=8, doc="pixels; GSRecon patches and the VAE's x8")
RENDER_RESOLUTION = _int(8, 4096)
# Syntax only: whether CUDA is present is checked by chibisplat/device.py where the device is used (a preset for
# another machine must stay valid here).
DEVICE = Key("str", pattern=r"auto|cpu|cuda(:\d+)?", doc="auto, cpu, cuda or cuda:<index>")
MIXED_PRECISION = Key("str", choices=Ref("chibisplat.training.precision", "MIXED_PRECISION", heavy=True))
EVEN_VIEW_SET_INDICES = Key("list", item=_int(0), min_len=1, distinct=True,
                            max_len_ref=Ref("chibisplat.protocol", "EVEN_VIEW_SETS"),
                            doc="indices into the even view sets (chibisplat/protocol.py EVEN_VIEW_SETS)")
HF_REPO = Key("str", pattern=r"[A-Za-z0-9][\w.-]*/[\w.-]+", doc="a Hugging Face repo id, owner/name")
SNAPSHOT = Key("mapping", keys={"repo": HF_REPO, "revision": Key("str", nullable=True), "path": OPT_PATH})


def _caption_template(value) -> str | None:
    if value is None:
        return None
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(value) if f is not None}
    except ValueError as e:
        return f"{value!r} is not a valid template ({e}); allowed: text with {{name}} and/or {{uid}}"
    bad = sorted(fields - set(CAPTION_FIELDS))
    if bad:
        return f"{value!r} uses unknown placeholder(s) {bad}; allowed: {{name}}, {{uid}}"
    return None


# ---------------------------------------------------------------------------------------------------------------
# The schema.

SCHEMA: dict[str, Section] = {
    "render": Section(validator=Ref("chibisplat.render.options", "validate_render_params")),
    "pack": Section(
        fields_of=Ref("chibisplat.config", "PackParams"),
        keys={
            "renders_dir": PATH, "assets_dir": PATH, "out_dir": PATH,
            "num_shards": _int(1, 100_000), "val_num_shards": _int(1, 100_000),
            "val_fraction": _float(0.0, 1.0, max_open=True),
            "rows_per_group": _int(1),
            "default_caption": Key("str", nullable=True, check=_caption_template),
        },
    ),
    "embed": Section(
        fields_of=Ref("chibisplat.config", "EmbedParams"),
        keys={
            "packed_dir": PATH, "out": PATH, "batch_size": POSITIVE, "device": DEVICE, "tiny_seed": SEED,
            "tiny_cache_dir": PATH,
        },
    ),
    "models": Section(
        fields_of=Ref("chibisplat.config", "ModelsParams"),
        keys={
            "source": Key("str", choices=MODEL_SOURCES),
            "seed": SEED,
            "image_conditioned": BOOL,
            "sd15": SNAPSHOT,
            "diffsplat": SNAPSHOT,
            "finetuned": OPT_PATH,
        },
    ),
    "finetune": Section(
        presets=True,
        fields_of=Ref("chibisplat.config", "FinetuneParams"),
        keys={
            "gsrecon": BOOL, "gsvae": BOOL, "packed_dir": PATH, "out_dir": PATH, "metrics_dir": PATH, "seed": SEED,
            "resolution": LATENT_RESOLUTION, "render_resolution": RENDER_RESOLUTION, "batch_size": POSITIVE,
            "gsrecon_steps": STEPS, "gsrecon_lr": LR, "gsvae_steps": STEPS, "gsvae_lr": LR,
            "gsvae_tiny_decoder_steps": STEPS, "adam_beta1": BETA, "adam_beta2": BETA, "adam_weight_decay": WEIGHT,
            "lr_scheduler": Key("str", choices=LR_SCHEDULERS), "lr_warmup_steps": STEPS,
            "max_grad_norm": _float(0.0, min_open=True), "mixed_precision": MIXED_PRECISION,
            "gradient_checkpointing": BOOL, "latent_weight": WEIGHT, "render_weight": WEIGHT,
            "lpips_weight": WEIGHT, "lpips_weights": OPT_PATH, "rasterizer": Key("str", choices=RASTERIZERS),
            "image_formation": IMAGE_FORMATION,
            "log_every": POSITIVE,
        },
    ),
    "latents": Section(
        presets=True,
        fields_of=Ref("chibisplat.config", "LatentParams"),
        keys={
            "packed_dir": PATH, "embeddings": PATH, "out_dir": PATH,
            "resolution": LATENT_RESOLUTION, "render_resolution": RENDER_RESOLUTION, "device": DEVICE,
            "mixed_precision": MIXED_PRECISION,
            "splits": Key("list", item=Key("str", choices=SPLITS), min_len=1,
                          distinct=True),
            "view_sets": dataclasses.replace(EVEN_VIEW_SET_INDICES, nullable=True),
        },
    ),
    "train": Section(
        presets=True,
        fields_of=Ref("chibisplat.config", "TrainParams"),
        keys={
            "latents_dir": PATH, "embeddings": PATH, "packed_dir": PATH, "out_dir": PATH, "metrics_dir": PATH,
            "seed": SEED, "max_steps": POSITIVE, "batch_size": POSITIVE, "gradient_accumulation_steps": POSITIVE,
            "mixed_precision": MIXED_PRECISION, "allow_tf32": BOOL, "mode": Key("str", choices=("lora", "full")),
            "lora_rank": POSITIVE, "lora_alpha": _float(0.0, min_open=True), "lr": LR,
            "lr_scheduler": Key("str", choices=LR_SCHEDULERS), "lr_warmup_steps": STEPS,
            "adam_beta1": BETA, "adam_beta2": BETA, "adam_weight_decay": WEIGHT,
            "adam_epsilon": _float(0.0, 1.0, min_open=True), "max_grad_norm": _float(0.0, min_open=True),
            "gradient_checkpointing": BOOL, "use_ema": BOOL, "ema_decay": _float(0.0, 1.0),
            "ema_power": _float(0.0, min_open=True),
            "prediction_type": Key("str", choices=PREDICTION_TYPES, nullable=True,
                                   doc="null: v_prediction with models.image_conditioned, else epsilon"),
            "cfg_dropout": PROB, "diffusion_weight": WEIGHT, "render_weight": WEIGHT, "rendering_loss_prob": PROB,
            "lpips_weight": WEIGHT, "lpips_weights": OPT_PATH, "rasterizer": Key("str", choices=RASTERIZERS),
            "image_formation": IMAGE_FORMATION,
            "checkpointing_steps": POSITIVE, "checkpoints_total_limit": _int(1, nullable=True),
            "resume": Key("str", choices=("auto", "never")), "log_every": POSITIVE,
            "fused_adamw": BOOL, "ema_foreach": BOOL, "compile": BOOL, "dataloader_workers": _int(0, 256),
        },
    ),
    "evaluate": Section(
        presets=True,
        fields_of=Ref("chibisplat.config", "EvaluateParams"),
        keys={
            "packed_dir": PATH, "latents_dir": PATH, "embeddings": PATH, "unet": PATH, "metrics": PATH,
            "previews_dir": PATH, "view_sets": EVEN_VIEW_SET_INDICES, "render_resolution": RENDER_RESOLUTION,
            "lpips_weights": OPT_PATH, "steps": POSITIVE, "guidance": _float(0.0), "sampler": Key("str", choices=SAMPLERS),
            "seed": SEED, "elevation": _float(-90.0, 90.0), "distance": _float(0.0, min_open=True),
            "opacity_threshold": _float(0.0, 1.0, max_open=True), "rasterizer": Key("str", choices=RASTERIZERS),
            "image_formation": IMAGE_FORMATION,
            "device": DEVICE, "val_batches": POSITIVE,
            "image_guidance": _float(0.0, doc="CFG scale of the image model (models.image_conditioned)"),
            "clip": dataclasses.replace(SNAPSHOT, nullable=True, doc="CLIP ViT-L/14 for the CLIP score"),
        },
    ),
    "generate": Section(
        presets=True,
        fields_of=Ref("chibisplat.config", "GenerateParams"),
        keys={
            "prompt": Key("str"), "unet": PATH, "out_dir": PATH, "steps": POSITIVE, "guidance": _float(0.0),
            "sampler": Key("str", choices=SAMPLERS), "seed": SEED, "elevation": _float(-90.0, 90.0),
            "distance": _float(0.0, min_open=True), "render_resolution": RENDER_RESOLUTION,
            "turntable_frames": POSITIVE, "turntable_fps": _int(1, 100),
            "opacity_threshold": _float(0.0, 1.0, max_open=True), "rasterizer": Key("str", choices=RASTERIZERS),
            "image_formation": IMAGE_FORMATION,
            "device": DEVICE,
            # image-to-3D (models.image_conditioned; docs/image-to-3d.md)
            "image": Key("path", nullable=True, doc="front view to condition on; null: text only"),
            "image_guidance": _float(0.0), "image_elevation": _float(-90.0, 90.0),
            "border_ratio": _float(0.0, 1.0, max_open=True), "matte_tolerance": _float(0.0, 1.0),
        },
    ),
    # Where render and latents run (chibisplat/executors). In no stage's STAGE_SECTIONS / dvc.yaml params on
    # purpose: it never changes an output byte, so switching executors re-runs nothing; read by the two stages.
    "cluster": Section(
        keys={
            stage: Key("mapping", keys={
                "executor": Key("str", choices=EXECUTORS),
                "ray_address": Key("str", nullable=True, doc="a Ray address (host:6379, ray://host:10001, auto)"),
                "num_cpus": _float(0.0, 1024.0, min_open=True, doc="CPUs per Ray task / encoder"),
                "num_gpus": _float(0.0, 64.0, nullable=stage == "latents", doc="GPUs per Ray task / encoder"),
                "max_retries": _int(0, 100),
                **({"workers": _int(1, 4096)} if stage == "latents" else {}),
            })
            for stage in ("render", "latents")
        },
    ),
}


# ---------------------------------------------------------------------------------------------------------------
# Checking one value.


def _describe(spec: Key, full: bool) -> str:
    """What ``spec`` allows, in words."""
    choices = spec.choices.get(full) if isinstance(spec.choices, Ref) else spec.choices
    if choices is not None:
        text = "one of " + ", ".join(repr(c) for c in choices)
    elif spec.kind in ("int", "float"):
        text = "an integer" if spec.kind == "int" else "a number"
        lo = None if spec.min is None else f"{'>' if spec.min_open else '>='} {spec.min:g}"
        hi = None if spec.max is None else f"{'<' if spec.max_open else '<='} {spec.max:g}"
        text += " " + " and ".join(b for b in (lo, hi) if b) if (lo or hi) else ""
        if spec.multiple_of:
            text += f", a multiple of {spec.multiple_of}"
    elif spec.kind == "bool":
        text = "true or false"
    elif spec.kind == "path":
        text = "a non-empty path (text)"
    elif spec.kind == "str":
        text = spec.doc if spec.pattern and spec.doc else "text"
    elif spec.kind == "list":
        text = "a list" + (f" of {_describe(spec.item, full)}" if spec.item else "")
    elif spec.kind == "mapping":
        text = "a mapping with keys " + ", ".join(spec.keys or {})
    else:
        text = "any value"
    if spec.nullable:
        text += ", or null"
    if spec.doc and not (spec.kind == "str" and spec.pattern):
        text += f" ({spec.doc})"
    return text


def _check_value(value, spec: Key, where: str, full: bool, errors: list[str]) -> None:
    def bad(why: str = "is not allowed") -> None:
        errors.append(f"{where} = {value!r} {why}; allowed: {_describe(spec, full)}")

    if value is None:
        if not spec.nullable:
            bad("is not set")
        return
    kind = spec.kind
    if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        return bad("is not an integer")
    if kind == "float" and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
        return bad("is not a number")
    if kind == "bool" and not isinstance(value, bool):
        return bad("is not true or false")
    if kind in ("str", "path") and not isinstance(value, str):
        return bad("is not text")
    if kind == "path" and not value.strip():
        return bad("is empty")
    if kind == "list" and not isinstance(value, list):
        return bad("is not a list")
    if kind == "mapping" and not isinstance(value, dict):
        return bad("is not a mapping")
    if kind in ("int", "float"):
        if spec.min is not None and (value <= spec.min if spec.min_open else value < spec.min):
            return bad("is out of range")
        if spec.max is not None and (value >= spec.max if spec.max_open else value > spec.max):
            return bad("is out of range")
        if spec.multiple_of and value % spec.multiple_of:
            return bad(f"is not a multiple of {spec.multiple_of}")
    choices = spec.choices.get(full) if isinstance(spec.choices, Ref) else spec.choices
    if choices is not None and value not in choices:
        near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        return bad("is not allowed" + (f" (did you mean {near[0]!r}?)" if near else ""))
    if spec.pattern and not re.fullmatch(spec.pattern, value):
        return bad()
    if kind == "list":
        if len(value) < spec.min_len:
            return bad(f"has fewer than {spec.min_len} element(s)")
        if spec.distinct and len({repr(v) for v in value}) != len(value):
            return bad("repeats an element")
        for i, v in enumerate(value):
            if spec.item is not None:
                _check_value(v, spec.item, f"{where}[{i}]", full, errors)
        seq = spec.max_len_ref.get(full) if spec.max_len_ref else None
        if seq is not None:
            out = [v for v in value if isinstance(v, int) and not 0 <= v < len(seq)]
            if out:
                return bad(f"has {out} outside 0..{len(seq) - 1}")
    if kind == "mapping" and spec.keys is not None:
        _check_mapping(value, spec.keys, where, full, errors)
    if spec.check is not None:
        fn = spec.check.get(full) if isinstance(spec.check, Ref) else spec.check
        if fn is not None:
            try:
                message = fn(value)
            except ValueError as e:
                message = str(e)
            if isinstance(message, str) and message:
                errors.append(f"{where}: {message}")


def unknown_key_message(key, known, where: str) -> str:
    near = difflib.get_close_matches(str(key), sorted(known), n=1)
    hint = f"did you mean {where}.{near[0]}? " if near else ""
    return f"{where}.{key} is not a known key; {hint}known keys: {', '.join(sorted(known))}"


def _check_mapping(values: dict, keys: dict[str, Key], where: str, full: bool, errors: list[str]) -> None:
    for k, v in values.items():
        if k not in keys:
            errors.append(unknown_key_message(k, keys, where))
        else:
            _check_value(v, keys[k], f"{where}.{k}", full, errors)


# ---------------------------------------------------------------------------------------------------------------
# Sections.


def key_from_field(cls, name: str) -> Key:
    """A :class:`Key` with the type of a parameter dataclass field (for a key this schema does not list yet)."""
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint)
    nullable = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if nullable else hint
    origin = typing.get_origin(base)
    if origin in (tuple, list):
        item = typing.get_args(base)[0] if typing.get_args(base) else Any
        return Key("list", nullable=nullable, item=key_from_type(item))
    return dataclasses.replace(key_from_type(base), nullable=nullable)


def key_from_type(t) -> Key:
    if t is bool:
        return BOOL
    if t is int:
        return Key("int")
    if t is float:
        return Key("float")
    if t is str:
        return Key("str")
    if isinstance(t, type) and issubclass(t, Path):
        return PATH
    return Key("any")


def section_keys(name: str, extra_key: str | None = None) -> dict[str, Key]:
    """The keys of section ``name``; with ``extra_key``, also that key when the section's dataclass has it."""
    sec = SCHEMA[name]
    keys = dict(sec.keys)
    if extra_key is not None and extra_key not in keys and sec.fields_of is not None:
        try:
            cls = sec.fields_of.get(full=True)
        except ImportError:
            return keys
        # a derived field (metadata "derived", chibisplat/config.py) is computed, never a params.yaml key
        if extra_key in {f.name for f in dataclasses.fields(cls) if "derived" not in f.metadata}:
            keys[extra_key] = key_from_field(cls, extra_key)
    return keys


def _section_key(name: str, key: str) -> Key | None:
    return section_keys(name, key).get(key)


def _check_section(name: str, values, params: dict, full: bool, errors: list[str]) -> None:
    sec = SCHEMA[name]
    if sec.validator is not None:
        try:
            sec.validator.get(full=True)(values)
        except ValueError as e:
            errors.append(str(e))
        return
    if not isinstance(values, dict):
        errors.append(f"{name}: expected a mapping of keys, got {type(values).__name__}")
        return
    presets = values.get(PRESETS_KEY) if sec.presets else None
    active: dict = {}
    if sec.presets and PRESETS_KEY in values:
        if not isinstance(presets, dict):
            errors.append(f"{name}.{PRESETS_KEY}: expected a mapping {{{', '.join(MODEL_SOURCES)}}}")
            presets = {}
        for source, preset in presets.items():
            where = f"{name}.{PRESETS_KEY}.{source}"
            if source not in MODEL_SOURCES:
                errors.append(unknown_key_message(source, MODEL_SOURCES, f"{name}.{PRESETS_KEY}"))
                continue
            if not isinstance(preset, dict):
                errors.append(f"{where}: expected a mapping of {name} keys")
                continue
            for k, v in preset.items():
                spec = _section_key(name, k)
                if spec is None:
                    errors.append(unknown_key_message(k, sec.keys, where))
                else:
                    _check_value(v, spec, f"{where}.{k}", full, errors)
        source = (params.get("models") or {}).get("source", MODEL_SOURCES[0])
        if presets and source in MODEL_SOURCES:
            if source not in presets:
                errors.append(f"{name}.{PRESETS_KEY} has no '{source}' preset (models.source); add one")
            active = presets.get(source) or {}
        elif presets:
            active = {k: v for preset in presets.values() if isinstance(preset, dict) for k, v in preset.items()}
    for k, v in values.items():
        if k == PRESETS_KEY and sec.presets:
            continue
        spec = _section_key(name, k)
        if spec is None:
            errors.append(unknown_key_message(k, sec.keys, name))
        elif v is None and k in active:
            continue  # null: the active preset's value
        else:
            _check_value(v, spec, f"{name}.{k}", full, errors)


def validate_params(params, path: str | Path = "params.yaml", full: bool = False, sections=None) -> None:
    """Raise :class:`ConfigError` listing every invalid value and unknown key of a loaded params.yaml.

    ``sections``: check only these sections (a stage's :data:`STAGE_SECTIONS`); None: all. Unknown section names
    are reported either way. ``full``: also check the facts of torch-importing modules that this process has not
    loaded (:class:`Ref`).
    """
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping of sections ({', '.join(SCHEMA)}), got {type(params).__name__}")
    errors: list[str] = []
    for name in params:
        if name not in SCHEMA:
            near = difflib.get_close_matches(str(name), list(SCHEMA), n=1)
            hint = f"did you mean {near[0]}? " if near else ""
            errors.append(f"{name}: is not a known section; {hint}known sections: {', '.join(SCHEMA)}")
    # models first: models.source picks the presets the other sections are checked against.
    wanted = [n for n in params if n in SCHEMA and (sections is None or n in sections)]
    for name in sorted(wanted, key=lambda n: n != "models"):
        _check_section(name, params[name], params, full, errors)
    if errors:
        head = f"{path}: {len(errors)} invalid parameter(s); nothing was run or changed:" if len(errors) > 1 else f"{path}:"
        raise ConfigError(head + ("\n  " if len(errors) > 1 else " ") + "\n  ".join(errors))
