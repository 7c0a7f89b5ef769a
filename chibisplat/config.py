"""The typed configuration: params.yaml -> one frozen dataclass per section (:func:`load_config`).

One loader for every section::

    cfg = load_config("params.yaml", sections=("train", "models"))
    cfg.train.lr, cfg.models.source, cfg.evaluate   # None: a section that was not asked for

does, in this order:

1. parse the file as YAML 1.2 (:func:`read_params`: DVC writes it with ruamel, and YAML 1.1 would read an unquoted
   ``no`` as False);
2. validate it with :func:`chibisplat.config_schema.validate_params`, the per-key checker (type, range, choices;
   every bad key in one message, an unknown key with the nearest valid one);
3. apply presets: a section's ``presets.<models.source>`` is the base and its own keys win; an explicit ``null``
   for a key the preset defines means "the preset's value" (:func:`resolved_section`);
4. build the section's dataclass with one generic builder (:func:`build`): a field typed ``Path`` gets a
   :class:`~pathlib.Path`, a tuple field a tuple, a nested dataclass is built the same way; a key that params.yaml
   does not set keeps the field's default, a field without default must be set;
5. compute the derived values once (fields marked :func:`derived`, e.g. ``evaluate.resolution`` =
   ``latents.resolution``, the size the latents were encoded at).

Defaults live in ONE place: a key that params.yaml sets (explicitly, or in every preset) has no default here, so
the file is the only source of its value; keys params.yaml does not list keep the default of their field
(``tests/test_config.py`` enforces both, and that every field is a schema key and vice versa).

This module imports no torch: every stage can load its configuration before any heavy import.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from chibisplat.config_schema import (
    DEFAULT_IMAGE_FORMATION, MODEL_SOURCES, PRESETS_KEY, SCHEMA, SPLITS, ConfigError, unknown_key_message, validate_params,
)

DEFAULT_PATH = "params.yaml"
DERIVED = "derived"  # field metadata: "<section>.<key>" the field's value is computed from (never set in params.yaml)
TINY, PRETRAINED = MODEL_SOURCES


def derived(source: str):
    """A field computed by the loader from ``source`` (``"<section>.<key>"``), never read from params.yaml."""
    return field(metadata={DERIVED: source})


class MovedKeyError(ConfigError, KeyError):
    """A params.yaml key that moved elsewhere; the message says where (a ConfigError, and a KeyError as before)."""

    __str__ = ConfigError.__str__


# Keys that moved: (section, key) -> where they went.
_FINETUNE_STAGE = ("GSRecon/GSVAE fine-tuning is its own stage, switched by finetune.gsrecon / finetune.gsvae "
                   "(chibisplat/training/finetune.py)")
MOVED_KEYS = {("train", "finetune_gsrecon"): _FINETUNE_STAGE, ("train", "finetune_gsvae"): _FINETUNE_STAGE}


class _Section:
    """Base of the section dataclasses: fields typed ``Path`` hold a Path however they were given (text or Path)."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and _is_path(_hints(type(self))[f.name]) and not isinstance(value, Path):
                object.__setattr__(self, f.name, Path(value))


# ---------------------------------------------------------------------------------------------------------------
# The sections. A field without default: params.yaml sets it (tests/test_config.py keeps it so).


@dataclass(frozen=True, kw_only=True)
class RenderParams(_Section):
    """params.yaml ``render:`` (values checked by chibisplat/render/options.py ``validate_render_params``).

    ``cameras`` and ``lights`` stay the mappings params.yaml holds: they are hashed as given into each character's
    ``render_config_sha256`` (chibisplat/render/stage.py ``render_config``) and sent to Blender as they are.
    """

    assets_dir: Path
    out_dir: Path
    report: Path | None  # null: <out_dir>/../reports/render.json
    scratch_dir: Path | None = None  # per-character working folders; null: <out_dir>/../.cache/render
    resolution: int
    samples: int
    seed: int
    denoise: bool
    workers: int
    engine: str
    device: str
    allow_failures: bool
    pose: str
    missing_textures: str
    cameras: dict
    lights: dict

    @property
    def report_path(self) -> Path:
        return self.report or self.out_dir.parent / "reports" / "render.json"

    @property
    def scratch_path(self) -> Path:
        return self.scratch_dir or self.out_dir.parent / ".cache" / "render"


@dataclass(frozen=True, kw_only=True)
class PackParams(_Section):
    """params.yaml ``pack:``."""

    renders_dir: Path
    assets_dir: Path
    out_dir: Path
    num_shards: int  # train shards; make it a multiple of (GPUs x DataLoader workers)
    val_num_shards: int
    val_fraction: float
    rows_per_group: int  # characters per Parquet row group (the streaming unit of the loader)
    default_caption: str | None  # e.g. "a chibi anime character, {name}"; None: a missing caption is an error

    def shards_in(self, split: str) -> int:
        return self.num_shards if split == "train" else self.val_num_shards


@dataclass(frozen=True, kw_only=True)
class EmbedParams(_Section):
    """params.yaml ``embed:``."""

    packed_dir: Path
    out: Path
    batch_size: int
    device: str  # auto: CUDA when present, else the CPU (chibisplat/device.py)
    tiny_seed: int
    tiny_cache_dir: Path  # where the locally built tiny text encoder is saved (models.source: tiny)


@dataclass(frozen=True, kw_only=True)
class SnapshotParams(_Section):
    """A Hugging Face repository pinned at a revision, or a local folder in its layout (``models.sd15`` ...)."""

    repo: str
    revision: str | None
    path: Path | None  # a local folder; null: the Hugging Face cache at ``revision`` (never downloaded)

    @property
    def label(self) -> str:
        """The folder when set, else ``repo@revision`` (recorded in identifiers, e.g. the text encoder's)."""
        return str(self.path) if self.path else f"{self.repo}@{self.revision}"


@dataclass(frozen=True, kw_only=True)
class ModelsParams(_Section):
    """params.yaml ``models:``: where the model stack comes from (chibisplat/models/sources.py)."""

    source: str  # tiny | pretrained
    seed: int  # tiny: deterministic initialisation
    image_conditioned: bool
    sd15: SnapshotParams
    diffsplat: SnapshotParams
    finetuned: Path | None  # the finetune stage's output; null: never

    @property
    def tiny(self) -> bool:
        """The one place that tells tiny from pretrained (checked against the schema's choices when loaded)."""
        if self.source not in MODEL_SOURCES:
            raise ConfigError(f"models.source = {self.source!r} is not allowed; allowed: one of "
                              f"{', '.join(map(repr, MODEL_SOURCES))}")
        return self.source == TINY


@dataclass(frozen=True, kw_only=True)
class FinetuneParams(_Section):
    """params.yaml ``finetune:`` (chibisplat/training/finetune.py)."""

    gsrecon: bool
    gsvae: bool
    packed_dir: Path
    out_dir: Path
    metrics_dir: Path
    seed: int
    resolution: int  # GSRecon input / splatter image size (the pretrained preset: latents.resolution)
    render_resolution: int  # rendering-loss resolution (DiffSplat: 256)
    batch_size: int  # objects per step
    gsrecon_steps: int
    gsrecon_lr: float
    gsvae_steps: int
    gsvae_lr: float
    gsvae_tiny_decoder_steps: int
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_weight_decay: float = 0.05
    lr_scheduler: str
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0
    mixed_precision: str
    gradient_checkpointing: bool = False
    latent_weight: float = 1.0  # GSVAE: MSE(splatter, decoded)
    render_weight: float = 1.0
    lpips_weight: float = 1.0
    lpips_weights: Path | None  # local LPIPS-VGG16 weights; null: LPIPS term 0 (logged)
    rasterizer: str = "auto"
    image_formation: str = DEFAULT_IMAGE_FORMATION  # diffsplat | 3dgs (chibisplat/splats/rasterize.py)
    log_every: int

    @property
    def enabled(self) -> bool:
        return (self.gsrecon and self.gsrecon_steps > 0) or (
            self.gsvae and (self.gsvae_steps > 0 or self.gsvae_tiny_decoder_steps > 0))


@dataclass(frozen=True, kw_only=True)
class LatentParams(_Section):
    """params.yaml ``latents:`` (chibisplat/training/latents.py)."""

    packed_dir: Path
    embeddings: Path
    out_dir: Path
    resolution: int  # GSRecon input size; latents are resolution / 8
    render_resolution: int  # stored targets of the rendering loss
    device: str  # auto | cpu | cuda | cuda:<n>: resolved where the encoders are placed (chibisplat/device.py)
    # Autocast of the frozen GSRecon + GSVAE: no | bf16 | fp16 (chibisplat/training/precision.py). The stored latents
    # are float32 either way; a value other than "no" is part of the cache key (the latents differ slightly).
    mixed_precision: str
    splits: tuple[str, ...] = SPLITS
    # Indices into EVEN_VIEW_SETS to encode; None: all 9 (the published recipe). Fewer make a quick smoke run.
    view_sets: tuple[int, ...] | None


@dataclass(frozen=True, kw_only=True)
class TrainParams(_Section):
    """params.yaml ``train:`` (chibisplat/training/train.py)."""

    latents_dir: Path
    embeddings: Path
    packed_dir: Path  # the condition views of the image model (models.image_conditioned)
    out_dir: Path
    metrics_dir: Path
    seed: int
    max_steps: int
    batch_size: int  # objects (x 4 views) per process and micro-batch
    gradient_accumulation_steps: int = 1
    mixed_precision: str  # no | fp16 | bf16 (accelerate)
    allow_tf32: bool = True
    mode: str  # lora | full
    lora_rank: int = 4
    lora_alpha: float = 4
    lr: float
    lr_scheduler: str
    lr_warmup_steps: int
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.01
    adam_epsilon: float = 1.0e-8
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool
    # GPU speed levers (README "GPU speed levers"; benchmarks/bench_gpu_pipeline.py measures them):
    fused_adamw: bool  # torch.optim.AdamW(fused=True): one kernel for all parameters (CUDA; CPU too)
    ema_foreach: bool  # EMA update with torch._foreach_* (one launch per op, not per tensor)
    compile: bool  # torch.compile the UNet's forward in place (weights and their names unchanged)
    dataloader_workers: int  # processes preparing micro-batches ahead of the step (pinned memory on CUDA)
    use_ema: bool
    ema_decay: float
    ema_power: float = 0.75  # warm-up 1 - (1 + step)^-power (DiffSplat's MyEMAModel)
    # null: the model's (DiffSplat): v_prediction with models.image_conditioned, else epsilon (docs/image-to-3d.md §4)
    prediction_type: str | None = None
    # each condition's dropout rate: text -> null embedding (DiffSplat: p = 0.10); the image model also drops the
    # image (zero latent) at this rate, both together half of it (docs/image-to-3d.md §5)
    cfg_dropout: float = 0.1
    diffusion_weight: float = 1.0
    render_weight: float = 1.0
    rendering_loss_prob: float  # DiffSplat: 0 in stage 1, 1 in the "__render" stage
    lpips_weight: float = 1.0
    lpips_weights: Path | None  # local LPIPS-VGG16 file; null: LPIPS term off (logged)
    rasterizer: str = "auto"  # auto | torch | gsplat
    image_formation: str = DEFAULT_IMAGE_FORMATION  # diffsplat | 3dgs (chibisplat/splats/rasterize.py)
    checkpointing_steps: int
    checkpoints_total_limit: int | None
    resume: str  # auto | never
    log_every: int


@dataclass(frozen=True, kw_only=True)
class EvaluateParams(_Section):
    """params.yaml ``evaluate:`` (chibisplat/training/evaluate.py)."""

    packed_dir: Path
    latents_dir: Path
    embeddings: Path
    unet: Path
    metrics: Path
    previews_dir: Path
    view_sets: tuple[int, ...]  # indices into EVEN_VIEW_SETS (0: ring A from slot 0, 6: ring B from 27)
    render_resolution: int
    lpips_weights: Path | None
    steps: int
    guidance: float
    image_guidance: float  # the image model's CFG scale (models.image_conditioned; DiffSplat recommends 2)
    sampler: str
    seed: int
    elevation: float
    distance: float
    opacity_threshold: float = 0.0  # DiffSplat: 0
    rasterizer: str = "auto"
    image_formation: str = DEFAULT_IMAGE_FORMATION  # diffsplat | 3dgs (chibisplat/splats/rasterize.py)
    device: str  # auto: CUDA when present, else the CPU
    val_batches: int  # micro-batches (1 object each) of the val diffusion loss
    clip: SnapshotParams | None  # CLIP ViT-L/14 for the CLIP score (chibisplat/training/clip_score.py)
    resolution: int = derived("latents.resolution")  # the size the latents were encoded at


@dataclass(frozen=True, kw_only=True)
class GenerateParams(_Section):
    """params.yaml ``generate:`` (chibisplat/training/inference.py; ``chibisplat generate`` overrides some)."""

    prompt: str
    unet: Path
    out_dir: Path
    steps: int
    guidance: float
    sampler: str  # DiffSplat's default sde-dpmsolver++; dpmsolver++ | ddim
    seed: int
    elevation: float  # degrees above the object (DiffSplat text-to-3D default)
    distance: float
    render_resolution: int
    turntable_frames: int
    turntable_fps: int
    opacity_threshold: float  # Gaussians at or below are dropped from renders and the PLY (DiffSplat: 0)
    rasterizer: str = "auto"
    image_formation: str = DEFAULT_IMAGE_FORMATION  # diffsplat | 3dgs (chibisplat/splats/rasterize.py)
    device: str  # auto: CUDA when present, else the CPU (chibisplat/device.py)
    # image-to-3D (models.image_conditioned; docs/image-to-3d.md)
    image: Path | None  # a front view on any background; None: text only
    image_guidance: float  # DiffSplat: 7.5 is for text; keep <= 3 for images, 2.0 recommended
    image_elevation: float  # elevation of the input view (DiffSplat README example; our ring-A renders)
    border_ratio: float  # margin around the cut-out character (DiffSplat's rembg_and_center)
    matte_tolerance: float  # border-colour matte of images without alpha (chibisplat/training/image_condition.py)
    resolution: int = derived("latents.resolution")  # latent views are generated at the encoding size


SECTIONS: dict[str, type] = {
    "render": RenderParams,
    "pack": PackParams,
    "embed": EmbedParams,
    "models": ModelsParams,
    "finetune": FinetuneParams,
    "latents": LatentParams,
    "train": TrainParams,
    "evaluate": EvaluateParams,
    "generate": GenerateParams,
}
# cluster: where render and latents run (chibisplat/executors/__init__.py ExecutorConfig, read by those two stages only).
UNTYPED_SECTIONS = ("cluster",)


@dataclass(frozen=True)
class Config:
    """params.yaml, typed: one dataclass per section; a section that was not asked for is None."""

    path: Path = Path(DEFAULT_PATH)
    render: RenderParams | None = None
    pack: PackParams | None = None
    embed: EmbedParams | None = None
    models: ModelsParams | None = None
    finetune: FinetuneParams | None = None
    latents: LatentParams | None = None
    train: TrainParams | None = None
    evaluate: EvaluateParams | None = None
    generate: GenerateParams | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)  # the parsed file (cluster:)


# ---------------------------------------------------------------------------------------------------------------
# The generic builder.


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _strip_optional(hint):
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else hint
    return hint


def _is_path(hint) -> bool:
    base = _strip_optional(hint)
    return isinstance(base, type) and issubclass(base, Path)


def _convert(value, hint, where: str):
    if value is None:
        return None
    base = _strip_optional(hint)
    if isinstance(base, type) and issubclass(base, Path):
        return Path(value)
    if dataclasses.is_dataclass(base):
        if isinstance(value, base):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(base))}")
        return build(base, value, where)
    if typing.get_origin(base) is tuple:
        (item, *_rest) = typing.get_args(base) or (Any,)
        return tuple(_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    return copy.deepcopy(value) if isinstance(value, (dict, list)) else value


def build(cls, values: Mapping[str, Any], where: str, derived_values: Mapping[str, Any] | None = None):
    """``cls`` (a section dataclass) from a mapping of params.yaml keys (presets already applied).

    Paths, tuples and nested sections are converted by field type; keys absent keep the field default; an unknown
    key, a missing required one or a derived one set by hand are a :class:`ConfigError` naming ``where.key``.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    errors = []
    for key in values:
        if key not in fields:
            errors.append(unknown_key_message(key, [n for n, f in fields.items() if DERIVED not in f.metadata], where))
        elif DERIVED in fields[key].metadata:
            errors.append(f"{where}.{key} is derived from {fields[key].metadata[DERIVED]}; set that key instead")
    kwargs = {}
    for name, f in fields.items():
        if DERIVED in f.metadata:
            if derived_values is None or name not in derived_values:
                errors.append(f"{where}.{name}: no value for {f.metadata[DERIVED]} (load that section too)")
            else:
                kwargs[name] = derived_values[name]
        elif name in values:
            kwargs[name] = _convert(values[name], hints[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(f"{where}.{name} is not set; add it to params.yaml")
    if errors:
        raise ConfigError("params.yaml: " + "; ".join(errors))
    return cls(**kwargs)


def plain(obj):
    """A section (or Config part) as JSON-ready params.yaml values: Paths as text, tuples as lists, nested
    sections as mappings. Fingerprints and manifests hash this, so they hash exactly what the raw file held."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Path):
        return os.fspath(obj)
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: plain(v) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------------------------------------------------------
# Presets and the loader.


def model_source(params: Mapping) -> str:
    """``models.source`` of a parsed params file (the preset every presets section applies)."""
    models = params.get("models")
    source = models.get("source") if isinstance(models, Mapping) else None
    if source is None:
        raise ConfigError("params.yaml: models.source is not set; allowed: one of "
                          f"{', '.join(map(repr, MODEL_SOURCES))} (it selects every section's preset)")
    if source not in MODEL_SOURCES:
        raise ConfigError(f"params.yaml: models.source = {source!r} is not allowed; allowed: one of "
                          f"{', '.join(map(repr, MODEL_SOURCES))}")
    return source


def deep_merge(base: Mapping, override: Mapping) -> dict:
    out = copy.deepcopy(dict(base))
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) \
            else copy.deepcopy(v)
    return out


def resolved_section(params: Mapping, name: str) -> dict:
    """``params[name]`` with its preset for ``models.source`` applied underneath (explicit keys win; an explicit
    ``null`` for a key the preset defines means the preset's value, so that ``dvc exp run -S train.lr=3e-4`` finds
    an existing key to override)."""
    if name not in params:
        raise ConfigError(f"params.yaml has no '{name}:' section")
    section = dict(params[name] or {})
    presets = section.pop(PRESETS_KEY, None) or {}
    if not presets:
        return section
    source = model_source(params)
    if source not in presets:
        raise ConfigError(f"params.yaml {name}.{PRESETS_KEY} has no '{source}' preset (models.source); add one")
    preset = presets[source] or {}
    section = {k: v for k, v in section.items() if not (v is None and k in preset)}
    return deep_merge(preset, section)


def _check_moved(params: Mapping, names) -> None:
    for name in names:
        section = params.get(name)
        if not isinstance(section, Mapping):
            continue
        moved = sorted(k for (s, k) in MOVED_KEYS if s == name and k in section)
        if moved:
            raise MovedKeyError(f"params.yaml {name}.{moved[0]} moved: {MOVED_KEYS[(name, moved[0])]}; remove "
                                f"{', '.join(f'{name}.{k}' for k in moved)}")


def config_from_params(params: Mapping, sections=None, path: str | Path = DEFAULT_PATH, validate: bool = True,
                       full: bool = False) -> Config:
    """The :class:`Config` of an already parsed params file (``sections``: these only; None: every typed section
    the file has). ``validate``: check it with the schema first (``full``: with the facts of torch modules too)."""
    names = [n for n in SECTIONS if n in params] if sections is None else list(sections)
    unknown = [n for n in names if n not in SECTIONS and n not in UNTYPED_SECTIONS]
    if unknown:
        raise ConfigError(f"{path}: no section(s) {unknown}; known sections: {', '.join(SCHEMA)}")
    _check_moved(params, names)
    if validate:
        validate_params(params, path, full=full, sections=None if sections is None else names)
    missing = [n for n in names if n not in params]
    if missing:
        raise ConfigError(f"{path} has no {', '.join(repr(n + ':') for n in missing)} section")
    resolved: dict[str, dict] = {}

    def section(name: str) -> dict:
        if name not in resolved:
            resolved[name] = resolved_section(params, name)
        return resolved[name]

    built = {}
    for name in names:
        if name in UNTYPED_SECTIONS:
            continue
        cls = SECTIONS[name]
        derived_values = {}
        for f in dataclasses.fields(cls):
            if DERIVED in f.metadata:
                src_section, src_key = f.metadata[DERIVED].split(".", 1)
                if src_section not in params:
                    raise ConfigError(f"{path}: {name}.{f.name} is {src_section}.{src_key}, but the file has no "
                                      f"'{src_section}:' section")
                derived_values[f.name] = section(src_section).get(src_key)
        built[name] = build(cls, section(name), name, derived_values)
    return Config(path=Path(path), raw=params, **built)


def read_params(path: str | Path = DEFAULT_PATH) -> dict:
    """The parsed params file, not validated: YAML 1.2 (ruamel, as DVC writes it with ``dvc exp run -S``; PyYAML's
    YAML 1.1 would read an unquoted ``no`` as False). A syntax error is a :class:`ConfigError` naming the line."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import MarkedYAMLError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the stages from the repository root (where params.yaml is)")
    try:
        with open(path) as f:
            params = YAML(typ="safe", pure=True).load(f)
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: YAML syntax error: {e.problem or e.context}") from None
    return {} if params is None else params


def load_config(path: str | Path = DEFAULT_PATH, sections=None, full: bool = False) -> Config:
    """params.yaml parsed (YAML 1.2), validated, presets applied, typed (see the module docstring).

    ``sections``: build these only (a stage's ``STAGE_SECTIONS``), and check only these: a bad value in a section
    a stage does not read never blocks it. None: every section of the file.
    """
    return config_from_params(read_params(path), sections, path, validate=True, full=full)


__all__ = [
    "Config", "ConfigError", "EmbedParams", "EvaluateParams", "FinetuneParams", "GenerateParams", "LatentParams",
    "ModelsParams", "MovedKeyError", "PackParams", "RenderParams", "SECTIONS", "SnapshotParams", "TrainParams",
    "build", "config_from_params", "derived", "load_config", "model_source", "plain", "read_params",
    "resolved_section",
]
