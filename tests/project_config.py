"""The configuration the tests start from, independent of how this checkout has been used.

A used checkout differs from a fresh clone: ``dvc exp run -S key=value`` (the README's workflow) leaves params.yaml
rewritten by DVC (ruamel round trip: other values, and quotes dropped, so ``"no"`` becomes ``no``), and
``dvc remote add -d ...`` / ``dvc remote modify --local ...`` change .dvc/config / .dvc/config.local. No test reads
those workspace files directly:

* :func:`project_params` is params.yaml parsed as DVC writes it (YAML 1.2) with every value an experiment is
  expected to change put back to the tests' baseline: the tiny models (``models.source: tiny``, seed 0, no image
  conditioning, no fine-tuned modules), each preset-backed key at ``null`` (the preset's value, as committed) and the
  optional fine-tuning off. A test then sets the values it depends on.
* :func:`project_config` / :func:`section_params` / :func:`models_params` are that baseline typed by the loader
  (chibisplat/config.py), with a test's own values as explicit keys (they win over the presets), instead of a
  dataclass's defaults: params.yaml is the one home of every value it sets.
* :func:`committed_text` is a file as the last commit holds it (for tests about the committed defaults themselves:
  the default remote), falling back to the working tree where there is no git history.
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parents[1]
PRESETS_KEY = "presets"

# models: the tests run the tiny, seeded stack on a CPU whatever an experiment selected.
TEST_MODELS = {"source": "tiny", "seed": 0, "image_conditioned": False, "finetuned": None}
# Opt-in switches the README shows as experiments (`dvc exp run -S finetune.gsrecon=true ...`): off for the tests.
TEST_SWITCHES = {"finetune": {"gsrecon": False, "gsvae": False}}


def parse_params(path: Path) -> dict:
    """A params file read as YAML 1.2, like DVC (which writes it) and chibisplat.params (which reads it)."""
    with open(path) as f:
        return YAML(typ="safe", pure=True).load(f) or {}


def baseline(params: dict) -> dict:
    """``params`` with the experiment-prone values put back to the tests' baseline (see the module docstring)."""
    params = copy.deepcopy(params)
    if isinstance(params.get("models"), dict):
        params["models"].update(TEST_MODELS)
    for name, values in TEST_SWITCHES.items():
        if isinstance(params.get(name), dict):
            params[name].update({k: v for k, v in values.items() if k in params[name]})
    for section in params.values():
        presets = section.get(PRESETS_KEY) if isinstance(section, dict) else None
        if isinstance(presets, dict):
            preset_keys = {k for preset in presets.values() if isinstance(preset, dict) for k in preset}
            for key in preset_keys & set(section):
                section[key] = None  # null: the value of the preset models.source selects
    return params


def project_params(path: Path | None = None) -> dict:
    """params.yaml (this repository's, or ``path``) at the tests' baseline; a fresh dict each call."""
    return baseline(parse_params(REPO / "params.yaml" if path is None else path))


def _with(params: dict, name: str, overrides: dict) -> dict:
    from chibisplat.config import deep_merge, plain

    if overrides:  # nested mappings merged key by key; Paths as text, tuples as lists (as params.yaml holds them)
        params[name] = deep_merge(params.get(name) or {}, plain(overrides))
    return params


def project_config(params: dict | None = None, sections=None, validate: bool = False, **source):
    """The typed :class:`~chibisplat.config.Config` of ``params`` (default: :func:`project_params`). ``validate``:
    check it with the schema first (as a stage does); tests that set odd values on purpose leave it off."""
    from chibisplat.config import config_from_params

    params = project_params() if params is None else params
    if source.get("source"):
        params["models"]["source"] = source["source"]
    return config_from_params(params, sections, validate=validate, full=validate)


def section_params(name: str, source: str | None = None, validate: bool = False, **overrides):
    """Section ``name`` of the baseline (``source``: that models.source preset) with ``overrides`` set explicitly."""
    params = _with(project_params(), name, overrides)
    return getattr(project_config(params, (name,), validate, source=source), name)


def models_params(**overrides):
    """The baseline ``models:`` (tiny, seed 0, no fine-tuned modules) with ``overrides`` (nested: key by key)."""
    return section_params("models", **overrides)


def committed_text(rel: str, repo: Path = REPO) -> str:
    """``rel`` as the last commit holds it (a used checkout may have changed it), else the working tree's copy."""
    r = subprocess.run(["git", "show", f"HEAD:{rel}"], cwd=repo, capture_output=True, text=True)
    if r.returncode == 0:
        return r.stdout
    return (repo / rel).read_text()
