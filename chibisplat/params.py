"""Reading ``params.yaml`` (the single source of the pipeline's parameters)."""

from __future__ import annotations

from pathlib import Path

import yaml


def load_params(path: str | Path = "params.yaml") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the stages from the repository root (where params.yaml is)")
    with open(path) as f:
        return yaml.safe_load(f) or {}


def section(name: str, path: str | Path = "params.yaml") -> dict:
    params = load_params(path)
    if name not in params:
        raise KeyError(f"{path} has no '{name}:' section")
    return params[name]
