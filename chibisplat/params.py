"""Reading ``params.yaml`` (the single source of the pipeline's parameters)."""

from __future__ import annotations

from pathlib import Path

from ruamel.yaml import YAML


def load_params(path: str | Path = "params.yaml") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the stages from the repository root (where params.yaml is)")
    # YAML 1.2 (ruamel, as DVC writes it with `dvc exp run -S`): PyYAML's YAML 1.1 would read an unquoted
    # `no` as False.
    with open(path) as f:
        return YAML(typ="safe", pure=True).load(f) or {}


def section(name: str, path: str | Path = "params.yaml") -> dict:
    params = load_params(path)
    if name not in params:
        raise KeyError(f"{path} has no '{name}:' section")
    return params[name]
