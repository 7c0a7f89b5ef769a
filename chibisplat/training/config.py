"""Parameter sections with presets: ``<section>.presets.{tiny,pretrained}`` merged by ``models.source``.

Every training-side section of params.yaml (``latents``, ``train``, ``evaluate``, ``generate``) may hold a
``presets:`` mapping. The preset named by ``models.source`` is the base and the section's other keys win over
it, so ``dvc exp run -S models.source=pretrained`` switches every default at once while
``-S train.lr=3e-5`` still overrides one value::

    train:
      presets:
        tiny:       {lr: 1.0e-3, max_steps: 240}
        pretrained: {lr: 1.0e-4, max_steps: 13020}
      lr: 2.0e-4        # explicit: wins over both presets (null: the preset's value)
"""

from __future__ import annotations

import copy

from chibisplat.config_schema import MODEL_SOURCES


class NonFiniteLoss(FloatingPointError):
    """A training loss became NaN or inf (train and finetune stop with it; the stages print it as an error)."""


def model_source(params: dict) -> str:
    source = (params.get("models") or {}).get("source", "tiny")
    if source not in MODEL_SOURCES:
        raise ValueError(f"params.yaml models.source must be {' or '.join(map(repr, MODEL_SOURCES))}, got {source!r}")
    return source


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def resolved_section(params: dict, name: str) -> dict:
    """``params[name]`` with its preset for ``models.source`` applied underneath (explicit keys win)."""
    if name not in params:
        raise KeyError(f"params.yaml has no '{name}:' section")
    section = dict(params[name] or {})
    presets = section.pop("presets", None) or {}
    source = model_source(params)
    if presets and source not in presets:
        raise KeyError(f"params.yaml {name}.presets has no '{source}' preset (models.source); add one")
    preset = presets.get(source, {})
    # An explicit null for a key the preset defines means "the preset's value": params.yaml declares the keys people
    # sweep (train.lr, ...) as null so that `dvc exp run -S train.lr=3e-4` finds an existing key to override.
    section = {k: v for k, v in section.items() if not (v is None and k in preset)}
    return deep_merge(preset, section)


def check_keys(section: str, values: dict, known: set[str]) -> None:
    unknown = sorted(set(values) - known)
    if unknown:
        raise KeyError(f"params.yaml {section}: unknown key(s) {unknown}; known keys: {sorted(known)}")
